"""A MobileNet's head as one native call (fastmb::classifier_head): the last 1x1 ConvBNAct,
global average pooling and the classifier's linear layers, eval on the CPU, float32. The modules
stay as they are; `FusedHead` packs their weights (the batch norm folded; the first linear layer
also by groups of its inputs, for one image to run it under the conv) and packs again whenever
one changes. Anything the op does not cover runs the modules."""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastmb import _extension, dispatch
from fastmb.ops.activations import activation_name
from fastmb.ops.inverted_residual import (
    NATIVE_STEPS,
    ConvBN,
    Program,
    calls_needed,
    conv_bn,
    has_hooks,
    memoized_forward,
    module_tree_slots,
    run_layers,
)
from fastmb.ops.packing import (
    PackedArguments,
    Slot,
    bn_scale_shift,
    cached_plan,
    conv_bn_slots,
    eval_op_applies,
    fold_and_pack,
    hook_slots,
    mode_slots,
    pack_panels,
    pointwise_conv,
    structure_slots,
)

NATIVE = _extension.has_kernel("classifier_head", "CPU")


@dataclass(frozen=True)
class HeadLinear:
    """One linear layer of a head after the pooling: an nn.Linear, or a 1x1 conv run on the
    pooled pixel (timm's conv_head), with its bias or none, an eval batch norm to fold into it
    (or None), and the activation after them."""

    layer: nn.Module
    norm: nn.BatchNorm2d | None
    activation: str

    def slots(self) -> list[tuple[dict, str]]:
        if self.norm is not None:
            slots = conv_bn_slots(self.layer, self.norm)
        else:
            slots = [(self.layer._parameters, "weight")]
        return slots + ([(self.layer._parameters, "bias")] if self.layer.bias is not None else [])

    def pack(self) -> tuple[Tensor, Tensor]:
        """The (out, in) weight and the bias, with the batch norm folded in (in float64)."""
        weight, bias = self.layer.weight.flatten(1), self.layer.bias
        if self.norm is None:
            bias = bias if bias is not None else weight.new_zeros(weight.shape[0])
            return weight.float().contiguous(), bias.float().contiguous()
        scale, shift = bn_scale_shift(self.norm)
        bias = shift if bias is None else shift + bias.double() * scale
        return (weight.double() * scale[:, None]).float().contiguous(), bias.float().contiguous()


INPUT_GROUP = 64  # the first layer's inputs per group in fastmb::classifier_head's fc1_by_groups


def pack_by_input_groups(weight: Tensor) -> Tensor:
    """An (out, in) linear weight as fastmb::classifier_head's fc1_by_groups: per group of 64
    inputs, that group's columns packed as the 1x1 convs' weights (pack_panels):
    (in / 64, ceil(out / 16), 64, 16)."""
    return torch.stack([pack_panels(group) for group in weight.split(INPUT_GROUP, dim=1)])


def classifier_layers(classifier: nn.Module) -> list[HeadLinear] | None:
    """A HeadLinear per linear layer of a classifier Sequential of nn.Linear (with bias),
    activations fastmb has and nn.Dropout (nothing in eval), or None."""
    if type(classifier) is not nn.Sequential:
        return None
    layers: list[HeadLinear] = []
    for module in classifier._modules.values():
        name = activation_name(module)
        if type(module) is nn.Linear and module.bias is not None:
            layers.append(HeadLinear(module, None, "identity"))
        elif type(module) is nn.Dropout or name == "identity":
            continue
        elif layers and layers[-1].activation == "identity" and name is not None:
            layers[-1] = HeadLinear(layers[-1].layer, None, name)
        else:
            return None
    return layers or None


