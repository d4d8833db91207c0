"""fastmb.convert on torchvision models: what it swaps, that nothing else changes, and that a
converted model has the same fused modules as fastmb's own builder."""

import copy
import logging

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

import fastmb
from fastmb.models.calibration import calibrate_batch_norm

FUSED = (fastmb.nn.DWConvBNAct, fastmb.nn.ConvBNAct, fastmb.nn.SqueezeExcitation)


def converted(name: str, caplog) -> tuple[nn.Module, nn.Module]:
    original = calibrate_batch_norm(getattr(torchvision.models, name)(), resolution=96)
    parameters = {id(p) for p in original.parameters()}
    with caplog.at_level(logging.INFO, logger="fastmb"):
        model = fastmb.convert(copy.deepcopy(original))
    assert {id(p) for p in model.parameters()} != parameters  # a deep copy was converted
    return original.eval(), model.eval()


def fused_modules(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, FUSED)}


def test_mobilenet_v3_large(caplog):
    original, model = converted("mobilenet_v3_large", caplog)
    lines = ("swapped 15 DWConvBNAct", "swapped 31 ConvBNAct", "swapped 8 SqueezeExcitation", "swapped 15 InvertedResidual (one")
    for line in lines:
        assert line in caplog.text
    assert list(model.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = original(x)
        assert ((model(x) - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_mobilenet_v2(caplog):
    original, model = converted("mobilenet_v2", caplog)
    assert "swapped 17 DWConvBNAct" in caplog.text and "swapped 18 ConvBNAct" in caplog.text
    assert "swapped 17 InvertedResidual (one native call in eval)" in caplog.text
    assert "SqueezeExcitation" not in caplog.text
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        expected = original(x)
        assert ((model(x) - expected).abs().max() / expected.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"])
def test_converted_model_has_the_builders_fused_modules(name, caplog):
    """The builders describe torchvision's architecture with fastmb's modules, so a converted
    torchvision model runs the same fused modules in the same places."""
    _, model = converted(name, caplog)
    assert fused_modules(model) == fused_modules(getattr(fastmb, name)())


def test_shares_parameters_keeps_training_mode_and_reports_what_it_left(caplog):
    dense = Conv2dNormActivation(8, 16, 3)
    depthwise = Conv2dNormActivation(16, 16, 5, stride=2, groups=16, activation_layer=nn.Hardswish)
    with_bias = Conv2dNormActivation(16, 16, 3, groups=16, bias=True)
    mish = Conv2dNormActivation(16, 16, 3, groups=16, activation_layer=nn.Mish)
    model = nn.Sequential(dense, nn.Sequential(depthwise, with_bias, mish), nn.Sequential(nn.Conv2d(16, 4, 1), nn.ReLU())).train()
    original = copy.deepcopy(model)
    conv_weight = depthwise[0].weight
    with caplog.at_level(logging.INFO, logger="fastmb"):
        fastmb.convert(model)
    fused = model[1][0]
    assert isinstance(fused, fastmb.nn.DWConvBNAct) and fused.training
    assert fused[0].weight is conv_weight and fused.activation == "hardswish" and fused[0].stride == (2, 2)
    assert fused[2] is depthwise[2]  # the activation module is shared too: hooks on it still run
    # The rest keep their modules: only the pointwise-layer wrapper around them changes.
    assert isinstance(model[0], fastmb.nn.ConvBNAct) and model[0][0] is dense[0] and model[0][2] is dense[2]
    assert isinstance(model[1][1], fastmb.nn.ConvBNAct) and model[1][1][0] is with_bias[0]
    assert isinstance(model[1][2], fastmb.nn.ConvBNAct) and model[1][2][2] is mish[2]
    assert type(model[2]) is nn.Sequential  # no batch norm: nothing to fuse
    assert "left 1 depthwise stage: the conv has a bias" in caplog.text
    assert "left 1 depthwise stage: activation Mish is not one fastmb fuses" in caplog.text
    assert list(model.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 8, 12, 12)
    for training in (True, False):
        with torch.no_grad():
            torch.testing.assert_close(model.train(training)(x), original.train(training)(x))


def test_layers_with_norms_it_does_not_fuse_are_reported():
    """A backbone built with a norm fastmb does not fuse (GroupNorm) is left as it was, each
    layer's reason reported, and still computes torchvision's outputs."""
    from functools import partial

    model = torchvision.models.mobilenet_v3_small(norm_layer=partial(nn.GroupNorm, 4), num_classes=10).eval()
    expected_model = copy.deepcopy(model)
    converted, report = fastmb.convert(model, report=True)
    assert report.skipped["Conv2dNormActivation: norm GroupNorm is not a BatchNorm2d"] == 1 + 10 + 11 + 11 + 1
    assert not any(isinstance(m, (fastmb.nn.DWConvBNAct, fastmb.nn.ConvBNAct)) for m in converted.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), expected_model(x), rtol=1e-4, atol=1e-5)
    _, report = fastmb.convert(nn.Sequential(Conv2dNormActivation(8, 8, 3, norm_layer=None, activation_layer=nn.Mish)), report=True)
    assert report.skipped == {}  # no norm (a feature pyramid's layers): nothing left that could fuse


@pytest.mark.parametrize("detector", ["fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large"])
def test_detection_backbones(detector):
    """torchvision's MobileNetV3 detectors (random weights, batch-norm statistics from a random
    batch): the backbone's layers and blocks are swapped, its feature maps match, and nothing
    is reported left (the feature pyramid's norm-free layers are not candidates)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models.detection, detector)(weights=None, weights_backbone=None, num_classes=5)
    with torch.no_grad():
        model.train().backbone(torch.randn(2, 3, 128, 128))
    model.eval()
    converted, report = fastmb.convert(copy.deepcopy(model), report=True)
    assert report.skipped == {} and report.swapped["InvertedResidual (one native call in eval)"] >= 14
    x = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        expected = model.backbone(x)
        for _ in range(2):  # the second call replays the plans
            actual = converted.backbone(x)
            for key in expected:
                error = (actual[key] - expected[key]).abs().max() / expected[key].abs().max()
                assert error <= 1e-5, key


def test_weights_go_channels_last_so_a_contiguous_input_runs_in_it(caplog):
    """After convert (and in the builders' models) the conv weights are channels_last, so a
    contiguous input's activations are channels_last from the first conv on, in training too;
    values are those of the contiguous model. channels_last=False keeps the layout."""
    original = calibrate_batch_norm(torchvision.models.mobilenet_v3_small(), resolution=64)
    kept = fastmb.convert(copy.deepcopy(original), channels_last=False)
    assert all(p.is_contiguous() for p in kept.parameters())
    model, report = fastmb.convert(copy.deepcopy(original), report=True)
    assert report.channels_last and "channels_last" in str(report)
    built = fastmb.mobilenet_v3_small()
    for m in (model, built):
        weights = [p for p in m.parameters() if p.dim() == 4]
        assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    layouts = []
    model.features[0].register_forward_hook(lambda module, args, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(2, 3, 64, 64)
    for training in (False, True):
        torch.manual_seed(0)
        expected = kept.train(training)(x)
        torch.manual_seed(0)
        torch.testing.assert_close(model.train(training)(x), expected, rtol=1e-4, atol=1e-5)
    assert layouts == [True, True]
    _, untouched = fastmb.convert(nn.Sequential(nn.Conv2d(3, 4, 3)), report=True)
    assert not untouched.channels_last  # nothing fastmb fuses: the model is left as it was


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small"])
def test_converted_blocks_run_in_one_op_call_and_survive_a_round_trip(name, caplog, monkeypatch, native_block_calls):
    """Each torchvision InvertedResidual becomes fastmb's fused subclass (still an instance of
    torchvision's class); in eval the stem and the blocks run as one op call, the model's head
    another; the model pickles."""
    import io

    from torchvision.models import mobilenetv2, mobilenetv3

    from fastmb.ops.classifier_head import FusedHead

    original, model = converted(name, caplog)
    blocks = [m for m in model.modules() if isinstance(m, (mobilenetv2.InvertedResidual, mobilenetv3.InvertedResidual))]
    assert blocks and all(type(m).__module__ == "fastmb.convert_torchvision" for m in blocks)
    assert type(model).__module__ == "fastmb.convert_torchvision"  # the model too: its head fused
    heads = []
    monkeypatch.setattr(FusedHead, "__call__", lambda self, x, program=None, call=FusedHead.__call__: heads.append(len(native_block_calls)) or call(self, x, program))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected, y = original(x), model(x)
    # the stem and every block in one op call, then the head
    assert native_block_calls == [("stem", 0)] + [("block", 0)] * (len(blocks) - 1) and heads == [len(blocks)]
    # whole-model float32 against torchvision's eager (the blocks' own test applies DESIGN's rule)
    assert ((y - expected).abs().max() / expected.abs().max()).item() <= 3e-5
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), y)


def test_layers_with_hooks_are_left_with_them():
    """Hooks registered before convert still run: a hooked Conv2dNormActivation or SE block is
    left as it is (a fused module in its place would not carry them; they were dropped), a hooked
    block keeps its hooks through the class swap, hooked activations and gates are shared by the
    fused modules, and the outputs are torchvision's."""
    model = calibrate_batch_norm(torchvision.models.mobilenet_v3_small(num_classes=10), resolution=64).eval()
    expected_model = copy.deepcopy(model)
    seen = []
    model.features[2].block[1].register_forward_hook(lambda *args: seen.append("depthwise"))
    model.features[2].block[0].register_forward_pre_hook(lambda *args: seen.append("expansion"))
    model.features[4].block[2].register_forward_hook(lambda *args: seen.append("se"))
    model.features[3].register_forward_hook(lambda *args: seen.append("block"))
    model.features[5].block[1][2].register_forward_hook(lambda *args: seen.append("depthwise activation"))
    model.features[6].block[2].activation.register_forward_hook(lambda *args: seen.append("se activation"))
    model.features[7].block[2].scale_activation.register_forward_hook(lambda *args: seen.append("gate"))
    converted, report = fastmb.convert(model, report=True)
    assert isinstance(converted.features[5].block[1], fastmb.nn.DWConvBNAct)
    assert isinstance(converted.features[6].block[2], fastmb.nn.SqueezeExcitation)
    assert report.skipped["Conv2dNormActivation with hooks of its own"] == 2
    assert report.skipped["SqueezeExcitation with hooks of its own"] == 1
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        converted(x)
        torch.testing.assert_close(converted(x), expected_model(x), rtol=1e-4, atol=1e-5)
    assert sorted(seen) == sorted(["expansion", "depthwise", "block", "se", "depthwise activation", "se activation", "gate"] * 2)
