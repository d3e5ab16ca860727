"""Benchmark: the block stage's moments and the map costs' comparison, before and after float32.

Two costs of a learned compile of PP-OCR's recognizer that had nothing to do with training:

* the closed-form start's cross moments (`blockwise._PausedRuns.cross_moments`), per batch of
  16 lines and map: before, each whole map was copied channels-last, 4096 positions picked
  and multiplied in float64 (copied below as `moments_before`); now
  `projection.sampled_vectors` gathers only the picked positions and
  `projection.moment_product` multiplies in float32, accumulated in float64;
* each map's comparison in the map-cost pass: before, `metrics.fidelity` (float64 copies of
  the [64, 40, 6625] outputs, error figures the pass never read); now
  `metrics.agreement_figures`.

Inputs are random tensors of the recognizer's map shapes at 4x (timing does not depend on
the values). Interleaved per round, median seconds over `--rounds`; the moments' last column
is the largest difference between the two results, relative to the largest entry.

    python examples/bench_moments.py [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from fmcompress.backend.projection import moment_product, sampled_vectors
from fmcompress.metrics import agreement_figures, fidelity

POSITIONS = 4096
BATCH = 16
MAPS = [(32, 24, 160), (64, 24, 160), (128, 12, 160), (128, 12, 80), (240, 12, 80), (240, 6, 80), (480, 6, 80),
        (480, 3, 80)]  # (C, H, W) of the recognizer's planned maps at 4x, one of each shape


def moments_before(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """The cross moments as blockwise.py computed them before this change."""
    x, y = (v.reshape(v.shape[0], v.shape[1], -1).movedim(1, -1).reshape(-1, v.shape[1]) for v in (x, y))
    pick = torch.randperm(x.shape[0], generator=generator)[:POSITIONS]
    x, y = x[pick].to(torch.float64), y[pick].to(torch.float64)
    return x.T @ x, y.T @ x


def moments_now(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    xs, ys = sampled_vectors([x, y], POSITIONS, generator)
    return moment_product(xs, xs), moment_product(ys, xs)


def timed(function, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = torch.Generator().manual_seed(0)

    print("| map (C, H, W) | before, s | now, s | now / before | largest difference |")
    print("| --- | --- | --- | --- | --- |")
    totals = {"before": 0.0, "now": 0.0}
    for shape in MAPS:
        x, y = torch.randn(BATCH, *shape, generator=rng), torch.randn(BATCH, *shape, generator=rng)
        times: dict[str, list[float]] = {"before": [], "now": []}
        for _ in range(args.rounds):
            for name, function in (("before", moments_before), ("now", moments_now)):
                seconds, result = timed(function, x, y, torch.Generator().manual_seed(1))
                times[name].append(seconds)
                if name == "before":
                    reference = result
                else:
                    difference = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(result, reference, strict=True))
        before, now = statistics.median(times["before"]), statistics.median(times["now"])
        totals["before"] += before
        totals["now"] += now
        print(f"| {shape} | {before:.4f} | {now:.4f} | {now / before:.2f} | {difference:.1e} |")
    print(f"| all eight | {totals['before']:.4f} | {totals['now']:.4f} | {totals['now'] / totals['before']:.2f} | |")

    outputs = np.random.default_rng(0).random((64, 40, 6625), dtype=np.float32)
    reference = [outputs / outputs.sum(-1, keepdims=True)]
    candidate = [np.roll(reference[0], 1, axis=1)]
    times = {"fidelity": [], "agreement_figures": []}
    for _ in range(args.rounds):
        times["fidelity"].append(timed(fidelity, reference, candidate)[0])
        times["agreement_figures"].append(timed(agreement_figures, reference, candidate)[0])
    before, now = statistics.median(times["fidelity"]), statistics.median(times["agreement_figures"])
    print(f"\nmap costs' comparison of [64, 40, 6625] outputs: fidelity {before:.3f} s, agreement_figures "
          f"{now:.3f} s ({now / before:.2f}); the recognizer's pass makes 58 of them")


if __name__ == "__main__":
    main()
