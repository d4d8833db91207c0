"""python -m fastmb: build a MobileNet, load a torchvision (or eager) model's weights into the
fastmb one, check that both compute the same thing, then time both on each available backend,
and (CPU, fp32 eval) ONNX Runtime and OpenVINO on the baseline's ONNX export when installed,
and (training, CUDA) torch.compile of the baseline, in alternating rounds.
`python -m fastmb check [--device D]` checks every available fused backend against the
reference on this machine (fastmb/check.py).
"""

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import fastmb
from fastmb import _extension, dispatch, runtimes
from fastmb.models.calibration import calibrate_batch_norm

MODELS = ("mobilenet_v1", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BACKENDS_BY_DEVICE = {"cpu": ("reference", "cpu", "triton"), "cuda": ("cuda", "triton", "reference")}
PARITY_TOLERANCE = 1e-4  # max |fastmb - baseline| / max |baseline|, fp32


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line and exit status 2, without argparse's usage block."""
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog="python -m fastmb",
        description="Check a fastmb MobileNet against torchvision's (same weights), then time both: "
        "latency, throughput and speedup for torchvision eager and each available fastmb backend.",
    )
    parser.add_argument("--model", default="mobilenet_v3_large",
                        help=f"one of {', '.join(MODELS)}, or timm:<name> for a timm model (fastmb.convert'ed)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=None, metavar="N",
                        help="one or more batch sizes (default: 1 and 16 on CPU, 1 and 256 on CUDA)")
    parser.add_argument("--mode", choices=("eval", "train"), default="eval",
                        help="eval: a forward pass without grad; train: a full SGD step (forward, backward, update)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of the timed runs")
    parser.add_argument("--nchw", action="store_true",
                        help="contiguous (NCHW) inputs and baseline model, as a user who never asks for channels_last has them; "
                        "fastmb's models keep their channels_last weights, so they run channels_last from the first conv. "
                        "The default is channels_last everywhere, the fast layout on both devices")
    parser.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)  # the default now; still accepted
    parser.add_argument("--backend", choices=("all", *fastmb.backends()), default="all",
                        help="fastmb backend(s) to time (default: every available one)")
    parser.add_argument("--resolution", type=int, default=224, help="input height and width")
    parser.add_argument("--profile", action="store_true", help="also print per-layer params, MACs and bytes moved")
    parser.add_argument("--seconds", type=float, default=1.0, help="time budget per provider and batch size")
    parser.add_argument("--no-runtimes", action="store_true",
                        help="leave out ONNX Runtime and OpenVINO (timed by default on the CPU in fp32 eval when installed)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time torch.compile of the baseline (Inductor), the alternative a user picks for training and "
                        "on a GPU: on by default in train mode and on CUDA devices; compiling takes a minute or more on a "
                        "small CPU")
    args = parser.parse_args(argv)
    check_model(parser, args.model)
    if args.batch_size and min(args.batch_size) < 1:
        parser.error("--batch-size must be positive")
    if args.resolution < 1:
        parser.error(f"--resolution must be positive, got {args.resolution}")
    if not args.seconds > 0:
        parser.error(f"--seconds must be positive, got {args.seconds}")
    if args.nchw and args.channels_last:
        parser.error("--nchw and --channels-last contradict each other")
    args.device = resolve_device(parser, args.device)
    if args.compile is None:
        args.compile = args.mode == "train" or args.device.type == "cuda"
    return args


def check_model(parser: argparse.ArgumentParser, name: str) -> None:
    if name in MODELS:
        return
    if not name.startswith("timm:"):
        parser.error(f"--model {name!r}: one of {', '.join(MODELS)}, or timm:<name>")
    try:
        import timm
    except ImportError:
        parser.error(f"--model {name}: timm is not installed (pip install timm)")
    if name[5:] not in timm.list_models():
        parser.error(f"--model {name}: timm has no model {name[5:]!r} (timm.list_models() lists them)")


