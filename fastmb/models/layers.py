"""Building blocks shared by the MobileNet builders."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmb.nn import DWConvBNAct
from fastmb.ops.common import bn_affine

ACTIVATION_MODULES: dict[str, type[nn.Module]] = {"hardswish": nn.Hardswish, "relu": nn.ReLU, "relu6": nn.ReLU6}


# Pixels (batch x height x width) up to which a folded 1x1 conv on the CPU runs as a GEMM.
_MATMUL_MAX_PIXELS = 1024
# Bytes of a block's widest activation (whole batch) above which, in eval on the CPU, the block
# runs on sub-batches (run_in_sub_batches).
SUB_BATCH_BYTES = 16 << 20


def run_in_sub_batches(block: nn.Module, x: Tensor, widest_channels: int) -> Tensor:
    """block(x); in eval on the CPU without autograd, on sub-batches of x (concatenated) when
    the block's widest activation, widest_channels at x's height and width, would take more
    than SUB_BATCH_BYTES for the whole batch.

    glibc maps an allocation above 32 MB afresh on every call, and smaller ones too depending
    on what the process freed before, and each fresh page costs a fault. MobileNetV3-Large's
    second block expands to 51 MB at batch 16 (about 12 ms of faults in a 62 ms forward);
    sub-batches keep such tensors small enough to be reused. Measured on MobileNetV3-Large,
    fp32 batch 16, 2 threads (2-core Zen 4): 82 -> 65 ms with the default allocator, 62.8 ->
    61.3 ms with page faults taken out (MALLOC_MMAP_THRESHOLD_); limits of 2 to 8 MB were
    slower than 16 without faults. Each image's result is the same as in the whole batch: in
    eval (every submodule's), batch norm uses its running statistics."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.dim() != 4 or torch.compiler.is_compiling():
        return block(x)
    n, _, h, w = x.shape
    images = max(1, SUB_BATCH_BYTES // max(1, widest_channels * h * w * x.element_size()))
    if images >= n or any(module.training for module in block.modules()):
        return block(x)
    return torch.cat([block(part) for part in x.split(images)])


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Rounds a channel count to a multiple of `divisor`, never more than 10% down
    (the TensorFlow MobileNet rule, as in torchvision)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


# Activations whose gradient needs their input (eager saves it: one more activation-sized
# tensor per layer), and their backward formulas.
_INPUT_SAVING_ACTIVATIONS: dict[type[nn.Module], Callable[[Tensor, Tensor], Tensor]] = {
    nn.Hardswish: torch.ops.aten.hardswish_backward,
    nn.ReLU6: lambda grad, u: torch.ops.aten.hardtanh_backward(grad, u, 0.0, 6.0),
}


# The activations applied in place to the eval path's own conv output (the module call costs
# more than a small layer's activation).
_IN_PLACE_ACTIVATIONS: dict[type[nn.Module], Callable[[Tensor], Tensor]] = {
    nn.Hardswish: lambda y: F.hardswish(y, inplace=True),
    nn.ReLU: lambda y: F.relu(y, inplace=True),
    nn.ReLU6: lambda y: F.relu6(y, inplace=True),
}


class _BatchNormActivation(torch.autograd.Function):
    """act(batch_norm(z)) in training with batch statistics, saving only z and the per-channel
    statistics for backward: u = batch_norm(z) is recomputed there instead of being kept, as
    eager's activation keeps it. Running statistics are updated as F.batch_norm does."""

    @staticmethod
    def forward(ctx, z, weight, bias, running_mean, running_var, momentum, eps, activation):
        u, mean, invstd = torch.native_batch_norm(z, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(z, weight, bias, mean, invstd)
        ctx.eps, ctx.activation = eps, activation
        return activation(u)

    @staticmethod
    def backward(ctx, grad_y):
        z, weight, bias, mean, invstd = ctx.saved_tensors
        gamma, beta = bn_affine(weight, bias, invstd)
        scale = invstd * gamma
        shape = (1, -1, 1, 1)
        u = z * scale.reshape(shape).to(z.dtype) + (beta - mean * scale).reshape(shape).to(z.dtype)
        grad_u = _INPUT_SAVING_ACTIVATIONS[type(ctx.activation)](grad_y, u)
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
        grad_z, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_u, z, weight, None, None, mean, invstd, True, ctx.eps, mask
        )
        return grad_z, grad_weight, grad_bias, None, None, None, None, None


def _batch_norm_activation(bn: nn.BatchNorm2d, activation: nn.Module, z: Tensor) -> Tensor:
    """bn then activation in training mode, through _BatchNormActivation: nn.BatchNorm2d's
    training-mode forward (num_batches_tracked, momentum=None as a cumulative average)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    return _BatchNormActivation.apply(z, bn.weight, bn.bias, bn.running_mean, bn.running_var, momentum, bn.eps, activation)


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) + norm + optional activation: children "0", "1", "2", the layout of
    torchvision's Conv2dNormActivation, so state_dicts match key for key.

    In eval mode without autograd, a BatchNorm2d is folded into the convolution's weight and
    bias (recomputed only when a parameter or statistic changes), which removes the batch
    norm's pass over the output: most of MobileNet's remaining memory traffic. In training,
    BatchNorm2d + hardswish/relu6 keep only the conv output for backward (eager also keeps the
    batch norm's output), a quarter less memory for MobileNetV3's activations.
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
        padding = (kernel_size - 1) // 2 * dilation
        layers = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False),
            norm_layer(out_channels),
        ]
        if activation != "identity":
            layers.append(ACTIVATION_MODULES[activation](inplace=True))
        super().__init__(*layers)
        self.out_channels = out_channels
        self._folded: tuple | None = None  # (key, weight, bias)

    def _folded_conv(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
        # The tensors straight from the modules' dicts: this runs for every layer on every call,
        # and nn.Module's attribute lookup costs more than the rest of the key.
        conv_weight, gamma, beta = conv._parameters["weight"], bn._parameters["weight"], bn._parameters["bias"]
        mean, var = bn._buffers["running_mean"], bn._buffers["running_var"]
        key = (conv_weight.data_ptr(), conv_weight._version, gamma.data_ptr(), gamma._version, beta.data_ptr(), beta._version,
               mean.data_ptr(), mean._version, var.data_ptr(), var._version, bn.eps)  # fmt: skip
        if self._folded is None or self._folded[0] != key:
            scale = gamma * torch.rsqrt(var + bn.eps)
            weight = conv_weight * scale.reshape(-1, 1, 1, 1).to(conv_weight.dtype)
            bias = (beta - mean * scale).to(conv_weight.dtype)
            self._folded = (key, weight, bias)
        return self._folded[1], self._folded[2]

    def forward(self, x: Tensor) -> Tensor:
        # Children through _modules: Sequential's self[i] costs microseconds, and at batch 1 this
        # runs for every pointwise layer of the model.
        conv, bn, activation = self._modules["0"], self._modules["1"], self._modules.get("2")
        if self._fuses_training_batch_norm(bn, activation):
            return _batch_norm_activation(bn, activation, conv(x))
        foldable = (
            not self.training
            and not torch.is_grad_enabled()
            and type(bn) is nn.BatchNorm2d
            and not bn.training
            and bn.affine
            and bn.running_var is not None
            and not torch.compiler.is_compiling()
        )
        if not foldable:
            return super().forward(x)
        weight, bias = self._folded_conv(conv, bn)
        if self._pointwise_as_matmul(conv, x):
            n, c, h, w = x.shape
            y = torch.addmm(bias, x.permute(0, 2, 3, 1).reshape(-1, c), weight.view(-1, c).t())
            y = y.view(n, h, w, -1).permute(0, 3, 1, 2)  # channels_last, as the conv returns it
        else:
            y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        if activation is None:
            return y
        in_place = _IN_PLACE_ACTIVATIONS.get(type(activation))
        return in_place(y) if in_place is not None else activation(y)

    @staticmethod
    def _pointwise_as_matmul(conv: nn.Conv2d, x: Tensor) -> bool:
        """Whether the folded 1x1 conv runs as one GEMM over the channels_last pixels instead
        of F.conv2d. On the CPU, in whole MobileNetV3-Large runs (fp32, 2 threads), oneDNN's
        1x1 conv was slower than the GEMM at batch 1 (the model 1.2x slower) and at few pixels
        (up to a 7x7 map at batch 16; with weights in cache it was not, so the cold weight is
        the likely cause); with more pixels the conv was faster."""
        return (
            x.device.type == "cpu"
            and conv.kernel_size == (1, 1)
            and conv.stride == (1, 1)
            and conv.padding == (0, 0)
            and conv.groups == 1
            and x.dim() == 4
            and (x.shape[0] == 1 or x.shape[0] * x.shape[2] * x.shape[3] <= _MATMUL_MAX_PIXELS)
            and x.is_contiguous(memory_format=torch.channels_last)
        )

    @staticmethod
    def _fuses_training_batch_norm(bn: nn.Module, activation: nn.Module | None) -> bool:
        return (
            bn.training
            and type(activation) in _INPUT_SAVING_ACTIVATIONS
            and type(bn) is nn.BatchNorm2d
            and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()  # compile plans its own memory
        )


def depthwise_stage(
    channels: int,
    kernel_size: int,
    stride: int,
    dilation: int,
    activation: str,
    norm_layer: Callable[[int], nn.Module],
) -> nn.Module:
    """The fused DWConvBNAct when `norm_layer` makes a BatchNorm2d (the only norm fastmb fuses),
    else the unfused equivalent with the same keys."""
    norm = norm_layer(channels)
    if type(norm) is not nn.BatchNorm2d or not norm.affine:
        return ConvBNAct(channels, channels, kernel_size, stride, channels, dilation, activation, norm_layer)
    return DWConvBNAct(channels, kernel_size, stride, dilation, activation, eps=norm.eps, momentum=norm.momentum)


def init_weights(model: nn.Module) -> None:
    """torchvision's MobileNet initialisation."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)


def build_with_weights(build: Callable[..., nn.Module], enum_name: str, weights, progress: bool, kwargs: dict) -> nn.Module:
    """`build(**kwargs)`, loaded with torchvision's pretrained `weights` when given: a member of
    torchvision's enum `enum_name` or its name ("IMAGENET1K_V1", "DEFAULT"). torchvision
    downloads them; num_classes follows the weights, as in torchvision."""
    if weights is None:
        return build(**kwargs)
    try:
        import torchvision.models
    except ImportError as error:
        raise ImportError("loading pretrained weights needs torchvision: pip install torchvision") from error
    weights = getattr(torchvision.models, enum_name).verify(weights)
    num_classes = len(weights.meta["categories"])
    if kwargs.setdefault("num_classes", num_classes) != num_classes:
        raise ValueError(f"num_classes={kwargs['num_classes']} does not match the {num_classes} classes of {weights}")
    model = build(**kwargs)
    model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True))
    return model
