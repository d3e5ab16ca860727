"""VerifyPass: the emitted model is exactly what was planned, or compile writes nothing.

Checks, in order; the first that fails raises `VerificationError` (exit 1):

a. `onnx.checker` with `full_check` (types and shapes inferred through the graph).
b. onnxruntime loads it.
c. On held-out samples its outputs equal the reference semantics run by the same
   runtime: onnxruntime on the original model with explicit P and U convs at every
   projected map (InsertProjectionsPass, the projections of `ctx.results["fit"]`).
   Relative error at most 1e-4 for float32 models; float16 and bfloat16 models round
   at every op, so 1e-2. One runtime on both sides isolates the rewrites (folding,
   tiling, conv splitting) from run-time rounding: a model whose outputs amplify
   rounding (PP-OCR's detector, a sigmoid over large logits) differs by 3% between
   two runtimes even unprojected. The training backend's agreement (the torch
   executor with U P applied, what the projections were fitted with) is reported as
   `executor_relative_error`, a figure beside the check.
c'. Where compile planned on an exactly rewritten graph (`rewritten`: Concats sunk by
   passes/sink_concat.py, whose piece tensors the projections may name), rule c's
   reference is that graph with the projections inserted, and the rewritten graph
   itself must equal the original in onnxruntime to the same tolerance
   (`rewrite_relative_error`), so the chain emitted = rewritten + projections and
   rewritten = original is checked link by link.
d. The memory analysis re-run on it finds every compressible stored map at or
   under the plan's ceiling (`ctx.results["plan"]`). The analysis recognises the
   projection and expansion convs by their structure, not their names, so the
   verdict survives renaming tools.
e. With `runtime_level` (compile --runtime ort): the runtime view re-run on it finds
   every tensor onnxruntime allocates (graph inputs excepted) at or under the ceiling.

The model is not changed; `result.data` holds the figures of each check and the
analysis of the emitted model (`"after"`, an `AnalysisReport`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from fmcompress.data import Dataset
from fmcompress.errors import InputError, VerificationError
from fmcompress.featuremaps import Projection
from fmcompress.metrics import ort_session, run_ort
from fmcompress.units import Ceiling

from .base import Pass, PassContext, PassResult
from .fit import torch_executor
from .memory import MemoryAnalysisPass

FLOAT32_TOLERANCE = 1e-4
HALF_TOLERANCE = 1e-2
HALF_TYPES = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def agreement_tolerance(model: onnx.ModelProto) -> float:
    """Relative error allowed between the emitted model and the executor (rule c)."""
    types = {value.type.tensor_type.elem_type for value in [*model.graph.input, *model.graph.output]}
    return HALF_TOLERANCE if types & set(HALF_TYPES) else FLOAT32_TOLERANCE


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))


def worst_relative_error(outputs: list[np.ndarray], references: list[np.ndarray]) -> float:
    """The largest relative error over paired outputs."""
    return max(relative_error(a, b) for a, b in zip(outputs, references, strict=True))


def check_model(model: onnx.ModelProto, what: str = "the emitted model") -> None:
    """Rule a: onnx.checker's full check, as one-line VerificationError."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # the checker raises several exception types
        raise VerificationError(f"{what} fails onnx.checker: {str(exc).splitlines()[0]}") from None


