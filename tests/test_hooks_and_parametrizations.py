"""Hooks on the modules inside fused layers run as they do in the eager model: a fused path that
would skip a hooked module's call (the whole-block ops, the folded ConvBNAct, DWConvBNAct,
SqueezeExcitation, the head op) steps aside while any module it covers has hooks of its own, and
comes back once they are removed. torch.nn.utils.prune, which computes a conv's weight in a
pre-hook, and parametrizations (weight_norm, parametrize.register_parametrization), which take
the weight out of the conv's parameters, give torchvision's outputs and gradients. (Global hooks,
which tools such as FlopCounterMode register, see the fused layers as they run:
tests/test_profile.py.)"""

import copy

import pytest
import torch
import torch.nn.utils.prune as prune
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm
import torchvision
from torch import nn

import fastmb
from fastmb.ops import inverted_residual as ir
from oracle import randomize_batch_norm, run

# Modules inside fused layers, by their (torchvision) names: a block's expansion conv, its depthwise
# conv and batch norm, an SE block's first conv, the stem's conv, the head conv's activation, the
# classifier's first linear layer.
INNER = {
    "mobilenet_v2": ["features.2.conv.0.0", "features.4.conv.1.0", "features.5.conv.1.1", "features.0.0", "features.18.2", "classifier.1"],
    "mobilenet_v3_small": ["features.4.block.0.0", "features.2.block.0.0", "features.2.block.0.1", "features.4.block.2.fc1",
                           "features.0.0", "features.12.2", "classifier.0"],
}  # fmt: skip


def pair(name: str) -> tuple[nn.Module, nn.Module]:
    """(torchvision's model, fastmb's with its weights), random batch-norm statistics, no dropout."""
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(num_classes=10, dropout=0.0)
    randomize_batch_norm(theirs)
    ours = getattr(fastmb, name)(num_classes=10, dropout=0.0)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def assert_close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """Within 1e-4 of the expected tensor's largest entry (float32; batch statistics over few
    values amplify rounding in places)."""
    error = (actual - expected).abs().max().item()
    assert error <= 1e-4 * expected.abs().max().item(), f"{msg}: max error {error:.3g}"


def image(batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 3, 64, 64).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(INNER))
def test_hooks_inside_fused_layers_run(name, training):
    theirs, ours = pair(name)
    x = image()
    calls = {"ours": [], "theirs": []}
    for key, model in (("ours", ours), ("theirs", theirs)):
        model.train(training)
        if not training:
            with torch.no_grad():
                model(x), model(x)  # a memo made before the hooks must not skip them
        modules = dict(model.named_modules())
        handles = [modules[n].register_forward_hook(lambda m, args, out, n=n, key=key: calls[key].append(n)) for n in INNER[name]]
        handles.append(modules[INNER[name][0]].register_forward_pre_hook(lambda m, args, key=key: calls[key].append("pre")))
        with torch.set_grad_enabled(training):
            calls[key + " output"] = model(x)
        for handle in handles:
            handle.remove()
    assert sorted(calls["ours"]) == sorted(calls["theirs"]) and len(calls["ours"]) == len(INNER[name]) + 1
    assert_close(calls["ours output"], calls["theirs output"])
    if not training:
        with torch.no_grad():
            ours(x), ours(x)
        assert isinstance(ours.__dict__.get("_fastmb_forward"), ir.ForwardMemo)  # the hooks removed, the fused forward again