def resolve_device(parser: argparse.ArgumentParser, spec: str | None) -> torch.device:
    """The device to run on: `spec`, checked, or cuda when there is one, else cpu."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        parser.error(f"--device {spec!r} is not a device: cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {spec}: no CUDA device here (torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        parser.error(f"--device {spec}: fastmb runs on cpu and cuda devices")
    return device


def progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def eager_copy(model: nn.Module) -> nn.Module:
    """`model` with every fused fastmb module replaced by the eager PyTorch modules it fuses
    (same parameters): the baseline for architectures torchvision does not have (V1)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, fastmb.nn.DWConvBNAct):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, nn.Sequential(*module))
    return model


def build_pair(name: str) -> tuple[nn.Module, nn.Module, str]:
    """(baseline, fastmb model with the baseline's state_dict, baseline's name)."""
    if name.startswith("timm:"):
        import timm

        baseline = timm.create_model(name[5:], pretrained=False)  # random weights: nothing downloads
        calibrate_batch_norm(baseline, resolution=96)
        return baseline, fastmb.convert(copy.deepcopy(baseline)), "timm"
    ours = getattr(fastmb, name)()
    if name == "mobilenet_v1":
        baseline, label = eager_copy(ours), "eager PyTorch"
    else:
        try:
            import torchvision
        except ImportError:
            sys.exit(f"python -m fastmb: error: the {name} baseline is torchvision's: pip install torchvision")

        baseline, label = getattr(torchvision.models, name)(), "torchvision"
    calibrate_batch_norm(baseline, resolution=96)
    ours.load_state_dict(baseline.state_dict(), strict=True)
    return baseline, ours, label


def fastmb_backends(device: torch.device, choice: str) -> list[str]:
    status = fastmb.backends()
    if choice != "all":
        if status[choice] != "available":
            sys.exit(f"fastmb backend {choice!r} is not available: {status[choice]}")
        return [choice]
    available = [b for b in BACKENDS_BY_DEVICE.get(device.type, ("reference",)) if status[b] == "available"]
    # On a GPU "auto" follows the measured table (PyTorch's kernels where fastmb's lost): what a
    # user gets by default, timed beside each backend forced.
    return ["auto", *available] if device.type == "cuda" else available


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def check_parity(baseline: nn.Module, ours: nn.Module, backends: list[str], device: torch.device, mode: str, resolution: int) -> bool:
    """fp32 outputs of both models, eval mode (and train mode's batch statistics when timing
    training), on every backend."""
    x = torch.randn(2, 3, resolution, resolution, device=device, generator=torch.Generator(device).manual_seed(1))
    ok = True
    for training in (False, True) if mode == "train" else (False,):
        expected_model = copy.deepcopy(baseline).to(device).train(training)
        torch.manual_seed(2)  # the same dropout mask for both models
        with torch.no_grad():
            expected = expected_model(x)
        for backend in backends:
            model = copy.deepcopy(ours).to(device).train(training)
            torch.manual_seed(2)
            with torch.no_grad(), fastmb.use_backend(backend):
                error = relative_error(model(x), expected)
            verdict = "ok" if error <= PARITY_TOLERANCE else "MISMATCH"
            print(f"parity ({'train' if training else 'eval'}, fastmb {backend}): max relative error {error:.2e}  {verdict}")
            ok &= error <= PARITY_TOLERANCE
    return ok


def step_function(model: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], object]:
    if mode == "eval":
        model.eval()

        def run():
            with torch.no_grad():
                return model(x)

        return run
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    target = torch.randint(0, 1000, (x.shape[0],), device=x.device)

    def run():
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x).float(), target)
        loss.backward()
        optimizer.step()
        return loss

    return run


