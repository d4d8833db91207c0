"""The compiled extension fastmb._C: it loads, and its operator schemas are the ones the
Python side (reference backend, fake implementations, autograd) is written against."""

import ctypes
import sys

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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libstdc++ is the C++ runtime on Linux")
def test_extension_uses_the_process_cpp_runtime():
    """A private copy of libstdc++ in fastmb._C (a compiler wrapper linking it statically) made
    every C++ error raised by the native ops crash the process (H200 machine, 2026-12-04): the
    extension's C++ runtime functions must be the shared library's, which torch uses."""
    if _extension.C is None:
        pytest.skip(f"fastmb._C is not built: {_extension.LOAD_ERROR}")
    extension, runtime = ctypes.CDLL(_extension.C.__file__), ctypes.CDLL("libstdc++.so.6")
    for symbol in ("__cxa_allocate_exception", "__cxa_begin_catch"):
        address = [ctypes.cast(getattr(library, symbol), ctypes.c_void_p).value for library in (extension, runtime)]
        assert address[0] == address[1], f"fastmb._C has its own {symbol}: was libstdc++ linked statically?"


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
def test_slot_stamps_change_with_each_kind_of_change(stamps):
    """fastmb._C.slot_stamps and its Python fallback (no extension) tell a tensor changed in
    place, one whose data was replaced, a different object in a slot, a key added or removed and
    a dict that grew; and nothing else."""
    from fastmb.ops import packing

    stamp = _extension.C.slot_stamps if stamps == "native" else packing._python_slot_stamps
    parameters, attributes = {"weight": torch.nn.Parameter(torch.randn(4, 3)), "bias": torch.randn(4)}, {"eps": 1e-5}
    slots = [(parameters, "weight"), (parameters, "bias"), (attributes, "eps"), (attributes, "activation"), (parameters, None)]

    def now() -> object:
        return stamp(slots, 2)

    before = now()
    assert now() == before
    with torch.no_grad():
        parameters["weight"].mul_(2)
    in_place = now()
    parameters["weight"].data = torch.randn(4, 3)
    replaced_data = now()
    parameters["bias"] = parameters["bias"].clone()
    other_tensor = now()
    attributes["eps"] = 1e-3
    other_value = now()
    attributes["activation"] = "relu"
    added_key = now()
    parameters["extra"] = None
    grown = now()
    assert len({before, in_place, replaced_data, other_tensor, other_value, added_key, grown}) == 7
    # past the tensor slots a tensor's value is not read: an in-place change is not seen there
    with torch.no_grad():
        parameters["weight"].add_(1)
    assert stamp(slots[1:], 0) == stamp(slots[1:], 0) and stamp(slots, 0) == stamp(slots, 0)
    with pytest.raises(TypeError):
        stamp([(parameters, "weight"), ([1], "x")], 1)
    # bad slots among the tensor slots (read ahead by the native version's prefetch passes)
    with pytest.raises(TypeError):
        stamp([(parameters, "weight"), ([1], "x"), (parameters, "bias")], 3)
    with pytest.raises(TypeError, match="unhashable"):
        stamp([(parameters, "weight"), (parameters, ["not", "hashable"])], 2)
    sparse = {"x": torch.randn(3, 3).to_sparse()}  # no storage
    with pytest.raises(RuntimeError):
        stamp([(parameters, "weight"), (sparse, "x")], 2)
    assert stamp([(sparse, "x")], 0) == stamp([(sparse, "x")], 0)
    with torch.inference_mode():
        inference = {"x": torch.randn(2)}
    with pytest.raises(RuntimeError, match="version counter"):
        stamp([(inference, "x")], 1)


