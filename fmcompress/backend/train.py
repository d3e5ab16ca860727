"""Learned projections: P and U trained end to end through the frozen network.

Price & Tanner's improvement over PCA, adapted to a few hundred unlabeled samples
and a CPU or one GPU. Rules:

a. Student and teacher are one torch executor. The student reads U P X at every
   planned map (`LearnedProjection`: P and U are the only parameters with
   gradients; every original weight is a frozen buffer); the teacher is the same
   module with every projection bypassed, run without gradients on the same
   (augmented) batch.
b. Initialisation: the PCA projections (`learned`) or random orthonormal ones
   (`random`, the paper's).
c. Loss per output, from the teacher's output on the first batch (`output_kinds`):
   * `[N, K]` class scores: KL divergence at temperature T (soft targets, times
     T^2); probabilities (rows >= 0 summing to 1) are turned back into log-probs,
     floored at 1e-8;
   * `[N, T, K]` rows summing to 1 (CTC and other sequence heads): the same KL per
     time step;
   * anything else (detection maps, box regressions): MSE divided by the teacher's
     mean square, so outputs of any scale weigh alike.
   `ce` replaces KD with cross-entropy on the labels (class outputs only), `kd+ce`
   adds both. `feature_weight` adds feature-level distillation at the projected maps:
   the mean over maps of ||U P x - t||^2 / ||t||^2, where t is the map the teacher
   computed there from the same batch (`feature_reference` `teacher`: the student is
   told where errors from earlier maps took it, at every map), or x itself (`self`:
   each projection's own reconstruction error).
d. Schedules: `joint` trains all maps together for `epochs`; `greedy` adds one map a
   stage in network order and trains all maps added so far for `stage_epochs`, then
   all of them jointly for `epochs` (the paper's schedule, shortened).
e. Adam (or SGD with momentum 0.9), a linear warmup over the first epoch, then a
   cosine decay of the learning rate over all steps. `lr` is relative to each map's scale: a map with C channels steps at
   lr / sqrt(C) (the RMS of an orthonormal P's entries), since an absolute step that
   suits 16 channels wrecks a map of 480 in a few Adam steps. Each epoch draws its order (and its `max_samples` subset) from the seed and
   the epoch number, and the augmentation from the seed, the epoch and the step, so a
   resumed run repeats the uninterrupted one exactly.
f. After every epoch the held-out part is scored with the student: accuracy with
   labels, else top-1 agreement with the teacher (per step for a sequence head: finer
   than the share of equal decodings on a few hundred samples), else output cosine
   similarity; ties
   (a few hundred samples saturate a score) go to the lower held-out distillation
   loss. The best epoch's projections are kept; training stops early once the score
   reaches `target`. The initialisation is scored first and is a candidate too, so
   training never returns worse held-out figures than PCA. Held-out data is never
   trained on.
f'. An epoch whose held-out distillation loss is not finite or more than ten times
   the best one diverged: the best projections are restored, the optimiser's moments
   dropped and the learning rate (and the rest of its schedule) multiplied by 0.3. Ten,
   not less: leaving the block stage's fitted projections for a better optimum, the
   first epochs raise the held-out loss more than threefold on the way, and cutting the
   rate there stalls the run (PP-OCR's classifier at 4x: 95.0% at a threshold of 2,
   97.8% at 10). A diverged epoch is never the best one.
g. A checkpoint after every epoch (`checkpoint`): projections, optimiser and
   scheduler state, history and the best state, written atomically. `resume`
   continues from it; a checkpoint of other maps, ranks or settings is refused.
h. Distributed: under torchrun (WORLD_SIZE > 1) the process group is initialised
   (gloo on CPU, nccl on CUDA), the student is wrapped in DistributedDataParallel,
   and each rank takes its share (`rank::world`) of every global batch, so gradients
   average to the single-process ones. Every rank scores the held-out part (same
   result); only rank 0 writes checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - torch's convention
from torch import nn

from fmcompress.errors import InputError
from fmcompress.featuremaps import Projection
from fmcompress.metrics import is_sequence_head, rows_are_distributions
from fmcompress.training import TrainConfig, check_device

from .projection import ChannelProjection


def resolve_device(name: str) -> torch.device:
    check_device(name)
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


PROBABILITY_FLOOR = 1e-8  # probabilities below it are alike to the KD loss (see _log_probs)
DIVERGED = 10.0  # a held-out distillation loss this many times the best one means the epoch diverged (f')
BACKTRACK_FACTOR = 0.3


class LearnedProjection(ChannelProjection):
    """U P x with trainable P, U; `bypass` makes it the identity (the teacher's pass).

    With a `feature_reference` (only when the loss uses it: it is a pass over the whole
    map) the relative error of the last student pass is kept in `reconstruction`: against
    the map the teacher's last pass saw here (`teacher`), or against the student's own
    input (`self`, the reconstruction error of this projection alone).
    """

    def __init__(self, P: np.ndarray, U: np.ndarray, feature_reference: str | None = None):  # noqa: N803
        super().__init__(P, U)
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


# ------------------------------------------------------------------ output kinds and losses

def output_kinds(outputs: Sequence[torch.Tensor]) -> list[str]:
    """Rule c: `logits`, `probs`, `seq_probs` or `regression` per output."""
    kinds = []
    for out in outputs:
        # only class-shaped outputs are copied to numpy for the test (not, say, a detection map)
        if out.dim() == 2 and out.shape[1] >= 2:
            kinds.append("probs" if rows_are_distributions(out.detach().float().cpu().numpy()) else "logits")
        elif out.dim() == 3 and is_sequence_head(out.detach().float().cpu().numpy()):
            kinds.append("seq_probs")
        else:
            kinds.append("regression")
    return kinds


def _log_probs(out: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    # the 1e-8 floor is measured, not a guard: PP-OCR's recognizer has 93% of its 6,625 probabilities
    # below it, and matching those tails exactly (a floor at float32's smallest number) lost 4 points
    scores = out.float().clamp_min(PROBABILITY_FLOOR).log() if kind in ("probs", "seq_probs") else out.float()
    return F.log_softmax(scores / temperature, dim=-1)


def distillation_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], kinds: Sequence[str],
                      temperature: float) -> torch.Tensor:
    """Rule c's KD/MSE terms, averaged over outputs."""
    terms = []
    for s, t, kind in zip(student, teacher, kinds, strict=True):
        if kind == "regression":
            terms.append(F.mse_loss(s.float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-12))
            continue
        log_s, log_t = _log_probs(s, kind, temperature), _log_probs(t, kind, temperature)
        per_row = F.kl_div(log_s.reshape(-1, log_s.shape[-1]), log_t.reshape(-1, log_t.shape[-1]),
                           log_target=True, reduction="batchmean")
        terms.append(per_row * temperature**2)
    return torch.stack(terms).mean()


def label_loss(student: Sequence[torch.Tensor], kinds: Sequence[str], labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the first class output against the labels."""
    for out, kind in zip(student, kinds, strict=True):
        if kind in ("logits", "probs"):
            return F.nll_loss(_log_probs(out, kind, 1.0), labels)
    raise InputError("--loss ce needs a model whose output is class scores [N, classes]")


# ---------------------------------------------------------------------------- the trainer

@dataclass
class EpochRecord:
    epoch: int
    stage: str
    active_maps: int
    loss: float
    score: float
    lr: float
    held_out_loss: float = float("nan")
    seconds: float = 0.0  # wall time of the epoch: training steps and the held-out score


@dataclass
class TrainResult:
    projections: dict[str, Projection]
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = float("nan")
    initial_score: float = float("nan")  # the initialisation's held-out score (PCA's, for learned)
    metric: str = ""
    stopped_early: bool = False
    device: str = "cpu"
    world_size: int = 1


Monitor = Callable[[str, dict[str, Any]], None]  # (event, fields): "epoch_start", "step", "epoch_end" (and "block", from the fit pass)


def diverged(held_out_loss: float, best_loss: float) -> bool:
    """Rule f': not finite, or more than DIVERGED times the best held-out loss so far."""
    return not math.isfinite(held_out_loss) or held_out_loss > DIVERGED * best_loss


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Rule e's schedule as a factor of the learning rate: a linear warmup over the first
    epoch (Adam's first steps move every entry by the full lr, whatever its gradient), then
    a cosine decay to 0."""
    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / max(1, warmup_steps))
        return ramp * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))

    return factor


def plan_epochs(maps: int, config: TrainConfig) -> list[tuple[str, int]]:
    """Rule d: (stage name, number of active maps) for every epoch of the run."""
    epochs: list[tuple[str, int]] = []
    if config.schedule == "greedy":
        for i in range(maps):
            epochs += [(f"greedy {i + 1}/{maps}", i + 1)] * config.stage_epochs
    return epochs + [("joint", maps)] * config.epochs


class ProjectionTrainer:
    """Trains one projection per map of `names` on `calibration` (inputs and labels as numpy)."""

    def __init__(self, executor: nn.Module, names: Sequence[str], initial: dict[str, Projection],
                 config: TrainConfig, *, checkpoint: str | os.PathLike | None = None, resume: bool = False,
                 monitor: Monitor | None = None):
        config.check()
        self.config = config
        self.names = list(names)
        self.device = resolve_device(config.device)
        self.rank, self.world = _distributed_setup(self.device)
        self.executor = executor.to(self.device)
        for parameter in self.executor.parameters():
            parameter.requires_grad_(False)
        reference = config.feature_reference if config.feature_weight > 0 else None
        self.projections = {name: LearnedProjection(initial[name].P, initial[name].U, reference).to(self.device)
                            for name in self.names}
        for name, module in self.projections.items():
            self.executor.set_transform(name, module)
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.resume = resume
        self.monitor = monitor or (lambda event, fields: None)

    # -- public

    def fit(self, calibration: dict[str, np.ndarray], calibration_labels: np.ndarray | None,
            held_out: dict[str, np.ndarray], held_out_labels: np.ndarray | None) -> TrainResult:
        cfg = self.config
        inputs = list(self.executor.input_names)
        epochs = plan_epochs(len(self.names), cfg)
        samples = len(next(iter(calibration.values())))
        per_epoch = min(samples, cfg.max_samples or samples)
        steps_per_epoch = math.ceil(per_epoch / cfg.batch_size)
        # one group a map, its step relative to the map's scale (rule e): an orthonormal P's
        # entries have an RMS of 1/sqrt(C), so the same lr suits 16 and 960 channels alike
        groups = [{"params": list(module.parameters()), "lr": cfg.lr / math.sqrt(module.P.shape[1])}
                  for module in self.projections.values()]
        optimizer = (torch.optim.Adam(groups, lr=cfg.lr) if cfg.optimizer == "adam"
                     else torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(len(epochs) * steps_per_epoch,
                                                                               steps_per_epoch))
        model = self._wrapped()
        teacher_held = self._teacher_outputs(held_out, inputs)
        kinds = output_kinds(teacher_held)
        if cfg.loss != "kd" and calibration_labels is None:
            raise InputError(f"--loss {cfg.loss} needs labelled data (an .npz with `labels` or class subfolders)")
        metric = "accuracy" if held_out_labels is not None and kinds[0] in ("logits", "probs") else \
            "agreement" if kinds[0] in ("logits", "probs", "seq_probs") else "cosine"
        state = _RunState(best=self._snapshot(), best_score=-math.inf)
        self._activate(len(self.names))
        state.best_score, state.best_loss = self._score(held_out, held_out_labels, teacher_held, inputs, kinds, metric)
        state.best_epoch = 0  # the initialisation is a candidate too: training never makes it worse
        initial_score = state.best_score
        start_epoch = self._load(optimizer, scheduler, state) if self.resume else 0
        for epoch in range(start_epoch, len(epochs)):
            stage, active = epochs[epoch]
            self._activate(active)
            self.monitor("epoch_start", {"epoch": epoch + 1, "epochs": len(epochs), "stage": stage,
                                         "steps": steps_per_epoch})
            started = time.perf_counter()
            loss = self._train_epoch(model, optimizer, scheduler, calibration, calibration_labels, inputs, kinds,
                                     epoch, per_epoch)
            self._activate(len(self.names))  # the held-out score is always that of the full network
            score, held_loss = self._score(held_out, held_out_labels, teacher_held, inputs, kinds, metric)
            record = EpochRecord(epoch + 1, stage, active, loss, score, optimizer.param_groups[0]["lr"], held_loss,
                                 time.perf_counter() - started)
            state.history.append(record)
            every_map = active == len(self.names)  # greedy stages with fewer maps are never kept nor backed off
            if every_map and diverged(held_loss, state.best_loss):
                self._backtrack(optimizer, scheduler, state.best)
            elif every_map and (score, -held_loss) > (state.best_score, -state.best_loss):
                state.best, state.best_score, state.best_epoch = self._snapshot(), score, epoch + 1
                state.best_loss = held_loss
            self.monitor("epoch_end", asdict(record) | {"best": state.best_score, "metric": metric})
            self._save(epoch + 1, optimizer, scheduler, state)
            if cfg.target is not None and every_map and score >= cfg.target:
                state.stopped_early = epoch + 1 < len(epochs)
                break
        if state.best_epoch < 0:  # resumed past the end, or nothing scored: keep what we have
            state.best = self._snapshot()
        return TrainResult(projections=state.best, history=state.history, best_epoch=state.best_epoch,
                           best_score=state.best_score, initial_score=initial_score, metric=metric,
                           stopped_early=state.stopped_early,
                           device=str(self.device), world_size=self.world)

    # -- steps

    def _train_epoch(self, model: nn.Module, optimizer, scheduler, data: dict[str, np.ndarray],
                     labels: np.ndarray | None, inputs: list[str], kinds: list[str], epoch: int,
                     per_epoch: int) -> float:
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
            tensors = [_augment(torch.from_numpy(np.ascontiguousarray(data[name][batch])), cfg.augment,
                                [mix_seeds(cfg.seed, epoch, int(i), j) for i in batch]).to(self.device)
                       for j, name in enumerate(inputs)]
            with torch.no_grad():
                teacher = self._run(self.executor, tensors, bypass=True)
            student = self._run(model, tensors, bypass=False)
            loss = self._loss(student, teacher, kinds, labels, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            self.monitor("step", {"step": step + 1, "loss": losses[-1]})
        return float(np.mean(losses)) if losses else float("nan")

    def _loss(self, student, teacher, kinds, labels, batch) -> torch.Tensor:
        cfg = self.config
        terms = []
        if cfg.loss in ("kd", "kd+ce"):
            terms.append(distillation_loss(student, teacher, kinds, cfg.temperature))
        if cfg.loss in ("ce", "kd+ce"):
            terms.append(label_loss(student, kinds, torch.from_numpy(labels[batch]).to(self.device)))
        if cfg.feature_weight:
            active = [m.reconstruction for m in self.projections.values()
                      if not m.bypass and m.reconstruction is not None]
            if active:
                terms.append(cfg.feature_weight * torch.stack(active).mean())
        return torch.stack(terms).sum()

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
        with torch.no_grad():
            parts = [self._run(self.executor, batch, bypass=True) for batch in self._batches(data, inputs)]
        return [torch.cat(outs).cpu() for outs in zip(*parts, strict=True)]

    def _score(self, data, labels, teacher, inputs, kinds, metric: str) -> tuple[float, float]:
        """(rule f's score, the held-out distillation loss that breaks ties between equal scores)."""
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
        cosines = [F.cosine_similarity(s.float().flatten(1), t.float().flatten(1), dim=1).mean()
                   for s, t in zip(student, teacher, strict=True)]
        return float(torch.stack(cosines).mean()), loss

    def _batches(self, data: dict[str, np.ndarray], inputs: list[str]):
        total = len(next(iter(data.values())))
        for start in range(0, total, self.config.batch_size):
            yield [torch.from_numpy(np.ascontiguousarray(data[name][start:start + self.config.batch_size]))
                   .to(self.device) for name in inputs]

    def _activate(self, count: int) -> None:
        for i, name in enumerate(self.names):
            self.projections[name].bypass = i >= count

    def _wrapped(self) -> nn.Module:
        if self.world == 1:
            return self.executor
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index or 0] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.executor, device_ids=device_ids, find_unused_parameters=True)

    def _backtrack(self, optimizer, scheduler, best: dict[str, Projection]) -> None:
        """Rule f': a diverging epoch returns to the best projections at a lower learning rate."""
        with torch.no_grad():
            for name, projection in best.items():
                self.projections[name].P.copy_(torch.from_numpy(projection.P))
                self.projections[name].U.copy_(torch.from_numpy(projection.U))
        optimizer.state.clear()
        scheduler.base_lrs = [lr * BACKTRACK_FACTOR for lr in scheduler.base_lrs]
        for group in optimizer.param_groups:
            group["lr"] *= BACKTRACK_FACTOR

    def _snapshot(self) -> dict[str, Projection]:
        return {name: m.to_projection() for name, m in self.projections.items()}

    # -- checkpoints (rule g)

    def _identity(self) -> dict[str, Any]:
        return {"maps": [[n, m.P.shape[0], m.P.shape[1]] for n, m in self.projections.items()],
                "config": self.config.fingerprint()}

    def _save(self, epoch: int, optimizer, scheduler, state: _RunState) -> None:
        if self.checkpoint is None or self.rank != 0:
            return
        from fmcompress.modelio import write_bytes_atomic

        payload = {"identity": self._identity(), "epoch": epoch,
                   "projections": {n: (m.P.detach().cpu(), m.U.detach().cpu()) for n, m in self.projections.items()},
                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "best": {n: (p.P, p.U) for n, p in state.best.items()}, "best_score": state.best_score,
                   "best_loss": state.best_loss,
                   "best_epoch": state.best_epoch, "history": [asdict(r) for r in state.history]}
        buffer = _torch_bytes(payload)
        write_bytes_atomic(buffer, self.checkpoint)

    def _load(self, optimizer, scheduler, state: _RunState) -> int:
        if self.checkpoint is None or not self.checkpoint.exists():
            raise InputError(f"--resume: no checkpoint at {self.checkpoint}")
        try:
            payload = torch.load(self.checkpoint, map_location="cpu", weights_only=False)
        except Exception as exc:  # a truncated or foreign file
            raise InputError(f"--resume: {self.checkpoint} is not a readable checkpoint ({type(exc).__name__})") from None
        if payload.get("identity") != self._identity():
            raise InputError(f"--resume: {self.checkpoint} was made for other maps, ranks or training settings")
        with torch.no_grad():
            for name, (P, U) in payload["projections"].items():  # noqa: N806
                self.projections[name].P.copy_(P)
                self.projections[name].U.copy_(U)
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        state.best = {n: Projection(P, U) for n, (P, U) in payload["best"].items()}
        state.best_score, state.best_epoch = payload["best_score"], payload["best_epoch"]
        state.best_loss = payload.get("best_loss", math.inf)
        state.history = [EpochRecord(**r) for r in payload["history"]]
        return int(payload["epoch"])


@dataclass
class _RunState:
    best: dict[str, Projection]
    best_score: float
    best_epoch: int = -1
    best_loss: float = math.inf
    history: list[EpochRecord] = field(default_factory=list)
    stopped_early: bool = False


def random_projections(maps: Sequence[tuple[str, int, int]], seed: int) -> dict[str, Projection]:
    """Rule b's `random`: a random orthonormal P (k x C) per map, U = P^T."""
    rng = np.random.default_rng(seed)
    fitted = {}
    for name, channels, k in maps:
        q, _ = np.linalg.qr(rng.standard_normal((channels, k)))
        fitted[name] = Projection(P=q.T.astype(np.float32), U=q.astype(np.float32))
    return fitted


def _augment(x: torch.Tensor, kind: str, seeds: Sequence[int]) -> torch.Tensor:
    """`light`: per sample, a shift of up to 2 positions along each spatial axis (zero fill) and
    noise at 2% of the sample's std. `splice`: first, each sample's columns in a span of 20-50%
    of its width come, with probability 1/2, from another sample of the batch (for text lines
    that is another real-looking line: new inputs for distillation, which needs no labels),
    then `light`. Each sample's draw comes from its own seed (rule e), so a sample is augmented
    alike whichever batch it lands in (`splice`'s partner is drawn among the batch's samples,
    which a distributed run splits between ranks). `strong`: `splice`, then each image
    stretched along its width (`_stretch`) and its contrast and brightness changed
    (`_photometric`), then `light`."""
    if kind == "none" or not x.is_floating_point() or x.dim() < 3:
        return x
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    if kind in ("splice", "strong"):
        x = _splice(x, generators)
    strong = kind == "strong"
    return torch.stack([_augment_one(_photometric(_stretch(sample, generator), generator) if strong else sample,
                                     generator) for sample, generator in zip(x, generators, strict=True)])


def _stretch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One image [C, H, W] resampled along W by a factor in [0.8, 1.25] (log-uniform), then
    cut or zero-padded on the right back to W: glyphs of other widths (zero is what a
    recognizer's preprocessing pads a short line with). Other ranks are left as they are."""
    if x.dim() != 3:
        return x
    width = x.shape[-1]
    factor = math.exp(math.log(0.8) + (math.log(1.25) - math.log(0.8)) * float(torch.rand(1, generator=generator)))
    resized = F.interpolate(x[None], size=(x.shape[1], max(1, round(width * factor))), mode="bilinear",
                            align_corners=False)[0]
    if resized.shape[-1] >= width:
        return resized[..., :width]
    return F.pad(resized, (0, width - resized.shape[-1]))


def _photometric(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Contrast times [0.7, 1.3] about the sample's mean, brightness +-10% of its std."""
    contrast = 0.7 + 0.6 * float(torch.rand(1, generator=generator))
    brightness = 0.2 * float(torch.rand(1, generator=generator)) - 0.1
    mean, std = x.mean(), x.std().clamp_min(1e-6)
    return (x - mean) * contrast + mean + brightness * std


def _splice(x: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Per sample, with probability 1/2, a span of 20-50% of the last axis copied from a
    partner in the batch (itself when the batch has one sample)."""
    out = x.clone()
    width = x.shape[-1]
    for i, generator in enumerate(generators):
        draw = torch.rand(3, generator=generator)
        partner = int(torch.randint(0, len(x), (1,), generator=generator))
        if draw[0] >= 0.5 or partner == i:
            continue
        span = max(1, int(width * (0.2 + 0.3 * float(draw[1]))))
        start = int((width - span) * float(draw[2]))
        out[i, ..., start:start + span] = x[partner, ..., start:start + span]
    return out


def _augment_one(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise_scale = 0.02 * float(x.std().clamp_min(1e-6))
    shifted = x
    for axis in range(1, x.dim()):  # x is one sample: [C, spatial...]
        shift = int(torch.randint(-2, 3, (1,), generator=generator))
        if shift:
            shifted = torch.roll(shifted, shift, dims=axis)
            index = torch.arange(x.shape[axis])
            mask = (index < shift) if shift > 0 else (index >= x.shape[axis] + shift)
            view = [1] * x.dim()
            view[axis] = -1
            shifted = shifted.masked_fill(mask.view(view), 0.0)
    return shifted + torch.randn(x.shape, generator=generator, dtype=x.dtype) * noise_scale


def mix_seeds(*values: int) -> int:
    """One 63-bit seed from several integers (the same on every platform and run)."""
    digest = hashlib.blake2b(json.dumps(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _torch_bytes(payload: dict[str, Any]) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _distributed_setup(device: torch.device) -> tuple[int, int]:
    """Rule h: (rank, world size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()
