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

`--channels-last` compares the kernels for the torch executor's CPU layout instead (maps
channels last): one GEMM over the [N, H, W, C] memory, the earlier `mix_channels` there,
against the 1x1 convolution it runs now; with `--compile N`, whole compiles likewise.

    python examples/bench_projection.py --channels-last --rounds 20
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

from fmcompress.backend.projection import is_channels_last, mix_channels
from fmcompress.compiler import CompileOptions, compile_model
from fmcompress.evaluation.thirdparty import REAL_MODELS, real_model

BATCH = 16
Mix = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mix_by_matmul(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The earlier `mix_channels`: a broadcast torch.matmul."""
    mixed = torch.matmul(matrix.to(x.dtype), x.reshape(x.shape[0], x.shape[1], -1))
    return mixed.reshape(x.shape[0], matrix.shape[0], *x.shape[2:])


def mix_by_gemm(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The earlier `mix_channels` on a channels-last map: one GEMM over its [N, H, W, C] memory
    (any other layout as `mix_channels` does it)."""
    if is_channels_last(x):
        return (x.permute(0, 2, 3, 1) @ matrix.to(x.dtype).T).permute(0, 3, 1, 2)
    return mix_channels(matrix, x)


def patched(function: str) -> str:
    """Code that makes a compile's process (which imports this file: its folder is not on that
    process's path) mix channels by `function` of this file, in the projections and the block loss."""
    return (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
            "import bench_projection, fmcompress.backend.projection as p, fmcompress.backend.blockwise as b\n"
            f"p.mix_channels = b.mix_channels = bench_projection.{function}\n")


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
    parser.add_argument("--channels-last", action="store_true",
                        help="compare GEMM and 1x1 convolution on channels-last maps (else matmul and bmm)")
    args = parser.parse_args()
    before, now = ("gemm", "conv") if args.channels_last else ("matmul", "bmm")
    if args.compile:
        compare_compiles({before: patched(f"mix_by_{before}"), now: ""}, args.compile, args.rounds)
        return
    kernels = {before: mix_by_gemm if args.channels_last else mix_by_matmul, now: mix_channels}
    table = Table(title=f"{args.model} at {args.ceiling}: U (P x) forward + backward, batch {BATCH}, "
                        f"median of {args.rounds} rounds, {torch.get_num_threads()} threads")
    for column in ("map", "shape", "k", f"{before} ms", f"{now} ms", f"{now} / {before}"):
        table.add_column(column)
    totals = dict.fromkeys(kernels, 0.0)
    for name, shape, k in planned_maps(args.model, args.ceiling):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(BATCH, *shape[1:], generator=generator)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        P = torch.randn(k, shape[1], generator=generator, requires_grad=True)  # noqa: N806
        U = torch.randn(shape[1], k, generator=generator, requires_grad=True)  # noqa: N806
        times: dict[str, list[float]] = {mode: [] for mode in kernels}
        for round_ in range(args.rounds + 1):  # the first round warms up; the order alternates
            for mode in (kernels if round_ % 2 else reversed(list(kernels))):
                times[mode].append(step_seconds(kernels[mode], x, P, U))
        medians = {mode: statistics.median(values[1:]) for mode, values in times.items()}
        for mode in totals:
            totals[mode] += medians[mode]
        table.add_row(name, "x".join(map(str, shape[1:])), str(k), f"{1e3 * medians[before]:.2f}",
                      f"{1e3 * medians[now]:.2f}", f"{medians[now] / medians[before]:.2f}")
    table.add_row("all maps", "", "", f"{1e3 * totals[before]:.1f}", f"{1e3 * totals[now]:.1f}",
                  f"{totals[now] / totals[before]:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
