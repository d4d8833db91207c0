"""fastmb::conv_weight_grad, the CPU weight gradient of a full conv, fastmb::full_conv and
full_conv_input_grad, its forward and input gradient, and _FullConv, the training conv ConvBNAct
and the timm converter run for convs that are neither depthwise nor 1x1: against eager's conv
(float64 to rounding, float32 by DESIGN.md's rule), gradcheck, and the inputs that step aside."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastmb
from fastmb.nn import ConvBNAct, conv_bn_act
from fastmb.nn.conv_bn_act import _FullConv
from oracle import assert_close_to_oracle, randomize_batch_norm, run, threads

pytestmark = pytest.mark.skipif(
    not fastmb._extension.has_kernel("conv_weight_grad", "CPU"), reason="the native CPU operators were not built"
)


def eager_weight_grad(grad_z: Tensor, x: Tensor, weight: Tensor, stride, padding, dilation) -> Tensor:
    return torch.ops.aten.convolution_backward(
        grad_z, x, weight, None, stride, padding, dilation, False, [0, 0], 1, [False, True, False]
    )[1]


# (x shape, C_out, kernel, stride, padding, dilation): MobileNetV4's 3x3 stride-2 convs (one and a
# half vectors of output channels), 5x5 over 3 channels, 1x3 with dilation, asymmetric padding
# (top, bottom, left, right), an image all border, wide padding, no padding, and rows wider than
# the weight gradient's bands of 64 pixels (a band a row).
CASES = [
    ((2, 32, 13, 11), 24, (3, 3), (2, 2), [1, 1], (1, 1)),
    ((3, 3, 10, 12), 5, (5, 5), (1, 1), [2, 2], (1, 1)),
    ((2, 7, 9, 14), 40, (1, 3), (1, 2), [0, 2], (1, 2)),
    ((2, 16, 8, 9), 16, (3, 3), (2, 2), [0, 1, 0, 1], (1, 1)),
    ((1, 4, 2, 1), 8, (3, 3), (1, 1), [1, 1], (1, 1)),
    ((2, 6, 5, 5), 17, (2, 2), (1, 1), [3, 3], (2, 2)),
    ((2, 9, 12, 10), 33, (3, 3), (1, 1), [0, 0], (1, 1)),
    ((1, 5, 4, 150), 8, (3, 3), (1, 1), [1, 1], (1, 1)),
]
CASE_IDS = ["mnv4_stride_2", "5x5_rgb", "1x3_dilated", "asymmetric_padding", "all_border", "wide_padding", "no_padding", "wide_rows"]


def padded_input(x: Tensor, padding: list[int]) -> tuple[Tensor, list[int]]:
    """x and the symmetric padding eager's conv takes for `padding` (two or four sides)."""
    if len(padding) == 2:
        return x, padding
    top, bottom, left, right = padding
    return F.pad(x, [left, right, top, bottom]), [0, 0]


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("shape, out_channels, kernel, stride, padding, dilation", CASES, ids=CASE_IDS)
def test_matches_eager_in_float64(layout, shape, out_channels, kernel, stride, padding, dilation):
    x = torch.randn(shape, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out_channels, shape[1], *kernel, dtype=torch.float64)
    eager_x, eager_padding = padded_input(x, padding)
    z = F.conv2d(eager_x, weight, None, stride, eager_padding, dilation)
    grad_z = torch.randn_like(z).contiguous(memory_format=torch.channels_last)
    ours = torch.ops.fastmb.conv_weight_grad(grad_z, x, list(weight.shape), stride, padding, dilation)
    expected = eager_weight_grad(grad_z, eager_x, weight, stride, eager_padding, dilation)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    assert ours.is_contiguous()


