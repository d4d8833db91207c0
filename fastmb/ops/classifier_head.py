"""A MobileNet's head as one native call (fastmb::classifier_head): the last 1x1 ConvBNAct,
global average pooling and the classifier's linear layers, eval on the CPU, float32. The modules
stay as they are; `FusedHead` packs their weights (the batch norm folded) and packs again
whenever one changes. Anything the op does not cover runs the modules."""

import torch
from torch import Tensor, nn

from fastmb import _extension
from fastmb.ops.activations import activation_name
from fastmb.ops.inverted_residual import ConvBN, conv_bn
from fastmb.ops.packing import PackedArguments, conv_bn_slots, eval_op_applies, fold_and_pack, pointwise_conv

NATIVE = _extension.has_kernel("classifier_head", "CPU")


def classifier_layers(classifier: nn.Module) -> list[tuple[nn.Linear, str]] | None:
    """(linear, activation name) per linear layer of a classifier Sequential of nn.Linear (with
    bias), activations fastmb has and nn.Dropout (nothing in eval), or None."""
    if type(classifier) is not nn.Sequential:
        return None
    layers: list[tuple[nn.Linear, str]] = []
    for module in classifier._modules.values():
        name = activation_name(module)
        if type(module) is nn.Linear and module.bias is not None:
            layers.append((module, "identity"))
        elif type(module) is nn.Dropout or name == "identity":
            continue
        elif layers and layers[-1][1] == "identity" and name is not None:
            layers[-1] = (layers[-1][0], name)
        else:
            return None
    return layers or None


class FusedHead(PackedArguments):
    """The op's arguments for a head, packed from its modules' current parameters."""

    def __init__(self, conv: ConvBN, linears: list[tuple[nn.Linear, str]], dropouts: list[nn.Module]) -> None:
        super().__init__()
        self.conv, self.linears, self._modes = conv, linears, [conv.bn, *(linear for linear, _ in linears), *dropouts]

    def tensor_slots(self) -> list[tuple[dict, str]]:
        slots = conv_bn_slots(self.conv.conv, self.conv.bn)
        return slots + [(linear._parameters, name) for linear, _ in self.linears for name in ("weight", "bias")]

    def settings(self) -> tuple:
        return (self.conv.bn.eps,)

    def pack(self) -> tuple:
        weight, bias = fold_and_pack(self.conv.conv, self.conv.bn)
        fc_weights = [linear.weight.float().contiguous() for linear, _ in self.linears]
        fc_biases = [linear.bias.float().contiguous() for linear, _ in self.linears]
        return weight, bias, self.conv.activation, fc_weights, fc_biases, [act for _, act in self.linears]

    def __call__(self, x: Tensor) -> Tensor | None:
        """The logits through the op, or None where it does not apply."""
        if not NATIVE or not eval_op_applies(x, self.conv.conv.in_channels) or any(m.training for m in self._modes):
            return None
        return self.run(torch.ops.fastmb.classifier_head, x)


def _head_plan(model: nn.Module, features: nn.Sequential, avgpool: nn.Module | None, classifier: nn.Module) -> FusedHead | None:
    """The FusedHead for these modules, kept on `model` while they stay the same."""
    last = next(reversed(features._modules.values()), None)
    modules = (last, avgpool, classifier, *classifier._modules.values(), *(last._modules.values() if last is not None else ()))
    plan = model.__dict__.get("_fastmb_head")
    if plan is not None and plan[0] == modules:
        return plan[1]
    head = None
    conv = conv_bn(last) if last is not None else None
    pooled = avgpool is None or (type(avgpool) is nn.AdaptiveAvgPool2d and avgpool.output_size in (1, (1, 1)))
    linears = classifier_layers(classifier)
    if conv is not None and pointwise_conv(conv.conv) and pooled and linears is not None:
        dropouts = [m for m in classifier._modules.values() if type(m) is nn.Dropout]
        head = FusedHead(conv, linears, dropouts)
    model.__dict__["_fastmb_head"] = (modules, head)
    return head


def forward_with_fused_head(
    model: nn.Module, x: Tensor, features: nn.Sequential, avgpool: nn.Module | None, classifier: nn.Module
) -> Tensor:
    """classifier(flatten(avgpool(features(x)))) (avgpool None: adaptive average pooling to 1x1),
    with features' last layer, the pooling and the classifier as one op call where it applies:
    eval on the CPU (the torchvision MobileNetV2/V3 forward)."""
    head = None
    if NATIVE and not model.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        head = _head_plan(model, features, avgpool, classifier)
    if head is None:
        x = features(x)
    else:
        layers = list(features._modules.values())
        for layer in layers[:-1]:
            x = layer(x)
        logits = head(x)
        if logits is not None:
            return logits
        x = layers[-1](x)
    x = avgpool(x) if avgpool is not None else nn.functional.adaptive_avg_pool2d(x, 1)
    return classifier(torch.flatten(x, 1))
