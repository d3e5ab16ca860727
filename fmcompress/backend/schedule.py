"""When learned projections train on what: epochs, learning rate, seeds and the divergence test.

Used by end-to-end training (`trainer.py`) and block reconstruction (`blockwise.py`).
Rules:

a. Schedules (`plan_epochs`): `joint` trains all maps together for `epochs`; `greedy`
   adds one map a stage in network order and trains all maps added so far for
   `stage_epochs`, then all of them jointly for `epochs` (the paper's schedule, shortened).
b. Learning rate (`warmup_cosine`): a linear warmup over the first epoch, then a cosine
   decay over all steps. `lr` is relative to each map's scale: a map with C channels
   steps at lr / sqrt(C) (the RMS of an orthonormal P's entries), since an absolute step
   that suits 16 channels wrecks a map of 480 in a few Adam steps. The default lr is 3e-3:
   at 1e-2 PP-OCR's classifier at 8x lost its held-out agreement in the first end-to-end
   epochs in two draws of four (0.44-0.66 from 0.88-0.91) and 9.8 points on average; at
   3e-3 no probe epoch fell more than 9% below the block stage and it lost 4.9-5.0 (the
   recognizer and the demo as before).
c. Seeds (`mix_seeds`): every draw (an epoch's order, a sample's augmentation) comes
   from a seed mixed from the run's seed and where the draw happens, so a resumed run
   repeats the uninterrupted one exactly.
d. Divergence (`diverged`): an epoch whose held-out distillation loss is not finite or
   more than `DIVERGED` times the best one diverged; the trainer then returns to the best
   projections at `BACKTRACK_FACTOR` times the learning rate. Ten, not less: leaving the
   block stage's fitted projections for a better optimum, the first epochs raise the
   held-out loss more than threefold on the way, and cutting the rate there stalls the
   run (PP-OCR's classifier at 4x).
e. Stopping (`should_stop`, the trainer's rule h), from the epochs' records alone, so a
   resumed run stops where the uninterrupted one does. Only epochs with every map count.
   `patience`: that many epochs in a row without a held-out score above the best so far
   (the initialisation's included), counted after the first `probe` epochs. `probe`: while
   none of the probe's epochs beats the initialisation's score, training stops after any of
   them that leaves their best more than `PROBE_SCORE_SHORTFALL` of it below it, and after
   the last of them when its held-out loss is more than `PROBE_LOSS_RATIO` times the
   initialisation's. Three epochs, and patience only after them: leaving the block stage's
   projections, PP-OCR's classifier scores below them for up to three epochs, its held-out
   loss falling, before a later one beats them. At the default rate (3e-3, rule b) its
   probe epochs score at most 9% below the stage in every run measured (twenty: 4x and
   8x, four seeds, either set's lines); the recognizer's first epoch 25-67% below it (4x and
   8x, either set's lines), and no end-to-end epoch has ever paid on it. Hence 15%,
   checked after each epoch: the recognizer's compile stops after one epoch of about 37 s
   instead of running six to the patience. Patience 4, not 3: the classifier at 8x beat its
   start at its seventh epoch once in four draws, after three that only tied it, its
   held-out loss falling all along (0.36 to 0.11); it lost 0.7 points instead of 3.0, and
   the draws that stop to the patience run one epoch (about 4 s) longer.
   `probe_steps` (`falls_short`): the held-out part is scored once more, after that many
   steps of the first epoch, and the same shortfall stops training there. The recognizer's
   collapse starts at the first steps, at a sixth of the peak rate or less (the warmup's):
   after four steps it scored 0.54 against the stage's 0.77 (held-out loss 0.23 to
   1.41); the classifier's draws were within 2.5% of their start then (4x and 8x). The
   recognizer's loss is sharp around the stage's projections, so lower rates fall too: a
   plain gradient step of norm 1e-3 over its 1.9 million projection entries raised the loss
   of the very batch it was taken on from 0.094 to 2.4, where random steps of 1e-3 of a
   tensor's norm (0.01 to 0.3), one map at a time, left it at 0.09-0.12 (docs/results.md
   section 1). Four steps and a scoring cost the recognizer about 10 s, its probe epoch 40.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from fmcompress.train_config import TrainConfig

DIVERGED = 10.0  # a held-out distillation loss this many times the best one means the epoch diverged
BACKTRACK_FACTOR = 0.3
PROBE_LOSS_RATIO = 4.0  # see should_stop
PROBE_SCORE_SHORTFALL = 0.15  # see should_stop: at most 0.09 short where training went on to pay, 0.25-0.67 where not


def plan_epochs(maps: int, config: TrainConfig) -> list[tuple[str, int]]:
    """Rule a: (stage name, number of active maps) for every epoch of the run."""
    epochs: list[tuple[str, int]] = []
    if config.schedule == "greedy":
        for i in range(maps):
            epochs += [(f"greedy {i + 1}/{maps}", i + 1)] * config.stage_epochs
    return epochs + [("joint", maps)] * config.epochs


def warmup_cosine(epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """Rule b's schedule as a factor of the learning rate: a linear warmup over the first
    epoch (Adam's first steps move every entry by the full lr, whatever its gradient), then
    a cosine decay to 0 over all `epochs`. The warm-up is the first epoch by construction, so
    no caller can leave it out (the block stage once passed a warm-up of no steps)."""
    total_steps = epochs * steps_per_epoch

    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / max(1, steps_per_epoch))
        return ramp * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))

    return factor


def mix_seeds(*values: int) -> int:
    """Rule c: one 63-bit seed from several integers (the same on every platform and run)."""
    digest = hashlib.blake2b(json.dumps(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def diverged(held_out_loss: float, best_loss: float) -> bool:
    """Rule d: not finite, or more than DIVERGED times the best held-out loss so far."""
    return not math.isfinite(held_out_loss) or held_out_loss > DIVERGED * best_loss


def falls_short(score: float, initial_score: float) -> bool:
    """Rule e's probe test, after a probe epoch or the first `probe_steps` steps: the score is
    more than PROBE_SCORE_SHORTFALL of the start's below it."""
    return initial_score > 0 and score < (1 - PROBE_SCORE_SHORTFALL) * initial_score


def should_stop(history: Sequence[Any], initial_score: float, initial_loss: float, maps: int,
                config: TrainConfig) -> str | None:
    """Rule e: `patience`, `probe` or None (go on), from the EpochRecords so far."""
    full = [r for r in history if r.active_maps == maps]
    best, since = initial_score, 0
    for epoch, record in enumerate(full, 1):
        if record.score > best:
            best, since = record.score, 0
        elif epoch > config.probe:  # the probe's epochs leave the start: patience counts after them
            since += 1
    if config.probe and 0 < len(full) <= config.probe and best <= initial_score:
        # none of the probe's epochs so far beat the start, so `best` is the start's score
        probe_best = max(record.score for record in full)
        if falls_short(probe_best, initial_score):
            return "probe"
        if len(full) == config.probe and full[-1].held_out_loss > PROBE_LOSS_RATIO * initial_loss:
            return "probe"
    if config.patience and since >= config.patience:
        return "patience"
    return None
