"""FitProjectionsPass: find P and U for every planned map (the training backend's step).

Rules:

a. The maps and ranks come from the plan (`ctx.plan`, or the constructor's); the data
  from the constructor or else the pipeline (`ctx.calibration`, `ctx.held_out`). Nothing planned: no projections, no data read.
b. `pca` (Tai et al.'s compression-aware projection without its compensation): one
  projection per planned map, fitted in network order with every earlier projection
  in place, so each map is fitted on what the compressed network will feed it.
  P = the top-k eigenvectors of the uncentred channel second moment E[x x^T] over the
  calibration data (a bounded random subset of positions per batch), U = P^T.
  Uncentred, because the folded model has no bias to carry a mean and zero padding
  must commute with U.
c. `learned` (the default; Price & Tanner): the closed-form starts of `block_init` (the
  Fisher-weighted ridge regression, `lstsq` unweighted, or the PCA projections; damped more
  where maps are stored in one byte: `block_ridge`), each refined in network order to reproduce what the
  original network computes after its block (at most `block_epochs` per map, fewer
  once `block_min_gain` stops paying on the held-out part, each map keeping its best
  held-out epoch (`block_judge`), `fmcompress.backend.blockwise`, its rules a-e; fitted to
  two augmented copies of every sample as well where the plan compresses the maps
  five-fold or more and the device has the memory they take (`block_augment` `auto`,
  `block_augmentation`, `stage_bytes`; a stage that may not fit at all is a warning);
  0 epochs and a `pca` start skip it), then P and U of every map trained end to end
  through the frozen network (`fmcompress.backend.trainer`: distillation from the
  original model's outputs, its rules a-h; `patience` and `probe` end it early). With
  `fake_quant` (`--fake-quant`, for `--int8`) both stages see every stored map P x rounded
  as int8 (quantization-aware training, straight-through gradient).
d. `random`: random orthonormal projections trained the same way (the paper's
  initialisation, for comparison).
e. Only calibration data is trained on; the held-out part scores each epoch, of the block
  stage's maps and of end-to-end training (the best epoch is kept, `target` stops early),
  and stays unseen by the gradients.
f. `learned` never returns worse held-out figures than `pca`: after a block stage, the
  plain PCA projections are fitted too (about one forward pass) and are the trainer's
  fallback candidate (its rule e).
g. The model is not changed; `ctx.projections` (and `result.data`) maps tensor names to
  `Projection`s, `ctx.projected_graph` is the graph those names refer to, and
  `ctx.training` keeps what a trained method did (`TrainingRecord`).

Entry point: `FitProjectionsPass(calibration, held_out, method="learned").run(model, ctx)`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import onnx

from fmcompress.data import Dataset
from fmcompress.errors import InputError
from fmcompress.featuremaps import Projection
from fmcompress.train_config import COPIES_FROM, TrainConfig

from .base import Pass, PassContext, PassResult
from .graph import Model
from .plan import Plan

if TYPE_CHECKING:  # torch is an optional extra
    from fmcompress.backend.trainer import TrainResult
    from fmcompress.reports.analysis import AnalysisReport

METHODS = ("learned", "pca", "random")
DEFAULT_METHOD = "learned"
# the block stage holds about four times a sample's live peak per sample it fits to (two paused
# runs, the map's raw values, the block's targets: 4.2 on PP-OCR's recognizer, 4.0 on its
# classifier, measured as the growth of resident memory with the samples); five leaves a margin
STAGE_LIVE_FACTOR = 5


def torch_executor(model: onnx.ModelProto):
    """The training backend's module for `model` (torch is an optional extra)."""
    try:
        from fmcompress.backend import OnnxModule
    except ImportError as exc:
        raise InputError(f"this step needs torch: pip install 'fmcompress[torch]' ({exc})") from exc
    return OnnxModule(model).eval()


@dataclass
class TrainingRecord:
    """What a trained method did: its configuration, the trainer's result, the block stage."""

    config: Any  # the TrainConfig used
    result: Any = None  # the TrainResult (history, best epoch); None when nothing was trained
    block_stage: dict | None = None  # learned's block reconstruction: epochs, seconds, per-map losses


