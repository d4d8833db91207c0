"""fastmb.profile: parameters, multiply-accumulates and bytes moved, per layer and in total.

Built on torch.utils.flop_counter.FlopCounterMode, with formulas registered for the fastmb ops,
so a torchvision model and its fastmb counterpart are counted by one mechanism: every operator
the forward pass dispatches is one entry, attributed to the innermost module running it.
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from fastmb import dispatch

aten = torch.ops.aten

# Element-wise work the papers leave out of their multiply-add counts, per output element...
_PER_OUTPUT = {
    aten.native_batch_norm, aten._native_batch_norm_legit, aten._native_batch_norm_legit_no_training,
    aten.hardswish, aten.hardswish_, aten.relu, aten.relu_, aten.hardtanh, aten.hardtanh_,
    aten.hardsigmoid, aten.hardsigmoid_, aten.sigmoid, aten.sigmoid_, aten.add, aten.add_, aten.mul, aten.mul_,
}
# ... and per input element (reductions).
_PER_INPUT = {aten.mean, aten._adaptive_avg_pool2d, aten.avg_pool2d}


def _dwconv_bn_act_flops(x_shape, weight_shape, *args, out_shape, **kwargs) -> int:
    n, c, h, w = out_shape[0]
    return 2 * n * c * h * w * weight_shape[2] * weight_shape[3]


def _squeeze_excitation_flops(x_shape, fc1_weight_shape, *args, out_shape, **kwargs) -> int:
    squeeze, channels = fc1_weight_shape
    return 2 * x_shape[0] * 2 * squeeze * channels  # fc1 and fc2, biases excluded


def _dwconv_bn_act_elementwise(args, out) -> int:
    return out[0].numel() * (1 if args[-1] == "identity" else 2)  # batch norm, activation


def _squeeze_excitation_elementwise(args, out) -> int:
    x, fc1_weight = args[0], args[1]
    return 2 * x.numel() + x.shape[0] * sum(fc1_weight.shape)  # pool, scale; activation, gate


def _inverted_residual_flops(x_shape, expand_weight, expand_bias, expand_act, dw_weight, *args, out_shape, **kwargs) -> int:
    n, in_channels, h, w = x_shape
    channels, _, kh, kw = dw_weight
    fc1_weight, out_channels, ho, wo = args[6], out_shape[1], out_shape[2], out_shape[3]
    macs = n * h * w * in_channels * channels if expand_bias is not None else 0
    macs += n * ho * wo * channels * (kh * kw + out_channels)  # depthwise, projection
    macs += 2 * n * fc1_weight[0] * channels if fc1_weight is not None else 0  # SE fc1 and fc2
    return 2 * macs


def _inverted_residual_elementwise(args, out) -> int:
    x, expand_bias, expand_act, dw_weight, fc1_weight, residual = args[0], args[2], args[3], args[4], args[11], args[19]
    expanded = x.shape[0] * x.shape[2] * x.shape[3] * dw_weight.shape[0]
    depthwise = out.shape[0] * out.shape[2] * out.shape[3] * dw_weight.shape[0]
    count = expanded * (1 if expand_act == "identity" else 2) if expand_bias is not None else 0  # batch norm, activation
    count += 2 * depthwise + out.numel() * (2 if residual else 1)  # batch norm and activation; batch norm, residual
    if fc1_weight is not None:
        count += 2 * depthwise + out.shape[0] * sum(fc1_weight.shape)  # pool, scale; activation, gate
    return count


def _classifier_head_flops(x_shape, conv_weight, conv_bias, conv_act, fc_weights, *args, out_shape, **kwargs) -> int:
    n, in_channels, h, w = x_shape
    macs = n * h * w * in_channels * conv_bias[0] + sum(n * out_features * in_features for out_features, in_features in fc_weights)
    return 2 * macs


def _classifier_head_elementwise(args, out) -> int:
    x, conv_bias, conv_act, fc_weights, fc_acts = args[0], args[2], args[3], args[4], args[6]
    conv = x.shape[0] * x.shape[2] * x.shape[3] * conv_bias.shape[0]
    count = conv * (2 if conv_act == "identity" else 3)  # batch norm, activation, pool
    return count + sum(x.shape[0] * w.shape[0] for w, act in zip(fc_weights, fc_acts) if act != "identity")


def _conv1x1_bn_act_flops(x_shape, weight_shape, *args, out_shape, **kwargs) -> int:
    n, in_channels, h, w = x_shape
    return 2 * n * h * w * in_channels * weight_shape[0]


def _conv1x1_bn_act_elementwise(args, out) -> int:
    return out.numel() * (1 if args[-1] == "identity" else 2)  # batch norm, activation


# The CPU-only native ops (no backend table): ConvBNAct's 1x1 GEMM path and the whole-block ops.
_NATIVE_CPU_OPS = {
    "conv1x1_bn_act": (_conv1x1_bn_act_flops, _conv1x1_bn_act_elementwise),
    "inverted_residual": (_inverted_residual_flops, _inverted_residual_elementwise),
    "classifier_head": (_classifier_head_flops, _classifier_head_elementwise),
}

_FASTMB_OPS = {
    "dwconv_bn_act": (_dwconv_bn_act_flops, _dwconv_bn_act_elementwise),
    "squeeze_excitation": (_squeeze_excitation_flops, _squeeze_excitation_elementwise),
}


def _onednn_conv_flops(x_shape, w_shape, *args, out_shape, **kwargs) -> int:
    return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


def _onednn_conv_elementwise(args, out) -> int:
    return out.numel() if args[7] != "none" else 0  # the fused activation


def _fastmb_packets() -> dict:
    """Each fastmb forward operator (any backend, and the CPU-only native ops), and oneDNN's fused
    conv (ConvBNAct's eval path) -> its (flop formula, element-wise count)."""
    packets = {}
    if hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        packets[torch.ops.mkldnn._convolution_pointwise] = (_onednn_conv_flops, _onednn_conv_elementwise)
    for op, formulas in _NATIVE_CPU_OPS.items():
        if hasattr(torch.ops.fastmb, op):
            packets[getattr(torch.ops.fastmb, op)] = formulas
    for op, formulas in _FASTMB_OPS.items():
        for kernel in dispatch.kernels(op).values():
            overload = getattr(kernel.forward, "_opoverload", kernel.forward)
            if isinstance(overload, torch._ops.OpOverload):
                packets[overload._overloadpacket] = formulas
    return packets


@dataclass
class LayerRow:
    name: str
    op: str
    output_shape: tuple[int, ...]
    params: int = 0
    macs: int = 0
    elementwise: int = 0
    bytes: int = 0


@dataclass
class Profile:
    """Totals and per-layer rows; str() is a table, to_dict() a plain dict."""

    params: int
    macs: int
    elementwise: int
    bytes: int
    rows: list[LayerRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        header = ("layer", "op", "output shape", "params", "MACs", "elementwise", "bytes")
        lines = [
            (r.name, r.op, "x".join(map(str, r.output_shape)), f"{r.params:,}", f"{r.macs:,}", f"{r.elementwise:,}", f"{r.bytes:,}")
            for r in self.rows
        ]
        lines.append(("total", "", "", f"{self.params:,}", f"{self.macs:,}", f"{self.elementwise:,}", f"{self.bytes:,}"))
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
        render = lambda row: "  ".join(  # noqa: E731
            cell.ljust(width) if i < 3 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths))
        )
        rule = "-" * len(render(header))
        return "\n".join([render(header), rule, *map(render, lines[:-1]), rule, render(lines[-1])])


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


