"""FitProjectionsPass: find P and U for every planned map (the training backend's step).

Rules:

* The maps and ranks come from the plan (`ctx.results["plan"]`, a `Plan`, or the
  constructor). Nothing planned: no projections, no data read.
* One projection per planned map, fitted in network order with every earlier
  projection in place, so each map is fitted on what the compressed network will
  feed it.
* `pca` (Tai et al.'s compression-aware projection without its compensation):
  P = the top-k eigenvectors of the uncentred channel second moment E[x x^T] over
  the calibration data (a bounded random subset of positions per batch), U = P^T.
  Uncentred, because the folded model has no bias to carry a mean and zero padding
  must commute with U.
* Only calibration data is read: the held-out part stays unseen for the fidelity figures.
* The model is not changed; `result.data` maps tensor names to `Projection`s.

Entry point: `FitProjectionsPass(calibration, method="pca").run(model, ctx)`.
"""

from __future__ import annotations

import onnx

from fmcompress.data import Dataset
from fmcompress.errors import InputError
from fmcompress.featuremaps import Projection

from .base import Pass, PassContext, PassResult
from .plan import Plan

METHODS = ("pca",)


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

    def __init__(self, calibration: Dataset, *, method: str = "pca", batch_size: int = 16,
                 plan: Plan | None = None):
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
        self.calibration = calibration
        self.method = method
        self.batch_size = batch_size
        self.plan = plan

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        plan = self.plan or ctx.results.get("plan")
        if not isinstance(plan, Plan):
            raise InputError("the fit pass needs a plan: run PlanPass first or pass plan=")
        if not plan.maps:
            return PassResult(model, modified=False, data={})
        from fmcompress.backend.projection import fit_pca

        executor = torch_executor(model)
        maps = [(m.name, m.channels, m.k) for m in plan.maps]
        names = list(executor.input_names)

        def progress(i: int, name: str) -> None:
            ctx.log(f"pca {i + 1}/{len(maps)}: {name} {plan.maps[i].channels} -> {plan.maps[i].k} channels")

        projections: dict[str, Projection] = fit_pca(
            executor, maps, lambda: self.calibration.torch_batches(self.batch_size, names), progress=progress)
        return PassResult(model, modified=False, data=projections)
