"""BN statistics for randomly initialised models: what the parity checks (python -m fastmb,
tests, benchmarks) need so that eval outputs depend on every layer, without downloading weights."""

import torch
from torch import nn


def calibrate_batch_norm(model: nn.Module, resolution: int = 224, batches: int = 2) -> nn.Module:
    """Gives a randomly initialised model realistic BN statistics (averages over a few random
    batches) and random BN affine parameters, so that eval outputs depend on every layer."""
    generator = torch.Generator().manual_seed(0)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
        bn.weight.data.uniform_(0.5, 1.5, generator=generator)
        bn.bias.data.uniform_(-0.2, 0.2, generator=generator)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(4, 3, resolution, resolution, generator=generator))
    for bn, momentum in zip(norms, momenta):
        bn.momentum = momentum
    return model.eval()
