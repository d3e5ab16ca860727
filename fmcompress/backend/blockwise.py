"""Block reconstruction: each projection refined on what its block computes, in network order.

The first stage of `learned`, between PCA and end-to-end training (`trainer.py`). PCA
makes each projection reconstruct its own map; what matters is what the network
computes from it, and the errors of the projections before it. Rules:

a. Maps are taken in network order (the step that computes them). Map i starts as the
   PCA of map i *as the compressed network computes it*, every earlier projection
   already refined and applied (as `fit_pca` fits them); with `init="lstsq"` (it saves most
   of the epochs a PCA start needs), as the closed-form
   least-squares fit instead (`lstsq_projection`: the rank-k U P that best maps map i
   as the compressed network computes it onto map i as the original computes it,
   reduced-rank regression; it is PCA where the two agree); with `init="fisher"`, as the
   same regression with its error measured in the metric of the network's output Fisher
   information at the map (`fisher.output_fisher`, one forward and backward pass of the
   original before the stage; compile's default): the rank-k U P keeps the directions the
   network's predictions depend on, not the directions of most power. `ridge` damps it, relative to
   x's mean eigenvalue: `PLAIN_RIDGE` by default, `ROUNDED_RIDGE` where maps are stored
   in one byte (`--int8`; `--block-ridge` names another). Undamped, the regression
   inverts x's weakest directions (where the compressed network differs from the
   original) with gains that amplify the error int8 rounding adds to x, an error that is
   about a fixed fraction of each map's power.
   PP-OCR's recognizer at 4x, one block epoch, 128 lines: 0% exact match in int8 with the
   plain regression (85% in float), 73% (Percentile) with the damping; the noise of x's
   own rounding alone as the damping (its range / 255, squared, / 12): 67%.
b. Its block runs from map i's step to the first later planned map whose value depends
   on it, else to the graph outputs. The target is what the original network computes
   there from the same input, so a projection also corrects the errors that the ones
   before it left.
c. Loss: at a map, the squared error divided by the target's mean square; with
   `weighted` (`--block-loss fisher`), both measured in M (e^T M e per position), the
   output's Fisher information at that map (`fisher.metric_roots`, the metric the start
   uses): the block reproduces the directions of the next map that the predictions depend
   on, not all of its power, so its error is measured as the start's is. The target's part,
   which no epoch changes, is taken once a batch; the error's gradient, 2 M e, comes from
   the forward's M e (`quadratic_form`): one channel mixing a step, not one each way. At the outputs,
   `losses.distillation_loss` (KL at `temperature` for class outputs, scaled MSE for
   the rest).
d. P and U only, by Adam at lr / sqrt(C) under schedule.py's rule b: the rate warmed up
   linearly over the first of `epochs` passes of the calibration batches, then a cosine
   decay over all of them; the batches in an order drawn from the seed and the map's
   index; no augmentation of its own (`--block-augment` draws its variants before the
   stage). The warm-up because the start is already a closed-form fit,
   which Adam's first steps (each entry moved by about the full rate, whatever its
   gradient) undo: at the full rate from the first step, the first epoch raised the
   held-out block loss above the start in 18 of PP-OCR's recognizer's 29 maps at 4x;
   warmed up, in 13-15. With `quantized`, the stored map is rounded as int8
   (`projection.fake_quant_uint8`). With `precision` bfloat16 the block's steps run under
   autocast (the projections, the loss and every value handed on stay float32). Not the
   default: on a CPU with AVX-512 BF16 the recognizer's stage took 100-105 s against 102-114 s
   in float32 (4x and 8x), and at 8x scored 79.0% against 81.7% (one run each). The same
   seed gives the same projections. `epochs` is
   a maximum: a map stops once its epoch's mean block loss has not fallen below
   (1 - `min_gain`) times its best for `patience` epochs in a row (`min_gain` 0: every
   epoch runs). The loss that decides is the held-out batches' where `held_out` is given
   (compile gives its held-out part: the block loss after each epoch on samples no
   gradient saw), and the map keeps the P and U of its best held-out epoch (its start
   included: epochs that never beat it are undone); without
   them, the calibration batches' loss decides and the last epoch is kept. With the
   calibration loss, more epochs paid on PP-OCR's recognizer at 4x (2.3 points lost on
   held-out lines with three, 1.1 with twelve) and cost its classifier at 8x (2.3 -> 3.0
   with six); judged on held-out lines, 9 of the recognizer's 29 maps keep their start
   and the rest stop after 2-12 epochs (docs/results.md section 1).
e. Cost: the compressed run is paused just after map i's step, its value there still
   unprojected, and the original run before the block's end, one frontier per
   calibration batch (the tensors alive at that point), so an epoch of a map runs only
   the block's steps after map i's own (whose output does not depend on P and U): the
   stage costs about `epochs` passes of the network, plus one forward pass of each run;
   the held-out batches add one forward pass of the block an epoch.
   Memory: the two paused runs and the block's target, per batch (the fit pass passes
   at most `--max-samples` samples); `lstsq` holds a third paused run (the original's,
   at map i). A map that nothing downstream depends on keeps its start (as every map
   does with `epochs` 0).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fmcompress.featuremaps import Projection
from fmcompress.train_config import FISHER_DRAWS

from .executor import Frontier
from .fisher import floored_metric, metric_roots, output_fisher
from .losses import distillation_loss, output_kinds
from .projection import (
    ChannelProjection,
    SecondMomentRecorder,
    mix_channels,
    moment_product,
    pca_projection,
    sampled_vectors,
)
from .schedule import mix_seeds, warmup_cosine

INITS = ("pca", "lstsq", "fisher")
PLAIN_RIDGE = 1e-6  # lstsq's damping, relative to the mean eigenvalue: dead channels only
ROUNDED_RIDGE = 1e-3  # ... for maps rounded to int8 (rule a); 3e-4 and 1e-2 measured worse
POSITIONS_PER_BATCH = 4096  # channel vectors per batch in the moments of the start (as fit_pca takes)


@dataclass
class BlockFit:
    """What the stage did to one map: its epochs' mean block losses (empty: nothing later reads
    the map, it kept its start), and whether it stopped before `epochs` (rule d)."""

    losses: list[float] = field(default_factory=list)
    held_out_losses: list[float] = field(default_factory=list)  # at the start, then after each epoch (rule d)
    best_epoch: int | None = None  # the epoch whose P and U the map kept (0: its start; None: no judge, the last)
    stopped_early: bool = False
    seconds: float = 0.0  # the map's start and refinement, wall time

    @property
    def first(self) -> float:
        return self.losses[0] if self.losses else math.nan

    @property
    def last(self) -> float:
        return self.losses[-1] if self.losses else math.nan


Progress = Callable[[int, str, BlockFit], None]
BlockLoss = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor]  # (values, targets) -> loss  # (index in network order, map, what its refinement did)


def fit_blockwise(executor: nn.Module, maps: Sequence[tuple[str, int, int]],
                  batches: Sequence[tuple[torch.Tensor, ...]], *, epochs: int, lr: float, temperature: float,
                  seed: int = 0, min_gain: float = 0.0, patience: int = 2, init: str = "pca",
                  quantized: bool = False, ridge: float = PLAIN_RIDGE, precision: str = "float32",
                  fisher_draws: int = FISHER_DRAWS, held_out: Sequence[tuple[torch.Tensor, ...]] = (),
                  weighted: bool = False,
                  progress: Progress | None = None) -> dict[str, Projection]:
    """One refined projection per (name, channels, k); `executor` (an OnnxModule without
    transforms) is left without transforms. `batches` (and `held_out`, rule d's judge) are
    input tuples on its device."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    original = copy.deepcopy(executor)
    runs = _PausedRuns(executor, original, batches, track_original=init != "pca")
    judge = _PausedRuns(executor, original, held_out) if held_out and epochs > 0 else None
    ordered = sorted(range(len(maps)), key=lambda i: executor.producer_step(maps[i][0]))
    fisher = output_fisher(original, [(name, channels) for name, channels, _ in maps], batches,
                           seed=seed, draws=fisher_draws, temperature=temperature) if init == "fisher" or weighted else {}
    fitted: dict[str, Projection] = {}
    try:
        for position, i in enumerate(ordered):
            name, channels, k = maps[i]
            started = time.perf_counter()
            step = executor.producer_step(name)
            if init in ("lstsq", "fisher"):
                start = lstsq_projection(*runs.cross_moments(name, seed=i), k, ridge=ridge, metric=fisher.get(name))
            else:
                start = pca_projection(runs.second_moment(name, channels, seed=i), k)
            if judge is not None:
                judge.pause_after(name)
            projection = ChannelProjection(start.P, start.U, quantized).to(runs.batches[0][0].device)
            executor.set_transform(name, projection)
            later = [maps[j][0] for j in ordered[position + 1:] if executor.producer_step(maps[j][0]) > step]
            end = runs.block_end(name, projection, later) if epochs > 0 else None
            fit = BlockFit()
            if end is not None:
                if judge is not None:
                    judge.aim(end)
                metric = floored_metric(fisher[end.name]).float().to(projection.P.device) \
                    if weighted and end.name in fisher else None
                fit = _refine(projection, runs, name, end, epochs=epochs, lr=lr / math.sqrt(channels),
                              temperature=temperature, seed=(seed, i), min_gain=min_gain, patience=patience,
                              precision=precision, judge=judge, metric=metric)
            projection.requires_grad_(False)
            for paused in (runs, judge):
                if paused is not None:
                    paused.apply(name, projection)
            fit.seconds = time.perf_counter() - started
            if progress is not None:
                progress(position, name, fit)
            fitted[name] = projection.to_projection()
    finally:
        executor.clear_transforms()
    return fitted


def lstsq_projection(xx: torch.Tensor, yx: torch.Tensor, k: int, ridge: float = PLAIN_RIDGE,
                     metric: torch.Tensor | None = None) -> Projection:
    """Rule a's closed form: the rank-k W = U P minimising sum ||y - W x||^2, from the moments
    xx = sum x x^T (the compressed network's map) and yx = sum y x^T (the original's).

    Reduced-rank regression: B = yx (xx + ridge)^-1 is the full-rank least-squares map, U the
    top-k eigenvectors of the fitted values' moment B xx B^T, and P = U^T B. With y = x it is
    PCA (B = I). The ridge is relative to the mean eigenvalue; `PLAIN_RIDGE` only guards dead
    channels, `ROUNDED_RIDGE` bounds the gains on weak directions (rule a)."""
    xx, yx = xx.to(torch.float64), yx.to(torch.float64)
    channels = xx.shape[0]
    damp = ridge * float(torch.trace(xx)) / channels + 1e-30
    B = torch.linalg.solve(xx + damp * torch.eye(channels, dtype=xx.dtype), yx.T).T  # noqa: N806
    root = inverse_root = torch.eye(channels, dtype=xx.dtype)
    if metric is not None:  # the same regression with errors measured as e^T M e: in M^(1/2)'s coordinates
        root, inverse_root = metric_roots(metric)
    fitted = root @ B @ xx @ B.T @ root
    _, vectors = torch.linalg.eigh((fitted + fitted.T) / 2)
    top = vectors[:, -k:].flip(-1)
    top = top * torch.where(top.sum(0) < 0, -1.0, 1.0).to(top.dtype)  # deterministic signs, as PCA's
    P = (top.T @ root @ B).contiguous().numpy().astype(np.float32)  # noqa: N806
    return Projection(P=P, U=(inverse_root @ top).contiguous().numpy().astype(np.float32))


class _PausedRuns:
    """Per calibration batch, the compressed run paused just after the current map's step (its
    value there unprojected) and the original run paused at the current block's end (restarted
    when a block ends earlier); with `track_original`, also the original run just after the
    current map's step."""

    def __init__(self, executor: nn.Module, original: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]],
                 track_original: bool = False):
        self.executor, self.original, self.batches = executor, original, list(batches)
        self.compressed: list[Frontier | None] = [None] * len(self.batches)
        self.reference: list[Frontier | None] = [None] * len(self.batches)
        self.at_map: list[Frontier | None] | None = [None] * len(self.batches) if track_original else None
        self.targets: list[tuple[torch.Tensor, ...]] = []
        self.raw: list[torch.Tensor] = []  # the current map's unprojected value per batch

    def pause_after(self, name: str) -> None:
        """Advance the compressed runs past `name`'s step (no transform on it yet: its raw value)."""
        stop = self.executor.producer_step(name) + 1
        self.raw = []
        with torch.no_grad():
            for b, inputs in enumerate(self.batches):
                frontier = self.executor.advance(self.compressed[b] or self.executor.start(*inputs), stop)
                self.raw.append(self.executor.value(frontier, name))
                self.executor.set_value(frontier, name, None)  # held apart: a fork need not copy it
                self.compressed[b] = self.executor.trim(frontier, keep_outputs=False)

    def second_moment(self, name: str, channels: int, seed: int) -> torch.Tensor:
        """Pause the compressed runs after `name`'s step; its uncentred second moment there."""
        self.pause_after(name)
        recorder = SecondMomentRecorder(channels, seed=seed, stop=False)
        for value in self.raw:
            recorder(value)
        return recorder.mean_moment()

    def cross_moments(self, name: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pause both runs after `name`'s step; (sum x x^T, sum y x^T) over the same random
        positions, x the compressed network's value, y the original's."""
        assert self.at_map is not None
        self.pause_after(name)
        stop = self.executor.producer_step(name) + 1
        generator = torch.Generator().manual_seed(mix_seeds(seed, 1))
        xx = yx = None
        with torch.no_grad():
            for b, inputs in enumerate(self.batches):
                frontier = self.original.advance(self.at_map[b] or self.original.start(*inputs), stop)
                target = self.original.value(frontier, name)
                self.at_map[b] = self.original.trim(frontier, keep_outputs=False)
                x, y = sampled_vectors([self.raw[b], target], POSITIONS_PER_BATCH, generator)
                xx = moment_product(x, x) if xx is None else xx + moment_product(x, x)
                yx = moment_product(y, x) if yx is None else yx + moment_product(y, x)
        return xx, yx

    def apply(self, name: str, projection: nn.Module) -> None:
        """The map is done: its projected value replaces the raw one in every paused run."""
        with torch.no_grad():
            for frontier, raw in zip(self.compressed, self.raw, strict=True):
                self.executor.set_value(frontier, name, projection(raw))
        self.raw = []

    def block_end(self, name: str, projection: nn.Module, later: Sequence[str]) -> _BlockEnd | None:
        """Rule b, found on the first batch with gradients on; the original's values there."""
        frontier = self._projected(0, name, projection)
        end = None
        for other in later:
            self.executor.advance(frontier, self.executor.producer_step(other) + 1)
            if self.executor.value(frontier, other).requires_grad:
                end = _BlockEnd(self.executor.producer_step(other) + 1, other)
                break
        else:
            self.executor.advance(frontier, self.executor.num_steps)
            if any(out.requires_grad for out in self.executor.outputs(frontier)):
                end = _BlockEnd(self.executor.num_steps, None)
        if end is not None:
            self.aim(end)
        return end

    def aim(self, end: _BlockEnd) -> None:
        """The original's values at `end`, per batch: the block's targets."""
        self.targets = [self._reference_values(b, end) for b in range(len(self.batches))]

    def block_loss(self, name: str, projection: nn.Module, end: _BlockEnd, loss: BlockLoss,
                   precision: str = "float32") -> float:
        """The mean block loss over every batch, without gradients (rule d's held-out judge)."""
        device = self.batches[0][0].device.type
        losses = []
        with torch.no_grad():
            for b in range(len(self.batches)):
                with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                    values = self.block_values(b, name, projection, end)
                losses.append(float(loss(values, self.targets[b])))
        return sum(losses) / len(losses)

    def block_values(self, b: int, name: str, projection: nn.Module, end: _BlockEnd) -> tuple[torch.Tensor, ...]:
        """The compressed network's values at the block end for batch b (with gradients)."""
        return end.values(self.executor, self.executor.advance(self._projected(b, name, projection), end.stop))

    def _projected(self, b: int, name: str, projection: nn.Module) -> Frontier:
        """A fork of batch b's paused run with the projection applied to the map's raw value."""
        frontier = self.executor.fork(self.compressed[b])
        self.executor.set_value(frontier, name, projection(self.raw[b]))
        return frontier

    def _reference_values(self, b: int, end: _BlockEnd) -> tuple[torch.Tensor, ...]:
        frontier = self.reference[b]
        if frontier is None or frontier.position > end.stop:
            frontier = self.original.start(*self.batches[b])
        with torch.no_grad():
            self.reference[b] = self.original.trim(self.original.advance(frontier, end.stop))
            return tuple(v.detach().clone() for v in end.values(self.original, self.reference[b]))


class _BlockEnd:
    """Where a block ends: after the step of `name`, or at the graph outputs (name None)."""

    def __init__(self, stop: int, name: str | None):
        self.stop, self.name = stop, name

    def values(self, executor: nn.Module, frontier: Frontier) -> tuple[torch.Tensor, ...]:
        return (executor.value(frontier, self.name),) if self.name else executor.outputs(frontier)


def _block_loss(runs: _PausedRuns, end: _BlockEnd, temperature: float, metric: torch.Tensor | None) -> BlockLoss:
    """Rule c: at the outputs the distillation loss; at a map the squared error over the target's
    mean square, both measured in `metric` (M, the map's output Fisher as `fisher.floored_metric`
    gives it: e^T M e = |M^(1/2) e|^2) where given."""
    if end.name is None or metric is None:
        kinds = output_kinds(runs.targets[0]) if end.name is None else ["regression"]  # a map: scaled MSE
        return lambda values, targets: distillation_loss([v.float() for v in values], targets, kinds, temperature)

    # a target's mean square in the metric is the same every epoch: taken once a batch, not
    # once a step (a channel mixing costs as much as a pointwise conv of the map)
    scales: dict[int, torch.Tensor] = {}  # by id: every target stays alive while the map is refined

    def weighted(values: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        target = targets[0].float()
        if id(targets[0]) not in scales:
            scales[id(targets[0])] = (quadratic_form(metric, target) / target.numel()).clamp_min(1e-12)
        error = values[0].float() - target
        return quadratic_form(metric, error) / error.numel() / scales[id(targets[0])]

    return weighted


def quadratic_form(metric: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum over positions of x^T M x (x's channels on axis 1, M symmetric), with its gradient
    2 M x taken from the forward's own M x: one channel mixing forward and none backward, where
    |M^(1/2) x|^2 through autograd takes one each way."""
    with torch.no_grad():
        curved = mix_channels(metric, x)
    energy = (x * curved).sum()  # its gradient is M x: half the form's
    return 2 * energy - energy.detach()


def _refine(projection: ChannelProjection, runs: _PausedRuns, name: str, end: _BlockEnd, *, epochs: int,
            lr: float, temperature: float, seed: tuple[int, int], min_gain: float, patience: int,
            precision: str = "float32", judge: _PausedRuns | None = None,
            metric: torch.Tensor | None = None) -> BlockFit:
    """Rules c and d: each epoch's mean loss (and held-out loss, with a `judge`), and whether it
    stopped before `epochs`; with a judge, the projection ends at its best held-out epoch."""
    loss_of = _block_loss(runs, end, temperature, metric)
    optimizer = torch.optim.Adam(projection.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(epochs, len(runs.batches)))
    generator = torch.Generator().manual_seed(mix_seeds(*seed))
    device = runs.batches[0][0].device.type
    fit, best, stale = BlockFit(), math.inf, 0
    kept, kept_loss = None, math.inf
    if judge is not None:  # the start is a candidate too: epochs that never beat it are undone
        best = kept_loss = judge.block_loss(name, projection, end, loss_of, precision)
        kept, fit.best_epoch = copy.deepcopy(projection.state_dict()), 0
        fit.held_out_losses.append(kept_loss)
    for _ in range(epochs):
        losses = []
        for b in torch.randperm(len(runs.batches), generator=generator).tolist():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                values = runs.block_values(b, name, projection, end)
            loss = loss_of(values, runs.targets[b])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        fit.losses.append(sum(losses) / len(losses))
        decisive = fit.losses[-1]
        if judge is not None:
            decisive = judge.block_loss(name, projection, end, loss_of, precision)
            fit.held_out_losses.append(decisive)
            if decisive < kept_loss:  # the best held-out epoch so far: its P and U are kept
                kept, kept_loss, fit.best_epoch = copy.deepcopy(projection.state_dict()), decisive, len(fit.losses)
        if decisive < best * (1 - min_gain):
            best, stale = decisive, 0
        else:
            stale += 1
        if min_gain > 0 and stale >= patience and len(fit.losses) < epochs:
            fit.stopped_early = True
            break
    if kept is not None:
        projection.load_state_dict(kept)
    return fit
