"""Benchmark: the teacher's pass of end-to-end training, by onnxruntime or by the torch executor.

Training runs the frozen original on every batch without gradients (fmcompress/backend/
teacher.py). Per model, one batch's pass by each, alternating within each round, the
median over rounds. Models from their PyPI wheels (the `test` extra).

    python examples/bench_teacher.py [--rounds 7] [--models ppocr-rec,ppocr-cls,ppocr-det,yolov8n]

`--compile N` times whole compiles instead (PP-OCR's recognizer at 4x on N rendered lines,
`--block-epochs 2 --epochs 2`), each teacher alternating, each compile in its own process.

    python examples/bench_teacher.py --compile 256 --rounds 2
"""

from __future__ import annotations

import statistics
import time

import onnx
import torch
from bench_fusion import BATCHES
from benchcompile import bench_parser, compare_compiles
from rich.console import Console
from rich.table import Table

from fmcompress.backend import OnnxModule
from fmcompress.backend.teacher import ort_teacher
from fmcompress.evaluation.thirdparty import real_model
from fmcompress.train_config import TrainConfig

EXECUTOR = "import fmcompress.backend.teacher as t; t.ort_teacher = lambda *a, **k: None\n"


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--models", default=",".join(BATCHES))
    args = parser.parse_args()
    if args.compile:
        compare_compiles({"executor": EXECUTOR, "onnxruntime": ""}, args.compile, args.rounds)
        return
    table = Table(title=f"the teacher's pass (no gradients), median of {args.rounds} rounds, "
                        f"{torch.get_num_threads()} threads")
    for column in ("model", "batch", "executor s", "onnxruntime s", "onnxruntime / executor"):
        table.add_column(column)
    for name in args.models.split(","):
        model = onnx.load(str(real_model(name)))
        executor = OnnxModule(model).eval()
        teacher = ort_teacher(model, list(executor.input_names), TrainConfig())
        x = [torch.rand(*BATCHES[name])]
        runs = {"executor": lambda e=executor, x=x: e(*x), "onnxruntime": lambda t=teacher, x=x: t(x)}
        times: dict[str, list[float]] = {mode: [] for mode in runs}
        with torch.no_grad():
            for _ in range(args.rounds + 1):  # the first round warms up
                for mode, run in runs.items():
                    start = time.perf_counter()
                    run()
                    times[mode].append(time.perf_counter() - start)
        medians = {mode: statistics.median(values[1:]) for mode, values in times.items()}
        ratios = [o / e for o, e in zip(times["onnxruntime"][1:], times["executor"][1:], strict=True)]
        table.add_row(name, str(BATCHES[name][0]), f"{medians['executor']:.3f}", f"{medians['onnxruntime']:.3f}",
                      f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
    Console().print(table)


if __name__ == "__main__":
    main()
