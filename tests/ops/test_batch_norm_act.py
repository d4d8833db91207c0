"""fastmb::batch_norm_act, the CPU training batch norm + activation of ConvBNAct and of the timm
convs fastmb.convert swaps: against eager's F.batch_norm + activation (float64 exactly, float32
by DESIGN.md's rule), gradcheck, running statistics, and the layouts and dtypes that step aside."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmb
from fastmb.nn import ConvBNAct
from fastmb.nn.conv_bn_act import _BatchNormActivation
from fastmb.ops.activations import ACTIVATIONS
from oracle import assert_close_to_oracle, clone_as, randomize_batch_norm, run, threads

pytestmark = pytest.mark.skipif(
    not fastmb._extension.has_kernel("batch_norm_act", "CPU"), reason="the native CPU operators were not built"
)


def ran_native(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether a training step of `module` on x called the native forward and backward."""
    with torch.profiler.profile() as profile:
        module(x.detach().requires_grad_()).sum().backward()
    names = {event.name for event in profile.events()}
    return {"fastmb::batch_norm_act", "fastmb::batch_norm_act_backward"} <= names


def conv_bn_act(in_channels: int, out_channels: int, kernel_size: int, activation: str, momentum: float | None = 0.1) -> ConvBNAct:
    module = ConvBNAct(in_channels, out_channels, kernel_size, activation=activation, norm_layer=lambda c: nn.BatchNorm2d(c, momentum=momentum))
    randomize_batch_norm(module)
    return module.train()


SHAPES = [((3, 6, 5, 7), 37, 1), ((2, 5, 9, 9), 16, 3), ((4, 9, 1, 1), 20, 1), ((1, 4, 2, 1), 3, 1)]


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["channels_last", "contiguous"])
@pytest.mark.parametrize("shape, out_channels, kernel_size", SHAPES, ids=["37_channels", "3x3_conv", "1x1_pixels", "2_values"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_steps_match_eager_in_float64(activation, memory_format, shape, out_channels, kernel_size, momentum):
    """Two training steps (momentum=None averages over num_batches_tracked): output, gradients
    and running statistics equal the plain module stack's; channels_last runs the native op."""
    fused = conv_bn_act(shape[1], out_channels, kernel_size, activation, momentum).double()
    eager = nn.Sequential(*copy.deepcopy(list(fused.children())))
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 3).contiguous(memory_format=memory_format)
    for _ in range(2):
        grad = torch.randn(shape[0], out_channels, *shape[2:], dtype=torch.float64)
        ours, theirs = run(fused, x, grad), run(eager, x, grad)
        assert ours.keys() == theirs.keys()
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-9, atol=1e-9, msg=key)
        assert ours["y"].is_contiguous(memory_format=memory_format)
    native = memory_format == torch.channels_last or shape[2:] == (1, 1)
    assert ran_native(fused, x) == native


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("thread_count", [1, 2])
@pytest.mark.parametrize("offset", [0.0, 300.0], ids=["centred", "mean_far_above_std"])
def test_float32_by_the_rule(activation, thread_count, offset):
    """float32, channels_last, against the float64 oracle by DESIGN.md's 2x rule; the offset puts
    every channel's mean far above its standard deviation (the statistics must not lose it)."""
    fused = conv_bn_act(24, 40, 1, activation)
    with torch.no_grad():
        fused[0].weight.abs_()  # positive weights carry the offset into z's mean
    eager = nn.Sequential(*copy.deepcopy(list(fused.children())))
    x = torch.randn(4, 24, 13, 11) + offset
    grad = torch.randn(4, 40, 13, 11)
    oracle = run(clone_as(eager, torch.float64), x.double(), grad.double())
    with threads(thread_count):
        baseline = run(clone_as(eager, torch.float32, torch.channels_last), x.contiguous(memory_format=torch.channels_last), grad)
        actual = run(clone_as(fused, torch.float32, torch.channels_last), x.contiguous(memory_format=torch.channels_last), grad)
    assert_close_to_oracle(actual, baseline, oracle, torch.float32)


@pytest.mark.parametrize("activation", ["identity", "silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck(activation, affine):
    """The native backward against finite differences (float64; the smooth activations, so no
    difference straddles a kink)."""
    z = torch.randn(2, 5, 3, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(5, dtype=torch.float64, requires_grad=True) if affine else None
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True) if affine else None

    def function(z, *affine_parameters):
        return _BatchNormActivation.apply(z, *(affine_parameters or (None, None)), None, None, 0.0, 1e-5, activation)

    assert torch.autograd.gradcheck(function, (z, weight, bias) if affine else (z,))


def test_double_backward_differentiates_the_batch_statistics():
    """create_graph: the second derivative through the batch statistics, as eager's."""
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight, bias = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    grads = []
    for function in (
        lambda z: _BatchNormActivation.apply(z, weight, bias, None, None, 0.0, 1e-5, "silu"),
        lambda z: F.silu(F.batch_norm(z, None, None, weight, bias, True, 0.0, 1e-5)),
    ):
        (first,) = torch.autograd.grad(function(z).pow(2).sum(), z, create_graph=True)
        grads.append(torch.autograd.grad(first.sum(), z)[0])
    torch.testing.assert_close(grads[0], grads[1])


def test_one_value_per_channel_is_refused_as_eager_does():
    module = conv_bn_act(4, 6, 1, "relu")
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        module(torch.randn(1, 4, 1, 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_other_dtypes_step_aside(dtype):
    """Half dtypes keep the ATen batch norm (no native op), under DESIGN.md's rule."""
    fused = conv_bn_act(6, 8, 1, "hardswish")
    eager = nn.Sequential(*copy.deepcopy(list(fused.children())))
    x, grad = torch.randn(2, 6, 5, 5), torch.randn(2, 8, 5, 5)
    cast = x.to(dtype).contiguous(memory_format=torch.channels_last)
    assert not ran_native(clone_as(fused, dtype, torch.channels_last), cast)
    oracle = run(clone_as(eager, torch.float64), x.double(), grad.double())
    baseline = run(clone_as(eager, dtype, torch.channels_last), cast, grad)
    actual = run(clone_as(fused, dtype, torch.channels_last), cast, grad)
    assert_close_to_oracle(actual, baseline, oracle, dtype)
