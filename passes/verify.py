"""VerifyPass: the emitted model is exactly what was planned, or compile writes nothing.

Checks, in order; the first that fails raises `VerificationError` (exit 1):

a. `onnx.checker` with `full_check` (types and shapes inferred through the graph).
b. onnxruntime loads it.
c. On held-out samples its outputs equal the reference semantics run by the same
   runtime: onnxruntime on the original model with explicit P and U convs at every
   projected map (InsertProjectionsPass, the projections of `ctx.projections`).
   Relative error at most 1e-4 for float32 models; float16 and bfloat16 models round
   at every op, so 1e-2. One runtime on both sides isolates the rewrites (folding,
   tiling, conv splitting) from run-time rounding: a model whose outputs amplify
   rounding (a sigmoid over large logits, as in PP-OCR's detector) differs between two
   runtimes by far more than the tolerance even unprojected (docs/results.md). Both
   sides run at onnxruntime's `extended` level (`VERIFY_LEVEL`): at `all` its NCHWc
   layout kernels block a convolution by its tensor's width, so a band and the whole
   map round differently (tiling alone, bitwise exact at `extended`, differed by 1e-5
   at `all` on the zoo's EfficientNetV2-S at 224x224, whose untrained logits reach 200,
   and compiled at 512KB by 3.9e-4); rule b still loads the model at `all`, the level a
   user's session runs. Folding U and P into weights rounds differently from explicit
   convs, and a model amplifies that as it amplifies any rounding: where 1e-4 is exceeded,
   the tolerance becomes 10 x the reference's own `rounding_sensitivity` (its outputs'
   relative change when every input moves by one float32 rounding), at most 1e-2: ~1e-7
   for the trained digits model, so 1e-4 stands, while the zoo's untrained nets, whose
   logits reach the hundreds, move by 2e-5 on noise and 1e-3 on photographs
   (EfficientNet-B0 at 224x224, 4x: error 9.5e-4). A wrong fold or band is off by far
   more. The tolerance met is reported. The training backend's agreement (the torch
   executor with U P applied, what the projections were fitted with) is reported as
   `executor_relative_error`, a figure beside the check.
c'. Where compile planned on an exactly rewritten graph (`ctx.projected_graph` is not
   the original: Concats sunk by passes/sink_concat.py, whose piece tensors the
   projections may name), rule c's
   reference is that graph with the projections inserted, and the rewritten graph
   itself must equal the original in onnxruntime to the same tolerance
   (`rewrite_relative_error`), so the chain emitted = rewritten + projections and
   rewritten = original is checked link by link.
d. The memory analysis re-run on it finds every compressible stored map at or
   under the plan's ceiling (`ctx.plan`). The analysis recognises the
   projection and expansion convs by their structure, not their names, so the
   verdict survives renaming tools.
e. With `runtime_level` (compile --runtime ort): the runtime view re-run on it finds
   every tensor onnxruntime allocates (graph inputs excepted) at or under the ceiling.

The model is not changed; `ctx.verification` (and `result.data`) holds the figures of
each check and the analysis of the emitted model (`"after"`, an `AnalysisReport`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from fmcompress.data import Dataset
from fmcompress.errors import InputError, VerificationError
from fmcompress.featuremaps import Projection
from fmcompress.ortrun import ort_session, output_batch_axes, run_ort
from fmcompress.units import Ceiling

from .base import Pass, PassContext, PassResult
from .fit import torch_executor
from .graph import Model
from .memory import analyze_stored
from .prepare_data import HeldOutPass
from .runtime import analyze_runtime

FLOAT32_TOLERANCE = 1e-4
VERIFY_LEVEL = "extended"  # rule c: the rewrites' arithmetic, without layout-dependent kernels
HALF_TOLERANCE = 1e-2
HALF_TYPES = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


SENSITIVITY_FACTOR = 10  # rule c: allowed error per unit of the model's rounding amplification
SENSITIVITY_CAP = 1e-2  # rule c: never looser than this, however chaotic the model


def rounding_sensitivity(session: Any, subset: Dataset, batch_size: int, reference: list[np.ndarray]) -> float:
    """How much the model's outputs move (relative error) when each input value moves by one
    float32 rounding (a relative 2**-24, random sign, seeded): its amplification of rounding.
    A trained classifier moves by ~1e-7; the zoo's untrained ones by 2e-5, their logits in the
    hundreds."""
    rng = np.random.default_rng(0)

    def nudged():
        for inputs, labels in subset.batches(batch_size):
            yield {name: _nudge(array, rng) for name, array in inputs.items()}, labels

    return worst_relative_error(run_ort(session, nudged(), batch_first=True), reference)


def _nudge(array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if array.dtype.kind != "f":
        return array
    step = np.finfo(array.dtype).eps / 2
    return (array * (1 + step * rng.choice([-1.0, 1.0], size=array.shape))).astype(array.dtype)


def agreement_tolerance(model: onnx.ModelProto) -> float:
    """Relative error allowed between the emitted model and the executor (rule c)."""
    types = {value.type.tensor_type.elem_type for value in [*model.graph.input, *model.graph.output]}
    return HALF_TOLERANCE if types & set(HALF_TYPES) else FLOAT32_TOLERANCE


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))


def worst_relative_error(outputs: list[np.ndarray], references: list[np.ndarray]) -> float:
    """The largest relative error over paired outputs (equal shapes, or VerificationError)."""
    for index, (a, b) in enumerate(zip(outputs, references, strict=True)):
        if np.shape(a) != np.shape(b):
            raise VerificationError(f"output {index}: shape {list(np.shape(a))} differs from the "
                                    f"reference's {list(np.shape(b))}")
    return max(relative_error(a, b) for a, b in zip(outputs, references, strict=True))


def check_model(model: onnx.ModelProto, what: str = "the emitted model") -> None:
    """Rule a: onnx.checker's full check, as one-line VerificationError."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:  # >2GB: ValueError
        raise VerificationError(f"{what} fails onnx.checker: {str(exc).splitlines()[0]}") from exc


