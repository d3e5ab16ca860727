"""Benchmark: the executor with inlined activations fused (fusion.py) against node by node.

One training-like step per model and round: forward and backward to the input (weights
frozen, as when projections train), fused and unfused alternating within each round so
both see the same machine state; the median over rounds of each time and of the per-round
ratio. Models from their PyPI wheels (the `test` extra): PP-OCR's recognizer, direction
classifier and detector (paddle2onnx writes their HardSwishes as chains), YOLOv8n (SiLU).

    python examples/bench_fusion.py [--rounds 7] [--models ppocr-rec,ppocr-cls,ppocr-det,yolov8n]

`--compile N` times whole compiles instead: PP-OCR's recognizer at 4x on N rendered lines
(`--block-epochs 2 --epochs 2`, memory probes off), fused and unfused alternating for
`--rounds` rounds, each in its own process; prints the report's `timings_s` and the
training section's block stage and epoch seconds.

    python examples/bench_fusion.py --compile 256 --rounds 2
"""

from __future__ import annotations

import statistics
import time

import torch
from benchcompile import bench_parser, compare_compiles
from rich.console import Console
from rich.table import Table

from fmcompress.backend import OnnxModule
from fmcompress.evaluation.thirdparty import real_model

BATCHES = {"ppocr-rec": (16, 3, 48, 320), "ppocr-cls": (16, 3, 48, 192), "ppocr-det": (1, 3, 320, 320),
           "yolov8n": (4, 3, 320, 320)}


def step_seconds(module: OnnxModule, x: torch.Tensor) -> float:
    leaf = x.clone().requires_grad_(True)
    start = time.perf_counter()
    outputs = module(leaf)
    sum(out.float().square().mean() for out in outputs if out.is_floating_point()).backward()
    return time.perf_counter() - start


UNFUSED = "import fmcompress.backend.executor as e; e.find_fusions = lambda *a, **k: []\n"


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--models", default=",".join(BATCHES))
    args = parser.parse_args()
    if args.compile:
        compare_compiles({"unfused": UNFUSED, "fused": ""}, args.compile, args.rounds)
        return
    table = Table(title=f"forward + backward, median of {args.rounds} rounds, {torch.get_num_threads()} threads")
    for column in ("model", "batch", "chains fused", "unfused s", "fused s", "fused / unfused (range)"):
        table.add_column(column)
    for name in args.models.split(","):
        fused, plain = OnnxModule(str(real_model(name))), OnnxModule(str(real_model(name)), fuse=False)
        x = torch.rand(*BATCHES[name])
        step_seconds(fused, x), step_seconds(plain, x)  # warm-up
        times: dict[str, list[float]] = {"fused": [], "plain": []}
        for _ in range(args.rounds):
            times["plain"].append(step_seconds(plain, x))
            times["fused"].append(step_seconds(fused, x))
        ratios = [f / p for f, p in zip(times["fused"], times["plain"], strict=True)]
        kinds = sorted({kind for kind, _ in fused.fused_chains()})
        table.add_row(name, str(BATCHES[name][0]), f"{len(fused.fused_chains())} ({', '.join(kinds)})",
                      f"{statistics.median(times['plain']):.3f}", f"{statistics.median(times['fused']):.3f}",
                      f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
    Console().print(table)


if __name__ == "__main__":
    main()
