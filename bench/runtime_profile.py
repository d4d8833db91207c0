"""Where ONNX Runtime spends a torchvision model's eval forward, per torchvision block: its
profiler's per-node kernel times (median over the later runs) summed by the block a node came
from, beside its whole-run median. The runtime's side of a block-by-block comparison with
fastmb (bench/results/2026-12-03-prepared-chain.md).

    python bench/runtime_profile.py mobilenet_v3_large [--batch 1] [--runs 200] [--threads 2] [--nodes]
"""

import argparse
import collections
import json
import os
import statistics
import tempfile

import onnxruntime
import torch
import torchvision

from fastmb.runtimes import export_onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a torchvision.models builder, e.g. mobilenet_v3_large")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nodes", action="store_true", help="also print every node's time")
    args = parser.parse_args()

    x = torch.randn(args.batch, 3, 224, 224)
    onnx_model = export_onnx(getattr(torchvision.models, args.model)().eval(), x)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    session = onnxruntime.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
    for _ in range(args.runs):
        session.run(None, {"x": x.numpy()})
    with open(session.end_profiling()) as f:
        events = json.load(f)

    warm = args.runs // 4  # the first quarter of the runs is warm-up
    run_times = [e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][warm:]
    node_times = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node_times[(e["name"][: -len("_kernel_time")], e["args"].get("op_name", "?"))].append(e["dur"])
    # A node's name is the exported module path (/features/features.3/block/...): group by its second part.
    blocks: dict[str, float] = collections.defaultdict(float)
    for (name, op), times in node_times.items():
        median = statistics.median(times[warm:] or times)
        parts = name.strip("/").split("/")
        blocks[parts[1] if len(parts) > 2 else "(outside blocks)"] += median
        if args.nodes:
            print(f"{median:8.0f} us  {op:20s} {name}")
    print(f"{args.model}, batch {args.batch}, {args.threads} threads: model_run median {statistics.median(run_times):.0f} us "
          f"(profiling on), nodes {sum(blocks.values()):.0f} us")
    for block, us in blocks.items():
        print(f"  {block:28s} {us:8.0f} us")


if __name__ == "__main__":
    main()
