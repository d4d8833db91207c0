"""The compiled extension fastmb._C: it loads, and its operator schemas are the ones the
Python side (reference backend, fake implementations, autograd) is written against."""

import pytest
import torch

from fastmb import _extension
from fastmb.ops import schemas

OPS = {
    "dwconv_bn_act": schemas.DWCONV_BN_ACT,
    "dwconv_bn_act_backward": schemas.DWCONV_BN_ACT_BACKWARD,
    "squeeze_excitation": schemas.SQUEEZE_EXCITATION,
    "squeeze_excitation_backward": schemas.SQUEEZE_EXCITATION_BACKWARD,
}


def test_extension_is_built_and_importable():
    assert _extension.C is not None, _extension.LOAD_ERROR
    assert _extension.C.cuda_build == "built" or _extension.C.cuda_build.startswith("not built")


@pytest.mark.parametrize("name", list(OPS))
def test_native_schema_matches_reference_schema(name):
    native = getattr(torch.ops.fastmb, name).default._schema
    reference = getattr(torch.ops.fastmb, f"{name}_reference").default._schema
    assert str(native).replace(f"fastmb::{name}(", "(") == str(reference).replace(f"fastmb::{name}_reference(", "(")
    assert str(reference).endswith(OPS[name].split("->")[-1].strip())
