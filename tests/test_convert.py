"""fastmb.convert on torchvision models: what it swaps, and that nothing else changes."""

import copy
import logging

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

import fastmb
from fastmb.models.calibration import calibrate_batch_norm


def converted(name: str, caplog) -> tuple[nn.Module, nn.Module]:
    original = calibrate_batch_norm(getattr(torchvision.models, name)(), resolution=96)
    parameters = {id(p) for p in original.parameters()}
    with caplog.at_level(logging.INFO, logger="fastmb"):
        model = fastmb.convert(copy.deepcopy(original))
    assert {id(p) for p in model.parameters()} != parameters  # a deep copy was converted
    return original.eval(), model.eval()


def test_mobilenet_v3_large(caplog):
    original, model = converted("mobilenet_v3_large", caplog)
    assert sum(isinstance(m, fastmb.nn.DWConvBNAct) for m in model.modules()) == 15
    assert sum(isinstance(m, fastmb.nn.SqueezeExcitation) for m in model.modules()) == 8
    assert "swapped 15 depthwise stages and 8 SE blocks" in caplog.text
    assert list(model.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = original(x)
        assert ((model(x) - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_mobilenet_v2(caplog):
    original, model = converted("mobilenet_v2", caplog)
    assert sum(isinstance(m, fastmb.nn.DWConvBNAct) for m in model.modules()) == 17
    assert "swapped 17 depthwise stages and 0 SE blocks" in caplog.text
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        expected = original(x)
        assert ((model(x) - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_shares_parameters_keeps_training_mode_and_leaves_the_rest():
    dense = Conv2dNormActivation(8, 16, 3)
    depthwise = Conv2dNormActivation(16, 16, 5, stride=2, groups=16, activation_layer=nn.Hardswish)
    with_bias = Conv2dNormActivation(16, 16, 3, groups=16, bias=True)
    gelu = Conv2dNormActivation(16, 16, 3, groups=16, activation_layer=nn.GELU, inplace=None)
    model = nn.Sequential(dense, nn.Sequential(depthwise, with_bias, gelu)).train()
    conv_weight = depthwise[0].weight
    fastmb.convert(model)
    fused = model[1][0]
    assert isinstance(fused, fastmb.nn.DWConvBNAct) and fused.training
    assert fused[0].weight is conv_weight and fused.activation == "hardswish" and fused[0].stride == (2, 2)
    assert model[0] is dense and model[1][1] is with_bias and model[1][2] is gelu
    assert model(torch.randn(2, 8, 12, 12)).shape == (2, 16, 6, 6)
