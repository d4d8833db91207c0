"""fastmb::stem_conv_bn_act, the CPU training conv + batch norm + activation of a stem (a full
conv over few input channels whose input takes no gradient), as ConvBNAct and the timm stems
run it: against eager's Conv2d + BatchNorm2d + activation (float64 exactly, float32 by
DESIGN.md's rule), gradcheck, running statistics, and the inputs that step aside."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastmb
from fastmb.nn import ConvBNAct
from fastmb.nn.conv_bn_act import _StemConvBNAct
from fastmb.ops.activations import ACTIVATIONS
from oracle import assert_close_to_oracle, clone_as, randomize_batch_norm, threads

pytestmark = pytest.mark.skipif(
    not fastmb._extension.has_kernel("stem_conv_bn_act", "CPU"), reason="the native CPU operators were not built"
)


def step(module: nn.Module, x: Tensor, grad: Tensor) -> dict[str, Tensor]:
    """Output, parameter grads and buffers after one training step on an x without gradient."""
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(grad.to(y.dtype))
    results = {"y": y.detach()}
    results.update({f"grad_{name}": p.grad for name, p in module.named_parameters()})
    results.update({name: b.detach().clone() for name, b in module.named_buffers() if b.is_floating_point()})
    return results


def ran_native(module: nn.Module, x: Tensor) -> bool:
    """Whether a training step of `module` on x called the native forward and backward."""
    with torch.profiler.profile() as profile:
        module(x).sum().backward()
    names = {event.name for event in profile.events()}
    return {"fastmb::stem_conv_bn_act", "fastmb::stem_conv_bn_act_backward"} <= names


def stem(in_channels: int, out_channels: int, kernel_size: int, stride: int, activation: str, momentum: float | None = 0.1) -> ConvBNAct:
    norm = lambda c: nn.BatchNorm2d(c, momentum=momentum)  # noqa: E731
    module = ConvBNAct(in_channels, out_channels, kernel_size, stride, activation=activation, norm_layer=norm)
    randomize_batch_norm(module)
    return module.train().to(memory_format=torch.channels_last)  # the layout fastmb's builders and convert give


# (x shape, out channels, kernel, stride): MobileNet's stem (odd sizes), channel counts that fill
# 3, 5 (4 + 1) and part of one vector, one input channel at kernel 5, and an image all border.
SHAPES = [
    ((2, 3, 17, 15), 16, 3, 2),
    ((3, 3, 10, 12), 24, 3, 1),
    ((2, 4, 15, 15), 40, 3, 2),
    ((2, 1, 9, 11), 5, 5, 2),
    ((3, 3, 2, 1), 8, 3, 2),
]
SHAPE_IDS = ["stem", "24_channels", "40_channels", "5x5_one_channel", "all_border"]


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("layout", ["nchw_image", "channels_last"])
@pytest.mark.parametrize("shape, out_channels, kernel_size, stride", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_steps_match_eager_in_float64(activation, layout, shape, out_channels, kernel_size, stride, momentum):
    """Two training steps (momentum=None averages over num_batches_tracked): output, gradients
    and running statistics equal the plain module stack's, through the native op."""
    fused = stem(shape[1], out_channels, kernel_size, stride, activation, momentum).double()
    eager = nn.Sequential(*copy.deepcopy(list(fused.children())))
    x = torch.randn(shape, dtype=torch.float64) * 2 + 3
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        grad = torch.randn(F.conv2d(x, eager[0].weight, None, stride, kernel_size // 2).shape, dtype=torch.float64)
        ours, theirs = step(fused, x, grad), step(eager, x, grad)
        assert ours.keys() == theirs.keys()
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-9, atol=1e-9, msg=key)
        assert ours["y"].is_contiguous(memory_format=torch.channels_last)
    assert ran_native(fused, x)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("thread_count", [1, 2])
@pytest.mark.parametrize("offset", [0.0, 300.0], ids=["centred", "mean_far_above_std"])
def test_float32_by_the_rule(activation, thread_count, offset):
    """float32 against the float64 oracle by DESIGN.md's 2x rule; the offset puts every
    channel's mean far above its standard deviation (the statistics must not lose it)."""
    fused = stem(3, 32, 3, 2, activation)
    with torch.no_grad():
        fused[0].weight.abs_()  # positive weights carry the offset into z's mean
    eager = nn.Sequential(*copy.deepcopy(list(fused.children())))
    x, grad = torch.randn(4, 3, 33, 31) + offset, torch.randn(4, 32, 17, 16)
    oracle = step(clone_as(eager, torch.float64), x.double(), grad.double())
    with threads(thread_count):
        baseline = step(clone_as(eager, torch.float32, torch.channels_last), x, grad)
        actual = step(clone_as(fused, torch.float32, torch.channels_last), x, grad)
    assert_close_to_oracle(actual, baseline, oracle, torch.float32)


@pytest.mark.parametrize("activation", ["identity", "silu", "gelu", "hardswish"])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck(activation, affine):
    """The native backward against finite differences in float64."""
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    weight = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(5, dtype=torch.float64, requires_grad=True) if affine else None
    beta = torch.randn(5, dtype=torch.float64, requires_grad=True) if affine else None

    def function(weight, *affine_parameters):
        bn = affine_parameters or (None, None)
        return _StemConvBNAct.apply(x, weight, *bn, None, None, 0.0, 1e-5, activation, ((2, 2), (1, 1), (1, 1)))

    assert torch.autograd.gradcheck(function, (weight, gamma, beta) if affine else (weight,))


def test_double_backward_differentiates_the_batch_statistics():
    """create_graph: the second derivative through the batch statistics, as eager's."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    gamma, beta = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    grads = []
    for function in (
        lambda w: _StemConvBNAct.apply(x, w, gamma, beta, None, None, 0.0, 1e-5, "silu", ((2, 2), (1, 1), (1, 1))),
        lambda w: F.silu(F.batch_norm(F.conv2d(x, w, None, 2, 1), None, None, gamma, beta, True, 0.0, 1e-5)),
    ):
        (first,) = torch.autograd.grad(function(weight).pow(2).sum(), weight, create_graph=True)
        grads.append(torch.autograd.grad(first.sum(), weight)[0])
    torch.testing.assert_close(grads[0], grads[1])


def test_one_value_per_channel_is_refused_as_eager_does():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        stem(3, 8, 3, 2, "relu")(torch.randn(1, 3, 2, 2))


def test_weight_changes_between_steps_are_used():
    """Nothing is cached: an in-place change of the conv weight is seen by the next step."""
    fused = stem(3, 8, 3, 2, "relu").double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    before = fused(x).detach()
    with torch.no_grad():
        fused[0].weight.mul_(-1.5)
    eager = nn.Sequential(*copy.deepcopy(list(fused.children())))
    after = fused(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, eager(x), rtol=1e-9, atol=1e-9)


# What the native op does not take, run through eager's modules (under DESIGN.md's rule): an
# input that takes a gradient, a layout that stays NCHW, more input channels, a padding mode,
# half dtypes and autocast.
STEP_ASIDE = {
    "x_requires_grad": lambda m, x: (m, x.requires_grad_()),
    "nchw_weight_and_x": lambda m, x: (m.to(memory_format=torch.contiguous_format), x),
    "five_input_channels": lambda m, x: (stem(5, 8, 3, 2, "hardswish"), torch.randn(2, 5, 9, 9)),
    "reflect_padding": lambda m, x: (setattr(m[0], "padding_mode", "reflect") or m, x),
    "bfloat16": lambda m, x: (m.bfloat16(), x.bfloat16()),
}


@pytest.mark.parametrize("case", list(STEP_ASIDE))
def test_unsupported_inputs_step_aside(case):
    module, x = STEP_ASIDE[case](stem(3, 8, 3, 2, "hardswish"), torch.randn(2, 3, 9, 9))
    assert not ran_native(module, x)
    eager = nn.Sequential(*copy.deepcopy(list(module.children())))
    y, expected = module(x), eager(x)
    tolerance = 2e-2 if x.dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y, expected, rtol=tolerance, atol=tolerance)


def test_autocast_steps_aside():
    module = stem(3, 8, 3, 2, "hardswish")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ran_native(module, torch.randn(2, 3, 9, 9))


def test_opcheck():
    """torch.library.opcheck on the operators (schema, fake tensor, AOT dispatch); their
    autograd is the module's autograd function's."""
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    x, weight, gamma, beta = torch.randn(2, 3, 9, 8), torch.randn(6, 3, 3, 3), torch.rand(6) + 0.5, torch.randn(6)
    conv = ([2, 2], [1, 1], [1, 1])
    torch.library.opcheck(torch.ops.fastmb.stem_conv_bn_act.default, (x, weight, gamma, beta, *conv, 1e-5, "hardswish"), test_utils=checks)
    y, mean, var = torch.ops.fastmb.stem_conv_bn_act(x, weight, gamma, beta, *conv, 1e-5, "hardswish")
    for mask in ([True, True], [True, False], [False, True]):
        args = (torch.randn_like(y), x, weight, gamma, beta, mean, var, *conv, 1e-5, "hardswish", mask)
        torch.library.opcheck(torch.ops.fastmb.stem_conv_bn_act_backward.default, args, test_utils=checks)


@pytest.mark.parametrize("layout", ["nchw_image", "channels_last"])
def test_rectangular_kernel_stride_dilation_and_padding(layout):
    """Any nn.Conv2d geometry: a 3x5 kernel, strides 2 and 3, dilations 2 and 1, paddings 2 and 3
    (border runs on every side), against eager in float64."""
    conv = nn.Conv2d(3, 12, (3, 5), stride=(2, 3), padding=(2, 3), dilation=(2, 1), bias=False)
    fused = ConvBNAct.from_modules(conv, nn.BatchNorm2d(12), nn.Hardswish()).double().train().to(memory_format=torch.channels_last)
    randomize_batch_norm(fused)
    eager = nn.Sequential(*copy.deepcopy(list(fused.children())))
    x = torch.randn(3, 3, 19, 23, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(eager[0](x).shape, dtype=torch.float64)
    ours, theirs = step(fused, x, grad), step(eager, x, grad)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-9, atol=1e-9, msg=key)
    assert ran_native(fused, x)