class VerifyPass(Pass):
    """Checks an emitted model against its original (rules a-d); the model is unchanged."""

    name = "verify"

    def __init__(self, original: onnx.ModelProto, held_out: Dataset, *, batch_size: int = 16, samples: int = 8,
                 projections: dict[str, Projection] | None = None, ceiling_bytes: int | None = None,
                 runtime_level: str | None = None, rewritten: onnx.ModelProto | None = None):
        self.original = original
        self.rewritten = rewritten
        self.reference_graph = rewritten if rewritten is not None else original  # what the plan names
        self.held_out = held_out
        self.batch_size = batch_size
        self.samples = samples
        self.projections = projections
        self.ceiling_bytes = ceiling_bytes
        self.runtime_level = runtime_level

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        check_model(model)
        projections = self.projections if self.projections is not None else ctx.results.get("fit", {})
        subset = self.held_out.head(self.samples)
        emitted = self._emitted_outputs(model, subset)
        worst = self._reference_agreement(emitted, projections, subset, ctx)
        after = self._ceiling(model, ctx)
        data: dict[str, Any] = {"checker": "ok", "onnxruntime": "ok", "relative_error": worst,
                                "executor_relative_error": self._executor_error(emitted, projections, subset),
                                "tolerance": agreement_tolerance(model), "samples": len(subset), "after": after}
        if self.rewritten is not None:
            data["rewrite_relative_error"] = self._rewrite_agreement(subset)
        if self.runtime_level is not None:
            data["runtime"] = self._runtime_ceiling(model, ctx, after.ceiling_bytes)
        return PassResult(model, modified=False, data=data)

    def _emitted_outputs(self, model: onnx.ModelProto, subset: Dataset) -> list[np.ndarray]:
        """Rule b, and the emitted model's outputs."""
        try:
            session = ort_session(model)
        except InputError as exc:
            raise VerificationError(str(exc)) from None
        return run_ort(session, subset.batches(self.batch_size))

    def _reference_agreement(self, emitted: list[np.ndarray], projections: dict[str, Projection],
                             subset: Dataset, ctx: PassContext) -> float:
        """Rule c."""
        from .insert import InsertProjectionsPass

        reference_model = InsertProjectionsPass(projections).run(self.reference_graph, ctx).model
        reference = run_ort(ort_session(reference_model), subset.batches(self.batch_size))
        worst = worst_relative_error(emitted, reference)
        tolerance = agreement_tolerance(reference_model)
        if not worst <= tolerance:
            raise VerificationError(f"the emitted model disagrees with the original with its projections "
                                    f"inserted: relative error {worst:.3g} > {tolerance:g}")
        return worst

    def _executor_error(self, emitted: list[np.ndarray], projections: dict[str, Projection],
                        subset: Dataset) -> float:
        """The training backend's agreement with the emitted model (reported, rule c)."""
        import torch

        from fmcompress.backend.projection import install_projections

        executor = torch_executor(self.reference_graph)
        install_projections(executor, projections)
        with torch.no_grad():
            outputs = [executor(*batch) for batch in subset.torch_batches(self.batch_size, executor.input_names)]
        reference = [torch.cat(parts).float().numpy() for parts in zip(*outputs, strict=True)]
        return worst_relative_error(emitted, reference)

    def _rewrite_agreement(self, subset: Dataset) -> float:
        """Rule c': the exactly rewritten graph against the original, both in onnxruntime."""
        rewritten = run_ort(ort_session(self.rewritten), subset.batches(self.batch_size))
        original = run_ort(ort_session(self.original), subset.batches(self.batch_size))
        worst = worst_relative_error(rewritten, original)
        tolerance = agreement_tolerance(self.original)
        if not worst <= tolerance:
            raise VerificationError(f"the rewritten graph (Concats sunk) disagrees with the original: "
                                    f"relative error {worst:.3g} > {tolerance:g}")
        return worst

    def _runtime_ceiling(self, model: onnx.ModelProto, ctx: PassContext, ceiling_bytes: int):
        """Rule e."""
        from .runtime import RuntimeMemoryPass

        view = RuntimeMemoryPass(self.runtime_level, ceiling_bytes).run(model, ctx).data
        _refuse_over(view.over_ceiling(), "onnxruntime allocation(s)", ceiling_bytes)
        return view

    def _ceiling(self, model: onnx.ModelProto, ctx: PassContext):
        """Rule d."""
        plan = ctx.results.get("plan")
        ceiling_bytes = self.ceiling_bytes if self.ceiling_bytes is not None else getattr(plan, "ceiling_bytes", None)
        if ceiling_bytes is None:
            raise InputError("the verify pass needs a ceiling: run PlanPass first or pass ceiling_bytes=")
        after = MemoryAnalysisPass(Ceiling(bytes=ceiling_bytes)).run(model, ctx).data
        _refuse_over(after.over_ceiling(), "stored feature map(s)", ceiling_bytes)
        return after


def _refuse_over(over: list, what: str, ceiling_bytes: int) -> None:
    """Rules d and e: VerificationError naming the first tensors above the ceiling."""
    if over:
        names = ", ".join(f"{t.name} ({t.bytes} B)" for t in over[:5])
        raise VerificationError(f"{len(over)} {what} of the emitted model are above the ceiling of "
                                f"{ceiling_bytes} B: {names}")