@pytest.mark.parametrize("thread_count", [1, 2])
@pytest.mark.parametrize("offset", [0.0, 50.0], ids=["centred", "offset_input"])
def test_float32_by_the_rule(thread_count, offset):
    """float32 against the float64 oracle by DESIGN.md's 2x rule, over more pixels than one
    float sum holds (kWeightGradPixels) and border pixels batched across rows."""
    x = (torch.randn(4, 32, 42, 40) + offset).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(48, 32, 3, 3)
    grad_z = torch.randn(4, 48, 21, 20).contiguous(memory_format=torch.channels_last)
    args = ((2, 2), [1, 1], (1, 1))
    oracle = {"grad_weight": eager_weight_grad(grad_z.double(), x.double(), weight.double(), *args)}
    with threads(thread_count):
        eager = {"grad_weight": eager_weight_grad(grad_z, x, weight, *args)}
        actual = {"grad_weight": torch.ops.fastmb.conv_weight_grad(grad_z, x, list(weight.shape), *args)}
    assert_close_to_oracle(actual, eager, oracle, torch.float32)


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("shape, out_channels, kernel, stride, padding, dilation", CASES, ids=CASE_IDS)
def test_full_conv_matches_eager(layout, shape, out_channels, kernel, stride, padding, dilation):
    """fastmb::full_conv (float32 only) against the float64 oracle by DESIGN.md's rule; its output
    channels_last whatever x's layout."""
    x = torch.randn(shape) + 0.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out_channels, shape[1], *kernel)
    eager_x, eager_padding = padded_input(x, padding)
    oracle = {"z": F.conv2d(eager_x.double(), weight.double(), None, stride, eager_padding, dilation)}
    eager = {"z": F.conv2d(eager_x, weight, None, stride, eager_padding, dilation)}
    actual = {"z": torch.ops.fastmb.full_conv(x, weight, stride, padding, dilation)}
    assert actual["z"].is_contiguous(memory_format=torch.channels_last)
    assert_close_to_oracle(actual, eager, oracle, torch.float32)


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("shape, out_channels, kernel, stride, padding, dilation", CASES, ids=CASE_IDS)
def test_full_conv_input_grad_matches_eager(layout, shape, out_channels, kernel, stride, padding, dilation):
    """fastmb::full_conv_input_grad (float32 only) against the float64 oracle by DESIGN.md's rule:
    every residue class of columns and rows, the classes no tap reaches (zero), the padding."""
    weight = torch.randn(out_channels, shape[1], *kernel)
    eager_x, eager_padding = padded_input(torch.randn(shape), padding)
    grad_z = torch.randn(F.conv2d(eager_x, weight, None, stride, eager_padding, dilation).shape)
    if layout == "channels_last":
        grad_z = grad_z.contiguous(memory_format=torch.channels_last)
    top, left = (padding[0], padding[2]) if len(padding) == 4 else (0, 0)

    def input_grad(dtype: torch.dtype) -> Tensor:
        full = torch.ops.aten.convolution_backward(
            grad_z.to(dtype), eager_x.to(dtype), weight.to(dtype), None, stride, eager_padding, dilation, False, [0, 0], 1, [True, False, False]
        )[0]
        return full[:, :, top : top + shape[2], left : left + shape[3]]  # the input's part of the padded one

    actual = {"grad_x": torch.ops.fastmb.full_conv_input_grad(grad_z, weight, shape, stride, padding, dilation)}
    assert actual["grad_x"].is_contiguous(memory_format=torch.channels_last)
    assert_close_to_oracle(actual, {"grad_x": input_grad(torch.float32)}, {"grad_x": input_grad(torch.float64)}, torch.float32)


def test_full_conv_opcheck():
    x = torch.randn(2, 8, 9, 7).contiguous(memory_format=torch.channels_last)
    weight, conv = torch.randn(16, 8, 3, 3), ([2, 2], [1, 1], [1, 1])
    torch.library.opcheck(torch.ops.fastmb.full_conv, (x, weight, *conv))
    grad_z = torch.randn(2, 16, 5, 4).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.fastmb.full_conv_input_grad, (grad_z, weight, list(x.shape), *conv))


