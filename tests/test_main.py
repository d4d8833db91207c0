"""python -m fastmb, the main job."""

import sys
import threading
import time
import warnings

import pytest
import torch

import fastmb
from fastmb import __main__ as cli
from oracle import run_python


def test_default_run_exits_zero_and_prints_the_table():
    result = run_python(["-m", "fastmb", "--seconds", "0.2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parity (eval, fastmb reference): max relative error" in result.stdout
    # the CPU kernels' instruction set in the title where they are built
    kernels = f" ({fastmb._extension.C.cpu_isa} kernels)" if fastmb._extension.C is not None else ""
    assert f"mobilenet_v3_large, eval, cpu{kernels}, float32" in result.stdout
    assert "torchvision" in result.stdout and "fastmb reference" in result.stdout and "speedup" in result.stdout
    assert "... timing" in result.stderr  # progress


@pytest.fixture
def quick_compile(monkeypatch):
    """torch.compile through AOTAutograd without Inductor: the main job's plumbing at a few
    seconds instead of Inductor's minute or more a model."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend="aot_eager"))


def test_v1_training_step_beside_torch_compile(quick_compile, capsys):
    """Training is timed beside torch.compile of the baseline by default, with fastmb's ratio to it."""
    assert cli.main(["--model", "mobilenet_v1", "--mode", "train", "--batch-size", "2", "--resolution", "96", "--seconds", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "parity (train, fastmb reference)" in out and "mobilenet_v1, train" in out and "eager PyTorch" in out
    rows = {line[7:].rsplit(maxsplit=3)[0]: line for line in out.splitlines() if line.startswith("    2  ")}
    latency, throughput = map(float, rows["eager PyTorch + torch.compile"].split()[-3:-1])
    # printed to 0.01 ms and 0.1 images/s
    assert latency > 0 and throughput == pytest.approx(2e3 / latency, abs=0.051 + 2e3 * 0.006 / latency**2)
    assert "fastmb cpu vs eager PyTorch + torch.compile: " in out


def test_torch_compile_off_by_flag_and_on_failure(monkeypatch, capsys):
    """--no-compile leaves it out; so does a compile that fails, with the reason, and the other
    providers are timed as before."""
    args = ["--model", "mobilenet_v3_small", "--mode", "train", "--batch-size", "1", "--resolution", "64", "--seconds", "0.02"]
    assert cli.main([*args, "--no-compile"]) == 0
    assert "torch.compile" not in capsys.readouterr().out

    def failing_compile(model):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", failing_compile)
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "torch.compile left out: RuntimeError: no C++ compiler" in captured.err
    assert "torch.compile" not in captured.out and "fastmb cpu" in captured.out
    assert not cli.parse_args(["--device", "cpu"]).compile and cli.parse_args(["--device", "cpu", "--compile"]).compile


def test_timm_model(capsys):
    """A timm model, converted, against timm's own."""
    pytest.importorskip("timm")
    assert cli.main(["--model", "timm:lcnet_050", "--batch-size", "1", "--resolution", "64", "--seconds", "0.05", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "parity (eval, fastmb cpu)" in out and "timm:lcnet_050, eval" in out


def test_profile_and_nchw(capsys):
    args = ["--model", "mobilenet_v3_small", "--profile", "--nchw", "--batch-size", "1", "--seconds", "0.05", "--no-runtimes"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "56,510,400" in out and "bytes moved" in out and "float32, NCHW" in out and "onnxruntime" not in out


def test_runtimes_are_timed_beside_fastmb_in_channels_last_by_default(capsys):
    """ONNX Runtime and OpenVINO on the torchvision model's export, where installed, and the
    ratio of fastmb's time to the faster of them."""
    installed = [r for r in ("onnxruntime", "openvino") if fastmb.runtimes.installed(r)]
    if not installed:
        pytest.skip("neither onnxruntime nor openvino is installed")
    assert cli.main(["--model", "mobilenet_v3_small", "--batch-size", "1", "--resolution", "64", "--seconds", "0.05", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "float32, channels_last" in out
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("    1  ")}
    assert set(installed) <= set(rows) and "fastmb cpu vs" in out
    # the same table as the PyTorch providers: latency, throughput and speedup over torchvision
    for runtime in installed:
        latency, throughput = map(float, rows[runtime].split()[2:4])
        assert latency > 0 and throughput == pytest.approx(1e3 / latency, rel=0.006 / latency + 0.001)  # printed to 0.01 ms


def test_refuses_to_report_speed_when_outputs_disagree(monkeypatch, capsys):
    real_build_pair = cli.build_pair

    def broken_pair(name):
        baseline, ours, label = real_build_pair(name)
        with torch.no_grad():
            next(ours.parameters()).mul_(2)
        return baseline, ours, label

    monkeypatch.setattr(cli, "build_pair", broken_pair)
    assert cli.main(["--model", "mobilenet_v3_small", "--batch-size", "1", "--seconds", "0.05"]) == 1
    captured = capsys.readouterr()
    assert "MISMATCH" in captured.out and "not reporting speed" in captured.err
    assert "latency" not in captured.out


def test_unavailable_backend_and_bad_arguments(capsys):
    with pytest.raises(SystemExit, match="not available"):
        cli.main(["--backend", "cuda", "--device", "cpu"])
    with pytest.raises(SystemExit):
        cli.main(["--batch-size", "0"])
    with pytest.raises(SystemExit):
        cli.main(["--model", "resnet50"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "foo"], "is not a device"),
        (["--device", "cuda:99"], "cuda"),
        (["--device", "meta"], "runs on cpu and cuda"),
        (["--resolution", "0"], "--resolution must be positive"),
        (["--resolution", "-3"], "--resolution must be positive"),
        (["--seconds", "0"], "--seconds must be positive"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--model", "resnet50"], "or timm:<name>"),
        (["--model", "timm:not_a_model"], "timm has no model 'not_a_model'"),
    ],
)
def test_bad_flags_are_one_line_and_a_nonzero_exit(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(flags)
    assert exit_info.value.code not in (0, None)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_a_bad_flag_ends_the_process_without_a_traceback():
    result = run_python(["-m", "fastmb", "--device", "foo"], timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["python -m fastmb: error: --device 'foo' is not a device: cpu, cuda or cuda:N (--help lists the options)"]


def test_rows_say_which_kernels_ran(capsys):
    """float16 on the CPU: the cpu backend's kernels do not take it, so the row says it ran on
    the reference."""
    args = ["--model", "mobilenet_v3_small", "--dtype", "float16", "--backend", "cpu", "--batch-size", "1", "--resolution", "64"]
    assert cli.main([*args, "--seconds", "0.01"]) == 0
    assert "fastmb cpu (ran: reference)" in capsys.readouterr().out


def test_a_gpu_run_times_auto_beside_each_backend():
    """On CUDA "auto" (the measured table's choice) is what users get: timed first, then every
    available backend forced; on the CPU the backends alone, as before."""
    status = fastmb.backends()
    available = [b for b in ("cuda", "triton", "reference") if status[b] == "available"]
    assert cli.fastmb_backends(torch.device("cuda"), "all") == ["auto", *available]
    assert "auto" not in cli.fastmb_backends(torch.device("cpu"), "all")
    assert cli.fastmb_backends(torch.device("cuda"), "reference") == ["reference"]


def test_check_passes_here_and_fails_on_a_broken_kernel(monkeypatch, capsys):
    assert cli.main(["check", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "checks passed" in out and "MISMATCH" not in out
    if fastmb.backends()["cpu"] != "available":
        return
    from fastmb import dispatch

    native = dispatch.kernels("dwconv_bn_act")["cpu"]

    def off_by_a_bit(*args):
        y, mean, var = native.forward(*args)
        return y * 1.01, mean, var

    monkeypatch.setattr(dispatch, "_KERNELS", dict(dispatch._KERNELS))
    dispatch.register_kernel("cpu", "dwconv_bn_act", off_by_a_bit, native.backward, native.supports)
    assert cli.main(["check", "--device", "cpu"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_unvalidated_gpu_warns_until_a_check_passes(monkeypatch, tmp_path):
    """No GPU here: the GPU's name is faked, and the warning function called as select() would."""
    from fastmb import check, dispatch

    monkeypatch.setenv("FASTMB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU 9000")
    warn = dispatch._warn_unvalidated_gpu.__wrapped__
    with pytest.warns(RuntimeWarning, match="not validated on Fake GPU 9000.*python -m fastmb check --device cuda"):
        warn(0)
    check.record_validated(torch.device("cuda", 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn(0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads thread states from /proc (Linux)")
def test_alternated_providers_wait_for_the_others_spinning_threads():
    """measure() starts each provider once the process's other threads are idle: a runtime's
    pool threads that still busy-wait would take a core from the provider timed next."""
    fastmb.runtimes.wait_for_idle_threads()  # earlier tests' pool threads may still spin
    assert fastmb.runtimes.wait_for_idle_threads() < 0.01  # nothing else running now
    started = threading.Event()

    def spin():  # a pool thread busy-waiting for more work: native code, mostly without the GIL
        a = torch.ones(1024, 1024)
        # 0.4 s from its first product, not from before the thread started: on a loaded host the
        # start took long enough that under 0.1 s was left after the first wait's 0.1-0.2 s.
        stop = time.perf_counter() + 0.4
        while time.perf_counter() < stop:
            started.set()
            a @ a

    spinner = threading.Thread(target=spin)
    spinner.start()
    started.wait()
    try:
        assert 0.1 <= fastmb.runtimes.wait_for_idle_threads(timeout=0.1) < 0.2  # gives up in time
        assert fastmb.runtimes.wait_for_idle_threads() > 0.1  # waits out the rest of the spin
    finally:
        spinner.join()
