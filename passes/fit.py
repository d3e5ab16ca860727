"""FitProjectionsPass: find P and U for every planned map (the training backend's step).

Rules:

* The maps and ranks come from the plan (`ctx.results["plan"]`, a `Plan`, or the
  constructor). Nothing planned: no projections, no data read.
* `pca` (Tai et al.'s compression-aware projection without its compensation): one
  projection per planned map, fitted in network order with every earlier projection
  in place, so each map is fitted on what the compressed network will feed it.
  P = the top-k eigenvectors of the uncentred channel second moment E[x x^T] over the
  calibration data (a bounded random subset of positions per batch), U = P^T.
  Uncentred, because the folded model has no bias to carry a mean and zero padding
  must commute with U.
* `learned` (the default; Price & Tanner): the PCA projections, each refined in
  network order to reproduce what the original network computes after its block
  (`block_epochs` per map, `fmcompress.backend.blockwise`, its rules a-e; 0 skips it),
  then P and U of every map trained end to end through the frozen network
  (`fmcompress.backend.train`: distillation from the original model's outputs, its
  rules a-h).
* `random`: random orthonormal projections trained the same way (the paper's
  initialisation, for comparison).
* Only calibration data is trained on; the held-out part scores each epoch (the best
  epoch is kept, `target` stops early) and stays unseen by the gradients.
* The model is not changed; `result.data` maps tensor names to `Projection`s, and
  `self.training` keeps the `TrainResult` (history, best epoch) of a trained method.

Entry point: `FitProjectionsPass(calibration, held_out, method="learned").run(model, ctx)`.
"""

from __future__ import annotations

import math
import os
import time

import onnx

from fmcompress.data import Dataset
from fmcompress.errors import InputError
from fmcompress.featuremaps import Projection

from .base import Pass, PassContext, PassResult
from .plan import Plan

METHODS = ("learned", "pca", "random")
DEFAULT_METHOD = "learned"


def torch_executor(model: onnx.ModelProto):
    """The training backend's module for `model` (torch is an optional extra)."""
    try:
        from fmcompress.backend import OnnxModule
    except ImportError as exc:
        raise InputError(f"this step needs torch: pip install 'fmcompress[torch]' ({exc})") from None
    return OnnxModule(model).eval()


class FitProjectionsPass(Pass):
    """Fits one projection per planned map on calibration data; the model is unchanged."""

    name = "fit"

    def __init__(self, calibration: Dataset, held_out: Dataset | None = None, *, method: str = DEFAULT_METHOD,
                 batch_size: int = 16, plan: Plan | None = None, training=None,
                 checkpoint: str | os.PathLike | None = None, resume: bool = False, monitor=None):
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
        if method != "pca" and held_out is None:
            raise InputError(f"method {method!r} needs a held-out part to score its epochs")
        self.calibration = calibration
        self.held_out = held_out
        self.method = method
        self.batch_size = batch_size
        self.plan = plan
        self.config = training  # a TrainConfig, or None for the defaults
        self.checkpoint = checkpoint
        self.resume = resume
        self.monitor = monitor
        self.training = None  # the TrainResult after a trained run
        self.block_stage: dict | None = None  # learned's block reconstruction: epochs, seconds, per-map losses

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        plan = self.plan or ctx.results.get("plan")
        if not isinstance(plan, Plan):
            raise InputError("the fit pass needs a plan: run PlanPass first or pass plan=")
        if not plan.maps:
            return PassResult(model, modified=False, data={})
        executor = torch_executor(model)
        maps = [(m.name, m.channels, m.k) for m in plan.maps]
        if self.method == "random":
            from fmcompress.backend.train import random_projections

            initial = random_projections(maps, seed=self.config.seed if self.config else 0)
        elif self.method == "learned" and self._config().block_epochs > 0:
            initial = self._blockwise(executor, maps, plan, ctx)
        else:
            initial = self._pca(executor, maps, plan, ctx)
        if self.method == "pca":
            return PassResult(model, modified=False, data=initial)
        return PassResult(model, modified=False, data=self._train(executor, maps, initial, ctx))

    def _pca(self, executor, maps, plan: Plan, ctx: PassContext) -> dict[str, Projection]:
        from fmcompress.backend.projection import fit_pca

        names = list(executor.input_names)

        def progress(i: int, name: str) -> None:
            ctx.log(f"pca {i + 1}/{len(maps)}: {name} {plan.maps[i].channels} -> {plan.maps[i].k} channels")

        return fit_pca(executor, maps, lambda: self.calibration.torch_batches(self.batch_size, names),
                       progress=progress)

    def _blockwise(self, executor, maps, plan: Plan, ctx: PassContext) -> dict[str, Projection]:
        from fmcompress.backend.blockwise import fit_blockwise
        from fmcompress.backend.train import resolve_device

        config = self._config()
        device = resolve_device(config.device)
        names = list(executor.input_names)
        # it holds every batch's paused runs: --max-samples bounds that memory as it bounds an epoch
        part = self.calibration if config.max_samples is None else self.calibration.head(config.max_samples)
        batches = [tuple(t.to(device) for t in batch) for batch in part.torch_batches(config.batch_size, names)]

        ranks = {m.name: (m.channels, m.k) for m in plan.maps}
        stage: dict = {"epochs": config.block_epochs, "seconds": 0.0, "maps": []}

        def progress(i: int, name: str, first: float, last: float) -> None:
            refined = math.isfinite(last)  # NaN: nothing later reads the map, it keeps its PCA
            record = {"name": name, "first_loss": first if refined else None, "loss": last if refined else None}
            stage["maps"].append(record)
            outcome = f"loss {first:.4f} -> {last:.4f}" if refined else "kept its PCA (nothing later reads it)"
            ctx.log(f"block {i + 1}/{len(maps)}: {name} {' -> '.join(map(str, ranks[name]))} channels, {outcome}")
            if self.monitor is not None:
                self.monitor("block", {"map": i + 1, "maps": len(maps), **record})

        started = time.perf_counter()
        fitted = fit_blockwise(executor.to(device), maps, batches, epochs=config.block_epochs, lr=config.block_lr,
                               temperature=config.temperature, seed=config.seed, progress=progress)
        stage["seconds"] = time.perf_counter() - started
        self.block_stage = stage
        return fitted

    def _config(self):
        from fmcompress.training import TrainConfig

        return self.config or TrainConfig(batch_size=self.batch_size)

    def _train(self, executor, maps, initial: dict[str, Projection], ctx: PassContext) -> dict[str, Projection]:
        from fmcompress.backend.train import ProjectionTrainer

        config = self._config()
        trainer = ProjectionTrainer(executor, [name for name, _, _ in maps], initial, config,
                                    checkpoint=self.checkpoint, resume=self.resume, monitor=self.monitor)
        assert self.held_out is not None
        self.training = trainer.fit(self.calibration.inputs, self.calibration.labels,
                                    self.held_out.inputs, self.held_out.labels)
        best = self.training
        ctx.log(f"{self.method}: best held-out {best.metric} {best.best_score:.4f} at epoch {best.best_epoch}"
                f"{' (stopped early at the target)' if best.stopped_early else ''}")
        return self.training.projections
