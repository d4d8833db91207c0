"""Hostile inputs to everything public: the functional ops, the modules' constructors and
from_modules, and the registered operators torch.ops.fastmb.* themselves (native CPU kernels).
Each case runs in a child process, so a crash (a signal) is observed and reported as that
case's failure instead of taking the test run down. A case expects either a clear error (its
type and a pattern naming the argument) or a result equal to eager PyTorch's."""

import json
import re

import pytest

import fastmb
from oracle import run_python

PRELUDE = """
import torch, numpy as np
import torch.nn.functional as F
import fastmb
from torch import nn
ops = torch.ops.fastmb
torch.manual_seed(0)
x = torch.randn(2, 8, 9, 9)
w = torch.randn(8, 1, 3, 3)
stats = [torch.zeros(8), torch.ones(8)]
conv = ([1, 1], [1, 1], [1, 1])

def native(x=x, w=w, bn_weight=None, bn_bias=None, stats=stats, conv=conv, training=False):
    return ops.dwconv_bn_act(x, w, bn_weight, bn_bias, *stats, *conv, 1e-5, training, "identity")

def eager(x, w, stride, padding, dilation):
    return F.batch_norm(F.conv2d(x, w, None, stride, padding, dilation, x.shape[1]), torch.zeros(x.shape[1]), torch.ones(x.shape[1]))

def same_as_eager(stride, padding, dilation, shape=(1, 4, 9, 9)):
    xs, ws = torch.randn(shape), torch.randn(shape[1], 1, 3, 3)
    y = ops.dwconv_bn_act(xs, ws, None, None, torch.zeros(shape[1]), torch.ones(shape[1]), stride, padding, dilation, 1e-5, False,
                          "identity")[0]
    expected = eager(xs, ws, stride, padding, dilation)
    assert y.shape == expected.shape, (y.shape, expected.shape)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)

def se_native(x=x, fc1=torch.randn(4, 8), b1=torch.randn(4), fc2=torch.randn(8, 4), b2=torch.randn(8)):
    return ops.squeeze_excitation(x, fc1, b1, fc2, b2, "relu", "hardsigmoid")

# The whole-block ops' arguments, as packed from a real block (8 -> 16 -> 8, SE, residual) and a
# head (8 -> 16, classifier 16 -> 12 -> 10), changed one at a time.
from fastmb.models.mobilenet_v3 import InvertedResidual, InvertedResidualConfig
from fastmb.ops.inverted_residual import FusedBlock, block_layers
from fastmb.ops.classifier_head import FusedHead, classifier_layers, conv_bn
block = InvertedResidual(InvertedResidualConfig(8, 3, 16, 8, True, "HS", 1, 1, 1.0), nn.BatchNorm2d).eval()
BLOCK = list(FusedBlock(block_layers(list(block.block.children()), True)).arguments())
BLOCK_ARG = {name: i for i, name in enumerate(["expand_weight", "expand_bias", "expand_activation", "dw_weight", "dw_scale",
    "dw_shift", "stride", "padding", "dilation", "dw_activation", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias",
    "se_activation", "se_gate", "project_weight", "project_bias", "residual"])}
xb = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)

def ir(x=xb, **changes):
    args = list(BLOCK)
    for name, value in changes.items():
        args[BLOCK_ARG[name]] = value
    return ops.inverted_residual(x, *args)

def ir_same_as_layers(shape):
    xs = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = ir(xs)
        with fastmb.use_backend("reference"):
            expected = block(xs)
    assert y.shape == expected.shape, (y.shape, expected.shape)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)

head_conv = fastmb.nn.ConvBNAct(8, 16, 1, activation="hardswish").eval()
HEAD = list(FusedHead(conv_bn(head_conv), classifier_layers(nn.Sequential(nn.Linear(16, 12), nn.Hardswish(), nn.Linear(12, 10))),
                      []).arguments())

def head(x=xb, **changes):
    args = dict(zip(["conv_weight", "conv_bias", "conv_activation", "fc_weights", "fc_biases", "fc_activations"], HEAD), **changes)
    return ops.classifier_head(x, *args.values())

xs, ws = torch.randn(2, 3, 9, 9), torch.randn(8, 3, 3, 3)
stem_conv = ([2, 2], [1, 1], [1, 1])

def stem(x=xs, w=ws, bn_weight=None, conv=stem_conv, activation="relu"):
    return ops.stem_conv_bn_act(x, w, bn_weight, None, *conv, 1e-5, activation)

def stem_backward(grad_y=torch.randn(2, 8, 5, 5), stats=stats, mask=(True, True)):
    return ops.stem_conv_bn_act_backward(grad_y, xs, ws, None, None, *stats, *stem_conv, 1e-5, "relu", list(mask))

def weight_grad(grad_z=torch.randn(2, 8, 5, 5), x=xs, weight_size=(8, 3, 3, 3), conv=stem_conv):
    return ops.conv_weight_grad(grad_z, x, list(weight_size), *conv)

def full_conv(x=xs, w=ws, conv=stem_conv):
    return ops.full_conv(x, w, *conv)

def full_conv_input_grad(grad_z=torch.randn(2, 8, 5, 5), w=ws, x_size=(2, 3, 9, 9), conv=stem_conv):
    return ops.full_conv_input_grad(grad_z, w, list(x_size), *conv)

def stem_same_as_eager(shape):
    x = torch.randn(shape)
    y = stem(x)[0]
    expected = F.relu(F.batch_norm(F.conv2d(x, ws, None, 2, 1), None, None, training=True))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
"""

