"""What each benchmark provider runs: eager PyTorch (NCHW or channels_last), torch.compile of
the eager module, or the fastmb module; and the timed step (eval forward, or train forward
and backward)."""

import torch
from torch import nn


def provider_module(provider: str, eager: nn.Module, fused: nn.Module) -> tuple[nn.Module, torch.memory_format]:
    """The module `provider` times, and the memory format of its input."""
    if provider == "eager":
        return eager, torch.contiguous_format
    if provider == "eager_cl":
        return eager.to(memory_format=torch.channels_last), torch.channels_last
    if provider == "compile":
        return torch.compile(eager.to(memory_format=torch.channels_last)), torch.channels_last
    return fused.to(memory_format=torch.channels_last), torch.channels_last


def step(module: nn.Module, x: torch.Tensor, mode: str):
    """eval: a forward pass without grad; train: forward and backward with batch statistics."""
    if mode == "eval":
        module.eval()

        def run():
            with torch.no_grad():
                return module(x)

        return run
    module.train()
    x = x.requires_grad_()
    grad = torch.randn_like(module(x))

    def run():
        module(x).backward(grad)

    return run
