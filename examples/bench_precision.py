"""Benchmark: the block stage's arithmetic, bfloat16 autocast against float32 (`--block-precision`).

One training-like step per model and round: forward and backward to the input (weights
frozen, as when projections train), in float32 and under bfloat16 autocast alternating
within each round; the median over rounds of each time and of the per-round ratio, and the
outputs' relative error in bfloat16. Models from their PyPI wheels (the `test` extra).
Native bfloat16 (AVX-512 BF16 or AMX) is what `--block-precision auto` asks for; the
table's title says whether this CPU has it.

    python examples/bench_precision.py [--rounds 7] [--models ppocr-rec,ppocr-cls]

`--compile N` times whole compiles instead: PP-OCR's recognizer at 4x on N rendered lines
(`--block-epochs 2 --epochs 2`), the block stage in float32 (the default) and in bfloat16
alternating, each in its own process.

    python examples/bench_precision.py --compile 256 --rounds 2
"""

from __future__ import annotations

import statistics
import time

import torch
from bench_fusion import BATCHES
from benchcompile import bench_parser, compare_compiles
from rich.console import Console
from rich.table import Table

from fmcompress.backend import OnnxModule
from fmcompress.backend.devices import native_bfloat16
from fmcompress.evaluation.thirdparty import real_model

# compile_seconds runs the CLI with fixed flags: the bfloat16 mode resolves every precision to it
BFLOAT16 = "import fmcompress.backend.devices as d; d.resolve_precision = lambda name, device: 'bfloat16'\n"


def step(module: OnnxModule, x: torch.Tensor, bfloat16: bool) -> tuple[float, torch.Tensor]:
    """Seconds of one forward and backward, and the first output (float32)."""
    leaf = x.clone().requires_grad_(True)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
        outputs = module(leaf)
    sum(out.float().square().mean() for out in outputs if out.is_floating_point()).backward()
    return time.perf_counter() - start, outputs[0].detach().float()


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--models", default="ppocr-rec,ppocr-cls")
    args = parser.parse_args()
    if args.compile:
        compare_compiles({"float32": "", "bfloat16": BFLOAT16}, args.compile, args.rounds)
        return
    native = native_bfloat16(torch.device("cpu"))
    table = Table(title=f"forward + backward, median of {args.rounds} rounds, {torch.get_num_threads()} threads, "
                        f"native bfloat16: {'yes' if native else 'no'}")
    for column in ("model", "batch", "float32 s", "bfloat16 s", "bfloat16 / float32 (range)", "output error"):
        table.add_column(column)
    for name in args.models.split(","):
        module = OnnxModule(str(real_model(name)))
        x = torch.rand(*BATCHES[name])
        step(module, x, False), step(module, x, True)  # warm-up
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for bfloat16 in (False, True):
                times[bfloat16].append(step(module, x, bfloat16)[0])
        reference, rounded = step(module, x, False)[1], step(module, x, True)[1]
        error = float((rounded - reference).norm() / reference.norm())
        ratios = [b / f for f, b in zip(times[False], times[True], strict=True)]
        table.add_row(name, str(BATCHES[name][0]), f"{statistics.median(times[False]):.3f}",
                      f"{statistics.median(times[True]):.3f}",
                      f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})", f"{error:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
