"""The pass interface shared by every graph pass, the typed state they share, and a pipeline.

A pass is a small object with one entry point, `run(model, ctx) -> PassResult` (also
reachable as `pass_(model, ctx)`). It reads its options from its constructor and what
earlier passes found from the typed fields of the `PassContext`. Rules:

a. `model` is a `Model` (passes/graph.py): rewriting passes edit `model.graph` in
   place and call `model.touched()`; analyses read it, or `model.proto()` where they
   need ONNX itself (onnxruntime, shape inference, the torch executor).
b. A pass writes what it finds into the context fields it `provides`, and returns it
   as `result.data` too (for a pass run on its own).
c. A pass lists the context fields it `requires`; `Pipeline` checks, before running
   anything, that each is set in the context or provided by an earlier pass, and
   otherwise fails naming the pass that provides it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import onnx

from .graph import Model

if TYPE_CHECKING:
    from fmcompress.data import Dataset
    from fmcompress.featuremaps import Projection

    from .allocate import Allocation
    from .fit import TrainingRecord
    from .memory import AnalysisReport
    from .peak_plan import PeakPlan
    from .plan import Plan
    from .runtime import RuntimeView
    from .runtime_plan import RuntimePlan
    from .sink_concat import SinkResult


@dataclass
class PassContext:
    """Facts shared by the passes of one pipeline run; each field names the pass that sets it."""

    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    act_bytes: int | None = None  # overrides the stored dtype's bytes per element
    log: Callable[[str], None] = lambda message: None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per pass name, set by Pipeline
    original: onnx.ModelProto | None = None  # Pipeline.run: its input, as given (verify compares with it)
    # what the passes find, in pipeline order
    before: AnalysisReport | None = None  # the first stored analysis: the pipeline's input model
    memory: AnalysisReport | None = None  # MemoryAnalysisPass, PlanPass: the graph as last analysed
    plan: Plan | None = None  # PlanPass; refined by SinkConcatPass, RuntimePlanPass, AllocatePass
    peak: PeakPlan | None = None  # PeakPlanPass (compile --peak): the ceiling chosen for onnxruntime's peak
    runtime_before: RuntimeView | None = None  # the first runtime analysis: the pipeline's input model
    runtime: RuntimeView | None = None  # RuntimeMemoryPass: onnxruntime's allocations, as last analysed
    sunk: list[SinkResult] | None = None  # SinkConcatPass: the Concats sunk
    runtime_plan: RuntimePlan | None = None  # RuntimePlanPass: tiled regions and projected region ends
    calibration: Dataset | None = None  # PrepareDataPass: the part that fits projections
    held_out: Dataset | None = None  # PrepareDataPass: the part that verifies and measures
    dataset: Dataset | None = None  # PrepareDataPass: every sample
    batch_size: int | None = None  # PrepareDataPass: what the graph allows
    warnings: list[str] = field(default_factory=list)  # any pass: said in the report
    allocation: Allocation | None = None  # AllocatePass
    projections: dict[str, Projection] | None = None  # FitProjectionsPass: tensor name -> P, U; EqualizeRangesPass
    # (--int8) rescales them
    projected_graph: Model | None = None  # FitProjectionsPass: the graph those names refer to
    training: TrainingRecord | None = None  # FitProjectionsPass (learned, random): what training did
    bn_folded: list[str] | None = None  # FoldBatchNormPass
    folds: dict[str, dict] | None = None  # FoldProjectionsPass: per map, where P and U went
    tiling: dict[str, Any] | None = None  # TileToCeilingPass: its plan, tiled regions, split convs
    verification: dict[str, Any] | None = None  # VerifyPass: checks and the emitted model's views
    measurement: dict[str, Any] | None = None  # MeasurePass: fidelity, FLOPs, latency, gate
    quantization: dict[str, Any] | None = None  # QuantizePass (--int8): float nodes left, int8 fidelity
    map_costs: list[dict[str, Any]] | None = None  # MapCostPass: each projection's held-out cost alone
    equalized: list[dict[str, Any]] | None = None  # EqualizeRangesPass (--int8): each stored map's range spread
    quantized_original: onnx.ModelProto | None = None  # QuantizePass: the input quantized alike (MeasurePass's baseline)

    def known(self) -> set[str]:
        """The names of the fields a pass has set."""
        return {f.name for f in fields(self) if f.name in PROVIDED and getattr(self, f.name) is not None}


@dataclass
class PassResult:
    model: Model | onnx.ModelProto  # a proto when the pass was called on one (`__call__`)
    modified: bool = False
    data: Any = None


class Pass:
    """Base class: subclasses set `name`, `requires`, `provides` and implement `run`."""

    name: str = "pass"
    requires: tuple[str, ...] = ()  # PassContext fields read (rule c)
    provides: tuple[str, ...] = ()  # PassContext fields written (rule b)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __call__(self, model: Model | onnx.ModelProto, ctx: PassContext | None = None) -> PassResult:
        """`run` at the edge: a proto in gives a proto in `result.model` (the input stays as it was)."""
        result = self.run(Model.of(model), ctx if ctx is not None else PassContext())
        if isinstance(model, onnx.ModelProto):
            result.model = result.model.proto()
        return result


class PipelineError(ValueError):
    """A pipeline lacks a pass that another needs (rule c)."""


class Pipeline:
    """Runs passes in order on one model, after checking that each finds what it requires."""

    def __init__(self, passes: Iterable[Pass]):
        self.passes = list(passes)

    def check(self, ctx: PassContext | None = None) -> None:
        """Rule c, before anything runs."""
        known = ctx.known() if ctx is not None else set()
        for pass_ in self.passes:
            for needed in pass_.requires:
                if needed not in known:
                    raise PipelineError(f"{type(pass_).__name__} needs `{needed}`, which "
                                        f"{providers(needed)} provides: add it before {type(pass_).__name__}")
            known |= set(pass_.provides)

    def run(self, model: Model | onnx.ModelProto,
            ctx: PassContext | None = None) -> tuple[Model | onnx.ModelProto, PassContext]:
        """Run every pass; returns the model (a proto when given a proto) and the context."""
        ctx = ctx if ctx is not None else PassContext()
        self.check(ctx)
        working = Model.of(model)
        if ctx.original is None:
            ctx.original = working.proto()
        for pass_ in self.passes:
            started = time.perf_counter()
            working = pass_.run(working, ctx).model
            ctx.timings[pass_.name] = ctx.timings.get(pass_.name, 0.0) + time.perf_counter() - started
        return (working.proto() if isinstance(model, onnx.ModelProto) else working), ctx

    def describe(self) -> list[str]:
        """One line a pass: its name and what it requires and provides."""
        return [f"{p.name}: needs {', '.join(p.requires) or '-'}; gives {', '.join(p.provides) or '-'}"
                for p in self.passes]


PROVIDED = ("before", "memory", "plan", "peak", "runtime_before", "runtime", "sunk", "runtime_plan", "dataset",
            "calibration", "held_out", "batch_size", "allocation", "projections", "projected_graph",
            "training", "bn_folded", "folds", "tiling", "verification", "measurement",
            "quantization", "equalized")


def providers(field_name: str) -> str:
    """The pass classes that provide a context field, for rule c's message."""
    found, stack = [], list(Pass.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if field_name in getattr(cls, "provides", ()):
            found.append(cls.__name__)
    return " or ".join(sorted(found)) or "no pass"
