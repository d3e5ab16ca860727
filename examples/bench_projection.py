"""Benchmark: how the training backend mixes a map's channels (projection.py's `mix_channels`).

A projection computes U (P x) over axis 1 of each map, per position. `torch.matmul` of the
k x C matrix with x as [N, C, positions] folds N into the positions, a transposed copy of
x, whenever x needs a gradient, as every map after the first does in training; `torch.bmm`
of the matrix expanded over N makes no copy. Per map of a model planned at a ceiling, one
forward and backward of U (P x) at batch 16, the two alternating within each round; the
median over rounds.

    python examples/bench_projection.py [--model ppocr-rec] [--ceiling 4x] [--rounds 7]

`--compile N` times whole compiles instead (PP-OCR's recognizer at 4x on N rendered lines,
`--block-epochs 2 --epochs 2`), matmul and bmm alternating, each in its own process.

    python examples/bench_projection.py --compile 256 --rounds 2
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from benchcompile import bench_parser, compare_compiles
from rich.console import Console
from rich.table import Table

from fmcompress.backend.projection import mix_channels
from fmcompress.compiler import CompileOptions, compile_model
from fmcompress.evaluation.thirdparty import REAL_MODELS, real_model

BATCH = 16
Mix = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mix_by_matmul(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The earlier `mix_channels`: a broadcast torch.matmul."""
    mixed = torch.matmul(matrix.to(x.dtype), x.reshape(x.shape[0], x.shape[1], -1))
    return mixed.reshape(x.shape[0], matrix.shape[0], *x.shape[2:])


# the compile's process imports this file (its folder is not on that process's path) for the matmul
MATMUL = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
          "import bench_projection, fmcompress.backend.projection as p; p.mix_channels = bench_projection.mix_by_matmul\n")


def step_seconds(mix: Mix, x: torch.Tensor, P: torch.Tensor, U: torch.Tensor) -> float:  # noqa: N803
    leaf = x.clone().requires_grad_(True)  # a map after a projection carries a gradient
    start = time.perf_counter()
    mix(U, mix(P, leaf)).square().mean().backward()
    return time.perf_counter() - start


def planned_maps(model: str, ceiling: str) -> list[tuple[str, list[int], int]]:
    """(name, shape at batch 1, k) of each map compile plans at `ceiling`."""
    shape = ",".join(map(str, REAL_MODELS[model].input_shape))
    options = CompileOptions(ceiling=ceiling, input_shapes=[f"x={shape}"])
    plan = compile_model(real_model(model), options, plan_only=True).plan
    return [(m.name, m.shape, m.k) for m in plan.maps]


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--model", default="ppocr-rec", choices=sorted(REAL_MODELS))
    parser.add_argument("--ceiling", default="4x")
    args = parser.parse_args()
    if args.compile:
        compare_compiles({"matmul": MATMUL, "bmm": ""}, args.compile, args.rounds)
        return
    table = Table(title=f"{args.model} at {args.ceiling}: U (P x) forward + backward, batch {BATCH}, "
                        f"median of {args.rounds} rounds, {torch.get_num_threads()} threads")
    for column in ("map", "shape", "k", "matmul ms", "bmm ms", "bmm / matmul"):
        table.add_column(column)
    totals = {"matmul": 0.0, "bmm": 0.0}
    for name, shape, k in planned_maps(args.model, args.ceiling):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(BATCH, *shape[1:], generator=generator)
        P = torch.randn(k, shape[1], generator=generator, requires_grad=True)  # noqa: N806
        U = torch.randn(shape[1], k, generator=generator, requires_grad=True)  # noqa: N806
        times: dict[str, list[float]] = {"matmul": [], "bmm": []}
        for _ in range(args.rounds + 1):  # the first round warms up
            times["matmul"].append(step_seconds(mix_by_matmul, x, P, U))
            times["bmm"].append(step_seconds(mix_channels, x, P, U))
        medians = {mode: statistics.median(values[1:]) for mode, values in times.items()}
        for mode in totals:
            totals[mode] += medians[mode]
        table.add_row(name, "x".join(map(str, shape[1:])), str(k), f"{1e3 * medians['matmul']:.2f}",
                      f"{1e3 * medians['bmm']:.2f}", f"{medians['bmm'] / medians['matmul']:.2f}")
    table.add_row("all maps", "", "", f"{1e3 * totals['matmul']:.1f}", f"{1e3 * totals['bmm']:.1f}",
                  f"{totals['bmm'] / totals['matmul']:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