class VerifyPass(HeldOutPass):
    """Checks an emitted model against its original (rules a-d); the model is unchanged."""

    name = "verify"
    provides = ("verification",)

    def __init__(self, original: onnx.ModelProto | None = None, held_out: Dataset | None = None, *,
                 batch_size: int | None = None, samples: int = 8,
                 projections: dict[str, Projection] | None = None, ceiling_bytes: int | None = None,
                 runtime_level: str | None = None, rewritten: onnx.ModelProto | None = None):
        self.original = original  # None: the pipeline's input (ctx.original)
        self.rewritten = rewritten
        self.held_out = held_out  # None: ctx.held_out
        self.batch_size = batch_size  # None: ctx.batch_size, else 16
        self.samples = samples
        self.projections = projections  # None: ctx.projections, on ctx.projected_graph
        self.ceiling_bytes = ceiling_bytes  # None: the plan's
        self.runtime_level = runtime_level
        self._batch_axes: list[int] = []  # each output's batch axis (set with the emitted outputs)

    @property
    def requires(self) -> tuple[str, ...]:
        return (*(("projections",) if self.projections is None else ()),
                *(("held_out",) if self.held_out is None else ()),
                *(("plan",) if self.ceiling_bytes is None else ()))

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        emitted_model = model.proto()
        check_model(emitted_model)
        self._take_context(ctx)
        projections = self.projections if self.projections is not None else ctx.projections or {}
        subset = self.held_out.head(self.samples)
        emitted = self._emitted_outputs(emitted_model, subset)
        worst, tolerance = self._reference_agreement(emitted, projections, subset, ctx)
        after = self._ceiling(emitted_model, ctx)
        data: dict[str, Any] = {"checker": "ok", "onnxruntime": "ok", "relative_error": worst,
                                "executor_relative_error": self._executor_error(emitted, projections, subset),
                                "tolerance": tolerance, "samples": len(subset), "after": after}
        if self.rewritten is not None:
            data["rewrite_relative_error"] = self._rewrite_agreement(subset)
        if self.runtime_level is not None:
            data["runtime"] = self._runtime_ceiling(emitted_model, ctx, after.ceiling_bytes)
        ctx.verification = data
        return PassResult(model, modified=False, data=data)

    def _take_context(self, ctx: PassContext) -> None:
        """The pipeline's input, held-out part, batch size and graph of the projections (rule c')."""
        self._take_held_out(ctx)
        if self.rewritten is None and ctx.projected_graph is not None:
            graph = ctx.projected_graph.proto()
            self.rewritten = graph if graph is not self.original else None

    @property
    def reference_graph(self) -> onnx.ModelProto:
        """The graph the plan and the projections name."""
        return self.rewritten if self.rewritten is not None else self.original

    def _emitted_outputs(self, model: onnx.ModelProto, subset: Dataset) -> list[np.ndarray]:
        """Rule b, and the emitted model's outputs."""
        try:
            ort_session(model)  # the level a user's session runs
            session = ort_session(model, level=VERIFY_LEVEL)
        except InputError as exc:
            raise VerificationError(str(exc)) from exc
        self._batch_axes = output_batch_axes(session, next(subset.batches(self.batch_size))[0])
        return run_ort(session, subset.batches(self.batch_size), batch_first=True)

    def _reference_agreement(self, emitted: list[np.ndarray], projections: dict[str, Projection],
                             subset: Dataset, ctx: PassContext) -> tuple[float, float]:
        """Rule c: the worst relative error and the tolerance it met."""
        from .insert import InsertProjectionsPass

        reference_model = InsertProjectionsPass(projections).run(Model.of(self.reference_graph), ctx).model.proto()
        session = ort_session(reference_model, level=VERIFY_LEVEL)
        reference = run_ort(session, subset.batches(self.batch_size), batch_first=True)
        worst = worst_relative_error(emitted, reference)
        tolerance = agreement_tolerance(reference_model)
        if not worst <= tolerance:  # within what the model's own rounding amplification allows?
            sensitivity = rounding_sensitivity(session, subset, self.batch_size, reference)
            tolerance = max(tolerance, min(SENSITIVITY_FACTOR * sensitivity, SENSITIVITY_CAP))
        if not worst <= tolerance:
            raise VerificationError(f"the emitted model disagrees with the original with its projections "
                                    f"inserted: relative error {worst:.3g} > {tolerance:.3g}")
        return worst, tolerance

    def _executor_error(self, emitted: list[np.ndarray], projections: dict[str, Projection],
                        subset: Dataset) -> float:
        """The training backend's agreement with the emitted model (reported, rule c)."""
        import torch

        from fmcompress.backend.projection import install_projections

        executor = torch_executor(self.reference_graph)
        install_projections(executor, projections)
        with torch.no_grad():
            outputs = [executor(*batch) for batch in subset.torch_batches(self.batch_size, executor.input_names)]
        reference = [torch.cat(parts, dim=axis).movedim(axis, 0).float().numpy()
                     for parts, axis in zip(zip(*outputs, strict=True), self._batch_axes, strict=True)]
        return worst_relative_error(emitted, reference)

    def _rewrite_agreement(self, subset: Dataset) -> float:
        """Rule c': the exactly rewritten graph against the original, both in onnxruntime."""
        rewritten = run_ort(ort_session(self.rewritten, level=VERIFY_LEVEL), subset.batches(self.batch_size), batch_first=True)
        original = run_ort(ort_session(self.original, level=VERIFY_LEVEL), subset.batches(self.batch_size), batch_first=True)
        worst = worst_relative_error(rewritten, original)
        tolerance = agreement_tolerance(self.original)
        if not worst <= tolerance:
            raise VerificationError(f"the rewritten graph (Concats sunk) disagrees with the original: "
                                    f"relative error {worst:.3g} > {tolerance:g}")
        return worst

    def _runtime_ceiling(self, model: onnx.ModelProto, ctx: PassContext, ceiling_bytes: int):
        """Rule e."""
        view = analyze_runtime(model, ctx, self.runtime_level, ceiling_bytes)
        _refuse_over(view.over_ceiling(), "onnxruntime allocation(s)", ceiling_bytes)
        return view

    def _ceiling(self, model: onnx.ModelProto, ctx: PassContext):
        """Rule d."""
        plan = ctx.plan
        ceiling_bytes = self.ceiling_bytes if self.ceiling_bytes is not None else getattr(plan, "ceiling_bytes", None)
        if ceiling_bytes is None:
            raise InputError("the verify pass needs a ceiling: run PlanPass first or pass ceiling_bytes=")
        after = analyze_stored(model, ctx, Ceiling(bytes=ceiling_bytes))
        _refuse_over(after.over_ceiling(), "stored feature map(s)", ceiling_bytes)
        return after


