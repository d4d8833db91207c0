"""torch.compile(fullgraph=True) traces fastmb modules without graph breaks, and the compiled
model computes what the eager one does: outputs, gradients, running statistics."""

import copy

import pytest
import torch
from torch import nn

import fastmb
from oracle import randomize_batch_norm, under_interpreter


def small_stack() -> nn.Module:
    stack = nn.Sequential(
        nn.Conv2d(3, 8, 1),
        fastmb.nn.DWConvBNAct(8, 3, stride=2),
        fastmb.nn.SqueezeExcitation(8, 4),
        fastmb.nn.DWConvBNAct(8, 5, activation="relu"),
        nn.Conv2d(8, 4, 1),
    )
    randomize_batch_norm(stack)
    return stack


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fullgraph_compile_matches_eager(backend, device, training):
    if under_interpreter(backend, device):
        pytest.skip("torch.compile traces Triton kernels on CUDA tensors only; the interpreter runs them eagerly")
    eager = small_stack().to(device).train(training)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    for _ in range(2):
        x = torch.randn(2, 3, 12, 12, device=device)
        expected, actual = eager(x), compiled(x)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        if training:
            expected.square().sum().backward()
            actual.square().sum().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled_module.parameters()):
        if training:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-4, msg=name)
    for (name, b), c in zip(eager.named_buffers(), compiled_module.buffers()):
        torch.testing.assert_close(c, b, msg=name)


def test_fullgraph_compile_with_inductor_on_cpu():
    """The default backend (Inductor) too, once, in eval: fake kernels give the right metadata."""
    model = small_stack().eval()
    x = torch.randn(1, 3, 16, 16)
    with fastmb.use_backend("reference"):
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), atol=1e-5, rtol=1e-5)
