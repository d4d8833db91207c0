"""fastmb.backends / set_backend / use_backend and the per-call backend selection."""

import threading
import warnings

import pytest
import torch

import fastmb
from fastmb import dispatch as registry
from fastmb.ops.reference import dwconv_bn_act as reference_dwconv


def test_backends_lists_every_backend_with_a_status():
    status = fastmb.backends()
    assert list(status) == ["reference", "cpu", "cuda", "triton"]
    assert status["reference"] == "available"
    assert all(isinstance(v, str) and v for v in status.values())


def test_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        fastmb.set_backend("tpu")
    with pytest.raises(ValueError, match="backend must be"):
        with fastmb.use_backend("fast"):
            pass


def test_unavailable_backend_raises_with_the_reason():
    unavailable = {name: why for name, why in fastmb.backends().items() if why != "available"}
    if not unavailable:
        pytest.skip("every backend is available on this machine")
    for name, why in unavailable.items():
        with pytest.raises(RuntimeError, match="not available") as error:
            fastmb.set_backend(name)
        assert why in str(error.value)


def test_cuda_backend_says_how_the_extension_was_built():
    from fastmb import _extension

    if _extension.C is not None and _extension.C.cuda_build != "built":
        assert _extension.C.cuda_build in fastmb.backends()["cuda"]


def test_use_backend_is_scoped_and_thread_local():
    seen = {}
    with fastmb.use_backend("reference"):
        assert registry.current_backend() == "reference"
        thread = threading.Thread(target=lambda: seen.update(other=registry.current_backend()))
        thread.start()
        thread.join()
    assert seen["other"] == "auto"
    assert registry.current_backend() == "auto"
    fastmb.set_backend("reference")
    try:
        assert registry.current_backend() == "reference"
    finally:
        fastmb.set_backend("auto")


def test_auto_warns_once_when_it_falls_back_to_reference(monkeypatch):
    monkeypatch.setattr(registry, "_warned_device_types", set())
    x, weight = torch.randn(1, 2, 4, 4), torch.randn(2, 1, 3, 3)
    stats = torch.zeros(2), torch.ones(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            fastmb.ops.dwconv_bn_act(x, weight, None, None, *stats)
    fallbacks = [w for w in caught if "running the reference implementation" in str(w.message)]
    expected = 0 if fastmb.backends()["cpu"] == "available" else 1
    assert len(fallbacks) == expected
    if fallbacks:
        assert fastmb.backends()["cpu"] in str(fallbacks[0].message)


def test_unsupported_input_falls_back_to_the_reference(monkeypatch):
    """A backend kernel that declines an input (here: 7x7 kernels) leaves it to the reference."""
    calls = []

    def fake_cpu_kernel(*args):
        calls.append(args[1].shape[-1])
        return reference_dwconv.forward_op(*args)

    monkeypatch.setattr(registry, "_KERNELS", dict(registry._KERNELS))
    registry.register_kernel(
        "cpu", "dwconv_bn_act", fake_cpu_kernel, reference_dwconv.backward_op, supports=lambda x, weight, *rest: weight.shape[-1] != 7
    )
    monkeypatch.setattr(registry, "_unavailable_reason", lambda name: None)
    x = torch.randn(1, 2, 8, 8)
    stats = torch.zeros(2), torch.ones(2)
    for kernel in (3, 7):
        for backend in ("auto", "cpu"):
            with fastmb.use_backend(backend):
                fastmb.ops.dwconv_bn_act(x, torch.randn(2, 1, kernel, kernel), None, None, *stats)
    assert calls == [3, 3]


def test_register_kernel_rejects_unknown_backends():
    with pytest.raises(ValueError, match="backend must be one of"):
        registry.register_kernel("opencl", "dwconv_bn_act", reference_dwconv.forward_op, reference_dwconv.backward_op)


def test_auto_order_for_cuda_comes_from_the_measured_table(tmp_path, monkeypatch):
    import json

    table = tmp_path / "auto_order.json"
    table.write_text(json.dumps({"measured": "test", "order": {"dwconv_bn_act": ["triton", "cuda"]}}))
    monkeypatch.setattr(registry, "AUTO_ORDER_FILE", str(table))
    registry.auto_order.cache_clear()
    try:
        assert registry.auto_order("dwconv_bn_act", "cuda") == ("triton", "cuda")
        assert registry.auto_order("squeeze_excitation", "cuda") == ("cuda", "triton")  # not in the table
        assert registry.auto_order("dwconv_bn_act", "cpu") == ("cpu",)
    finally:
        registry.auto_order.cache_clear()


@pytest.fixture
def auto_order_table(tmp_path, monkeypatch):
    """Writes a measured table of {op: order} for the test and makes "auto" read it."""
    import json

    def write(order: dict[str, list[str]]) -> None:
        table = tmp_path / "auto_order.json"
        table.write_text(json.dumps({"measured": "test", "order": order}))
        monkeypatch.setattr(registry, "AUTO_ORDER_FILE", str(table))
        registry.auto_order.cache_clear()

    yield write
    registry.auto_order.cache_clear()


def test_auto_runs_pytorch_where_the_table_ranks_it_ahead_of_every_usable_backend(auto_order_table, device):
    stats = torch.zeros(2, device=device), torch.ones(2, device=device)
    x, weight = torch.randn(1, 2, 5, 5, device=device), torch.randn(2, 1, 3, 3, device=device)
    args = (x, weight, None, None, *stats, [1, 1], [1, 1], [1, 1], 1e-5, False, "relu")  # the op's schema arguments
    auto_order_table({"dwconv_bn_act": ["pytorch", "cuda"]})
    assert registry.runs_pytorch("dwconv_bn_act", "cuda", args)
    assert not registry.runs_pytorch("dwconv_bn_act", "cpu", args)  # the table is for GPUs
    with fastmb.use_backend("reference"):  # a chosen backend is not overruled
        assert not registry.runs_pytorch("dwconv_bn_act", "cuda", args)
    auto_order_table({"dwconv_bn_act": ["triton", "cuda"]})
    assert not registry.runs_pytorch("dwconv_bn_act", "cuda", args)  # not in the order: a backend or the reference
    usable = fastmb.backends()["cuda"] == "available"
    auto_order_table({"dwconv_bn_act": ["cuda", "pytorch"]})
    # behind a backend: PyTorch only where that backend cannot run (here: no GPU build)
    assert registry.runs_pytorch("dwconv_bn_act", "cuda", args) != usable
    with registry.record_backends() as ran:
        auto_order_table({"dwconv_bn_act": ["pytorch"]})
        registry.runs_pytorch("dwconv_bn_act", "cuda", args)
    assert ran == {"pytorch"}


def test_committed_auto_order_table_names_known_ops_and_backends():
    import json

    with open(registry.AUTO_ORDER_FILE) as file:
        table = json.load(file)
    assert "measured" in table and "source" in table
    for op, order in table["order"].items():
        assert op in ("dwconv_bn_act", "squeeze_excitation")
        assert set(order) <= {"cuda", "triton", registry.PYTORCH} and len(set(order)) == len(order) >= 2