class FusedHead(PackedArguments):
    """The op's arguments for a head, packed from its modules' current parameters. Runs while
    every module in `modes` (the head's batch norms, dropouts, ...) is in eval."""

    def __init__(self, conv: ConvBN, linears: list[HeadLinear], modes: list[nn.Module]) -> None:
        super().__init__()
        self.conv, self.linears = conv, linears
        self._modes = [conv.bn, *(linear.layer for linear in linears), *(linear.norm for linear in linears if linear.norm), *modes]

    def tensor_slots(self) -> list[tuple[dict, str]]:
        return conv_bn_slots(self.conv.conv, self.conv.bn) + [slot for linear in self.linears for slot in linear.slots()]

    def setting_slots(self) -> list[Slot]:
        return [(norm.__dict__, "eps") for norm in (self.conv.bn, *(linear.norm for linear in self.linears)) if norm is not None]

    def modes(self) -> list[nn.Module]:
        return self._modes

    def pack(self) -> tuple:
        weight, bias = fold_and_pack(self.conv.conv, self.conv.bn)
        fc_weights, fc_biases = zip(*(linear.pack() for linear in self.linears))
        # The first layer again by groups of 64 inputs, where the groups share out over two
        # threads: one image then runs that layer under the conv (a copy of its weight).
        channels = bias.shape[0]
        by_groups = pack_by_input_groups(fc_weights[0]) if channels > 0 and channels % (2 * INPUT_GROUP) == 0 else None
        activations = [linear.activation for linear in self.linears]
        return weight, bias, self.conv.activation, list(fc_weights), list(fc_biases), activations, by_groups

    def __call__(self, x: Tensor, program: Program | None = None) -> Tensor | None:
        """The logits through the op, or None where it does not apply; `program` gets the call."""
        if not NATIVE or not eval_op_applies(x, self.conv.conv.in_channels) or any(m.training for m in self._modes):
            return None
        arguments = self.arguments()
        if arguments is None:
            return None
        dispatch.note_backend("cpu")
        return _call_head(x, arguments) if program is None else program.run(_call_head, x, arguments, self.watch_slots())


def _call_head(x: Tensor, arguments: tuple) -> Tensor:
    return torch.ops.fastmb.classifier_head(x.contiguous(memory_format=torch.channels_last), *arguments)


NATIVE_STEPS[_call_head] = lambda arguments: ("head", arguments)


def _head_plan(model: nn.Module, features: nn.Sequential, avgpool: nn.Module | None, classifier: nn.Module) -> FusedHead | None:
    """The FusedHead for these modules, kept on `model` while they stay the same (and with it
    what forward_with_fused_head checked: the model's mode, the features' layers and hooks).
    None while a module it runs needs its call (hooks, parametrizations)."""
    last = next(reversed(features._modules.values()), None)
    fused = [module for module in (last, avgpool, classifier) if module is not None]

    def slots() -> list[Slot]:
        modules = [features, classifier, *([last] if last is not None else [])]
        hooks = hook_slots(features) + [slot for module in fused for slot in module_tree_slots(module)]
        return structure_slots(modules) + mode_slots([model]) + hooks

    def build() -> FusedHead | None:
        conv = conv_bn(last) if last is not None and not calls_needed(fused) else None
        pooled = avgpool is None or (type(avgpool) is nn.AdaptiveAvgPool2d and avgpool.output_size in (1, (1, 1)))
        linears = classifier_layers(classifier)
        if conv is None or not pointwise_conv(conv.conv) or not pooled or linears is None:
            return None
        return FusedHead(conv, linears, [m for m in classifier._modules.values() if type(m) is nn.Dropout])

    # features in the key too: the slots watch the features this plan was made from, not which
    # features the model holds (replaced by a changed copy, the head kept the old weights).
    return cached_plan(model, "_fastmb_head", slots, build, key=(features, avgpool, classifier))


def forward_with_fused_head(
    model: nn.Module, x: Tensor, features: nn.Sequential, avgpool: nn.Module | None, classifier: nn.Module
) -> Tensor:
    """classifier(flatten(avgpool(features(x)))) (avgpool None: adaptive average pooling to 1x1),
    with features' last layer, the pooling and the classifier as one op call where it applies:
    eval on the CPU (the torchvision MobileNetV2/V3 forward). Repeated forwards run as their op
    calls (memoized_forward)."""

    def forward(x: Tensor, program: Program) -> Tensor:
        head = None
        if NATIVE and not model.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and not has_hooks(features):
            head = _head_plan(model, features, avgpool, classifier)
        if head is not None:
            layers = list(features._modules.values())
            x = run_layers(layers[:-1], x, program)
            logits = head(x, program)
            if logits is not None:
                return logits
            x = layers[-1](x)
        else:
            x = features(x)
        x = avgpool(x) if avgpool is not None else nn.functional.adaptive_avg_pool2d(x, 1)
        return classifier(torch.flatten(x, 1))

    return memoized_forward(model, (features, avgpool, classifier), x, forward)
