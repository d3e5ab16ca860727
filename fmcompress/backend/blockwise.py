"""Block reconstruction: each projection refined on what its block computes, in network order.

The first stage of `learned`, between PCA and end-to-end training (`trainer.py`). PCA
makes each projection reconstruct its own map; what matters is what the network
computes from it, and the errors of the projections before it. Rules:

a. Maps are taken in network order (the step that computes them). Map i starts as the
   PCA of map i *as the compressed network computes it*, every earlier projection
   already refined and applied (as `fit_pca` fits them).
b. Its block runs from map i's step to the first later planned map whose value depends
   on it, else to the graph outputs. The target is what the original network computes
   there from the same input, so a projection also corrects the errors that the ones
   before it left.
c. Loss: at a map, the squared error divided by the target's mean square; at the
   outputs, `losses.distillation_loss` (KL at `temperature` for class outputs, scaled
   MSE for the rest).
d. P and U only, by Adam at lr / sqrt(C) (schedule.py's rule b) with a cosine decay over
   `epochs` passes of the calibration batches, in an order drawn from the seed and the
   map's index; no augmentation. The same seed gives the same projections.
e. Cost: the compressed and the original run are each paused before the block, one
   frontier per calibration batch (the tensors alive at that point), so an epoch of a
   map runs only its block: the stage costs about `epochs` passes of the network, plus
   one forward pass of each run. Memory: the two paused runs and the block's target,
   per batch (the fit pass passes at most `--max-samples` samples). A map that nothing
   downstream depends on keeps its PCA.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fmcompress.featuremaps import Projection

from .executor import Frontier
from .losses import distillation_loss, output_kinds
from .projection import ChannelProjection, SecondMomentRecorder, pca_projection
from .schedule import mix_seeds, warmup_cosine

Progress = Callable[[int, str, float, float], None]  # (index, map, first epoch's loss, last epoch's loss)


def fit_blockwise(executor: nn.Module, maps: Sequence[tuple[str, int, int]],
                  batches: Sequence[tuple[torch.Tensor, ...]], *, epochs: int, lr: float, temperature: float,
                  seed: int = 0, progress: Progress | None = None) -> dict[str, Projection]:
    """One refined projection per (name, channels, k); `executor` (an OnnxModule without
    transforms) is left without transforms. `batches` are input tuples on its device."""
    original = copy.deepcopy(executor)
    runs = _PausedRuns(executor, original, batches)
    ordered = sorted(range(len(maps)), key=lambda i: executor.producer_step(maps[i][0]))
    fitted: dict[str, Projection] = {}
    try:
        for position, i in enumerate(ordered):
            name, channels, k = maps[i]
            step = executor.producer_step(name)
            moment = runs.second_moment(name, channels, seed=i)
            start = pca_projection(moment, k)
            projection = ChannelProjection(start.P, start.U).to(runs.batches[0][0].device)
            executor.set_transform(name, projection)
            later = [maps[j][0] for j in ordered[position + 1:] if executor.producer_step(maps[j][0]) > step]
            end = runs.block_end(later)
            first = last = math.nan
            if end is not None:
                first, last = _refine(projection, runs, end, epochs=epochs, lr=lr / math.sqrt(channels),
                                      temperature=temperature, seed=(seed, i))
            if progress is not None:
                progress(position, name, first, last)
            projection.requires_grad_(False)
            fitted[name] = projection.to_projection()
    finally:
        executor.clear_transforms()
    return fitted


class _PausedRuns:
    """Per calibration batch, the compressed run paused before the current map's step and the
    original run paused at the current block's end (restarted when a block ends earlier)."""

    def __init__(self, executor: nn.Module, original: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]]):
        self.executor, self.original, self.batches = executor, original, list(batches)
        self.compressed: list[Frontier | None] = [None] * len(self.batches)
        self.reference: list[Frontier | None] = [None] * len(self.batches)
        self.targets: list[tuple[torch.Tensor, ...]] = []

    def second_moment(self, name: str, channels: int, seed: int) -> torch.Tensor:
        """Pause the compressed runs before `name`'s step; its uncentred second moment there."""
        stop = self.executor.producer_step(name)
        recorder = SecondMomentRecorder(channels, seed=seed, stop=False)
        with torch.no_grad():
            for b, inputs in enumerate(self.batches):
                frontier = self.compressed[b] or self.executor.start(*inputs)
                self.compressed[b] = self.executor.trim(self.executor.advance(frontier, stop), keep_outputs=False)
                probe = self.executor.advance(self.executor.fork(frontier), stop + 1)
                recorder(self.executor.value(probe, name))
        return recorder.mean_moment()

    def block_end(self, later: Sequence[str]) -> _BlockEnd | None:
        """Rule b, found on the first batch with gradients on; the original's values there."""
        frontier = self.executor.fork(self.compressed[0])
        end = None
        for name in later:
            self.executor.advance(frontier, self.executor.producer_step(name) + 1)
            if self.executor.value(frontier, name).requires_grad:
                end = _BlockEnd(self.executor.producer_step(name) + 1, name)
                break
        else:
            self.executor.advance(frontier, self.executor.num_steps)
            if any(out.requires_grad for out in self.executor.outputs(frontier)):
                end = _BlockEnd(self.executor.num_steps, None)
        if end is not None:
            self.targets = [self._reference_values(b, end) for b in range(len(self.batches))]
        return end

    def block_values(self, b: int, end: _BlockEnd) -> tuple[torch.Tensor, ...]:
        """The compressed network's values at the block end for batch b (with gradients)."""
        frontier = self.executor.advance(self.executor.fork(self.compressed[b]), end.stop)
        return end.values(self.executor, frontier)

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


def _refine(projection: ChannelProjection, runs: _PausedRuns, end: _BlockEnd, *, epochs: int, lr: float,
            temperature: float, seed: tuple[int, int]) -> tuple[float, float]:
    """Rules c and d; (mean loss of the first epoch, of the last)."""
    kinds = output_kinds(runs.targets[0]) if end.name is None else ["regression"]  # a map: scaled MSE
    optimizer = torch.optim.Adam(projection.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(epochs * len(runs.batches), 0))
    generator = torch.Generator().manual_seed(mix_seeds(*seed))
    means = []
    for _ in range(epochs):
        losses = []
        for b in torch.randperm(len(runs.batches), generator=generator).tolist():
            loss = distillation_loss(runs.block_values(b, end), runs.targets[b], kinds, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        means.append(sum(losses) / len(losses))
    return (means[0], means[-1]) if means else (math.nan, math.nan)
