"""ConvBNAct: a drop-in for torchvision's Conv2dNormActivation (pointwise and full convs) that
folds the batch norm into the conv in eval and keeps less for backward in training."""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmb import _extension
from fastmb.nn.batch_norm import batch_norm_step, synced_batch_norm, synchronised
from fastmb.ops.activations import ACTIVATIONS, activation_name
from fastmb.ops.common import (
    autocast_dtype,
    batch_norm_affine,
    bn_affine,
    check_choice,
    conv_output_shape,
    differentiable_grads,
    frozen_batch_norm,
    integer,
    runs_composite,
    symbolic,
    torchvision_frozen_batch_norm,
    update_running_stats,
)
from fastmb.ops.inverted_residual import has_hooks, needs_call

_NATIVE_FOLD = _extension.has_kernel("fold_conv_bn", "CPU")
_NATIVE_CONV1X1 = _extension.has_kernel("conv1x1_bn_act", "CPU")
_NATIVE_BN_ACT = _extension.has_kernel("batch_norm_act", "CPU")
_NATIVE_STEM = _extension.has_kernel("stem_conv_bn_act", "CPU")
_NATIVE_CONV_WEIGHT_GRAD = _extension.has_kernel("conv_weight_grad", "CPU")
# fastmb::full_conv and its input gradient where they measured faster than oneDNN's (AVX-512,
# Zen 4, 2 threads): stride 2 from 16-64 channels into at most 32, MobileNetV4's first 3x3 conv
# (32 -> 32, 112x112 in, batch 16) 1.23x and 1.06-1.09x; into 48-96 channels, at stride 1 or
# from 3 channels oneDNN's matched them or won by up to 15%
# (bench/results/2026-12-07-training-convs.md).
_HAS_FULL_CONV = _extension.has_kernel("full_conv", "CPU")
_NATIVE_FULL_CONV = _HAS_FULL_CONV and torch.backends.cpu.get_cpu_capability() == "AVX512"
# Input channels up to which a full conv in training runs as fastmb::stem_conv_bn_act: z costs
# C_in * kH * kW multiply-adds a value to recompute, less than storing it (RGB stems: 27).
_STEM_MAX_IN_CHANNELS = 4
# Pixels (batch x height x width) up to which a folded 1x1 conv on the CPU runs as a GEMM.
_MATMUL_MAX_PIXELS = 1024


