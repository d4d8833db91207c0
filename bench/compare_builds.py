"""Compares two builds of fastmb (two source trees, each built in place) on the CPU depthwise op
at every MobileNetV3-Large shape: one process per tree and round, the trees alternated, and
per case the median over rounds of new time / old time. Two builds cannot share a process (both
register the fastmb operators), so alternation is what keeps a drifting machine out of it.

    python bench/compare_builds.py OLD_TREE NEW_TREE [--rounds 3] [--dtype float32]
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("eval-bs1", "eval-bs16", "train-bs16")


def time_tree(dtype_name: str, seconds: float, only: str) -> dict[str, float]:
    """Median seconds per case of the fastmb imported from sys.path[0] (in a child process)."""
    import torch

    import fastmb
    from shapes import mobilenet_v3_large_blocks

    torch.set_num_threads(int(os.environ.get("FASTMB_BENCH_THREADS", "2")))
    dtype = getattr(torch, dtype_name)
    results = {}
    with fastmb.use_backend("cpu"):
        for stage in mobilenet_v3_large_blocks()[0]:
            if only not in stage.name:
                continue
            module = fastmb.nn.DWConvBNAct(stage.channels, stage.kernel, stage.stride, activation=stage.activation)
            module = module.to(dtype).to(memory_format=torch.channels_last)
            for mode in MODES:
                batch = int(mode.split("-bs")[1])
                x = torch.randn(batch, stage.channels, stage.size, stage.size, dtype=dtype).contiguous(memory_format=torch.channels_last)
                if mode.startswith("eval"):
                    module.eval()

                    def step():
                        with torch.no_grad():
                            module(x)
                else:
                    module.train()
                    x.requires_grad_()
                    grad = torch.randn_like(module(x))

                    def step():
                        module(x).backward(grad)

                step()
                times, start = [], time.perf_counter()
                while time.perf_counter() - start < seconds or len(times) < 5:
                    begin = time.perf_counter()
                    step()
                    times.append(time.perf_counter() - begin)
                results[f"{mode} {stage.name}"] = statistics.median(times)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--seconds", type=float, default=0.25, help="timing budget per case")
    parser.add_argument("--only", default="", help="only the shapes whose name contains this")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path[:0] = [args.child, HERE]
        print(json.dumps(time_tree(args.dtype, args.seconds, args.only)))
        return

    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for label in ("old", "new"):
            child = [sys.executable, __file__, args.old, args.new, "--dtype", args.dtype, "--seconds", str(args.seconds), "--only", args.only]
            output = subprocess.run([*child, "--child", os.path.abspath(getattr(args, label))], capture_output=True, text=True, check=True)
            runs[label].append(json.loads(output.stdout.strip().splitlines()[-1]))
    by_mode: dict[str, list[float]] = {mode: [] for mode in MODES}
    print(f"new / old time, {args.dtype}, median over {args.rounds} alternating rounds (each round's ratio in brackets)")
    for case in runs["old"][0]:
        ratios = [new[case] / old[case] for old, new in zip(runs["old"], runs["new"])]
        by_mode[case.split()[0]].append(statistics.median(ratios))
        old_ms = statistics.median(run[case] for run in runs["old"]) * 1e3
        print(f"  {case:<42} old {old_ms:8.3f} ms  {statistics.median(ratios):.2f}x  [{', '.join(f'{r:.2f}' for r in ratios)}]")
    for mode, ratios in by_mode.items():
        print(f"{mode}: geometric mean {math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}x over {len(ratios)} shapes")


if __name__ == "__main__":
    main()
