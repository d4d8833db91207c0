"""python -m fastmb: build a MobileNet, load a torchvision (or eager) model's weights into the
fastmb one, check that both compute the same thing, then time both on each available backend.
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
from fastmb import dispatch
from fastmb.models.calibration import calibrate_batch_norm
from fastmb.ops.activations import ACTIVATIONS

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
    parser.add_argument("--channels-last", action="store_true", help="NHWC (channels_last) models and inputs")
    parser.add_argument("--backend", choices=("all", *fastmb.backends()), default="all",
                        help="fastmb backend(s) to time (default: every available one)")
    parser.add_argument("--resolution", type=int, default=224, help="input height and width")
    parser.add_argument("--profile", action="store_true", help="also print per-layer params, MACs and bytes moved")
    parser.add_argument("--seconds", type=float, default=1.0, help="time budget per measurement")
    args = parser.parse_args(argv)
    check_model(parser, args.model)
    if args.batch_size and min(args.batch_size) < 1:
        parser.error("--batch-size must be positive")
    if args.resolution < 1:
        parser.error(f"--resolution must be positive, got {args.resolution}")
    if not args.seconds > 0:
        parser.error(f"--seconds must be positive, got {args.seconds}")
    args.device = resolve_device(parser, args.device)
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
            activation = ACTIVATIONS[module.activation].make_module()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, nn.Sequential(module[0], module[1], activation))
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
    return [b for b in BACKENDS_BY_DEVICE.get(device.type, ("reference",)) if status[b] == "available"]


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


def measure(fn: Callable[[], object], device: torch.device, seconds: float) -> float:
    """Median milliseconds per call: two warm-up calls, then at least 5 timed ones, more while
    the budget lasts. CUDA timings use events with synchronisation."""
    for _ in range(2):
        fn()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - started < seconds and len(times) < 200):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            begin_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin_s) * 1e3)
    return statistics.median(times)


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
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
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
        reference_ms = None
        for name, model, backend in providers:
            progress(f"timing {name}, batch {batch}, {args.mode}")
            model = copy.deepcopy(model).to(device=device, dtype=dtype, memory_format=memory_format)
            with fastmb.use_backend(backend or "auto"), dispatch.record_backends() as ran:
                ms = measure(step_function(model, x, args.mode), device, args.seconds)
            if backend is not None and ran != {backend}:  # inputs its kernels do not take ran elsewhere
                name = f"{name} (ran: {', '.join(sorted(ran))})"
            reference_ms = reference_ms or ms
            rows.append((batch, name, ms, batch / ms * 1e3, reference_ms / ms))

    title = f"{args.model}, {args.mode}, {device}, {args.dtype}{', channels_last' if args.channels_last else ''}"
    width = max(18, *(len(row[1]) + 2 for row in rows))
    print(f"\n{title}\n{'batch':>5}  {'provider':<{width}}{'latency ms':>12}{'images/s':>12}{'speedup':>9}")
    for batch, name, ms, throughput, speedup in rows:
        print(f"{batch:>5}  {name:<{width}}{ms:>12.2f}{throughput:>12.1f}{speedup:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
