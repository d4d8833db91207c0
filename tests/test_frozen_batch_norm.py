"""Models built with torchvision's FrozenBatchNorm2d, as its detection models build their
MobileNetV3 backbones for pretrained weights: fastmb's builders and convert fuse them (a frozen
batch norm is an eval batch norm, in training too), the state_dict keys stay, outputs and
gradients are torchvision's, and edits to the frozen buffers are seen."""

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import fastmb
from oracle import relative_error, run


def frozen_pair(name: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(torchvision's model, fastmb's builder, torchvision's converted), FrozenBatchNorm2d
    throughout, random frozen statistics and affine buffers, no dropout."""
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(norm_layer=FrozenBatchNorm2d, num_classes=10, dropout=0.0).eval()
    with torch.no_grad():
        for module in theirs.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.running_var.uniform_(0.5, 1.5), module.running_mean.normal_(0, 0.1)
                module.weight.uniform_(0.5, 1.5), module.bias.normal_(0, 0.1)
    ours = getattr(fastmb, name)(norm_layer=FrozenBatchNorm2d, num_classes=10, dropout=0.0).eval()
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours, fastmb.convert(copy.deepcopy(theirs))


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v2"])
def test_fused_like_batch_norms_with_the_same_keys(name):
    theirs, ours, converted = frozen_pair(name)
    assert list(ours.state_dict()) == list(converted.state_dict()) == list(theirs.state_dict())
    for model in (ours, converted):
        assert sum(isinstance(m, fastmb.nn.DWConvBNAct) for m in model.modules()) == {"mobilenet_v3_small": 11, "mobilenet_v2": 17}[name]
        assert all(isinstance(m[1], FrozenBatchNorm2d) for m in model.modules() if isinstance(m, fastmb.nn.DWConvBNAct))


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v2"])
def test_eval_matches_and_sees_edits_to_the_frozen_buffers(name):
    """The whole-model replay (made by the first forward) reads the frozen norms' buffers:
    changed in place, or replaced, after it, the outputs follow."""
    theirs, ours, converted = frozen_pair(name)
    x = torch.randn(2, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for edit in (None, "in place", "replaced"):
            for model in (theirs, ours, converted):
                norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
                if edit == "in place":
                    norms[5].running_var.mul_(3), norms[9].weight.mul_(-1), norms[-1].bias.add_(0.5)
                elif edit == "replaced":
                    norms[7].running_mean = norms[7].running_mean + 0.3
            expected = theirs(x)
            for model in (ours, converted):
                for _ in range(2):
                    assert relative_error(model(x), expected) <= 1e-5, edit


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v2"])
def test_training_keeps_the_statistics_frozen(name):
    """In training a frozen batch norm normalises with its buffers and updates nothing: outputs
    and every gradient (input and parameters; the frozen norms have none) are torchvision's, in
    float64."""
    theirs, ours, converted = frozen_pair(name)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 10, dtype=torch.float64)
    before = copy.deepcopy(theirs.state_dict())
    expected = run(theirs.double().train(), x, grad)
    for model in (ours, converted):
        actual = run(model.double().train(), x, grad)
        assert actual.keys() == expected.keys()
        for key in expected:
            error = (actual[key] - expected[key]).abs().max().item()
            assert error <= 1e-9 * max(expected[key].abs().max().item(), 1.0), key
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, before[key].to(value.dtype), rtol=0, atol=0)


def test_onnx_export_of_a_frozen_model():
    ort = pytest.importorskip("onnxruntime")
    import io

    theirs, ours, _ = frozen_pair("mobilenet_v3_small")
    x = torch.randn(1, 3, 96, 96)
    buffer = io.BytesIO()
    torch.onnx.export(ours, (x,), buffer, dynamo=False, input_names=["x"])
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert relative_error(torch.from_numpy(session.run(None, {"x": x.numpy()})[0]), theirs(x)) <= 1e-5