def measure(fns: list[Callable[[], object]], device: torch.device, seconds: float, rounds: int = 3) -> list[float]:
    """Median milliseconds per call of each function, timed in `rounds` alternating rounds (the
    machine's speed drifts; each round starts once the previous provider's threads have gone
    idle, with an untimed warm-up call): about `seconds` per function in all. CUDA timings use
    events with synchronisation."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()  # compile, allocate
    for _ in range(rounds):
        for fn, samples in zip(fns, times):
            runtimes.wait_for_idle_threads()
            fn()
            round_times: list[float] = []
            started = time.perf_counter()
            while len(round_times) < 3 or (time.perf_counter() - started < seconds / rounds and len(round_times) < 100):
                round_times.append(time_call(fn, device))
            samples += round_times
    return [statistics.median(samples) for samples in times]


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)
    begin_s = time.perf_counter()
    fn()
    return (time.perf_counter() - begin_s) * 1e3


def with_backend(fn: Callable[[], object], backend: str | None, ran: set[str]) -> Callable[[], object]:
    """fn under fastmb backend `backend` ("auto" for None), adding the backends that ran to `ran`
    until some did: recorded on every call, that cost 20-40 us of a 2 ms forward at batch 1."""

    def run():
        with fastmb.use_backend(backend or "auto"):
            if ran:
                return fn()
            with dispatch.record_backends() as used:
                fn()
            ran.update(used)

    return run


def runtime_providers(args: argparse.Namespace, baseline: nn.Module, x: torch.Tensor) -> list[tuple[str, Callable[[], object]]]:
    """ONNX Runtime and OpenVINO on the baseline's ONNX export, where they apply and are installed."""
    if args.no_runtimes or args.device.type != "cpu" or args.mode != "eval" or args.dtype != "float32":
        return []
    installed = [r for r in runtimes.RUNTIMES if runtimes.installed(r)]
    if not installed:
        return []
    progress(f"exporting the baseline to ONNX for {', '.join(installed)}, batch {x.shape[0]}")
    try:
        onnx_model = runtimes.export_onnx(copy.deepcopy(baseline).eval(), x)
        return [(r, runtimes.runner(r, onnx_model, x, torch.get_num_threads())) for r in installed]
    except Exception as error:  # an export or runtime failure leaves the PyTorch comparison standing
        progress(f"ONNX Runtime / OpenVINO left out: {type(error).__name__}: {error}")
        return []


def compiled_name(label: str) -> str:
    return f"{label} + torch.compile"


def compiled_provider(args: argparse.Namespace, baseline: nn.Module, label: str, x: torch.Tensor,
                      memory_format: torch.memory_format) -> list[tuple[str, Callable[[], object]]]:
    """torch.compile of the baseline with default options, compiled here by a first untimed call
    (a compile failure leaves the other providers standing)."""
    if not args.compile:
        return []
    name = compiled_name(label)
    progress(f"compiling {name}, batch {x.shape[0]}, {args.mode} (a minute or more on a small CPU)")
    model = copy.deepcopy(baseline).to(device=x.device, dtype=x.dtype, memory_format=memory_format)
    try:
        fn = step_function(torch.compile(model), x, args.mode)
        fn()
    except Exception as error:  # e.g. no C++ compiler for Inductor's CPU code, or a Python Dynamo does not support
        progress(f"torch.compile left out: {type(error).__name__}: {error}")
        return []
    return [(name, fn)]