class _BatchNormActivation(torch.autograd.Function):
    """act(batch_norm(z)) in training with batch statistics, saving only z and the per-channel
    statistics for backward: u = batch_norm(z) is recomputed there instead of being kept, as
    eager's activation keeps it. Running statistics are updated as F.batch_norm does. On the CPU
    (float32/64, channels_last) forward and backward are one native op each
    (fastmb::batch_norm_act: two passes over z each way, against eager's nine)."""

    @staticmethod
    def forward(ctx, z, weight, bias, running_mean, running_var, momentum, eps, activation):
        ctx.eps, ctx.activation, ctx.native = eps, activation, _native_batch_norm_act(z)
        if ctx.native:
            y, mean, var = torch.ops.fastmb.batch_norm_act(z, weight, bias, eps, activation)
            if running_mean is not None:
                update_running_stats(running_mean, running_var, mean, var, z.numel() // z.shape[1], momentum)
            ctx.save_for_backward(z, weight, bias, mean, var)
            return y
        u, mean, invstd = torch.native_batch_norm(z, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(z, weight, bias, mean, invstd)
        in_place = ACTIVATIONS[activation].in_place  # u is this function's own: no second activation-sized tensor
        return in_place(u) if in_place is not None else ACTIVATIONS[activation].forward(u)

    @staticmethod
    def backward(ctx, grad_y):
        z, weight, bias, mean, spread = ctx.saved_tensors  # spread: the native op's var, else invstd
        if torch.is_grad_enabled():  # create_graph: differentiate the batch statistics too
            act = ACTIVATIONS[ctx.activation].forward
            grads = differentiable_grads(
                lambda z, w, b: act(F.batch_norm(z, None, None, w, b, True, 0.0, ctx.eps)), (z, weight, bias), ctx.needs_input_grad[:3], grad_y
            )
            return (*grads, None, None, None, None, None)
        affine_grads = (weight is not None and ctx.needs_input_grad[1]) or (bias is not None and ctx.needs_input_grad[2])
        if ctx.native:
            grad_z, grad_weight, grad_bias = torch.ops.fastmb.batch_norm_act_backward(
                grad_y, z, weight, bias, mean, spread, ctx.eps, ctx.activation, [ctx.needs_input_grad[0], affine_grads]
            )
            return (
                grad_z if ctx.needs_input_grad[0] else None,
                grad_weight if affine_grads and ctx.needs_input_grad[1] else None,
                grad_bias if affine_grads and ctx.needs_input_grad[2] else None,
                None, None, None, None, None,
            )  # fmt: skip
        gamma, beta = bn_affine(weight, bias, spread)
        scale = spread * gamma
        shape = (1, -1, 1, 1)
        u = z * scale.reshape(shape).to(z.dtype) + (beta - mean * scale).reshape(shape).to(z.dtype)
        grad_u = ACTIVATIONS[ctx.activation].backward(grad_y, u)
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
        grad_z, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_u, z, weight, None, None, mean, spread, True, ctx.eps, mask
        )
        return grad_z, grad_weight, grad_bias, None, None, None, None, None


class _StemConvBNAct(torch.autograd.Function):
    """act(batch_norm(conv(x))) in training with batch statistics for a stem conv (few input
    channels, x without gradient) as fastmb::stem_conv_bn_act: z is recomputed in each of the
    four passes, never stored, and nothing stem-sized is saved for backward but x itself."""

    @staticmethod
    def forward(ctx, x, weight, bn_weight, bn_bias, running_mean, running_var, momentum, eps, activation, conv_args):
        y, mean, var = torch.ops.fastmb.stem_conv_bn_act(x, weight, bn_weight, bn_bias, *conv_args, eps, activation)
        if running_mean is not None:
            update_running_stats(running_mean, running_var, mean, var, y.numel() // y.shape[1], momentum)
        ctx.save_for_backward(x, weight, bn_weight, bn_bias, mean, var)
        ctx.eps, ctx.activation, ctx.conv_args = eps, activation, conv_args
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bn_weight, bn_bias, mean, var = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: differentiate the batch statistics too
            act = ACTIVATIONS[ctx.activation].forward
            stride, padding, dilation = ctx.conv_args
            grads = differentiable_grads(
                lambda w, g, b: act(F.batch_norm(F.conv2d(x, w, None, stride, padding, dilation), None, None, g, b, True, 0.0, ctx.eps)),
                (weight, bn_weight, bn_bias), needs[1:4], grad_y,
            )  # fmt: skip
            return (None, *grads, *([None] * 6))
        affine = (bn_weight is not None and needs[2]) or (bn_bias is not None and needs[3])
        grad_weight, grad_bn_weight, grad_bn_bias = torch.ops.fastmb.stem_conv_bn_act_backward(
            grad_y, x, weight, bn_weight, bn_bias, mean, var, *ctx.conv_args, ctx.eps, ctx.activation, [needs[1], affine]
        )
        return (
            None,
            grad_weight if needs[1] else None,
            grad_bn_weight if affine and needs[2] else None,
            grad_bn_bias if affine and needs[3] else None,
            *([None] * 6),
        )


class _FullConv(torch.autograd.Function):
    """conv2d(x, weight) (no groups, no bias) whose weight gradient is fastmb::conv_weight_grad:
    the forward and the input gradient stay oneDNN's but for the narrow stride-2 convs, where
    fastmb::full_conv's are faster. On MobileNetV4's 3x3 stride-2 convs over 32 channels
    oneDNN's weight gradient took 6.5-6.8 ms a batch of 16, this 5.1 (2 threads)."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation):
        ctx.conv_args = (stride, padding, dilation)
        ctx.save_for_backward(x, weight)
        if _patch_conv(x, weight, stride):
            return torch.ops.fastmb.full_conv(x, weight, stride, padding, dilation)
        return F.conv2d(x, weight, None, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad_z):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conv_args
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: through conv2d itself
            grads = differentiable_grads(lambda x, w: F.conv2d(x, w, None, stride, padding, dilation), (x, weight), needs[:2], grad_z)
            return (*grads, None, None, None)
        grad_x = None
        if needs[0] and _patch_conv(x, weight, stride):
            grad_x = torch.ops.fastmb.full_conv_input_grad(grad_z, weight, x.shape, stride, padding, dilation)
        elif needs[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_z, x, weight, None, stride, padding, dilation, False, [0, 0], 1, [True, False, False]
            )[0]
        grad_weight = None
        if needs[1]:
            grad_weight = torch.ops.fastmb.conv_weight_grad(grad_z, x, weight.shape, stride, padding, dilation)
            if weight.is_contiguous(memory_format=torch.channels_last):  # the parameter's layout, as eager's gradient has it
                grad_weight = grad_weight.contiguous(memory_format=torch.channels_last)
        return grad_x, grad_weight, None, None, None


def _patch_conv(x: Tensor, weight: Tensor, stride: tuple[int, int]) -> bool:
    """Whether _FullConv's forward and input gradient are fastmb::full_conv's (float32, stride 2,
    16 or more input channels into at most 32, an AVX-512 CPU) rather than oneDNN's. (An RGB
    stem whose image takes a gradient: oneDNN's forward was 1.15x faster.)"""
    return _NATIVE_FULL_CONV and x.dtype == torch.float32 and tuple(stride) == (2, 2) and weight.shape[1] >= 16 and weight.shape[0] <= 32


def _plain_cpu_conv(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether conv(x) is a plain nn.Conv2d without groups or bias, with numeric zero padding, on a
    CPU float32/64 x (N, C, H, W) of the weight's dtype, outside autocast: what the native
    training conv ops take."""
    return (
        type(conv) is nn.Conv2d
        and conv.groups == 1
        and conv.bias is None
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype in (torch.float32, torch.float64)
        and conv.weight.dtype == x.dtype
        and autocast_dtype("cpu") is None
    )


def _full_conv(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether conv(x) in training runs as _FullConv: a plain CPU conv larger than 1x1 over a
    channels_last x, without hooks."""
    return (
        _NATIVE_CONV_WEIGHT_GRAD
        and _plain_cpu_conv(conv, x)
        and conv.kernel_size != (1, 1)
        and x.is_contiguous(memory_format=torch.channels_last)
        and not has_hooks(conv)
    )


def _stem_conv(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether conv(x) in training runs as fastmb::stem_conv_bn_act: a plain CPU conv over at most
    four channels, on an x that takes no gradient, whose output channels_last is (its weight or x
    is, as conv's output would be)."""
    return (
        _NATIVE_STEM
        and _plain_cpu_conv(conv, x)
        and conv.in_channels <= _STEM_MAX_IN_CHANNELS
        and not x.requires_grad
        and (x.is_contiguous(memory_format=torch.channels_last) or conv.weight.is_contiguous(memory_format=torch.channels_last))
    )


def _native_batch_norm_act(z: Tensor) -> bool:
    """Whether fastmb::batch_norm_act runs the training batch norm of z: CPU, float32/64,
    channels_last (the op would copy other layouts into it)."""
    return (
        _NATIVE_BN_ACT
        and z.device.type == "cpu"
        and z.dtype in (torch.float32, torch.float64)
        and z.dim() == 4
        and z.is_contiguous(memory_format=torch.channels_last)
    )


def fold_conv_bn(weight: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(weight * scale, beta - mean * scale) per output channel, scale = gamma / sqrt(var + eps):
    an eval batch norm folded into the conv before it. On the CPU one native call
    (fastmb::fold_conv_bn): six ATen calls cost about 17 us a layer, most of the fold's time."""
    if weight.device.type == "cpu" and _NATIVE_FOLD:
        return torch.ops.fastmb.fold_conv_bn(weight, gamma, beta, mean, var, eps)
    scale = gamma * torch.rsqrt(var + eps)
    return weight * scale.reshape(-1, *[1] * (weight.dim() - 1)).to(weight.dtype), (beta - mean * scale).to(weight.dtype)


if _NATIVE_FOLD:

    @torch.library.register_fake("fastmb::fold_conv_bn")
    def _fold_conv_bn_fake(weight, gamma, beta, mean, var, eps):
        return torch.empty_like(weight), weight.new_empty(weight.shape[0])

    @torch.library.register_fake("fastmb::conv1x1_bn_act")
    def _conv1x1_bn_act_fake(x, weight, gamma, beta, mean, var, eps, activation):
        n, _, h, w = x.shape
        return x.new_empty(n, weight.shape[0], h, w).contiguous(memory_format=torch.channels_last)


if _NATIVE_CONV_WEIGHT_GRAD:

    @torch.library.register_fake("fastmb::conv_weight_grad")
    def _conv_weight_grad_fake(grad_z, x, weight_size, stride, padding, dilation):
        return x.new_empty(weight_size)


if _HAS_FULL_CONV:

    @torch.library.register_fake("fastmb::full_conv")
    def _full_conv_fake(x, weight, stride, padding, dilation):
        return x.new_empty(conv_output_shape(x, weight, stride, padding, dilation)).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake("fastmb::full_conv_input_grad")
    def _full_conv_input_grad_fake(grad_z, weight, x_size, stride, padding, dilation):
        return grad_z.new_empty(x_size).contiguous(memory_format=torch.channels_last)


if _NATIVE_STEM:

    @torch.library.register_fake("fastmb::stem_conv_bn_act")
    def _stem_conv_bn_act_fake(x, weight, bn_weight, bn_bias, stride, padding, dilation, eps, activation):
        y = x.new_empty(conv_output_shape(x, weight, stride, padding, dilation)).contiguous(memory_format=torch.channels_last)
        return y, x.new_empty(weight.shape[0]), x.new_empty(weight.shape[0])

    @torch.library.register_fake("fastmb::stem_conv_bn_act_backward")
    def _stem_conv_bn_act_backward_fake(grad_y, x, weight, bn_weight, bn_bias, mean, var, stride, padding, dilation, eps, activation, mask):
        affine = x.new_empty(weight.shape[0] if mask[1] else 0, dtype=bn_weight.dtype if bn_weight is not None else x.dtype)
        return x.new_empty(weight.shape if mask[0] else (0,)), affine, torch.empty_like(affine)


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) + norm + optional activation: children "0", "1" and (unless the
    activation is "identity") "2", the layout of torchvision's Conv2dNormActivation, so
    state_dicts match key for key.

    With a BatchNorm2d norm: in eval mode without autograd, on the CPU, the batch norm is folded
    into the convolution's weight and bias on every call (so never stale; ``fastmb.freeze``
    keeps the folded weights instead, also on a GPU, where unfrozen layers run as eager's
    modules), which removes its pass over the output; on the CPU a folded 1x1 conv over channels_last inputs at
    batch 1, or up to 1024 pixels, runs as one GEMM. In training, batch norm + hardswish/relu6
    keep only the conv output for backward (eager also keeps the batch norm's output). A
    torchvision FrozenBatchNorm2d (an eval batch norm in training too) is folded the same way
    without autograd; with autograd its modules run.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        activation: str = "identity",
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        check_choice("activation", activation, ACTIVATIONS)
        in_channels, out_channels = integer("in_channels", in_channels, 1), integer("out_channels", out_channels, 1)
        kernel_size, stride = integer("kernel_size", kernel_size, 1), integer("stride", stride, 1)
        groups, dilation = integer("groups", groups, 1), integer("dilation", dilation, 1)
        padding = (kernel_size - 1) // 2 * dilation
        layers = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False),
            norm_layer(out_channels),
        ]
        if activation != "identity":
            layers.append(ACTIVATIONS[activation].make_module())
        super().__init__(*layers)
        self._setup()

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, norm: nn.Module, activation: nn.Module | None = None) -> "ConvBNAct":
        """The module around existing `conv`, `norm` and (optional) `activation` modules, which
        it shares (fastmb.convert uses this)."""
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"conv must be an nn.Conv2d, got {conv!r}")
        if not isinstance(norm, nn.Module) or (activation is not None and not isinstance(activation, nn.Module)):
            raise ValueError("norm and activation must be nn.Modules")
        module = cls.__new__(cls)
        nn.Sequential.__init__(module, *(m for m in (conv, norm, activation) if m is not None))
        module._setup()
        return module

    def _setup(self) -> None:
        self.out_channels = self._modules["0"].out_channels
        self.frozen = False  # fastmb.freeze: fold once and keep the folded weights
        self._folded: tuple | None = None  # frozen: (key, weight, bias)

    def _kept_fold(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
        """Frozen: the conv's weight and bias with the batch norm folded in, kept from call to
        call while the tensors and their versions stay the same (folded on every call where one
        is an inference tensor: those have no version)."""
        conv_weight, gamma, beta, mean, var = inputs = _fold_inputs(conv, bn)
        if any(t.is_inference() for t in inputs):
            return fold_conv_bn(*inputs, bn.eps)
        key = (conv_weight.data_ptr(), conv_weight._version, gamma.data_ptr(), gamma._version, beta.data_ptr(), beta._version,
               mean.data_ptr(), mean._version, var.data_ptr(), var._version, bn.eps)  # fmt: skip
        if self._folded is None or self._folded[0] != key:
            self._folded = (key, *fold_conv_bn(conv_weight, gamma, beta, mean, var, bn.eps))
        return self._folded[1], self._folded[2]

    def forward(self, x: Tensor) -> Tensor:
        # Children through _modules: Sequential's self[i] costs microseconds, and at batch 1 this
        # runs for every pointwise layer of the model. The activation is read off the child on
        # every call, so a swapped child is honoured.
        conv, bn, activation = self._modules["0"], self._modules["1"], self._modules.get("2")
        if synchronised(bn):  # nn.SyncBatchNorm itself synchronises only CUDA tensors
            u = synced_batch_norm(conv(x), bn, batch_norm_step(bn))
            return activation(u) if activation is not None else u
        norm = type(bn) is nn.BatchNorm2d or torchvision_frozen_batch_norm(bn)
        if not norm or conv.bias is not None or torch.compiler.is_compiling() or symbolic(x) or runs_composite(x):
            return super().forward(x)  # compile and ONNX export fold on their own; torch.func, torch.fx: plain ops
        if needs_call(conv) or needs_call(bn) or (activation is not None and needs_call(activation)):
            return super().forward(x)  # the modules themselves: their hooks, parametrizations
        y = run_conv_bn_act_modules(x, conv, bn, activation, self._kept_fold if self.frozen else None)
        return y if y is not None else super().forward(x)


def run_conv_bn_act_modules(
    x: Tensor,
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    activation: nn.Module | None,
    folded_conv: Callable[[nn.Conv2d, nn.BatchNorm2d], tuple[Tensor, Tensor]] | None = None,
) -> Tensor | None:
    """activation(bn(conv(x))) for a conv without bias and a batch norm whose forward is
    F.batch_norm's (not synchronised), on the fused paths: in eval without autograd the batch
    norm folded into the conv (`folded_conv` returns the folded weight and bias, kept by a frozen
    layer; default: fold now, on the CPU only); in training, the memory-saving batch norm +
    activation. None where neither applies: the caller runs its modules. (A FrozenBatchNorm2d is
    an eval batch norm in training too: folded without autograd, its modules with it.)"""
    frozen = frozen_batch_norm(bn)
    if bn.training and not frozen:
        name = activation_name(activation)
        if name is None or not torch.is_grad_enabled() or x.numel() == 0:
            return None  # an empty batch too: F.batch_norm returns it as it is, native_batch_norm raises
        if _stem_conv(conv, x):
            _check_values_per_channel(conv_output_shape(x, conv.weight, conv.stride, conv.padding, conv.dilation))
            step = batch_norm_step(bn)
            conv_args = (conv.stride, conv.padding, conv.dilation)
            return _StemConvBNAct.apply(
                x, conv.weight, bn.weight, bn.bias, step.running_mean, step.running_var, step.momentum, bn.eps, name, conv_args
            )
        # relu and identity gain nothing from the autograd function's saved tensors, but the
        # native op's passes pay (an input of the layout the conv keeps gives a z of it)
        if not (ACTIVATIONS[name].saves_input or _native_batch_norm_act(x)):
            return None
        z = _FullConv.apply(x, conv.weight, conv.stride, conv.padding, conv.dilation) if _full_conv(conv, x) else conv(x)
        _check_values_per_channel(z.shape)
        step = batch_norm_step(bn)
        return _BatchNormActivation.apply(z, bn.weight, bn.bias, step.running_mean, step.running_var, step.momentum, bn.eps, name)
    if torch.is_grad_enabled() or not (frozen or bn.affine) or bn.running_var is None:
        return None
    if autocast_dtype(x.device.type) is not None:
        return None  # the modules, each cast as eager casts it: the fused paths compute in x's dtype
    name = activation_name(activation)
    if folded_conv is None:
        if x.device.type != "cpu":
            # A fold on every call is six small kernels on a GPU: at a launch-bound batch more than
            # the batch norm's pass it saves (not timed alone; the H200's batch-1 model with them
            # and the GPU kernels took 1.8x eager's time). So the modules, as eager runs them.
            return None
        folded_conv = _fold_now
    if _pointwise_as_matmul(conv, x):
        if _NATIVE_CONV1X1 and x.dtype in (torch.float32, torch.float64) and name is not None:
            # the batch norm applied to the GEMM's output as its rows are in cache: no fold
            return torch.ops.fastmb.conv1x1_bn_act(x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, name)
        weight, bias = folded_conv(conv, bn)
        n, c, h, w = x.shape
        y = torch.addmm(bias, x.permute(0, 2, 3, 1).reshape(-1, c), weight.view(-1, c).t())
        y = y.view(n, h, w, -1).permute(0, 3, 1, 2)  # channels_last, as the conv returns it
    else:
        weight, bias = folded_conv(conv, bn)
        if _fused_onednn_conv(conv, x):
            # oneDNN's conv straight (F.conv2d took 1.5x its time on the 3-channel stems), with the
            # activation in its epilogue where oneDNN's keeps PyTorch's NaNs: no pass of its own
            attr, scalars, algorithm = _ONEDNN_POST_OPS.get(name, ("none", [], ""))
            y = torch.ops.mkldnn._convolution_pointwise(
                x, weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups, attr, scalars, algorithm
            )
            if name in _ONEDNN_POST_OPS:
                return y
        else:
            y = conv._conv_forward(x, weight, bias)  # honours padding_mode
    if activation is None:
        return y
    in_place = ACTIVATIONS[name].in_place if name is not None else None
    return in_place(y) if in_place is not None else activation(y)


def _check_values_per_channel(shape: tuple[int, ...]) -> None:
    """F.batch_norm's error in training for a batch with one value per channel."""
    if shape[1] > 0 and math.prod(shape) == shape[1]:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(shape)}")


# oneDNN's conv with a fused eltwise post-op (the op Inductor's CPU backend emits): (attr,
# scalars, algorithm) per activation. Not relu and relu6: oneDNN's turn NaN into 0.
_ONEDNN_POST_OPS = {
    "identity": ("none", [], ""), "silu": ("swish", [], ""), "hardswish": ("hardswish", [], ""), "gelu": ("gelu", [], "none"),
    "gelu_tanh": ("gelu", [], "tanh"),
}  # fmt: skip
_HAS_ONEDNN_CONV = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _fused_onednn_conv(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether the folded conv runs as oneDNN's conv with the activation fused: CPU float32,
    zero numeric padding."""
    return (
        _HAS_ONEDNN_CONV
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and x.dim() == 4
    )


def _fold_inputs(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, ...]:
    """The conv's weight and the batch norm's weight, bias, running mean and variance, straight
    from the modules' dicts: a fold runs for every layer on every call, and nn.Module's attribute
    lookup costs more than the rest. A weight that is not a parameter (remove_parametrizations
    under no_grad leaves a buffer) is read as the attribute."""
    weight = conv._parameters.get("weight")
    affine = batch_norm_affine(bn)
    return (weight if weight is not None else conv.weight, affine["weight"], affine["bias"],
            bn._buffers["running_mean"], bn._buffers["running_var"])  # fmt: skip


def _fold_now(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    return fold_conv_bn(*_fold_inputs(conv, bn), bn.eps)


def _pointwise_as_matmul(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether the folded 1x1 conv runs as one GEMM over the channels_last pixels instead
    of F.conv2d: on the CPU, in whole MobileNetV3-Large runs, oneDNN's 1x1 conv was slower
    than the GEMM at batch 1 and at few pixels, faster with more (bench/results/)."""
    return (
        x.device.type == "cpu"
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and x.dim() == 4
        and (x.shape[0] == 1 or x.shape[0] * x.shape[2] * x.shape[3] <= _MATMUL_MAX_PIXELS)
        and x.is_contiguous(memory_format=torch.channels_last)
    )