OK = None  # the case must run and pass its own assertions
# name: (statements, expected error type and message pattern, or OK)
CASES: dict[str, tuple[str, tuple[str, str] | None]] = {
    # registered operators: every size, shape and range they rely on
    "native stride 0": ("native(conv=([0, 0], [1, 1], [1, 1]))", ("RuntimeError", "stride must be at least 1")),
    "native negative padding": ("native(conv=([1, 1], [-1, 0], [1, 1]))", ("RuntimeError", "padding must be at least 0")),
    "native dilation 0": ("native(conv=([1, 1], [1, 1], [0, 1]))", ("RuntimeError", "dilation must be at least 1")),
    "native stride 2**32": ("same_as_eager([2**32, 2**32], [1, 1], [1, 1])", OK),
    "native stride 2**32 + 2": ("same_as_eager([2**32 + 2, 2**32 + 2], [1, 1], [1, 1])", OK),
    "native padding = dilation = 2**31, 1x1 input": ("same_as_eager([1, 1], [2**31, 2**31], [2**31, 2**31], (1, 2, 1, 1))", OK),
    "native padding 2**62 overflows": ("native(conv=([1, 1], [2**62, 2**62], [1, 1]))", ("RuntimeError", "overflow|output")),
    "native three padding values": ("native(conv=([1, 1], [1, 1, 1], [1, 1]))", ("RuntimeError", "padding two")),
    # the training batch norm + activation op
    "batch_norm_act 3-D z": ("ops.batch_norm_act(torch.randn(2, 8, 9), None, None, 1e-5, 'relu')", ("RuntimeError", "z must be \\(N, C, H, W\\)")),
    "batch_norm_act int z": ("ops.batch_norm_act(torch.ones(2, 8, 3, 3, dtype=torch.int32), None, None, 1e-5, 'relu')", ("RuntimeError", "float32 and float64")),
    "batch_norm_act bfloat16 z": ("ops.batch_norm_act(x.bfloat16(), None, None, 1e-5, 'relu')", ("RuntimeError", "float32 and float64")),
    "batch_norm_act short weight": ("ops.batch_norm_act(x, torch.ones(7), None, 1e-5, 'relu')", ("RuntimeError", "weight must be a vector of 8")),
    "batch_norm_act unknown activation": ("ops.batch_norm_act(x, None, None, 1e-5, 'tanh')", ("RuntimeError", "unknown activation 'tanh'")),
    "batch_norm_act empty batch": ("y, m, v = ops.batch_norm_act(x[:0], None, None, 1e-5, 'relu'); assert y.shape == (0, 8, 9, 9)", OK),
    "batch_norm_act_backward grad_y of another shape": (
        "ops.batch_norm_act_backward(x[:1], x, None, None, *stats, 1e-5, 'relu', [True, True])", ("RuntimeError", "grad_y must have z's shape")),
    "batch_norm_act_backward short mean": (
        "ops.batch_norm_act_backward(x, x, None, None, torch.zeros(3), torch.ones(8), 1e-5, 'relu', [True, True])",
        ("RuntimeError", "mean must be a vector of 8")),
    "batch_norm_act_backward float64 grad_y": (
        "ops.batch_norm_act_backward(x.double(), x, None, None, *stats, 1e-5, 'relu', [True, True])", ("RuntimeError", "grad_y must have z's dtype")),
    # the training stem conv + batch norm + activation op
    "stem 3-D x": ("stem(x=torch.randn(3, 9, 9))", ("RuntimeError", "x must be \\(N, C_in, H, W\\)")),
    "stem weight of other input channels": ("stem(w=torch.randn(8, 4, 3, 3))", ("RuntimeError", "weight must be \\(C_out, C_in, kH, kW\\) with C_in = 3")),
    "stem int x": ("stem(x=torch.ones(2, 3, 9, 9, dtype=torch.int32), w=ws.int())", ("RuntimeError", "float32 and float64")),
    "stem float64 weight": ("stem(w=ws.double())", ("RuntimeError", "dtypes differ")),
    "stem short bn_weight": ("stem(bn_weight=torch.ones(7))", ("RuntimeError", "bn_weight must be a vector of 8")),
    "stem unknown activation": ("stem(activation='tanh')", ("RuntimeError", "unknown activation 'tanh'")),
    "stem stride 0": ("stem(conv=([0, 0], [1, 1], [1, 1]))", ("RuntimeError", "stride must be at least 1")),
    "stem padding 2**62 overflows": ("stem(conv=([1, 1], [2**62, 2**62], [1, 1]))", ("RuntimeError", "overflow|output")),
    "stem kernel larger than the image": ("stem(x=torch.randn(2, 3, 1, 1), conv=([1, 1], [0, 0], [1, 1]))", ("RuntimeError", "output would be empty")),
    "stem empty batch": ("y, m, v = stem(x=xs[:0]); assert y.shape == (0, 8, 5, 5)", OK),
    "stem 1x37 image": ("stem_same_as_eager((3, 3, 1, 37))", OK),
    "stem NaN input stays NaN": ("assert stem(x=torch.full((2, 3, 9, 9), float('nan')))[0].isnan().all()", OK),
    "stem_backward grad_y of another shape": ("stem_backward(grad_y=torch.randn(2, 8, 4, 4))", ("RuntimeError", "grad_y must have the output's shape")),
    "stem_backward short mean": ("stem_backward(stats=[torch.zeros(3), torch.ones(8)])", ("RuntimeError", "mean must be a vector of 8")),
    "stem_backward nothing wanted": ("gw, gg, gb = stem_backward(mask=(False, False)); assert gw.numel() == 0", OK),
    # the training full conv's weight gradient
    "conv_weight_grad 3-D x": ("weight_grad(x=torch.randn(3, 9, 9))", ("RuntimeError", "x must be \\(N, C_in, H, W\\)")),
    "conv_weight_grad weight_size of other input channels": (
        "weight_grad(weight_size=(8, 4, 3, 3))", ("RuntimeError", "weight_size must be \\(C_out, C_in, kH, kW\\) with C_in = 3")),
    "conv_weight_grad kernel of 0 taps": ("weight_grad(weight_size=(8, 3, 0, 3))", ("RuntimeError", "every entry at least 1")),
    "conv_weight_grad three weight sizes": ("weight_grad(weight_size=(8, 3, 3))", ("RuntimeError", "weight_size")),
    "conv_weight_grad grad_z of another shape": ("weight_grad(grad_z=torch.randn(2, 8, 4, 4))", ("RuntimeError", "grad_z must have the conv output's shape")),
    "conv_weight_grad float64 grad_z": ("weight_grad(grad_z=torch.randn(2, 8, 5, 5, dtype=torch.float64))", ("RuntimeError", "grad_z must have x's dtype")),
    "conv_weight_grad int x": ("weight_grad(x=torch.ones(2, 3, 9, 9, dtype=torch.int32))", ("RuntimeError", "float32 and float64")),
    "conv_weight_grad stride 0": ("weight_grad(conv=([0, 0], [1, 1], [1, 1]))", ("RuntimeError", "stride must be at least 1")),
    "conv_weight_grad padding 2**62 overflows": ("weight_grad(conv=([1, 1], [2**62, 2**62], [1, 1]))", ("RuntimeError", "overflow|output")),
    "full_conv 3-D x": ("full_conv(x=torch.randn(3, 9, 9))", ("RuntimeError", "x must be \\(N, C_in, H, W\\)")),
    "full_conv weight of other input channels": ("full_conv(w=torch.randn(8, 4, 3, 3))", ("RuntimeError", "weight must be \\(C_out, C_in, kH, kW\\) with C_in = 3")),
    "full_conv kernel of 0 taps": ("full_conv(w=torch.randn(8, 3, 0, 3))", ("RuntimeError", "a kernel of at least 1x1")),
    "full_conv no output channels": ("assert full_conv(w=torch.randn(0, 3, 3, 3)).shape == (2, 0, 5, 5)", OK),
    "full_conv no input channels": ("assert not full_conv(x=torch.randn(2, 0, 9, 9), w=torch.randn(8, 0, 3, 3)).any()", OK),
    "full_conv_input_grad no output channels": ("assert not full_conv_input_grad(grad_z=torch.randn(2, 0, 5, 5), w=torch.randn(0, 3, 3, 3)).any()", OK),
    "full_conv float64 x": ("full_conv(x=xs.double(), w=ws.double())", ("RuntimeError", "float32 x and weight")),
    "full_conv stride 0": ("full_conv(conv=([0, 0], [1, 1], [1, 1]))", ("RuntimeError", "stride must be at least 1")),
    "full_conv padding 2**62 overflows": ("full_conv(conv=([1, 1], [2**62, 2**62], [1, 1]))", ("RuntimeError", "overflow|output")),
    "full_conv empty batch": ("z = full_conv(x=xs[:0]); assert z.shape == (0, 8, 5, 5)", OK),
    "full_conv NaN x stays NaN": ("assert full_conv(x=torch.full((2, 3, 9, 9), float('nan'))).isnan().all()", OK),
    "full_conv_input_grad three x sizes": ("full_conv_input_grad(x_size=(2, 3, 9))", ("RuntimeError", "x_size")),
    "full_conv_input_grad x_size of other channels": ("full_conv_input_grad(x_size=(2, 4, 9, 9))", ("RuntimeError", "with C_in = 4")),
    "full_conv_input_grad grad_z of another shape": ("full_conv_input_grad(grad_z=torch.randn(2, 8, 4, 4))", ("RuntimeError", "grad_z must have the conv output's shape")),
    "full_conv_input_grad float64 grad_z": ("full_conv_input_grad(grad_z=torch.randn(2, 8, 5, 5, dtype=torch.float64))", ("RuntimeError", "float32 grad_z and weight")),
    "full_conv_input_grad empty batch": ("g = full_conv_input_grad(grad_z=torch.randn(0, 8, 5, 5), x_size=(0, 3, 9, 9)); assert g.shape == (0, 3, 9, 9)", OK),
    "full_conv_input_grad NaN grad_z stays NaN": ("assert full_conv_input_grad(grad_z=torch.full((2, 8, 5, 5), float('nan'))).isnan().all()", OK),
    "conv_weight_grad empty batch": ("gw = weight_grad(grad_z=torch.randn(0, 8, 5, 5), x=xs[:0]); assert gw.shape == (8, 3, 3, 3) and not gw.any()", OK),
    "conv_weight_grad NaN grad_z stays NaN": ("assert weight_grad(grad_z=torch.full((2, 8, 5, 5), float('nan'))).isnan().all()", OK),
    # the whole-block CPU ops
    "block NCHW x": ("ir(x=xb.contiguous())", ("RuntimeError", "x must be a channels_last float32")),
    "block float64 x": ("ir(x=xb.double())", ("RuntimeError", "x must be a channels_last float32")),
    "block x with other channels": ("ir(x=torch.randn(1, 5, 9, 9).contiguous(memory_format=torch.channels_last))", ("RuntimeError", "expand_weight")),
    "block unknown activation": ("ir(expand_activation='tanh')", ("RuntimeError", "unknown activation 'tanh'")),
    "block unknown gate": ("ir(se_gate='softmax')", ("RuntimeError", "gate")),
    "block dw weight of other channels": ("ir(dw_weight=torch.randn(4, 1, 3, 3))", ("RuntimeError", "dw_weight must be")),
    "block stride 0": ("ir(stride=[0, 0])", ("RuntimeError", "stride must be at least 1")),
    "block padding 2**62 overflows": ("ir(padding=[2**62, 2**62])", ("RuntimeError", "overflow|output")),
    "block residual at stride 2": ("ir(stride=[2, 2])", ("RuntimeError", "residual")),
    "block transposed projection weight": ("ir(project_weight=BLOCK[16].transpose(0, 1))", ("RuntimeError", "project_weight")),
    "block float64 bias": ("ir(project_bias=BLOCK[17].double())", ("RuntimeError", "project_bias")),
    "block three SE tensors": ("ir(fc2_bias=None)", ("RuntimeError", "four SE tensors")),
    "block empty batch": ("assert ir(x=torch.randn(0, 8, 9, 9).contiguous(memory_format=torch.channels_last)).shape == (0, 8, 9, 9)", OK),
    "block 1x1 image": ("ir_same_as_layers((3, 8, 1, 1))", OK),
    "block 1x37 image": ("ir_same_as_layers((1, 8, 1, 37))", OK),
    "head NCHW x": ("head(x=xb.contiguous())", ("RuntimeError", "x must be a channels_last float32")),
    "head fc of other width": ("head(fc_weights=[torch.randn(12, 15), HEAD[3][1]])", ("RuntimeError", r"fc_weights\[i\]")),
    "head no fc": ("head(fc_weights=[], fc_biases=[], fc_activations=[])", ("RuntimeError", "at least one")),
    "head unknown activation": ("head(fc_activations=['hardswish', 'softmax'])", ("RuntimeError", "unknown activation")),
    "head image without pixels": ("head(x=torch.randn(2, 8, 0, 9).contiguous(memory_format=torch.channels_last))", ("RuntimeError", "no pixels")),
    "head empty batch": ("assert head(x=torch.randn(0, 8, 9, 9).contiguous(memory_format=torch.channels_last)).shape == (0, 10)", OK),
    "native negative bottom padding": ("native(conv=([1, 1], [1, -1, 1, 1], [1, 1]))", ("RuntimeError", "padding must be at least 0")),
    "native right padding 2**62 overflows": ("native(conv=([1, 1], [0, 0, 0, 2**62], [1, 1]))", ("RuntimeError", "overflow")),
    "native empty output": ("native(x=torch.randn(1, 8, 2, 2), conv=([1, 1], [0, 0], [1, 1]))", ("RuntimeError", "output would be empty")),
    "native short running_mean": ("native(stats=[torch.zeros(1), torch.ones(8)])", ("RuntimeError", "running_mean must be a vector of 8")),
    "native short bn_weight": ("native(bn_weight=torch.ones(3))", ("RuntimeError", "bn_weight must be a vector of 8")),
    "native 2-D bn_bias": ("native(bn_bias=torch.ones(8, 1))", ("RuntimeError", "bn_bias must be a vector of 8")),
    "native empty kernel": ("native(w=torch.randn(8, 1, 0, 0))", ("RuntimeError", "kernel of at least 1x1")),
    "native weight for other channels": ("native(w=torch.randn(9, 1, 3, 3))", ("RuntimeError", "weight must be \\(C, 1, kH, kW\\)")),
    "native 3-D x": ("native(x=torch.randn(8, 9, 9))", ("RuntimeError", "x must be \\(N, C, H, W\\)")),
    "native float16 on the CPU": ("native(x=x.half(), w=w.half())", ("RuntimeError", "float32, float64 and bfloat16")),
    "native dtypes differ": ("native(w=w.double())", ("RuntimeError", "dtypes differ")),
    "native eval without statistics": (
        "ops.dwconv_bn_act(x, w, None, None, None, None, *conv, 1e-5, False, 'identity')", ("RuntimeError", "running statistics")),
    "native unknown activation": (
        "ops.dwconv_bn_act(x, w, None, None, *stats, *conv, 1e-5, False, 'swish')", ("RuntimeError", "unknown activation")),
    "native backward, grad_y of another shape": (
        "ops.dwconv_bn_act_backward(torch.randn(2, 8, 4, 4), x, w, None, None, *stats, *conv, 1e-5, True, 'relu', [True] * 3)",
        ("RuntimeError", "grad_y must have the output's shape")),
    "native backward, short mean": (
        "ops.dwconv_bn_act_backward(torch.randn(2, 8, 9, 9), x, w, None, None, torch.zeros(2), torch.ones(8), *conv, 1e-5, True,"
        " 'relu', [True] * 3)", ("RuntimeError", "mean must be a vector of 8")),
    "native SE, fc1 for other channels": ("se_native(fc1=torch.randn(4, 7))", ("RuntimeError", "fc1_weight must be \\(S, 8\\)")),
    "native SE, fc2 of another shape": ("se_native(fc2=torch.randn(8, 5))", ("RuntimeError", "fc2_weight must be \\(8, 4\\)")),
    "native SE, short fc2_bias": ("se_native(b2=torch.randn(3))", ("RuntimeError", "fc2_bias must be a vector of 8")),
    "native SE, 3-D x": ("se_native(x=torch.randn(8, 9, 9))", ("RuntimeError", "x must be \\(N, C, H, W\\)")),
    "native SE backward, short pooled": (
        "ops.squeeze_excitation_backward(x, x, torch.randn(2, 3), torch.randn(4, 8), None, torch.randn(8, 4), None, 'relu',"
        " 'sigmoid')", ("RuntimeError", "pooled must be \\(2, 8\\)")),
    "native SE backward, grad_y of another shape": (
        "ops.squeeze_excitation_backward(x[:1], x, torch.randn(2, 8), torch.randn(4, 8), None, torch.randn(8, 4), None, 'relu',"
        " 'sigmoid')", ("RuntimeError", "grad_y must have x's shape")),
    # the functional op's edge
    "stride as numpy integers": ("fastmb.ops.dwconv_bn_act(x, w, None, None, *stats, stride=(np.int64(2), np.int32(1)))", OK),
    "stride as a float": ("fastmb.ops.dwconv_bn_act(x, w, None, None, *stats, stride=2.0)", ("TypeError", "stride must be an integer")),
    "stride as a numpy float": (
        "fastmb.ops.dwconv_bn_act(x, w, None, None, *stats, stride=np.float32(2))", ("TypeError", "stride must be an integer")),
    "stride True": ("fastmb.ops.dwconv_bn_act(x, w, None, None, *stats, stride=True)", ("TypeError", "stride must be an integer")),
    "stride 2**64": ("fastmb.ops.dwconv_bn_act(x, w, None, None, *stats, stride=2**64)", ("ValueError", "stride must be at least 1")),
    "training as a string": (
        "fastmb.ops.dwconv_bn_act(x, w, None, None, *stats, training='yes')", ("TypeError", "training must be True or False")),
    "eps NaN": ("fastmb.ops.dwconv_bn_act(x, w, None, None, *stats, eps=float('nan'))", ("TypeError", "eps must be a finite number")),
    "empty kernel": ("fastmb.ops.dwconv_bn_act(x, torch.randn(8, 1, 0, 3), None, None, *stats)", ("ValueError", "kH, kW >= 1")),
    # module constructors and from_modules
    "DWConvBNAct dilation -1": ("fastmb.nn.DWConvBNAct(16, 7, dilation=-1)", ("ValueError", "dilation must be at least 1")),
    "DWConvBNAct dilation 0": ("fastmb.nn.DWConvBNAct(16, 7, dilation=0)", ("ValueError", "dilation must be at least 1")),
    "DWConvBNAct kernel_size 0": ("fastmb.nn.DWConvBNAct(16, 0)", ("ValueError", "kernel_size must be at least 1")),
    "DWConvBNAct stride 0": ("fastmb.nn.DWConvBNAct(16, 3, stride=0)", ("ValueError", "stride must be at least 1")),
    "DWConvBNAct no channels": ("fastmb.nn.DWConvBNAct(0, 3)", ("ValueError", "channels must be at least 1")),
    "DWConvBNAct eps -1": ("fastmb.nn.DWConvBNAct(4, 3, eps=-1.0)", ("ValueError", "eps must be at least 0")),
    "from_modules, conv with bias": (
        "fastmb.nn.DWConvBNAct.from_modules(nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4))", ("ValueError", "no bias")),
    "from_modules, reflect padding": (
        "fastmb.nn.DWConvBNAct.from_modules(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False, padding_mode='reflect'),"
        " nn.BatchNorm2d(4))", ("ValueError", "zero padding")),
    "from_modules, not depthwise": (
        "fastmb.nn.DWConvBNAct.from_modules(nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4))", ("ValueError", "depthwise")),
    "from_modules, stride 0 set after construction": (
        "c = nn.Conv2d(4, 4, 3, groups=4, bias=False); c.stride = (0, 1)\n"
        "fastmb.nn.DWConvBNAct.from_modules(c, nn.BatchNorm2d(4))", ("ValueError", "conv.stride must be at least 1")),
    "from_modules, batch norm of other channels": (
        "fastmb.nn.DWConvBNAct.from_modules(nn.Conv2d(4, 4, 3, groups=4, bias=False), nn.BatchNorm2d(5))",
        ("ValueError", "bn must be an nn.BatchNorm2d .*over the conv.s 4 channels")),
    "ConvBNAct kernel_size 0": ("fastmb.nn.ConvBNAct(8, 16, kernel_size=0)", ("ValueError", "kernel_size must be at least 1")),
    "ConvBNAct stride 0": ("fastmb.nn.ConvBNAct(8, 16, stride=0)", ("ValueError", "stride must be at least 1")),
    "ConvBNAct dilation -1": ("fastmb.nn.ConvBNAct(8, 16, dilation=-1)", ("ValueError", "dilation must be at least 1")),
    "ConvBNAct no input channels": ("fastmb.nn.ConvBNAct(0, 16)", ("ValueError", "in_channels must be at least 1")),
    "ConvBNAct.from_modules, not a conv": ("fastmb.nn.ConvBNAct.from_modules(nn.Linear(2, 2), nn.BatchNorm2d(2))", ("ValueError", "conv must be an nn.Conv2d")),
    "SqueezeExcitation no squeeze channels": ("fastmb.nn.SqueezeExcitation(8, 0)", ("ValueError", "squeeze_channels must be at least 1")),
    "SqueezeExcitation.from_modules, 3x3 fc": (
        "fastmb.nn.SqueezeExcitation.from_modules(nn.Conv2d(8, 4, 3), nn.Conv2d(4, 8, 1))", ("ValueError", "fc1 must be a 1x1")),
}

