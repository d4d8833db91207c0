"""Where a torchvision model's eval forward spends its time, block by block, in fastmb and in
ONNX Runtime and OpenVINO: fastmb's from the profiler's per-block events inside its chain call
(`fastmb::inverted_residual_block`), the runtimes' from their own profilers' per-node times,
summed by the torchvision block a node came from. Medians over the later runs, then over rounds
that alternate the providers; each provider runs with profiling on, so the sums run above the
providers' plain latencies (the last row, each timed in turn without a profiler: OpenVINO's
per-node counters cost it most).

    python bench/runtime_profile.py mobilenet_v3_large [--batch 1] [--runs 40] [--rounds 5] [--threads 2]

Rows: torchvision's blocks (the stem and the first block together, as fastmb runs them), the head
(the last conv, pooling and the classifier), and the runtimes' other nodes (layout reorders).
"""

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable

import torch
import torchvision

import fastmb
from fastmb import runtimes

OTHER, HEAD = "other nodes", "head"


def group(names_in_order: Iterable[tuple[str, float]], blocks: int) -> dict[str, float]:
    """Microseconds per row for (node name, us) in execution order: a node named
    /features/features.N/... goes to block N (0 and 1 together, the last one to the head); an
    unnamed node to the head once the last block has started, else to OTHER."""
    rows: dict[str, float] = collections.defaultdict(float)
    in_head = False
    for name, us in names_in_order:
        parts = name.strip("/").split("/")
        if len(parts) > 2 and parts[0] == "features" and parts[1].startswith("features."):
            index = int(parts[1].split(".")[1])
            in_head = index == blocks - 1
            row = HEAD if in_head else "features.0-1" if index <= 1 else parts[1]
        else:
            in_head = in_head or parts[0].startswith("classifier")
            row = HEAD if in_head else OTHER
        rows[row] += us
    return rows


def medians(samples: dict[str, list[float]], warm: int) -> list[tuple[str, float]]:
    return [(name, statistics.median(times[warm:] or times)) for name, times in samples.items()]


def onnxruntime_rows(onnx_model: bytes, x: torch.Tensor, args: argparse.Namespace, blocks: int) -> dict[str, float]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    session = onnxruntime.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
    for _ in range(args.runs):
        session.run(None, {"x": x.numpy()})
    with open(session.end_profiling()) as f:
        events = sorted(json.load(f), key=lambda e: e["ts"])
    samples: dict[str, list[float]] = collections.defaultdict(list)  # insertion order: execution order
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            samples[e["name"][: -len("_kernel_time")]].append(e["dur"])
    return group(medians(samples, args.runs // 4), blocks)


def openvino_rows(onnx_model: bytes, x: torch.Tensor, args: argparse.Namespace, blocks: int) -> dict[str, float]:
    import openvino

    core = openvino.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(args.threads), "INFERENCE_PRECISION_HINT": "f32",
              "PERF_COUNT": "YES"}
    request = core.compile_model(core.read_model(onnx_model, b""), "CPU", config).create_infer_request()
    samples: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(args.runs):
        request.infer({0: x.numpy()})
        for node in request.profiling_info:  # in execution order
            samples[node.node_name].append(node.real_time.total_seconds() * 1e6)
    return group(medians(samples, args.runs // 4), blocks)


def fastmb_rows(model: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace, blocks: int) -> dict[str, float]:
    with torch.no_grad():
        for _ in range(args.runs // 4):
            model(x)
        with torch.profiler.profile() as profile:
            for _ in range(args.runs):
                model(x)
    events = sorted((e for e in profile.events() if e.name.startswith("fastmb::")), key=lambda e: e.time_range.start)
    block_events = [e for e in events if e.name == "fastmb::inverted_residual_block"]
    per_forward = len(block_events) // args.runs
    samples: dict[str, list[float]] = collections.defaultdict(list)
    for k, e in enumerate(block_events):  # chain block i is torchvision's features.(i + 1)
        samples[f"/features/features.{k % per_forward + 1}/block"].append(e.time_range.elapsed_us())
    for e in events:
        if e.name == "fastmb::classifier_head":
            samples["classifier"].append(e.time_range.elapsed_us())
    return group(medians(samples, 0), blocks)


def latency_us(fn: Callable[[], object], runs: int) -> float:
    """Median microseconds per call of fn without any profiler, after runs // 4 warm-up calls."""
    for _ in range(runs // 4):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a torchvision MobileNet builder: mobilenet_v2, mobilenet_v3_large, mobilenet_v3_small")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=40, help="runs per provider and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224)
    baseline = getattr(torchvision.models, args.model)().eval()
    blocks = len(baseline.features)
    onnx_model = runtimes.export_onnx(baseline, x)
    model, x_last = getattr(fastmb, args.model)().eval(), x.contiguous(memory_format=torch.channels_last)

    def fastmb_latency() -> float:
        with torch.no_grad():
            return latency_us(lambda: model(x_last), args.runs)

    providers = {"fastmb": (lambda: fastmb_rows(model, x_last, args, blocks), fastmb_latency)}
    for runtime, rows in (("onnxruntime", onnxruntime_rows), ("openvino", openvino_rows)):
        if runtimes.installed(runtime):
            providers[runtime] = (lambda rows=rows: rows(onnx_model, x, args, blocks),
                                  lambda runtime=runtime: latency_us(runtimes.runner(runtime, onnx_model, x, args.threads), args.runs))
    # Providers alternated in rounds, each row's median over the rounds: the host's speed drifts.
    samples: dict[str, dict[str, list[float]]] = {p: collections.defaultdict(list) for p in providers}
    for _ in range(args.rounds):
        for provider, (profiled, plain) in providers.items():
            runtimes.wait_for_idle_threads()
            for name, us in profiled().items():
                samples[provider][name].append(us)
            runtimes.wait_for_idle_threads()
            samples[provider]["no profiler"].append(plain())
    columns = {p: {name: statistics.median(v) for name, v in rows.items()} for p, rows in samples.items()}

    names = ["features.0-1"] + [f"features.{i}" for i in range(2, blocks - 1)] + [HEAD, OTHER]
    print(f"{args.model}, batch {args.batch}, {args.threads} threads: median us per run, profiling on")
    print(f"{'':14s}" + "".join(f"{c:>13s}" for c in columns))
    for name in names:
        print(f"{name:14s}" + "".join(f"{rows.get(name, 0.0):13.0f}" for rows in columns.values()))
    print(f"{'total':14s}" + "".join(f"{sum(v for k, v in rows.items() if k != 'no profiler'):13.0f}" for rows in columns.values()))
    print(f"{'no profiler':14s}" + "".join(f"{rows['no profiler']:13.0f}" for rows in columns.values()))


if __name__ == "__main__":
    main()