class FitProjectionsPass(Pass):
    """Fits one projection per planned map on calibration data; the model is unchanged."""

    name = "fit"
    provides = ("projections", "projected_graph", "training")

    def __init__(self, calibration: Dataset | None = None, held_out: Dataset | None = None, *,
                 method: str = DEFAULT_METHOD, batch_size: int | None = None, plan: Plan | None = None,
                 training=None, checkpoint: str | os.PathLike | None = None, resume: bool = False,
                 monitor=None):
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
        self.calibration = calibration  # None: ctx.calibration (and ctx.held_out)
        self.held_out = held_out
        self.method = method
        self.batch_size = batch_size  # None: ctx.batch_size, else 16
        self.plan = plan
        self.config = training  # a TrainConfig, or None for the defaults
        self.checkpoint = checkpoint
        self.resume = resume
        self.monitor = monitor

    @property
    def requires(self) -> tuple[str, ...]:
        needs = () if self.plan is not None else ("plan",)
        return needs + (("calibration",) if self.calibration is None else ())

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        plan = self.plan or ctx.plan
        if not isinstance(plan, Plan):
            raise InputError("the fit pass needs a plan: run PlanPass first or pass plan=")
        self._take_data(ctx)
        ctx.projected_graph = model.copy()
        ctx.projections = self._fit(model.proto(), plan, ctx) if plan.maps else {}
        return PassResult(model, modified=False, data=ctx.projections)

    def _take_data(self, ctx: PassContext) -> None:
        """The constructor's data and batch size, else the pipeline's (PrepareDataPass)."""
        if self.calibration is None:
            self.calibration, self.held_out = ctx.calibration, ctx.held_out
        if self.calibration is None:
            raise InputError("the fit pass needs calibration data: run PrepareDataPass first or pass it")
        if self.method != "pca" and self.held_out is None:
            raise InputError(f"method {self.method!r} needs a held-out part to score its epochs")
        if self.batch_size is None:
            self.batch_size = ctx.batch_size or 16
            if self.config is not None:
                self.config = replace(self.config, batch_size=self.batch_size)

    def _fit(self, model: onnx.ModelProto, plan: Plan, ctx: PassContext) -> dict[str, Projection]:
        executor = torch_executor(model)
        maps = [(m.name, m.channels, m.k) for m in plan.maps]
        fallback = None
        if self.method != "pca":
            ctx.training = TrainingRecord(self._config())
        if self.method == "random":
            from fmcompress.backend.trainer import random_projections

            initial = random_projections(maps, seed=self.config.seed if self.config else 0)
        elif self.method == "learned" and (self._config().block_epochs > 0 or self._config().block_init != "pca"):
            initial = self._blockwise(executor, maps, plan, ctx)
            fallback = self._pca(executor, maps, plan, ctx)  # rule f
        else:
            initial = self._pca(executor, maps, plan, ctx)
        if self.method == "pca":
            return initial
        return self._train(executor, maps, initial, ctx, fallback, model)

    def _pca(self, executor, maps, plan: Plan, ctx: PassContext) -> dict[str, Projection]:
        from fmcompress.backend.projection import fit_pca

        names = list(executor.input_names)

        def progress(i: int, name: str) -> None:
            ctx.log(f"pca {i + 1}/{len(maps)}: {name} {plan.maps[i].channels} -> {plan.maps[i].k} channels")

        return fit_pca(executor, maps, lambda: self.calibration.torch_batches(self.batch_size, names),
                       progress=progress)

    def _blockwise(self, executor, maps, plan: Plan, ctx: PassContext) -> dict[str, Projection]:
        from fmcompress.backend.blockwise import fit_blockwise
        from fmcompress.backend.devices import resolve_device, resolve_precision

        config = self._config()
        device = resolve_device(config.device)
        names = list(executor.input_names)
        # it holds every batch's paused runs: --max-samples bounds that memory as it bounds an epoch
        # (copies, below, triple it: `auto` has them only where they fit)
        part = self.calibration if config.max_samples is None else self.calibration.head(config.max_samples)
        batches = _on_device(part, config.batch_size, names, device)
        augment = self._augmentation(config, plan, len(part), device, ctx)
        if augment == "look":
            batches = _with_other_looks(batches, config.seed)
        elif augment == "copies":
            batches = _with_copies(batches, config.seed)

        ranks = {m.name: (m.channels, m.k) for m in plan.maps}
        stage: dict = {"epochs": config.block_epochs, "min_gain": config.block_min_gain,
                       "patience": config.block_patience, "judge": config.block_judge,
                       "block_loss": config.block_loss, "init": config.block_init, "augment": augment,
                       "precision": resolve_precision(config.block_precision, device), "seconds": 0.0, "maps": []}

        def progress(i: int, name: str, fit) -> None:
            refined = bool(fit.losses)  # none: nothing later reads the map, it keeps its start
            record = {"name": name, "first_loss": fit.first if refined else None,
                      "loss": fit.last if refined else None, "epochs": len(fit.losses),
                      "stopped_early": fit.stopped_early, "losses": list(fit.losses),
                      "held_out_losses": list(fit.held_out_losses), "best_epoch": fit.best_epoch,
                      "seconds": round(fit.seconds, 3)}
            stage["maps"].append(record)
            outcome = (f"loss {fit.first:.4f} -> {fit.last:.4f} in {len(fit.losses)} epoch(s)"
                       f"{held_out_outcome(fit)}{' (stopped: no gain)' if fit.stopped_early else ''}" if refined
                       else "kept its start (no block epochs, or nothing later reads it)") + f", {fit.seconds:.1f} s"
            ctx.log(f"block {i + 1}/{len(maps)}: {name} {' -> '.join(map(str, ranks[name]))} channels, {outcome}")
            if self.monitor is not None:
                self.monitor("block", {"map": i + 1, "maps": len(maps), **record})

        judged = config.block_judge == "held-out" and self.held_out is not None and len(self.held_out) > 0
        held_out = _on_device(self.held_out, config.batch_size, names, device) if judged else []
        started = time.perf_counter()
        fitted = fit_blockwise(executor.to(device), maps, batches, epochs=config.block_epochs, lr=config.block_lr,
                               temperature=config.temperature, seed=config.seed, min_gain=config.block_min_gain,
                               patience=config.block_patience, init=stage["init"],
                               quantized=config.fake_quant, ridge=block_ridge(config.block_ridge, ctx.act_bytes),
                               precision=stage["precision"], fisher_draws=config.fisher_draws,
                               held_out=held_out, weighted=config.block_loss == "fisher", progress=progress)
        stage["seconds"] = time.perf_counter() - started
        ctx.training.block_stage = stage
        return fitted

    def _augmentation(self, config: TrainConfig, plan: Plan, samples: int, device, ctx: PassContext) -> str:
        """`block_augmentation` for a stage of `samples` samples on `device`; the log says what `auto`
        chose where the plan asks for copies, and a stage that may not fit the free memory is a warning."""
        from fmcompress.backend.augment import COPY_KINDS
        from fmcompress.backend.devices import available_memory

        per_sample = stage_bytes(ctx.memory, 1)
        copies_bytes = None if per_sample is None else per_sample * (1 + len(COPY_KINDS)) * samples
        available = available_memory(device)
        augment = block_augmentation(config.block_augment, plan, copies_bytes, available)
        if config.block_augment == "auto" and plan_compression(plan) >= COPIES_FROM:
            ctx.log(_copies_choice(augment, plan, copies_bytes, available))
        held = copies_bytes if augment == "copies" or per_sample is None else per_sample * samples
        if held is not None and available is not None and held > available:
            ctx.warnings.append(f"the block stage may hold about {held / 2**30:.1f} GiB where {available / 2**30:.1f} "
                                f"GiB is free: --max-samples N fits it to fewer samples")
            ctx.log(f"block stage: {ctx.warnings[-1]}")  # now: a stage killed for memory says nothing after
        return augment

    def _config(self):
        return self.config or TrainConfig(batch_size=self.batch_size)

    def _train(self, executor, maps, initial: dict[str, Projection], ctx: PassContext,
               fallback: dict[str, Projection] | None, model: onnx.ModelProto) -> dict[str, Projection]:
        from fmcompress.backend.teacher import ort_teacher
        from fmcompress.backend.trainer import ProjectionTrainer

        config = self._config()
        teacher = ort_teacher(model, list(executor.input_names), config)
        trainer = ProjectionTrainer(executor, [name for name, _, _ in maps], initial, config,
                                    checkpoint=self.checkpoint, resume=self.resume, monitor=self.monitor,
                                    fallback=fallback, teacher=teacher)
        assert self.held_out is not None
        best = trainer.fit(self.calibration.inputs, self.calibration.labels,
                           self.held_out.inputs, self.held_out.labels)
        ctx.training.result = best
        stops = {"target": " (stopped early at the target)",
                 "patience": f" (stopped: {config.patience} epoch(s) without a better score)",
                 "probe": f" (stopped after {probe_length(best)}: training did not pay)"}
        ctx.log(f"{self.method}: kept held-out {best.metric} {best.best_score:.4f} at epoch {best.best_epoch}"
                f"{stops.get(best.stop_reason, '')}")
        return best.projections