def check_main(argv: list[str]) -> int:
    parser = _Parser(
        prog="python -m fastmb check",
        description="Check every available fastmb backend on this machine against the reference (float64): outputs, "
        "gradients and running statistics of both fused ops, under DESIGN.md's error rule. Exits 1 on any mismatch.",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    device = resolve_device(parser, parser.parse_args(argv).device)
    from fastmb import check

    return check.main(device)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        return check_main(argv[1:])
    args = parse_args(argv)
    device = args.device
    dtype = DTYPES[args.dtype]
    batch_sizes = args.batch_size or [1, 256 if device.type == "cuda" else 16]
    memory_format = torch.contiguous_format if args.nchw else torch.channels_last
    backends = fastmb_backends(device, args.backend)
    torch.manual_seed(0)

    progress(f"building {args.model} (fastmb and baseline)")
    baseline, ours, label = build_pair(args.model)
    if not check_parity(baseline, ours, backends, device, args.mode, args.resolution):
        print(f"fastmb and {label} disagree beyond {PARITY_TOLERANCE:g}: not reporting speed.", file=sys.stderr)
        return 1

    if args.profile:
        input_size = (1, 3, args.resolution, args.resolution)
        ours_profile, baseline_profile = fastmb.profile(ours, input_size), fastmb.profile(baseline, input_size)
        print(f"\nfastmb {args.model} at {args.resolution}x{args.resolution}, batch 1:\n{ours_profile}")
        print(f"\n{'':18}{'params':>12}{'MACs':>16}{'elementwise':>14}{'bytes moved':>16}")
        for name, p in ((label, baseline_profile), ("fastmb", ours_profile)):
            print(f"{name:18}{p.params:>12,}{p.macs:>16,}{p.elementwise:>14,}{p.bytes:>16,}")

    providers = [(label, baseline, None)] + [(f"fastmb {b}", ours, b) for b in backends]
    rows = []
    for batch in batch_sizes:
        x = torch.randn(batch, 3, args.resolution, args.resolution, device=device, dtype=dtype)
        x = x.contiguous(memory_format=memory_format)
        names, fns, used = [], [], []
        for name, model, backend in providers:
            progress(f"preparing {name}, batch {batch}, {args.mode}")
            # fastmb's models are channels_last as built or converted, whatever the input's layout
            model = copy.deepcopy(model).to(device=device, dtype=dtype, memory_format=memory_format if backend is None else None)
            used.append(set())
            names.append(name)
            fns.append(with_backend(step_function(model, x, args.mode), backend, used[-1]))
        for name, fn in runtime_providers(args, baseline, x) + compiled_provider(args, baseline, label, x, memory_format):
            names.append(name)
            fns.append(fn)
        progress(f"timing {len(fns)} providers in alternating rounds, batch {batch}")
        times = measure(fns, device, args.seconds)
        for index, (name, ms) in enumerate(zip(names, times)):
            backend = providers[index][2] if index < len(providers) else None
            if backend is not None and used[index] != {backend}:  # inputs its kernels do not take ran elsewhere
                name = f"{name} (ran: {', '.join(sorted(used[index]))})"
            rows.append((batch, name, ms, batch / ms * 1e3, times[0] / ms))
        runtime_times = {n: ms for n, ms in zip(names, times) if n in runtimes.RUNTIMES}
        if runtime_times and "fastmb cpu" in names:
            fastest = min(runtime_times, key=runtime_times.get)
            ratio = runtime_times[fastest] / times[names.index("fastmb cpu")]
            rows.append((batch, f"fastmb cpu vs {fastest}: {ratio:.2f}x", None, None, None))
        compiled = compiled_name(label)
        fastmb_times = {n: ms for n, ms in zip(names, times) if n.startswith("fastmb ") and n != "fastmb reference"}
        if compiled in names and fastmb_times:
            best = min(fastmb_times, key=fastmb_times.get)
            ratio = times[names.index(compiled)] / fastmb_times[best]
            rows.append((batch, f"{best} vs {compiled}: {ratio:.2f}x", None, None, None))

    layout = "NCHW" if args.nchw else "channels_last"
    # The CPU kernels' instruction set: readings on AVX2 and AVX-512 hosts differ (README).
    isa = f" ({_extension.C.cpu_isa} kernels)" if device.type == "cpu" and _extension.C is not None else ""
    title = f"{args.model}, {args.mode}, {device}{isa}, {args.dtype}, {layout}"
    width = max(18, *(len(row[1]) + 2 for row in rows if row[2] is not None))
    print(f"\n{title}\n{'batch':>5}  {'provider':<{width}}{'latency ms':>12}{'images/s':>12}{'speedup':>9}")
    for batch, name, ms, throughput, speedup in rows:
        if ms is None:
            print(f"{batch:>5}  {name}")
        else:
            print(f"{batch:>5}  {name:<{width}}{ms:>12.2f}{throughput:>12.1f}{speedup:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