@pytest.mark.parametrize("thread_count", [1, 2])
def test_full_conv_trains_like_eager(monkeypatch, thread_count):
    """_FullConv with fastmb::full_conv's forward and input gradient (where they pay: float32,
    stride 2, from 16 or more channels into at most 32; forced here on any CPU): a ConvBNAct's
    training step by DESIGN.md's rule against its module stack, over rows longer than a GEMM tile
    and both borders."""
    monkeypatch.setattr(conv_bn_act, "_NATIVE_FULL_CONV", True)
    fused = ConvBNAct(32, 32, 3, 2, activation="relu")
    randomize_batch_norm(fused)
    fused = fused.train().to(memory_format=torch.channels_last)
    eager = nn.Sequential(*copy.deepcopy(list(fused.children())))
    x = torch.randn(3, 32, 33, 30).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(eager[0](x).shape)
    oracle = run(copy.deepcopy(eager).double(), x.double(), grad.double())
    with threads(thread_count):
        baseline, actual = run(eager, x, grad), run(fused, x, grad)
        with torch.profiler.profile() as profile:  # a copy: its step moves the running statistics
            copy.deepcopy(fused)(x.detach().requires_grad_()).sum().backward()
    assert {"fastmb::full_conv", "fastmb::full_conv_input_grad"} <= {event.name for event in profile.events()}
    assert_close_to_oracle(actual, baseline, oracle, torch.float32)


@pytest.mark.parametrize("in_channels, out_channels, stride, used", [(16, 32, 2, True), (3, 32, 2, False), (32, 48, 2, False), (32, 32, 1, False)])
def test_full_conv_only_where_it_pays(monkeypatch, in_channels, out_channels, stride, used):
    """The convs oneDNN ran faster keep it (bench/results/2026-12-07-training-convs.md): an RGB
    stem whose image takes a gradient, wider outputs, stride 1."""
    monkeypatch.setattr(conv_bn_act, "_NATIVE_FULL_CONV", True)
    module = ConvBNAct(in_channels, out_channels, 3, stride, activation="relu").train().to(memory_format=torch.channels_last)
    x = torch.randn(2, in_channels, 9, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.profiler.profile() as profile:
        module(x).sum().backward()
    assert ("fastmb::full_conv" in {event.name for event in profile.events()}) == used


def ran_weight_grad(module: nn.Module, x: Tensor) -> bool:
    with torch.profiler.profile() as profile:
        module(x).sum().backward()
    return "fastmb::conv_weight_grad" in {event.name for event in profile.events()}


@pytest.mark.parametrize("activation", ["relu", "hardswish", "identity"])
@pytest.mark.parametrize("kernel_size, stride", [(3, 2), (5, 1)])
def test_conv_bn_act_training_matches_eager(activation, kernel_size, stride):
    """A full ConvBNAct's training steps (float64, channels_last) equal its module stack's, with
    the weight gradient from the native op; the gradient keeps the weight's layout."""
    fused = ConvBNAct(12, 20, kernel_size, stride, activation=activation)
    randomize_batch_norm(fused)
    fused = fused.double().train().to(memory_format=torch.channels_last)
    eager = nn.Sequential(*copy.deepcopy(list(fused.children())))
    x = torch.randn(3, 12, 11, 10, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        grad = torch.randn(eager[0](x).shape, dtype=torch.float64)  # the conv's alone: no running-statistics update
        ours, theirs = run(fused, x, grad), run(eager, x, grad)
        assert ours.keys() == theirs.keys()
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-9, atol=1e-9, msg=key)
    assert fused[0].weight.grad.stride() == eager[0].weight.grad.stride()
    assert ran_weight_grad(fused, x)


def test_steps_aside_for_hooks_nchw_and_groups():
    """The module's own conv where the native path does not apply: a hooked conv runs its hook,
    an NCHW input and a grouped conv train as eager's."""
    module = ConvBNAct(8, 8, 3, activation="relu").train()
    x = torch.randn(2, 8, 7, 7)
    assert not ran_weight_grad(module, x)  # NCHW
    module = module.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    assert ran_weight_grad(module, x)
    calls = []
    handle = module[0].register_forward_hook(lambda *args: calls.append(1))
    assert not ran_weight_grad(module, x) and calls
    handle.remove()
    grouped = ConvBNAct(8, 8, 3, groups=2, activation="relu").train().to(memory_format=torch.channels_last)
    assert not ran_weight_grad(grouped, x)


def test_gradcheck():
    """_FullConv's backward against finite differences, input and weight, float64."""
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _FullConv.apply(x, w, (2, 2), (1, 1), (1, 1)), (x, weight))


def test_double_backward():
    """create_graph: second derivatives as conv2d's own."""
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w: _FullConv.apply(x, w, (1, 1), (1, 1), (1, 1)), (x, weight))