CHILD = PRELUDE + """
import json, sys
for name, (code, _) in json.loads(sys.argv[1]).items():
    print(json.dumps({"start": name}), flush=True)
    try:
        exec(code)
        outcome = None
    except Exception as error:
        outcome = [type(error).__name__, str(error).splitlines()[0] if str(error) else ""]
    print(json.dumps({"name": name, "outcome": outcome}), flush=True)
"""


def run_cases(cases: dict) -> dict[str, list | str | None]:
    """Each case's outcome: None (ran), [error type, message], or "crashed: ..." when the child
    process died in it (the remaining cases then run in a fresh child)."""
    outcomes: dict = {}
    pending = dict(cases)
    while pending:
        child = run_python(["-c", CHILD, json.dumps(pending)])
        started = None
        for line in child.stdout.splitlines():
            record = json.loads(line)
            if "start" in record:
                started = record["start"]
            else:
                outcomes[record["name"]] = record["outcome"]
                pending.pop(record["name"])
        if child.returncode != 0:
            if started is None or started in outcomes:
                raise RuntimeError(f"the child process failed outside the cases:\n{child.stderr[-3000:]}")
            outcomes[started] = f"crashed: exit status {child.returncode}, {child.stderr.strip().splitlines()[-1:]}"
            pending.pop(started)
    return outcomes


@pytest.fixture(scope="module")
def outcomes():
    if fastmb.backends()["cpu"] != "available":
        pytest.skip(f"the native operators: {fastmb.backends()['cpu']}")
    return run_cases(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(outcomes, name):
    outcome, expected = outcomes[name], CASES[name][1]
    assert not isinstance(outcome, str), f"{name}: {outcome}"
    if expected is OK:
        assert outcome is None, f"{name} raised {outcome}"
    else:
        assert outcome is not None, f"{name} ran without an error; expected {expected[0]} matching {expected[1]!r}"
        assert outcome[0] == expected[0] and re.search(expected[1], outcome[1]), f"{name}: {outcome}"


def test_a_crash_is_reported_as_the_cases_failure():
    """The harness itself: a case that kills its process is that case's failure, and the cases
    after it still run."""
    outcomes = run_cases({"crash": ("import os; os.abort()", None), "after": ("1 + 1", None)})
    assert outcomes["crash"].startswith("crashed") and outcomes["after"] is None