class _LayerCounter(FlopCounterMode):
    """FlopCounterMode that also records, per operator call, the innermost module, the output
    shape, the element-wise work, the bytes read and written, and the module's parameters."""

    def __init__(self, model: nn.Module) -> None:
        fastmb_ops = _fastmb_packets()
        super().__init__(display=False, custom_mapping={packet: f for packet, (f, _) in fastmb_ops.items()})
        self.elementwise_of = {packet: count for packet, (_, count) in fastmb_ops.items()}
        self.model = model
        self.root = type(model).__name__
        self.attributed: set[int] = set()  # ids of parameters already counted in a row
        self.rows: list[LayerRow] = []

    def _elementwise(self, packet, args, out) -> int:
        if packet in self.elementwise_of:
            return self.elementwise_of[packet](args, out)
        if packet in _PER_OUTPUT:
            return tree_leaves(out)[0].numel()
        if packet in _PER_INPUT:
            return args[0].numel()
        return 0

    def _count_flops(self, func_packet, out, args, kwargs):
        flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out) if func_packet in self.flop_registry else 0
        elementwise = self._elementwise(func_packet, args, out)
        if flops or elementwise:
            self._record(func_packet, out, args, kwargs, flops // 2, elementwise)
        return super()._count_flops(func_packet, out, args, kwargs)

    def _record(self, packet, out, args, kwargs, macs, elementwise) -> None:
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        innermost = max(self.mod_tracker.parents, key=lambda name: (name != "Global", name.count(".")))
        path = innermost.removeprefix(self.root).removeprefix(".")
        name = path or "(top level)"
        # A layer's parameters count in the first row of the module that runs it.
        module = self.model.get_submodule(path) if innermost != "Global" else self.model
        fresh = [p for p in module.parameters() if id(p) not in self.attributed]
        self.attributed.update(id(p) for p in fresh)
        params = sum(p.numel() for p in fresh)
        op = packet._qualified_op_name.replace("::", ".").removeprefix("aten.")
        outputs = tree_leaves(out)
        if self.rows and self.rows[-1].name == name:  # consecutive ops of one module: one row
            row = self.rows[-1]
            row.op = f"{row.op}+{op}"
            row.output_shape = tuple(outputs[0].shape)
        else:
            row = LayerRow(name, op, tuple(outputs[0].shape))
            self.rows.append(row)
        row.params += params
        row.macs += macs
        row.elementwise += elementwise
        row.bytes += _nbytes(inputs) + _nbytes(outputs)


def profile(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224)) -> Profile:
    """Counts one eval-mode forward pass of `model` on an input of `input_size`, on the model's
    device and dtype. MACs count conv and linear layers exactly (K*K*Cin/groups*Cout*Hout*Wout,
    Cin*Cout; biases excluded); element-wise work (BN, activations, SE pool and scale) is its
    own column; bytes are the minimum each operator reads and writes (every tensor it takes or
    returns, once), so fusion shows up as fewer bytes."""
    parameter = next(model.parameters(), None)
    options = {"device": parameter.device, "dtype": parameter.dtype} if parameter is not None else {}
    x = torch.randn(*input_size, **options)
    was_training = model.training
    counter = _LayerCounter(model.eval())
    try:
        with torch.no_grad():
            model(x)  # warm-up: the whole-block ops pack their weights once, which is not the forward's work
            with counter:
                model(x)
    finally:
        model.train(was_training)
    rows = counter.rows
    return Profile(
        params=sum(p.numel() for p in model.parameters()),
        macs=sum(r.macs for r in rows),
        elementwise=sum(r.elementwise for r in rows),
        bytes=sum(r.bytes for r in rows),
        rows=rows,
    )


def saved_for_backward_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes of the tensors autograd keeps from `model`'s forward on `x` until backward (the
    training memory that grows with the batch): each storage counted once, parameters not."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x)
    return sum(storages.values())
