"""fastmb.profile against torchvision's published operation counts and the MobileNet paper."""

import pytest
import torchvision

import fastmb


@pytest.mark.parametrize(
    "name, macs, params",
    [("mobilenet_v2", 300_774_272, 3_504_872), ("mobilenet_v3_large", 216_589_760, 5_483_032), ("mobilenet_v3_small", 56_510_400, 2_542_856)],
)
def test_exact_macs_for_torchvision_and_fastmb_models(name, macs, params):
    theirs = fastmb.profile(getattr(torchvision.models, name)())
    ours = fastmb.profile(getattr(fastmb, name)())
    assert theirs.macs == ours.macs == macs
    assert theirs.params == ours.params == params
    assert sum(r.params for r in ours.rows) == sum(r.params for r in theirs.rows) == params
    # fastmb's eval path fuses (depthwise) or folds (pointwise) every BatchNorm: fewer passes.
    assert ours.elementwise < theirs.elementwise
    assert ours.bytes < theirs.bytes


# MobileNet paper, Table 6 (width multiplier) and Table 7 (resolution), million mult-adds.
@pytest.mark.parametrize(
    "width_mult, resolution, million_macs",
    [(1.0, 224, 568.7), (0.75, 224, 325.4), (0.5, 224, 149.5), (0.25, 224, 41.0), (1.0, 192, 418.1), (1.0, 160, 290.7), (1.0, 128, 186.4)],
)
def test_mobilenet_v1_matches_the_paper(width_mult, resolution, million_macs):
    result = fastmb.profile(fastmb.mobilenet_v1(width_mult=width_mult), (1, 3, resolution, resolution))
    assert result.macs / 1e6 == pytest.approx(million_macs, rel=0.002)


def test_rows_table_and_dict():
    model = fastmb.mobilenet_v3_small()
    result = fastmb.profile(model, (2, 3, 96, 96))
    assert model.training  # restored
    rows = {row.name: row for row in result.rows}
    # on the CPU each block is one op: depthwise 3x3 (16 channels), SE (16 -> 8 -> 16), projection
    block = rows["features.1"]
    assert block.op == "fastmb.inverted_residual" and block.output_shape == (2, 16, 24, 24)
    assert block.macs == 2 * 24 * 24 * 16 * 9 + 2 * 2 * 16 * 8 + 2 * 24 * 24 * 16 * 16
    assert block.params == (16 * 9 + 2 * 16) + (16 * 8 + 8 + 8 * 16 + 16) + (16 * 16 + 2 * 16)
    with fastmb.use_backend("reference"):  # layer by layer
        layers = {row.name: row for row in fastmb.profile(model, (2, 3, 96, 96)).rows}
    depthwise = layers["features.1.block.0"]
    assert depthwise.op.startswith("fastmb.dwconv_bn_act")
    assert depthwise.output_shape == (2, 16, 24, 24)
    assert depthwise.macs == 2 * 16 * 24 * 24 * 9
    assert depthwise.params == 16 * 9 + 2 * 16
    se = layers["features.1.block.1"]
    assert se.op.startswith("fastmb.squeeze_excitation") and se.macs == 2 * 2 * 16 * 8
    table = str(result)
    assert "features.1" in table and table.splitlines()[-1].startswith("total")
    as_dict = result.to_dict()
    assert as_dict["macs"] == result.macs and len(as_dict["rows"]) == len(result.rows)


def test_converted_timm_model():
    """The fused timm blocks count the same MACs and parameters, and fewer bytes."""
    timm = pytest.importorskip("timm")
    theirs = fastmb.profile(timm.create_model("efficientnet_b0", pretrained=False), (1, 3, 96, 96))
    ours = fastmb.profile(fastmb.convert(timm.create_model("efficientnet_b0", pretrained=False)), (1, 3, 96, 96))
    assert ours.macs == theirs.macs > 0 and ours.params == theirs.params == 5_288_548
    assert ours.bytes < theirs.bytes
