"""Benchmark: PCA fitting (frontier-cached) against one forward pass and the old prefix-per-map fit.

Per model: the maps `compile --ceiling 4x --plan-only` plans; calibration samples (random
inputs: the timing does not depend on the values) in batches; then, interleaved per round
so machine drift hits all three alike, the median seconds of
  * one forward pass of the torch executor over all samples (torch.no_grad),
  * the old fit: every map re-runs each batch from the inputs up to itself (the algorithm
    fit_pca used before the frontier cache, copied below),
  * fit_pca as shipped.
The last column checks that both fits give the same projections.

    python examples/bench_pca.py                                  # ResNet-18 224, PP-OCR det 640
    python examples/bench_pca.py --samples 128 --rounds 5 --models resnet18
    python examples/bench_pca.py --det-size 320
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fmcompress.backend import OnnxModule
from fmcompress.backend.projection import (
    fit_pca,
)
from fmcompress.compiler import CompileOptions, compile_model
from fmcompress.evaluation.thirdparty import real_model
from fmcompress.frontend import export_model


def forward_pass(executor: OnnxModule, batches: Callable) -> None:
    with torch.no_grad():
        for inputs in batches():
            executor(*inputs)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench(label: str, path: Path, shape: tuple[int, ...], args) -> list[str]:
    plan = compile_model(str(path), CompileOptions(ceiling="4x", input_shapes=[",".join(map(str, shape))]),
                         plan_only=True).plan
    maps = [(m.name, m.channels, m.k) for m in plan.maps]
    executor = OnnxModule(path).eval()
    rng = np.random.default_rng(0)
    data = [torch.from_numpy(rng.standard_normal((min(args.batch, args.samples - i), *shape[1:])).astype(np.float32))
            for i in range(0, args.samples, args.batch)]

    def batches():
        return ((x,) for x in data)

    forward_pass(executor, lambda: [(data[0],)])  # warm-up
    runs: dict[str, list[float]] = {"forward": [], "old": [], "new": []}
    for _ in range(args.rounds):
        runs["forward"].append(timed(lambda: forward_pass(executor, batches))[0])
        seconds, old = timed(lambda: fit_pca(executor, maps, batches, cache_bytes=0))
        runs["old"].append(seconds)
        seconds, new = timed(lambda: fit_pca(executor, maps, batches))
        runs["new"].append(seconds)
    difference = max(float(np.abs(old[n].P - new[n].P).max()) for n, _, _ in maps)
    forward, old_s, new_s = (statistics.median(runs[k]) for k in ("forward", "old", "new"))
    return [label, "x".join(map(str, shape[1:])), str(args.samples), str(len(maps)), f"{forward:.2f}",
            f"{old_s:.2f}", f"{new_s:.2f}", f"{new_s / forward:.2f}", f"{old_s / new_s:.1f}", f"{difference:.1e}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians are shown")
    parser.add_argument("--det-size", type=int, default=640, help="PP-OCR detector input side")
    parser.add_argument("--models", default="resnet18,ppocr-det")
    args = parser.parse_args()
    table = Table(title=f"PCA fit vs forward, {torch.get_num_threads()} threads, batch {args.batch}, "
                        f"median of {args.rounds} interleaved rounds")
    for column in ("model", "input", "samples", "maps", "forward s", "old fit s", "new fit s",
                   "new/forward", "old/new", "max |dP|"):
        table.add_column(column, justify="left" if column == "model" else "right")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            if name == "resnet18":
                path = Path(folder) / "resnet18.onnx"
                export_model("resnet18", (1, 3, 224, 224), path)
                table.add_row(*bench("ResNet-18", path, (1, 3, 224, 224), args))
            else:
                table.add_row(*bench(name, real_model(name), (1, 3, args.det_size, args.det_size), args))
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