def probe_length(result: TrainResult) -> str:
    """How much end-to-end training the probe ran before it stopped it (trainer rule h)."""
    if result.stopped_at_step is not None:
        return f"the first {result.stopped_at_step} step(s) of the first epoch"
    return f"{len(result.history)} probe epoch(s)"


def _on_device(data: Dataset, batch_size: int, names: list[str], device) -> list[tuple]:
    """The dataset's input batches, each tensor moved to `device`."""
    return [tuple(t.to(device) for t in batch) for batch in data.torch_batches(batch_size, names)]


def held_out_outcome(fit) -> str:
    """The log's account of a map's held-out block losses (blockwise rule d), '' where none were taken."""
    if not fit.held_out_losses:
        return ""
    kept = fit.held_out_losses[fit.best_epoch]
    which = "its start" if fit.best_epoch == 0 else f"epoch {fit.best_epoch}"
    return f", held-out {fit.held_out_losses[0]:.4f} -> {kept:.4f} (kept {which})"


def block_ridge(named: float | None, act_bytes: int | None) -> float:
    """The fisher and lstsq starts' damping (blockwise.py rule a): `named`, else the int8 one where maps
    are stored in one byte, else the plain one."""
    from fmcompress.backend.blockwise import PLAIN_RIDGE, ROUNDED_RIDGE

    if named is not None:
        return named
    return ROUNDED_RIDGE if act_bytes == 1 else PLAIN_RIDGE


