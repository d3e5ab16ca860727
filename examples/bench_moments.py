"""Benchmark: the block stage's moments and loss, and the map costs' comparison, before and after.

Three costs of a learned compile of PP-OCR's recognizer that the projections do not need:

* the closed-form start's cross moments (`blockwise._PausedRuns.cross_moments`), per batch of
  16 lines and map: before, each whole map was copied channels-last, 4096 positions picked
  and multiplied in float64 (copied below as `moments_before`); now
  `projection.sampled_vectors` gathers only the picked positions and
  `projection.moment_product` multiplies in float32, accumulated in float64;
* each map's comparison in the map-cost pass: before, `metrics.fidelity` (float64 copies of
  the [64, 40, 6625] outputs, error figures the pass never read); now
  `metrics.agreement_figures`;
* the Fisher-weighted block loss (`blockwise._block_loss`, forward and backward) over a map's
  refinement, six epochs of 24 batches (the recognizer's maps ran 5.4 epochs on average at
  4x): before, the target's channels were mixed by M^(1/2) at every step for its mean square
  (`weighted_before`), and the error's through autograd, a mixing each way; now the target's
  once a batch, the first time it is seen, and the error's as `blockwise.quadratic_form`
  (e^T M e, its gradient 2 M e from the forward's M e).

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

from fmcompress.backend.blockwise import _block_loss, _BlockEnd
from fmcompress.backend.projection import mix_channels, moment_product, sampled_vectors
from fmcompress.metrics import agreement_figures, fidelity

POSITIONS = 4096
BATCH = 16
MAPS = [(32, 24, 160), (64, 24, 160), (128, 12, 160), (128, 12, 80), (240, 12, 80), (240, 6, 80), (480, 6, 80),
        (480, 3, 80)]  # (C, H, W) of the recognizer's planned maps at 4x, one of each shape
REFINED_EPOCHS = 6


def moments_before(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """The cross moments as blockwise.py computed them before this change."""
    x, y = (v.reshape(v.shape[0], v.shape[1], -1).movedim(1, -1).reshape(-1, v.shape[1]) for v in (x, y))
    pick = torch.randperm(x.shape[0], generator=generator)[:POSITIONS]
    x, y = x[pick].to(torch.float64), y[pick].to(torch.float64)
    return x.T @ x, y.T @ x


def moments_now(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    xs, ys = sampled_vectors([x, y], POSITIONS, generator)
    return moment_product(xs, xs), moment_product(ys, xs)


def weighted_before(weight: torch.Tensor):
    """The Fisher-weighted block loss as blockwise.py computed it before: the target mixed every step."""
    def loss(values, targets):
        error = mix_channels(weight, values[0].float() - targets[0].float())
        return error.pow(2).mean() / mix_channels(weight, targets[0].float()).pow(2).mean().clamp_min(1e-12)
    return loss


def refinement(loss, values: list[torch.Tensor], targets: list[torch.Tensor]) -> list[float]:
    """Forward and backward of `loss` once per batch and epoch, as a map's block epochs step."""
    losses = []
    for value, target in [pair for _ in range(REFINED_EPOCHS) for pair in zip(values, targets, strict=True)]:
        value = value.detach().requires_grad_(True)
        result = loss((value,), (target,))
        result.backward()
        losses.append(float(result.detach()))
    return losses


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

    print(f"\n| block end (C, H, W) | loss over {REFINED_EPOCHS} epochs before, s | now, s | now / before "
          "| largest difference |")
    print("| --- | --- | --- | --- | --- |")
    for shape in MAPS[-4:]:  # the late maps, where the weighted loss costs most
        values = [torch.randn(BATCH, *shape, generator=rng) for _ in range(24)]
        targets = [v + 0.1 * torch.randn(BATCH, *shape, generator=rng) for v in values]
        root = torch.randn(shape[0], shape[0], generator=rng) / shape[0] ** 0.5
        weight = root @ root.T
        times = {"before": [], "now": []}
        for _ in range(args.rounds):
            seconds, reference = timed(refinement, weighted_before(weight), values, targets)
            times["before"].append(seconds)
            # a fresh loss a round, as each map's refinement makes one: its first epoch mixes every target
            seconds, result = timed(refinement, _block_loss(None, _BlockEnd(0, "map"), 1.0, weight @ weight),
                                    values, targets)
            times["now"].append(seconds)
            difference = max(abs(a - b) / abs(b) for a, b in zip(result, reference, strict=True))
        before, now = statistics.median(times["before"]), statistics.median(times["now"])
        print(f"| {shape} | {before:.3f} | {now:.3f} | {now / before:.2f} | {difference:.1e} |")

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
