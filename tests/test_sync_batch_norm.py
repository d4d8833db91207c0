"""nn.SyncBatchNorm inside the fused modules: two CPU processes (gloo), each with part of the
batch (3 images and 1), against one process with the whole batch and plain batch norms: outputs,
input gradients, parameter gradients (summed over the processes, as DDP does up to its average)
and running statistics, in float64."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastmb
from oracle import randomize_batch_norm

SPLIT = [3, 1]  # images per process: uneven, so the statistics' merge must weigh the counts


def build() -> nn.Module:
    torch.manual_seed(0)  # the same parameters in every process
    model = nn.Sequential(fastmb.nn.DWConvBNAct(6, 3, stride=2, activation="hardswish"), fastmb.nn.ConvBNAct(6, 10, 1, activation="relu6"))
    randomize_batch_norm(model)
    return model.double().train()


def eager(model: nn.Module) -> nn.Module:
    """The same parameters in PyTorch's own modules (the state_dict keys are the same)."""
    dw, pw = model[0], model[1]
    depthwise = nn.Sequential(nn.Conv2d(6, 6, 3, 2, 1, groups=6, bias=False), nn.BatchNorm2d(6), nn.Hardswish())
    pointwise = nn.Sequential(nn.Conv2d(6, 10, 1, bias=False), nn.BatchNorm2d(10), nn.ReLU6())
    reference = nn.Sequential(depthwise, pointwise).double()
    reference.load_state_dict(nn.Sequential(dw, pw).state_dict())
    return reference.train()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(sum(SPLIT), 6, 9, 9, dtype=torch.float64, generator=generator) * 2 + 3
    return x, torch.randn(sum(SPLIT), 10, 5, 5, dtype=torch.float64, generator=generator)


def step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = model(x)
    (y * grad).sum().backward()
    return {"y": y.detach(), "grad_x": x.grad, **{f"grad {k}": p.grad for k, p in model.named_parameters()}, **model.state_dict()}


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(build())
        assert isinstance(model[0][1], nn.SyncBatchNorm) and isinstance(model[0], fastmb.nn.DWConvBNAct)
        x, grad = inputs()
        start = sum(SPLIT[:rank])
        with fastmb.dispatch.record_backends() as ran:
            results = step(model, x[start : start + SPLIT[rank]], grad[start : start + SPLIT[rank]])
        assert ran == {"cpu"} or fastmb.backends()["cpu"] != "available", ran  # the fused CPU operators ran
        for key, value in results.items():
            if key.startswith("grad ") and value is not None:
                dist.all_reduce(value)
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_gloo_processes_match_one_process_with_the_whole_batch(tmp_path):
    mp.spawn(worker, args=(len(SPLIT), str(tmp_path / "init"), str(tmp_path)), nprocs=len(SPLIT), join=True)
    x, grad = inputs()
    expected = step(eager(build()), x, grad)
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in range(len(SPLIT))]
    for key, value in expected.items():
        if key in ("y", "grad_x"):
            actual = torch.cat([r[key] for r in ranks])
        else:
            actual = ranks[0][key]
            torch.testing.assert_close(ranks[1][key], actual, rtol=0, atol=0, msg=lambda message: f"{key}, between the processes: {message}")
        torch.testing.assert_close(actual, value, rtol=1e-9, atol=1e-10, msg=lambda message: f"{key}: {message}")