def plan_compression(plan: Plan) -> float:
    """How many times fewer bytes the planned maps take projected: their bytes before over after."""
    after = sum(m.bytes_after for m in plan.maps)
    return sum(m.bytes_before for m in plan.maps) / after if after else 1.0


def block_augmentation(named: str, plan: Plan, copies_bytes: int | None = None,
                       available: int | None = None) -> str:
    """What the block stage fits to besides its samples (`--block-augment`): `named`, or for `auto`
    copies where the plan compresses the maps COPIES_FROM-fold or more and the stage with them
    (`copies_bytes`, `stage_bytes`) fits the `available` memory (either unknown: assumed to),
    else none. Heavily compressed, a stage is short of lines (PP-OCR's recognizer at 8x,
    5.9-fold: four times the lines gained 3.4 points, two copies of each 0.6-1.6 over four
    draws); at 4x (3.2-fold) its start carries it and copies would triple a compile for half a
    point (docs/results.md section 1). They triple its memory too (the recognizer at 8x: 11 GB
    resident against 5): a compile that runs short of memory is killed, where one without copies
    loses a point."""
    if named != "auto":
        return named
    if plan_compression(plan) < COPIES_FROM:
        return "none"
    fits = copies_bytes is None or available is None or copies_bytes <= available
    return "copies" if fits else "none"


def stage_bytes(memory: AnalysisReport | None, samples: int) -> int | None:
    """About what the block stage holds fitting to `samples` samples: STAGE_LIVE_FACTOR times a
    sample's live peak, in float32 (the stage's arithmetic), each; None without a memory analysis."""
    if memory is None or not memory.input_shapes:
        return None
    batch = max(1, next(iter(memory.input_shapes.values()))[0])
    live = memory.peaks["live"] * (4 / memory.act_bytes if memory.act_bytes else 1) / batch
    return int(STAGE_LIVE_FACTOR * live * samples)


def _copies_choice(augment: str, plan: Plan, copies_bytes: int | None, available: int | None) -> str:
    """The log's account of what `auto` chose where the plan asks for copies."""
    fold = f"the maps are compressed {plan_compression(plan):.1f}-fold"
    if augment == "copies":
        return (f"block stage: two augmented copies of every sample (--block-augment auto: {fold}; "
                f"--block-augment none for a third of the time and memory)")
    return (f"block stage: no copies although {fold} (--block-augment auto): they would hold about "
            f"{copies_bytes / 2**30:.1f} GiB, {available / 2**30:.1f} GiB is free; --block-augment copies "
            f"to have them anyway, --max-samples to hold fewer samples")


def _with_copies(batches: list[tuple], seed: int) -> list[tuple]:
    """The block stage's batches, then an augmented copy of all of them per kind of
    augment.COPY_KINDS: more lines to fit each block to, made from the given ones."""
    from fmcompress.backend.augment import COPY_KINDS, augment_batch

    copies = [_redrawn(batches, (seed, 11 + i), lambda x, seeds, kind=kind: augment_batch(x, kind, seeds))
              for i, kind in enumerate(COPY_KINDS)]
    return list(batches) + [batch for copy in copies for batch in copy]


def _with_other_looks(batches: list[tuple], seed: int) -> list[tuple]:
    """The block stage's batches with half their samples given another look (augment.new_look)."""
    from fmcompress.backend.augment import look_variants

    return _redrawn(batches, (seed, 7), look_variants)


def _redrawn(batches: list[tuple], salt: tuple[int, int], draw: Callable) -> list[tuple]:
    """Each batch's tensors through `draw(tensor, seeds)`, sample j of the whole part drawn from
    mix_seeds(*salt, j): a sample is redrawn alike whatever batch it is in."""
    from fmcompress.backend.schedule import mix_seeds

    out, first = [], 0
    for batch in batches:
        seeds = [mix_seeds(*salt, first + i) for i in range(len(batch[0]))]
        out.append(tuple(draw(t.cpu(), seeds).to(t.device) for t in batch))
        first += len(batch[0])
    return out