@pytest.mark.parametrize("name", list(INNER))
def test_pruned_convs_match_torchvision(name):
    """Pruning (a pre-hook computing weight = weight_orig * weight_mask) in eval, with a memo made
    before, and a training step in float64 (in float32 MobileNetV2's ReLU6 kinks and batch
    statistics over 8 values make eager's own gradients differ from float64 by 30%); prune.remove
    then brings the fused forward back."""
    theirs, ours = pair(name)
    x = image()
    with torch.no_grad():
        ours.eval()(x), ours(x)
    pruned = [n for n, m in theirs.named_modules() if isinstance(m, nn.Conv2d)][1:12]
    with torch.no_grad():  # the masked weights as leaves, so that the models copy
        for model in (ours, theirs):
            modules = dict(model.named_modules())
            for n in pruned:
                prune.l1_unstructured(modules[n], "weight", amount=0.5)
        assert_close(ours.eval()(x), theirs.eval()(x))
    grad = torch.randn(2, 10, dtype=torch.float64)
    actual, expected = (run(copy.deepcopy(model).double().train(), x.double(), grad) for model in (ours, theirs))
    assert actual.keys() == expected.keys()
    for key in expected:
        error = (actual[key] - expected[key]).abs().max().item() if expected[key].numel() else 0.0
        assert error <= 1e-9 * max(expected[key].abs().max().item(), 1.0), key
    with torch.no_grad():
        for model in (ours, theirs):
            modules = dict(model.named_modules())
            for n in pruned:
                prune.remove(modules[n], "weight")
        ours(x)
        assert_close(ours(x), theirs(x))
    assert isinstance(ours.__dict__.get("_fastmb_forward"), ir.ForwardMemo)


class Scale(nn.Module):
    """A parametrization of one's own: the weight scaled by 1.5."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * 1.5


@pytest.mark.parametrize("parametrization", ["weight_norm", "own"])
@pytest.mark.parametrize("name", list(INNER))
def test_parametrized_convs_match_torchvision(name, parametrization):
    """Parametrizations added to convs after a memo was made (they raised KeyError 'weight' in
    eval): eval and training give torchvision's outputs; removed, the fused forward is back."""
    theirs, ours = pair(name)
    x = image()
    with torch.no_grad():
        ours.eval()(x), ours(x)
    names = [n for n, m in theirs.named_modules() if isinstance(m, nn.Conv2d)][1:12]
    for model in (ours, theirs):
        modules = dict(model.named_modules())
        for n in names:
            if parametrization == "weight_norm":
                weight_norm(modules[n])
            else:
                parametrize.register_parametrization(modules[n], "weight", Scale())
    for training in (False, True):
        with torch.set_grad_enabled(training):
            assert_close(ours.train(training)(x), theirs.train(training)(x))
    # Removed under no_grad, weight_norm leaves the weight as a buffer, which the per-layer modules
    # read; where it is a parameter again, the whole-block ops and the memo are back.
    with torch.no_grad():
        for model in (ours, theirs):
            modules = dict(model.named_modules())
            for n in names:
                parametrize.remove_parametrizations(modules[n], "weight")
        ours.eval(), theirs.eval()
        ours(x)
        assert_close(ours(x), theirs(x))
    parameters_again = all("weight" in modules[n]._parameters for n in names)
    assert parameters_again == (parametrization == "own")
    assert isinstance(ours.__dict__.get("_fastmb_forward"), ir.ForwardMemo) == parameters_again


TIMM_INNER = {
    "mobilenetv4_conv_small": ["blocks.2.0.dw_start.conv", "blocks.2.1.pw_exp.bn", "blocks.2.1.dw_mid.bn.act", "blocks.1.1.conv",
                               "blocks.4.0.bn1", "conv_head", "classifier"],
    "efficientnet_b0": ["conv_stem", "bn1.act", "blocks.1.0.conv_pw", "blocks.1.0.se.conv_reduce", "blocks.2.1.se.gate",
                        "blocks.3.0.bn2", "bn2", "classifier"],
}  # fmt: skip


@pytest.mark.parametrize("name", list(TIMM_INNER))
def test_hooks_inside_converted_timm_models_run(name):
    """Hooks on a converted timm model's stem, the layers of its blocks, their SE and its head."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    randomize_batch_norm(model)
    converted = fastmb.convert(copy.deepcopy(model)).eval()
    x = image(1)
    with torch.no_grad():
        converted(x), converted(x)
    calls = {"timm": [], "converted": []}
    for key, m in (("timm", model), ("converted", converted)):
        modules = dict(m.named_modules())
        for n in TIMM_INNER[name]:
            modules[n].register_forward_hook(lambda module, args, out, n=n, key=key: calls[key].append(n))
    with torch.no_grad():
        assert_close(converted(x), model(x))
    assert sorted(calls["converted"]) == sorted(calls["timm"]) == sorted(TIMM_INNER[name])
