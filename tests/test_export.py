"""Deployment paths of fastmb models: ONNX export (the new dynamo-based exporter and the legacy
one: the fused ops are exported as their composites of standard ONNX ops, and ONNX Runtime
gives torchvision's outputs), torch.jit.trace (composites too: the trace loads without fastmb),
torch.fx symbolic tracing (the standard modules: torchvision's create_feature_extractor), and
torch.export / AOTInductor (which keep the fused ops)."""

import copy
import io

import pytest
import torch
import torchvision

import fastmb
from fastmb.models.calibration import calibrate_batch_norm
from oracle import relative_error

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def onnx_outputs(model: torch.nn.Module, x: torch.Tensor, dynamo: bool) -> tuple[torch.Tensor, set[str]]:
    """ONNX Runtime's outputs for `model` exported on x, and the graph's op types."""
    if dynamo:
        pytest.importorskip("onnxscript")
        data = torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto.SerializeToString()
    else:
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"])
        data = buffer.getvalue()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return torch.from_numpy(outputs), {node.op_type for node in onnx.load_from_string(data).graph.node}


@pytest.fixture(scope="module")
def torchvision_model() -> torch.nn.Module:
    return calibrate_batch_norm(torchvision.models.mobilenet_v3_large(), resolution=96).eval()


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("kind", ["builder", "converted"])
def test_onnx_export_runs_in_onnx_runtime(torchvision_model, kind, dynamo):
    if kind == "builder":
        model = fastmb.mobilenet_v3_large().eval()
        model.load_state_dict(torchvision_model.state_dict())
    else:
        model = fastmb.convert(copy.deepcopy(torchvision_model))
    x = torch.randn(2, 3, 224, 224)
    outputs, op_types = onnx_outputs(model, x, dynamo)
    assert not any(op.startswith("fastmb") or "dwconv" in op for op in op_types), op_types
    with torch.no_grad():
        assert relative_error(outputs, torchvision_model(x)) <= 1e-5


def test_torch_export_and_aot_inductor_keep_the_fused_ops(tmp_path):
    model = torch.nn.Sequential(fastmb.nn.DWConvBNAct(8, 3), fastmb.nn.SqueezeExcitation(8, 4)).eval()
    x = torch.randn(2, 8, 12, 12)
    exported = torch.export.export(model, (x,))
    targets = {str(node.target) for node in exported.graph.nodes}
    assert {"fastmb.dwconv_bn_act.default", "fastmb.squeeze_excitation.default"} <= targets
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(exported.module()(x), expected)
    if fastmb.backends()["cpu"] != "available":
        return  # AOTInductor runs the operators fastmb._C registers
    package = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "model.pt2"))
    with torch.no_grad():
        torch.testing.assert_close(torch._inductor.aoti_load_package(package)(x), expected)


@pytest.mark.parametrize("kind", ["builder", "converted_timm"])
def test_jit_trace_records_standard_ops(torchvision_model, kind):
    """A model traced after eval forwards (its memo made) traces the composites, not the
    whole-block calls (whose string lists the tracer rejected) or a replay the tracer cannot see;
    the saved trace loads and computes eager's outputs for other inputs."""
    if kind == "builder":
        model, eager = fastmb.mobilenet_v3_large().eval(), torchvision_model
        model.load_state_dict(torchvision_model.state_dict())
    else:
        timm = pytest.importorskip("timm")
        eager = calibrate_batch_norm(timm.create_model("mobilenetv4_conv_small"), resolution=96).eval()
        model = fastmb.convert(copy.deepcopy(eager)).eval()
    x, other = torch.randn(2, 3, 96, 96), torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        model(x), model(x)
        traced = torch.jit.trace(model, x)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        assert not [node.kind() for node in loaded.inlined_graph.nodes() if node.kind().startswith("fastmb::")]
        assert relative_error(loaded(other), eager(other)) <= 1e-5
        assert relative_error(model(other), eager(other)) <= 1e-5


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v2", "mobilenet_v1", "timm:mobilenetv4_conv_small"])
def test_fx_symbolic_trace_and_feature_extraction(name):
    """torch.fx.symbolic_trace and torchvision's create_feature_extractor trace a fastmb model's
    layers as their standard modules (they raised: the fused layers check and branch on x),
    computing the model's outputs and its features."""
    from torchvision.models.feature_extraction import create_feature_extractor

    if name.startswith("timm:"):
        timm = pytest.importorskip("timm")
        model = fastmb.convert(calibrate_batch_norm(timm.create_model(name[5:]), resolution=96)).eval()
        features = "blocks.2"
    else:
        model = calibrate_batch_norm(getattr(fastmb, name)(), resolution=96).eval()
        features = "features.5"
    x = torch.randn(2, 3, 64, 64)
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    assert not [node.target for node in traced.graph.nodes if "fastmb" in str(node.target)]
    extractor = create_feature_extractor(copy.deepcopy(model), {features: "features"})
    captured = []
    model.get_submodule(features).register_forward_hook(lambda module, args, out: captured.append(out))
    with torch.no_grad():  # float32 both, eager's unfolded batch norms against the fused layers' folded ones
        assert relative_error(traced(x), model(x)) <= 5e-5
        assert relative_error(extractor(x)["features"], captured[0]) <= 5e-5