def _refuse_over(over: list, what: str, ceiling_bytes: int) -> None:
    """Rules d and e: VerificationError naming the first tensors above the ceiling."""
    if over:
        names = ", ".join(f"{t.name} ({t.bytes} B)" for t in over[:5])
        raise VerificationError(f"{len(over)} {what} of the emitted model are above the ceiling of "
                                f"{ceiling_bytes} B: {names}")


class VerifyTrafficPass(Pass):
    """compile --traffic: the emitted model's stored traffic (passes/allocate.py rule a) is
    within the allocation's budget; folding may only shrink what was planned."""

    name = "verify-traffic"
    requires = ("allocation", "verification")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        from .allocate import stored_traffic

        allocation = ctx.allocation
        traffic = stored_traffic(ctx.verification["after"])
        if traffic > allocation.budget_bytes:
            raise VerificationError(f"the emitted model stores {traffic} B of feature maps, above the traffic "
                                    f"budget {allocation.budget} ({allocation.budget_bytes} B); nothing was "
                                    f"written")
        ctx.log(f"traffic: {allocation.traffic_before} B -> {traffic} B "
                f"({allocation.traffic_before / max(traffic, 1):.2f}x; budget {allocation.budget_bytes} B)")
        return PassResult(model, modified=False, data=traffic)