def test_dict_versions_and_tensor_stamps_change_with_each_change():
    """fastmb._C.dict_versions gives a dict a new version at each change to it (another object set,
    even an equal one, a key added or removed, an OrderedDict's entry) and none while it is only
    read; tensor_stamps tells a tensor changed in place or given other data. Both refuse other
    objects."""
    import collections
    import sys

    versions, stamps = _extension.C.dict_versions, _extension.C.tensor_stamps
    plain, ordered = {"eps": 1e-5}, collections.OrderedDict(a=1)
    if sys.version_info >= (3, 14):
        assert versions([plain]) is None  # no versions to read: the Watch reads every slot
        return
    before = versions([plain, ordered])
    _ = plain["eps"], ordered.get("a"), len(ordered)
    assert versions([plain, ordered]) == before
    seen = [before]
    for change in (
        lambda: plain.__setitem__("eps", float("1e-5")),
        lambda: plain.__setitem__("momentum", 0.1),
        lambda: plain.pop("momentum"),
        lambda: ordered.__setitem__("b", 2),
        lambda: ordered.pop("a"),
        lambda: ordered.clear(),
    ):
        change()
        seen.append(versions([plain, ordered]))
    assert len(set(seen)) == len(seen)
    with pytest.raises(TypeError, match="item 1 must be a dict"):
        versions([plain, [1]])

    weight = torch.nn.Parameter(torch.randn(4, 3))
    first = stamps([weight])
    assert stamps([weight]) == first
    with torch.no_grad():
        weight.mul_(2)
    in_place = stamps([weight])
    weight.data = torch.randn(4, 3)
    assert len({first, in_place, stamps([weight])}) == 3
    with pytest.raises(TypeError, match="item 0 must be a tensor"):
        stamps([1.0])
    with torch.inference_mode():
        inference = torch.randn(2)
    with pytest.raises(RuntimeError, match="version counter"):
        stamps([inference])


@pytest.mark.parametrize("versions", ["native", "none"])
def test_watch_sees_each_kind_of_change(versions, monkeypatch):
    """A Watch (what plans and memos are checked with) tells each change to a slot, also after a
    change elsewhere in a watched dict (which it lets pass), with the dicts' versions and, as
    after CPython 3.13, without them."""
    from fastmb.ops import packing

    if versions == "none":
        monkeypatch.setattr(packing, "dict_versions", lambda dicts: None)
    full_reads, read_slots = [], packing.slot_stamps

    def counted_slot_stamps(slots: list, tensor_slots: int) -> object:
        full_reads.append(1)
        return read_slots(slots, tensor_slots)

    monkeypatch.setattr(packing, "slot_stamps", counted_slot_stamps)

    def parts() -> tuple[dict, dict, list]:
        parameters, attributes = {"weight": torch.nn.Parameter(torch.randn(4, 3)), "bias": torch.randn(4)}, {"eps": 1e-5}
        slots = [(parameters, "weight"), (parameters, "bias"), (attributes, "eps"), (attributes, "activation"), (parameters, None)]
        return parameters, attributes, slots

    def in_place(p: dict, a: dict) -> None:
        with torch.no_grad():
            p["weight"].mul_(2)

    changes = {
        "in place": in_place,
        "data replaced": lambda p, a: setattr(p["weight"], "data", torch.randn(4, 3)),
        "other tensor": lambda p, a: p.__setitem__("bias", p["bias"].clone()),
        "other value": lambda p, a: a.__setitem__("eps", 1e-3),
        "key added": lambda p, a: a.__setitem__("activation", "relu"),
        "dict grew": lambda p, a: p.__setitem__("extra", None),
    }
    for name, change in changes.items():
        for elsewhere_first in (False, True):
            parameters, attributes, slots = parts()
            watch = packing.Watch(slots)
            assert watch.unchanged(), name
            if elsewhere_first:  # a key no slot reads: still unchanged, and the versions taken again
                attributes["unwatched"] = 1
                assert watch.unchanged(), name
                full_reads.clear()
                assert watch.unchanged(), name
                assert full_reads == ([] if versions == "native" else [1]), name  # the short check again
            change(parameters, attributes)
            assert not watch.unchanged(), name
            assert not watch.unchanged(), name  # and stays changed
