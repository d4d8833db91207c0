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


@pytest.mark.parametrize("name", list(OPS))
def test_cuda_build_has_a_kernel_for_every_op(name):
    """Runs without a GPU: the kernels' registration for the CUDA dispatch key is static."""
    if _extension.C is None or _extension.C.cuda_build != "built":
        pytest.skip(f"fastmb._C was built without its CUDA part ({_extension.C and _extension.C.cuda_build})")
    assert _extension.has_kernel(name, "CUDA")
    assert _extension.has_kernel(name, "CPU")


def test_cuda_backend_is_registered_for_every_fused_op():
    from fastmb import dispatch

    if _extension.C is None or _extension.C.cuda_build != "built":
        pytest.skip("fastmb._C was built without its CUDA part")
    assert {op for backend, op in dispatch._KERNELS if backend == "cuda"} == {"dwconv_bn_act", "squeeze_excitation"}


def test_activation_and_gate_codes_match_the_kernels():
    """fastmb.ops.activations' codes are the enumerators of csrc/activations.h, and its names are
    the ones the operators parse (csrc/common.h)."""
    from pathlib import Path

    from fastmb.ops.activations import ACTIVATIONS, GATES

    csrc = Path(__file__).resolve().parents[1] / "csrc"
    if not csrc.exists():
        pytest.skip("needs the source tree")
    enums, parsing = (csrc / "activations.h").read_text(), (csrc / "common.h").read_text()
    for entry in (*ACTIVATIONS.values(), *GATES.values()):
        enumerator = "k" + "".join(part.capitalize() for part in entry.name.split("_"))  # gelu_tanh: kGeluTanh
        assert f"{enumerator} = {entry.code}" in enums, entry.name
        assert f'"{entry.name}"' in parsing, entry.name


@pytest.mark.parametrize("stamps", ["native", "python"])
def test_tensor_stamps_change_with_each_kind_of_change(stamps):
    """fastmb._C.tensor_stamps and its Python fallback (no extension) tell a tensor changed in
    place, one whose data was replaced, and a different tensor; and nothing else."""
    from fastmb.ops import packing

    stamp = _extension.C.tensor_stamps if stamps == "native" else packing._python_tensor_stamps
    weight, bias = torch.nn.Parameter(torch.randn(4, 3)), torch.randn(4)
    before = stamp([weight, bias])
    assert stamp([weight, bias]) == before and stamp([weight, weight.detach()]) != before
    with torch.no_grad():
        weight.mul_(2)
    in_place = stamp([weight, bias])
    weight.data = torch.randn(4, 3)
    replaced = stamp([weight, bias])
    assert len({before, in_place, replaced}) == 3
    with pytest.raises(TypeError):
        stamp([weight, 1.0])
    with torch.inference_mode():
        inference = torch.randn(2)
    with pytest.raises(RuntimeError, match="version counter"):
        stamp([inference])
