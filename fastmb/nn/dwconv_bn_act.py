"""DWConvBNAct: a drop-in for torchvision's depthwise Conv2dNormActivation."""

import torch.distributed as dist
from torch import Tensor, nn

from fastmb.nn.batch_norm import batch_norm_step, synchronised
from fastmb.ops.activations import ACTIVATIONS, activation_name
from fastmb.ops.common import (
    batch_norm_channels,
    check_choice,
    check_tensor,
    fused_norm,
    integer,
    pair,
    real,
    symbolic,
    torchvision_frozen_batch_norm,
)
from fastmb.ops.dwconv_bn_act import run_dwconv_bn_act, run_synced_dwconv_bn_act
from fastmb.ops.inverted_residual import own_hooks
from fastmb.ops.packing import depthwise_conv


class DWConvBNAct(nn.Sequential):
    """Depthwise ``Conv2d`` (no bias) + ``BatchNorm2d`` + activation, run as one fused op.

    Children "0" (the conv), "1" (the batch norm) and, unless the activation is "identity", "2"
    (the activation module: ``nn.Hardswish``, ``nn.ReLU``, ...) are torchvision's
    ``Conv2dNormActivation``'s, so its state_dict loads unchanged and code that indexes, hooks or
    swaps its layers finds them. ``activation`` is child "2"'s registry name; setting it to a name
    replaces the child. A child "2" fastmb does not fuse (or hooked) is called as it is. Training
    and eval follow ``nn.BatchNorm2d`` exactly, ``momentum=None`` and ``num_batches_tracked`` included.
    Child "1" may be an ``nn.SyncBatchNorm`` (``nn.SyncBatchNorm.convert_sync_batchnorm``): in
    training across processes the batch statistics and the backward's sums are then synchronised
    over its process group, inside the fused ops, on any device (the CPU with gloo too). It may
    be torchvision's ``FrozenBatchNorm2d`` (detection backbones): its running statistics then
    serve in training too, and are never updated.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        activation: str = "hardswish",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
    ) -> None:
        channels = integer("channels", channels, 1)
        kernel_size = integer("kernel_size", kernel_size, 1)
        stride, dilation = integer("stride", stride, 1), integer("dilation", dilation, 1)
        if momentum is not None:
            real("momentum", momentum)
        padding = (kernel_size - 1) // 2 * dilation
        super().__init__(
            nn.Conv2d(channels, channels, kernel_size, stride, padding, dilation, groups=channels, bias=False),
            nn.BatchNorm2d(channels, eps=real("eps", eps, 0.0), momentum=momentum),
        )
        self.activation = activation
        self.out_channels = channels

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: nn.Module | str | None = None) -> "DWConvBNAct":
        """The fused module around existing depthwise `conv` (no bias, zero padding), `bn` and
        `activation` (a module, or a registry name; None: identity) modules, which it shares, with
        their stride, padding and dilation (fastmb.convert uses this). Anything the fused op would
        compute differently is an error naming it."""
        if not isinstance(conv, nn.Conv2d) or not conv.groups == conv.in_channels == conv.out_channels:
            raise ValueError(f"conv must be a depthwise nn.Conv2d (groups == in_channels == out_channels), got {conv!r}")
        if conv.bias is not None:
            raise ValueError("conv must have no bias: the batch norm that follows makes it redundant, and the fused op has none")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"conv must have numeric zero padding, got padding={conv.padding!r}, padding_mode={conv.padding_mode!r}")
        pair("conv.stride", conv.stride, 1), pair("conv.padding", conv.padding, 0), pair("conv.dilation", conv.dilation, 1)
        norm = isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)) or torchvision_frozen_batch_norm(bn)
        if not norm or batch_norm_channels(bn) != conv.out_channels:
            kinds = "an nn.BatchNorm2d (or SyncBatchNorm, FrozenBatchNorm2d)"
            raise ValueError(f"bn must be {kinds} over the conv's {conv.out_channels} channels, got {bn!r}")
        if isinstance(activation, nn.Module) and activation_name(activation) is None:
            raise ValueError(f"activation must be one fastmb fuses ({', '.join(ACTIVATIONS)}), got {activation!r}")
        module = cls.__new__(cls)
        nn.Sequential.__init__(module, conv, bn)
        if isinstance(activation, nn.Module) and not isinstance(activation, nn.Identity):
            module.append(activation)
        else:
            module.activation = "identity" if activation is None or isinstance(activation, nn.Identity) else activation
        module.out_channels = conv.out_channels
        return module

    @property
    def activation(self) -> str | None:
        """The registry name of what child "2" computes ("identity" without one), or None when
        fastmb does not fuse it."""
        return activation_name(self._modules.get("2"))

    @activation.setter
    def activation(self, name: str) -> None:
        check_choice("activation", name, ACTIVATIONS)
        self._modules.pop("2", None)
        if name != "identity":
            self.append(ACTIVATIONS[name].make_module())

    def __setstate__(self, state: dict) -> None:
        name = state.pop("activation", None)  # pickled before the activation became child "2"
        super().__setstate__(state)
        if name is not None:
            self.activation = name

    def forward(self, x: Tensor) -> Tensor:
        children = self._modules  # self[i] costs microseconds, a small layer's time
        conv, bn, act = children["0"], children["1"], children.get("2")
        activation = activation_name(act)
        if (
            activation is None or len(children) > 3 or symbolic(x) or any(own_hooks(child) for child in children.values())
            or not fusable_children(conv, bn)
        ):  # fmt: skip
            return super().forward(x)  # the modules: a trace records them, hooks run
        # The parameters were checked when built; only x is new.
        check_tensor("x", x, 4)
        if x.shape[1] != conv.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels but this DWConvBNAct has {conv.in_channels}")
        return run_dwconv_bn_act_modules(x, conv, bn, activation)


def fusable_children(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether the children are still what the fused op computes (a depthwise_conv; a
    BatchNorm2d, SyncBatchNorm or FrozenBatchNorm2d): not after one was swapped, as when the batch
    norm is folded into the conv by hand (torch.nn.utils.fusion) and replaced by Identity."""
    return depthwise_conv(conv) and fused_norm(bn) and batch_norm_channels(bn) == conv.out_channels


def run_dwconv_bn_act_modules(
    x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: str, padding: list[int] | None = None
) -> Tensor:
    """act(bn(conv(x))) as the fused op, for a depthwise `conv` (no bias) and batch norm `bn`
    known good, in bn's mode, a SyncBatchNorm synchronised; `padding` (four sides: timm's
    Conv2dSame) replaces the conv's."""
    step = batch_norm_step(bn)
    geometry = (list(conv.stride), list(conv.padding) if padding is None else padding, list(conv.dilation))
    if synchronised(bn):  # statistics over the process group's whole batch
        return run_synced_dwconv_bn_act(
            x, conv.weight, bn.weight, bn.bias, step.running_mean, step.running_var, geometry, bn.eps, step.momentum, activation,
            bn.process_group or dist.group.WORLD,
        )  # fmt: skip
    return run_dwconv_bn_act(
        x, conv.weight, bn.weight, bn.bias, step.running_mean, step.running_var, *geometry, bn.eps, step.momentum,
        step.use_batch_stats, activation,
    )  # fmt: skip
