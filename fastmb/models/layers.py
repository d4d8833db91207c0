"""Building blocks shared by the MobileNet builders."""

from collections.abc import Callable

import torch
from torch import nn

from fastmb.nn import ConvBNAct, DWConvBNAct
from fastmb.ops.common import torchvision_frozen_batch_norm


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Rounds a channel count to a multiple of `divisor`, never more than 10% down
    (the TensorFlow MobileNet rule, as in torchvision)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def depthwise_stage(
    channels: int,
    kernel_size: int,
    stride: int,
    dilation: int,
    activation: str,
    norm_layer: Callable[[int], nn.Module],
) -> nn.Module:
    """The fused DWConvBNAct around the batch norm `norm_layer` makes, as it is made (eps,
    momentum, running statistics or none), when it is one fastmb fuses (a BatchNorm2d with affine
    parameters, or torchvision's FrozenBatchNorm2d), else the unfused equivalent with the same keys."""
    norm = norm_layer(channels)
    if not (type(norm) is nn.BatchNorm2d and norm.affine) and not torchvision_frozen_batch_norm(norm):
        return ConvBNAct(channels, channels, kernel_size, stride, channels, dilation, activation, norm_layer)
    stage = DWConvBNAct(channels, kernel_size, stride, dilation, activation)
    stage[1] = norm
    return stage


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


def use_channels_last(model: nn.Module) -> None:
    """Puts the model's 4-D parameters (conv weights) in channels_last. PyTorch's convs return a
    channels_last output when the weight is, even for a contiguous (NCHW) input, so the whole
    network then runs in the layout fastmb's CPU kernels and oneDNN are fastest in: a
    contiguous-input training step of MobileNetV3-Large, batch 16, 2 threads, took 622 ms
    with contiguous weights and 308 with these. Values do not change; 4-D outputs (feature
    maps) come out channels_last."""
    model.to(memory_format=torch.channels_last)


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
