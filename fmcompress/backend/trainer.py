"""Learned projections: P and U trained end to end through the frozen network.

Price & Tanner's improvement over PCA, adapted to a few hundred unlabeled samples
and a CPU or one GPU. The settings are `fmcompress.train_config.TrainConfig`; the
losses are `losses.py`, the schedules, seeds and divergence test `schedule.py`, the
augmentation `augment.py`, checkpoints `checkpoint.py` and devices and ranks
`devices.py`, each with its rules. Rules of the loop:

a. Student and teacher are one torch executor. The student reads U P X at every
   planned map (`LearnedProjection`: P and U are the only parameters with
   gradients; every original weight is a frozen buffer); the teacher is the same
   module with every projection bypassed, run without gradients on the same
   (augmented) batch, or onnxruntime's session of the original model where one is
   given (`teacher.py`: the same outputs to rounding, in about half the time on a CPU).
b. Initialisation: the PCA projections (`learned`) or random orthonormal ones
   (`random`, the paper's: `random_projections`).
c. Each step's loss is the losses' sum for `loss` and `feature_weight`, on the
   teacher's output kinds.
d. Epochs follow the schedule (`joint` or `greedy`); Adam (or SGD with momentum 0.9)
   steps each map at lr / sqrt(C) under the warmup-cosine schedule. Each epoch draws its
   order (and its `max_samples` subset) from the seed and the epoch number, and the
   augmentation from the seed, the epoch and the sample, so a resumed run repeats the
   uninterrupted one exactly.
e. After every epoch the held-out part is scored with the student: accuracy with
   labels, else top-1 agreement with the teacher, else output cosine similarity. A
   sequence head scores its decodings (`sequence`: the share of samples whose greedy CTC
   strings equal the teacher's), not its steps: per-step agreement is mostly blank steps,
   and on PP-OCR's recognizer it rose through epochs that lost whole strings. Every class
   counts here, a recognizer's space too, where the report's figures leave it out
   (`metrics.space_classes`): measured on PP-OCR's recognizer, leaving it out chose the same
   projections, and let through the probe's first steps (rule h) of an end-to-end epoch
   that never paid (313 s against 252 s at 4x). An epoch
   replaces the best when it raises the score without raising the held-out
   distillation loss, or ties the score (a few hundred samples saturate it) at a lower
   loss: on 128 held-out samples a score moves by single samples, and the loss, over
   every sample and class, is the steadier witness (PP-OCR's classifier at 8x kept an
   epoch that agreed on one more of its 128 held-out lines than its start and lost 6.2
   points on 1200 others).
   The best epoch's projections are kept; training stops early once the score reaches
   `target`. The initialisation is scored first and is a candidate
   too, and so is `fallback` when given (the fit pass's PCA, when training starts from
   the block stage), so training never returns worse held-out figures than either.
   Held-out data is never trained on. With `epochs` 0 (and no greedy stages) nothing
   trains: the better of the initialisation and `fallback` is returned.
f. An epoch that diverged (`schedule.diverged`) restores the best projections, drops
   the optimiser's moments and multiplies the learning rate (and the rest of its
   schedule) by `schedule.BACKTRACK_FACTOR`. A diverged epoch is never the best one, nor
   is a greedy stage with fewer maps than all.
g. Distributed: every rank scores the held-out part (same result); only rank 0 writes
   checkpoints.
h. Stopping (`schedule.should_stop`): besides `target`, training stops once `patience`
   epochs in a row after the first `probe` have not raised the best held-out score (a tie
   broken by the loss is no gain); and after the first `probe` epochs, when none of them beat the
   initialisation's score and the last one's held-out distillation loss is more than
   `schedule.PROBE_LOSS_RATIO` times the initialisation's, it will not pay, and the
   initialisation is kept; so it is after any probe epoch that leaves their best score short
   of the initialisation's by more than `schedule.PROBE_SCORE_SHORTFALL` of it; and so it is
   after the first `probe_steps` steps of the first epoch (`TrainResult.stopped_at_step`).
   `TrainResult.stop_reason` says which: `target`, `patience`, `probe` or `epochs` (all ran).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - torch's convention
from torch import nn

from fmcompress.errors import InputError
from fmcompress.featuremaps import Projection
from fmcompress.metrics import sequence_agreement
from fmcompress.train_config import TrainConfig

from .augment import augment_batch
from .checkpoint import EpochRecord, RunState, load_checkpoint, run_identity, save_checkpoint
from .devices import resolve_device, setup_ranks, wrap_for_ranks
from .losses import distillation_loss, feature_loss, label_loss, output_kinds
from .projection import ChannelProjection
from .schedule import (
    BACKTRACK_FACTOR,
    diverged,
    falls_short,
    mix_seeds,
    plan_epochs,
    should_stop,
    warmup_cosine,
)
from .teacher import OrtTeacher


class LearnedProjection(ChannelProjection):
    """U P x with trainable P, U; `bypass` makes it the identity (the teacher's pass).

    With a `feature_reference` (only when the loss uses it: it is a pass over the whole
    map) the relative error of the last student pass is kept in `reconstruction`: against
    the map the teacher's last pass saw here (`teacher`), or against the student's own
    input (`self`, the reconstruction error of this projection alone).
    """

    def __init__(self, P: np.ndarray, U: np.ndarray, feature_reference: str | None = None,  # noqa: N803
                 quantized: bool = False):
        super().__init__(P, U, quantized)
        self.bypass = False
        self.feature_reference = feature_reference
        self.teacher_map: torch.Tensor | None = None
        self.reconstruction: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            if self.feature_reference == "teacher" and not torch.is_grad_enabled():
                self.teacher_map = x
            return x
        out = super().forward(x)
        if self.feature_reference and torch.is_grad_enabled():
            reference = self.teacher_map if self.feature_reference == "teacher" else x
            self.reconstruction = (out - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-12)
        return out


@dataclass
class TrainResult:
    projections: dict[str, Projection]
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = float("nan")
    initial_score: float = float("nan")  # the initialisation's held-out score (PCA's, for learned)
    initial_loss: float = float("nan")  # ... and its held-out distillation loss
    metric: str = ""
    stopped_early: bool = False  # at the target
    stop_reason: str = "epochs"  # rule h: target, patience, probe or epochs
    stopped_at_step: int | None = None  # rule h: the probe stopped the first epoch after this many steps
    device: str = "cpu"
    world_size: int = 1


# (event, fields): "epoch_start", "step", "epoch_end" (and "block", from the fit pass)
Monitor = Callable[[str, dict[str, Any]], None]


def improves(score: float, loss: float, best_score: float, best_loss: float) -> bool:
    """Rule e: a candidate replaces the best when its held-out score is higher and its held-out
    distillation loss no higher, or its score equal and its loss lower."""
    no_higher = loss <= best_loss or (math.isnan(best_loss) and not math.isnan(loss))
    return (score > best_score and no_higher) or (score == best_score and loss < best_loss)


def random_projections(maps: Sequence[tuple[str, int, int]], seed: int) -> dict[str, Projection]:
    """Rule b's `random`: a random orthonormal P (k x C) per map, U = P^T."""
    rng = np.random.default_rng(seed)
    fitted = {}
    for name, channels, k in maps:
        q, _ = np.linalg.qr(rng.standard_normal((channels, k)))
        fitted[name] = Projection(P=q.T.astype(np.float32), U=q.astype(np.float32))
    return fitted


def score_metric(kinds: Sequence[str], held_out_labels: np.ndarray | None) -> str:
    """Rule e: `accuracy`, `agreement`, `sequence` or `cosine`, from the first output's kind."""
    if held_out_labels is not None and kinds[0] in ("logits", "probs"):
        return "accuracy"
    return {"logits": "agreement", "probs": "agreement", "seq_probs": "sequence"}.get(kinds[0], "cosine")


class ProjectionTrainer:
    """Trains one projection per map of `names` on `calibration` (inputs and labels as numpy)."""

    def __init__(self, executor: nn.Module, names: Sequence[str], initial: dict[str, Projection],
                 config: TrainConfig, *, checkpoint: str | os.PathLike | None = None, resume: bool = False,
                 monitor: Monitor | None = None, fallback: dict[str, Projection] | None = None,
                 teacher: OrtTeacher | None = None):
        config.check()
        self.config = config
        self.names = list(names)
        self.device = resolve_device(config.device)
        self.rank, self.world = setup_ranks(self.device)
        self.executor = executor.to(self.device)
        for parameter in self.executor.parameters():
            parameter.requires_grad_(False)
        reference = config.feature_reference if config.feature_weight > 0 else None
        self.projections = {name: LearnedProjection(initial[name].P, initial[name].U, reference, config.fake_quant)
                            .to(self.device) for name in self.names}
        for name, module in self.projections.items():
            self.executor.set_transform(name, module)
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.resume = resume
        self.monitor = monitor or (lambda event, fields: None)
        self.fallback = fallback  # rule e: another candidate, scored before training (never trained)
        self.teacher = teacher  # rule a: the original's outputs from onnxruntime (teacher.py)

    # -- public

    def fit(self, calibration: dict[str, np.ndarray], calibration_labels: np.ndarray | None,
            held_out: dict[str, np.ndarray], held_out_labels: np.ndarray | None) -> TrainResult:
        cfg = self.config
        inputs = list(self.executor.input_names)
        epochs = plan_epochs(len(self.names), cfg)
        samples = len(next(iter(calibration.values())))
        per_epoch = min(samples, cfg.max_samples or samples)
        steps_per_epoch = math.ceil(per_epoch / cfg.batch_size)
        optimizer = self._optimizer()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(len(epochs), steps_per_epoch))
        model = wrap_for_ranks(self.executor, self.device, self.world)
        teacher_held = self._teacher_outputs(held_out, inputs)
        kinds = output_kinds(teacher_held)
        if cfg.loss != "kd" and calibration_labels is None:
            raise InputError(f"--loss {cfg.loss} needs labelled data "
                             "(an .npz with `labels` or class subfolders)")
        metric = score_metric(kinds, held_out_labels)
        state = RunState(best=self._snapshot(), best_score=-math.inf)
        self._activate(len(self.names))
        state.best_score, state.best_loss = self._score(held_out, held_out_labels, teacher_held, inputs,
                                                        kinds, metric)
        state.best_epoch = 0  # the initialisation is a candidate too: training never makes it worse
        initial_score, initial_loss = state.best_score, state.best_loss
        if self.fallback is not None:
            self._consider_fallback(state, held_out, held_out_labels, teacher_held, inputs, kinds, metric)
        stop_reason, stopped_at_step = "epochs", None
        start_epoch = self._load(optimizer, scheduler, state) if self.resume else 0
        for epoch in range(start_epoch, len(epochs)):
            stage, active = epochs[epoch]
            self._activate(active)
            self.monitor("epoch_start", {"epoch": epoch + 1, "epochs": len(epochs), "stage": stage,
                                         "steps": steps_per_epoch})
            started = time.perf_counter()
            check = None
            if epoch == 0 and cfg.probe and cfg.probe_steps and active == len(self.names):  # rule h
                def check() -> bool:
                    score, _ = self._score(held_out, held_out_labels, teacher_held, inputs, kinds, metric)
                    self.monitor("probe_steps", {"steps": cfg.probe_steps, "score": score})
                    return falls_short(score, initial_score)
            loss = self._train_epoch(model, optimizer, scheduler, calibration, calibration_labels, inputs,
                                     kinds, epoch, per_epoch, check)
            if loss is None:
                stop_reason, stopped_at_step = "probe", cfg.probe_steps
                self.monitor("stop", {"epoch": epoch + 1, "reason": "probe"})
                break
            self._activate(len(self.names))  # the held-out score is always that of the full network
            score, held_loss = self._score(held_out, held_out_labels, teacher_held, inputs, kinds, metric)
            record = EpochRecord(epoch + 1, stage, active, loss, score, optimizer.param_groups[0]["lr"],
                                 held_loss, time.perf_counter() - started)
            self._keep_or_backtrack(record, optimizer, scheduler, state)
            self.monitor("epoch_end", asdict(record) | {"best": state.best_score, "metric": metric})
            self._save(epoch + 1, optimizer, scheduler, state)
            if cfg.target is not None and record.active_maps == len(self.names) and score >= cfg.target:
                state.stopped_early = epoch + 1 < len(epochs)
                stop_reason = "target" if state.stopped_early else stop_reason
                break
            reason = should_stop(state.history, initial_score, initial_loss, len(self.names), cfg)
            if reason is not None and epoch + 1 < len(epochs):
                stop_reason = reason
                self.monitor("stop", {"epoch": epoch + 1, "reason": reason})
                break
        if state.best_epoch < 0:  # resumed past the end, or nothing scored: keep what we have
            state.best = self._snapshot()
        return TrainResult(projections=state.best, history=state.history, best_epoch=state.best_epoch,
                           best_score=state.best_score, initial_score=initial_score,
                           initial_loss=initial_loss, metric=metric,
                           stopped_early=state.stopped_early, stop_reason=stop_reason,
                           stopped_at_step=stopped_at_step, device=str(self.device), world_size=self.world)

    # -- steps

    def _optimizer(self) -> torch.optim.Optimizer:
        """One group a map, its step relative to the map's scale (schedule.py, rule b): an
        orthonormal P's entries have an RMS of 1/sqrt(C), so one lr suits 16 and 960 channels."""
        cfg = self.config
        groups = [{"params": list(module.parameters()), "lr": cfg.lr / math.sqrt(module.P.shape[1])}
                  for module in self.projections.values()]
        if cfg.optimizer == "adam":
            return torch.optim.Adam(groups, lr=cfg.lr)
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)

    def _keep_or_backtrack(self, record: EpochRecord, optimizer, scheduler, state: RunState) -> None:
        """Rules e and f, for an epoch just scored."""
        state.history.append(record)
        # greedy stages with fewer maps are never kept nor backed off
        every_map = record.active_maps == len(self.names)
        if every_map and diverged(record.held_out_loss, state.best_loss):
            self._backtrack(optimizer, scheduler, state.best)
        elif every_map and improves(record.score, record.held_out_loss, state.best_score, state.best_loss):
            state.best, state.best_score, state.best_epoch = self._snapshot(), record.score, record.epoch
            state.best_loss = record.held_out_loss

    def _consider_fallback(self, state: RunState, held_out, held_out_labels, teacher_held, inputs, kinds,
                           metric: str) -> None:
        """Rule e's other candidate: kept as the best (epoch 0) when it scores above the start."""
        start = self._snapshot()
        self._load_projections(self.fallback)
        score, loss = self._score(held_out, held_out_labels, teacher_held, inputs, kinds, metric)
        if improves(score, loss, state.best_score, state.best_loss):
            state.best, state.best_score, state.best_loss = self._snapshot(), score, loss
        self._load_projections(start)

    def _train_epoch(self, model: nn.Module, optimizer, scheduler, data: dict[str, np.ndarray],
                     labels: np.ndarray | None, inputs: list[str], kinds: list[str], epoch: int,
                     per_epoch: int, check: Callable[[], bool] | None = None) -> float | None:
        """The epoch's mean training loss; None when `check`, called after `probe_steps` steps,
        says to stop (rule h)."""
        cfg = self.config
        total = len(next(iter(data.values())))
        order = np.random.default_rng([cfg.seed, epoch]).permutation(total)[:per_epoch]
        losses = []
        self.executor.train()
        for step, start in enumerate(range(0, per_epoch, cfg.batch_size)):
            global_batch = order[start:start + cfg.batch_size]
            if len(global_batch) < self.world:
                continue  # every rank needs a sample, or the gradient all-reduce would wait forever
            batch = global_batch[self.rank::self.world]
            tensors = [augment_batch(torch.from_numpy(np.ascontiguousarray(data[name][batch])), cfg.augment,
                                     [mix_seeds(cfg.seed, epoch, int(i), j) for i in batch]).to(self.device)
                       for j, name in enumerate(inputs)]
            teacher = self._teach(tensors)
            student = self._run(model, tensors, bypass=False)
            loss = self._loss(student, teacher, kinds, labels, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            self.monitor("step", {"step": step + 1, "loss": losses[-1]})
            if check is not None and step + 1 == cfg.probe_steps:
                if check():
                    return None
                self.executor.train()  # the check scored in eval mode
        return float(np.mean(losses)) if losses else float("nan")

    def _loss(self, student, teacher, kinds, labels, batch) -> torch.Tensor:
        """Rule c."""
        cfg = self.config
        terms = []
        if cfg.loss in ("kd", "kd+ce"):
            terms.append(distillation_loss(student, teacher, kinds, cfg.temperature))
        if cfg.loss in ("ce", "kd+ce"):
            terms.append(label_loss(student, kinds, torch.from_numpy(labels[batch]).to(self.device)))
        if cfg.feature_weight:
            features = feature_loss([m.reconstruction for m in self.projections.values() if not m.bypass])
            if features is not None:
                terms.append(cfg.feature_weight * features)
        return torch.stack(terms).sum()

    def _teach(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Rule a: the original network's outputs for a batch, without gradients."""
        outputs = self.teacher(tensors) if self.teacher is not None else None
        if outputs is not None:
            return tuple(out.to(self.device) for out in outputs)
        with torch.no_grad():
            return self._run(self.executor, tensors, bypass=True)

    def _run(self, module: nn.Module, tensors: list[torch.Tensor], bypass: bool) -> tuple[torch.Tensor, ...]:
        saved = {name: m.bypass for name, m in self.projections.items()}
        if bypass:
            for m in self.projections.values():
                m.bypass = True
        try:
            return module(*tensors)
        finally:
            for name, m in self.projections.items():
                m.bypass = saved[name]

    def _teacher_outputs(self, data: dict[str, np.ndarray], inputs: list[str]) -> list[torch.Tensor]:
        self.executor.eval()
        parts = [self._teach(batch) for batch in self._batches(data, inputs)]
        return [torch.cat(outs).cpu() for outs in zip(*parts, strict=True)]

    def _score(self, data, labels, teacher, inputs, kinds, metric: str) -> tuple[float, float]:
        """(rule e's score, the held-out distillation loss that breaks ties between equal scores)."""
        self.executor.eval()
        with torch.no_grad():
            parts = [self._run(self.executor, batch, bypass=False) for batch in self._batches(data, inputs)]
        student = [torch.cat(outs).cpu() for outs in zip(*parts, strict=True)]
        loss = float(distillation_loss(student, teacher, kinds, self.config.temperature))
        first_s, first_t = student[0].float(), teacher[0].float()
        if metric == "accuracy":
            return float((first_s.argmax(-1).numpy() == labels).mean()), loss
        if metric == "agreement":
            return float((first_s.argmax(-1) == first_t.argmax(-1)).float().mean()), loss
        if metric == "sequence":
            return sequence_agreement(first_t.numpy(), first_s.numpy()), loss
        cosines = [F.cosine_similarity(s.float().flatten(1), t.float().flatten(1), dim=1).mean()
                   for s, t in zip(student, teacher, strict=True)]
        return float(torch.stack(cosines).mean()), loss

    def _batches(self, data: dict[str, np.ndarray], inputs: list[str]) -> Iterator[list[torch.Tensor]]:
        total = len(next(iter(data.values())))
        for start in range(0, total, self.config.batch_size):
            yield [torch.from_numpy(np.ascontiguousarray(data[name][start:start + self.config.batch_size]))
                   .to(self.device) for name in inputs]

    def _activate(self, count: int) -> None:
        for i, name in enumerate(self.names):
            self.projections[name].bypass = i >= count

    def _backtrack(self, optimizer, scheduler, best: dict[str, Projection]) -> None:
        """Rule f: a diverging epoch returns to the best projections at a lower learning rate."""
        self._load_projections(best)
        optimizer.state.clear()
        scheduler.base_lrs = [lr * BACKTRACK_FACTOR for lr in scheduler.base_lrs]
        for group in optimizer.param_groups:
            group["lr"] *= BACKTRACK_FACTOR

    def _load_projections(self, projections: dict[str, Projection]) -> None:
        with torch.no_grad():
            for name, projection in projections.items():
                self.projections[name].P.copy_(torch.from_numpy(projection.P))
                self.projections[name].U.copy_(torch.from_numpy(projection.U))

    def _snapshot(self) -> dict[str, Projection]:
        return {name: m.to_projection() for name, m in self.projections.items()}

    # -- checkpoints (checkpoint.py)

    def _save(self, epoch: int, optimizer, scheduler, state: RunState) -> None:
        if self.checkpoint is None or self.rank != 0:
            return
        save_checkpoint(self.checkpoint, run_identity(self.projections, self.config), epoch, self.projections,
                        optimizer, scheduler, state)

    def _load(self, optimizer, scheduler, state: RunState) -> int:
        return load_checkpoint(self.checkpoint, run_identity(self.projections, self.config), self.projections,
                               optimizer, scheduler, state)
