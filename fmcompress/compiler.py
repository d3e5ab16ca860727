"""`compile`: the options, the declared pipeline of passes they give, and its run.

`build_pipeline(options)` is the whole of compile: every pass, in order, chosen from
the options (`Pipeline.describe()` lists them). `compile_model` loads the model, pins
its input shapes, runs that pipeline over one typed `PassContext`, records what was
done in the emitted model's metadata, drops its value_info (shapes are inferred by any
runtime; exporters' symbolic value_info let onnxruntime's planner reuse buffers across
tiled bands and hold them alive: docs/design.md section 3.8) and assembles the report
(fmcompress/reports/compile.py), whose runtime figures are those of the model as it
will be written. Nothing is written here: the caller writes the model and the report
atomically once everything passed.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import onnx

from .data import DEFAULT_MEAN, DEFAULT_SCALE, DEFAULT_STD
from .errors import InputError
from .featuremaps import Projection
from .int8 import DEFAULT_CALIBRATION
from .memprobe import measurement_enabled
from .modelio import load_model
from .ortrun import ort_level
from .passes import Pass, PassContext, Pipeline
from .passes.align_ranks import AlignRanksPass
from .passes.allocate import OBJECTIVES, AllocatePass, parse_traffic
from .passes.before_activation import PLACEMENTS, BeforeActivationPass
from .passes.equalize import EqualizeRangesPass
from .passes.fit import DEFAULT_METHOD, METHODS, FitProjectionsPass
from .passes.fold import FoldProjectionsPass
from .passes.fold_bn import FoldBatchNormPass
from .passes.map_cost import MapCostPass
from .passes.measure import MeasurePass
from .passes.memory import MemoryAnalysisPass
from .passes.peak_plan import PeakPlanPass, ShapeProjectionsPass, ShapeQuantizePass, VerifyPeakPass
from .passes.plan import Plan, PlanPass
from .passes.prepare_data import DataOptions, PrepareDataPass
from .passes.quantizable import QuantizablePass
from .passes.quantize import QuantizePass, planned_act_bytes
from .passes.runtime import RuntimeMemoryPass
from .passes.runtime_plan import RuntimePlanPass, TileToCeilingPass
from .passes.sink_concat import SinkConcatPass
from .passes.verify import VerifyPass, VerifyTrafficPass
from .reports.analysis import PLAN_ORT_LEVEL, REPORT_ORT_LEVEL, AnalysisReport
from .shapes import parse_input_shapes, resolve_input_shapes
from .train_config import TrainConfig, check_device
from .units import Ceiling, parse_ceiling, parse_size

Log = Callable[[str], None]
RUNTIMES = ("ort",)
LOSSLESS = "lossless"  # --peak lossless: the smallest peak tiling alone reaches (passes/peak_plan.py rule h)
NO_CEILING = Ceiling(ratio=1.0, text="1x")  # --traffic alone: no map above the largest, so no cap


@dataclass
class CompileOptions(DataOptions):
    """compile's options: the data's (DataOptions: data, num_samples, mean, std, scale,
    held_out_fraction, batch_size, seed) and the following."""

    ceiling: Ceiling | str | None = None  # None: only a traffic budget (then `traffic` is required)
    input_shapes: Any = None  # ["x=1,3,224,224"] or {"x": (1, 3, 224, 224)}
    act_bytes: int | None = None
    method: str = DEFAULT_METHOD
    # where a map whose kernel group ends in an activation is projected: before it where the group's
    # conv is 1x1 ("pointwise"), wherever allowed ("before"), or at the map ("after");
    # passes/before_activation.py, stored-view compiles
    placement: str = "pointwise"
    latency_repeats: int | None = None  # timed runs per model per round; None: metrics.ort_latency's automatic
    latency_rounds: int = 5  # interleaved rounds; the report gives the median and spread
    threads: int = 1  # onnxruntime intra-op threads for the latency figures
    min_agreement: float | None = None  # fidelity gate: held-out top-1 agreement, 0..1
    max_accuracy_drop: float | None = None  # fidelity gate: accuracy points lost (needs labels)
    training: TrainConfig = field(default_factory=TrainConfig)  # learned / random methods
    checkpoint: str | os.PathLike | None = None  # training checkpoint file, written after every epoch
    resume: bool = False  # continue from `checkpoint`
    monitor: Callable[[str, dict[str, Any]], None] | None = None  # training progress events
    runtime: str | None = None  # "ort": the ceiling holds for onnxruntime's allocations (tiling + projections)
    # onnxruntime's graph optimisations: the report's runtime figures (None: `all`, a user's default
    # session) and what --runtime ort plans and verifies for (None: `extended`); see plan_level
    ort_level: str | None = None
    measure_memory: bool = True  # measure both models' onnxruntime peak in a fresh process (fmcompress.memprobe)
    traffic: Ceiling | str | None = None  # budget on the total stored traffic (passes/allocate.py): 3x, 2MB
    objective: str = "traffic"  # or "traffic+latency": prefer maps whose projections fold
    latency_weight: float = 1.0  # traffic+latency: the weight of the latency term (passes/allocate.py rule f)
    int8: bool = False  # quantize the verified model to int8 QDQ (passes/quantize.py); plans maps at 1 byte
    calibrate: str = DEFAULT_CALIBRATION  # --int8's ranges: auto, minmax, percentile or entropy (int8.py rule b)
    # onnxruntime's live peak at most this size (passes/peak_plan.py): "512KB" or bytes, or "lossless" (the
    # smallest tiling alone reaches, rule h; what int8 alone means); implies runtime="ort"
    peak: str | int | None = None

    def __post_init__(self) -> None:
        if self.int8 and self.ceiling is None and self.traffic is None and self.peak is None:
            self.peak = LOSSLESS  # quantize, laid out for the smallest peak that loses nothing
        if self.peak is not None and self.runtime is None:
            self.runtime = "ort"  # --peak is a budget on onnxruntime's allocations


@dataclass
class CompileResult:
    model: onnx.ModelProto | None  # None for a plan-only run
    plan: Plan
    before: AnalysisReport
    after: AnalysisReport | None = None
    report: dict[str, Any] = field(default_factory=dict)
    projections: dict[str, Projection] = field(default_factory=dict)  # tensor name -> fitted P, U


def plan_level(options: CompileOptions) -> str:
    """The level --runtime ort plans, tiles and verifies for: the one named, else `extended`."""
    return options.ort_level or PLAN_ORT_LEVEL


def report_level(options: CompileOptions) -> str:
    """The level of the report's runtime figures: the one named, else `all` (a user's session)."""
    return options.ort_level or REPORT_ORT_LEVEL


def build_pipeline(options: CompileOptions, *, source: str = "", plan_only: bool = False) -> Pipeline:
    """Every pass compile runs for `options`, in order.

    analysis and plan -> [runtime view] -> Concats sunk, re-planned -> [runtime view and
    plan: regions to tile, their ends to project] -> data -> [traffic allocation] -> fit
    -> fold BatchNorm -> fold projections -> [tile to the ceiling] -> verify ->
    measure -> [traffic verified]. `plan_only` stops after planning.
    """
    check_options(options)
    ceiling = as_ceiling(options.ceiling) if options.ceiling is not None else NO_CEILING
    # with --runtime ort a map whose one channel is above the ceiling may still be tiled
    strict = not options.runtime
    passes: list[Pass] = [MemoryAnalysisPass(ceiling, source=source), PlanPass(ceiling, refuse_infeasible=strict)]
    if options.peak is not None:  # the ceiling is the one that keeps onnxruntime's peak under the size
        passes = [PeakPlanPass(peak_bytes(options), probe=lambda c: peak_probe(c, plan_level(options), options.int8),
                               level=report_level(options), plan_level=plan_level(options),
                               ceiling=as_ceiling(options.ceiling) if options.ceiling is not None else None,
                               source=source)]
    if options.runtime:
        passes += runtime_planning(plan_level(options))
    elif options.traffic is None:  # a traffic budget counts the maps as they are: nothing sunk
        passes += [SinkConcatPass(), PlanPass()]
    if options.int8:  # ranks onnxruntime's symmetric int8 convs take (passes/align_ranks.py rule a)
        passes.append(AlignRanksPass())
    if moves_before_activation(options):
        passes.append(BeforeActivationPass(options.placement))
    prepare = PrepareDataPass(options)
    if options.traffic is not None:  # the allocation measures its proxies on the calibration part
        passes += [prepare, AllocatePass(as_traffic(options.traffic), objective=options.objective,
                                         batch_size=options.batch_size, latency_weight=options.latency_weight,
                                         seed=options.seed)]
    if plan_only:
        return Pipeline(passes)
    if options.traffic is None:
        passes.append(prepare)
    if options.int8:  # a model onnxruntime's quantization refuses is refused before the fit
        passes.append(QuantizablePass())
    training = replace(options.training, batch_size=options.batch_size, seed=options.seed)
    passes += [
        FitProjectionsPass(method=options.method, training=training, checkpoint=options.checkpoint,
                           resume=options.resume, monitor=options.monitor),
        MapCostPass(),
        *([EqualizeRangesPass()] if options.int8 else []),  # one range per stored map's channels, for uint8
        FoldBatchNormPass(),
        FoldProjectionsPass(),
        *([TileToCeilingPass(level=plan_level(options))] if options.runtime else []),
        VerifyPass(runtime_level=plan_level(options) if options.runtime else None),
        *([QuantizePass(report_level(options), act_bytes=options.act_bytes, calibrate=options.calibrate,
                        ceiling_level=plan_level(options) if options.runtime else None)] if options.int8 else []),
        # after quantization with --int8: the size holds for the model written (peak_plan.py rule g)
        *([VerifyPeakPass(peak_bytes(options), report_level(options),
                          measure=measurement_enabled(options.measure_memory))] if options.peak is not None else []),
        MeasurePass(threads=options.threads, rounds=options.latency_rounds, repeats=options.latency_repeats,
                    min_agreement=options.min_agreement, max_accuracy_drop=options.max_accuracy_drop),
        *([VerifyTrafficPass()] if options.traffic is not None else []),
    ]
    return Pipeline(passes)


def moves_before_activation(options: CompileOptions) -> bool:
    """--placement pointwise (the default) or before applies to the stored-view plan, float or
    --int8; the runtime plans (--runtime, --peak) and --traffic's allocation keep each
    projection at its stored map (their plans are measured there)."""
    return (options.placement != "after" and not options.runtime and options.peak is None
            and options.traffic is None)


def runtime_planning(level: str) -> list[Pass]:
    """--runtime ort's planning after the first stored plan: runtime view, Concats sunk, re-planned,
    runtime view again, regions to tile and their ends to project."""
    return [RuntimeMemoryPass(level, plan_ceiling=True), SinkConcatPass(), PlanPass(refuse_infeasible=False),
            RuntimeMemoryPass(level, plan_ceiling=True), RuntimePlanPass()]


def peak_probe(ceiling_bytes: int, level: str, int8: bool = False) -> Pipeline:
    """What compile --runtime ort emits at a ceiling, in shapes (passes/peak_plan.py rule a): its planning,
    shape-only projections of the planned ranks, the folds and the tiling; with `int8`, quantized (rule g)."""
    ceiling, projections = Ceiling(bytes=ceiling_bytes), {}
    return Pipeline([MemoryAnalysisPass(ceiling), PlanPass(ceiling, refuse_infeasible=False),
                     *runtime_planning(level), *([AlignRanksPass()] if int8 else []),
                     ShapeProjectionsPass(into=projections), FoldBatchNormPass(),
                     FoldProjectionsPass(projections), TileToCeilingPass(level=level),
                     *([ShapeQuantizePass()] if int8 else [])])


def peak_bytes(options: CompileOptions) -> int | None:
    """--peak in bytes (a size: a peak relative to itself would mean nothing); None for `lossless`."""
    if isinstance(options.peak, str) and options.peak.strip().lower() == LOSSLESS:
        return None
    return options.peak if isinstance(options.peak, int) else parse_size(str(options.peak))


def compile_model(source: str | os.PathLike | onnx.ModelProto, options: CompileOptions, *,
                  plan_only: bool = False, log: Log = lambda message: None) -> CompileResult:
    """Run the whole pipeline in memory; raise InputError / VerificationError on failure."""
    from .reports.compile import compile_report, plan_report, set_metadata

    started = time.perf_counter()
    pipeline = build_pipeline(options, source=source_name(source), plan_only=plan_only)
    model = load_model(source)
    ctx = build_context(model, options.input_shapes, planned_act_bytes(options.int8, options.act_bytes), log)
    emitted, ctx = pipeline.run(model, ctx)
    plan = ctx.plan
    if plan_only:
        log(f"plan: {len(plan.maps)} map(s) to project to fit {plan.ceiling} ({plan.ceiling_bytes} B)")
        return CompileResult(None, plan, ctx.before, report=plan_report(model, ctx))
    log("verified: onnx.checker, onnxruntime, executor agreement, ceiling")
    if emitted is model:  # nothing was rewritten: the metadata goes on a copy, never on the input
        emitted = onnx.ModelProto()
        emitted.CopyFrom(model)
    del emitted.graph.value_info[:]  # see the module docstring: shapes only a runtime should infer
    set_metadata(emitted, plan, options, ctx.allocation)
    report = compile_report(source, model, emitted, options, ctx, time.perf_counter() - started)
    return CompileResult(emitted, plan, ctx.before, ctx.verification["after"], report,
                         projections=ctx.projections or {})


def check_options(options: CompileOptions) -> None:
    """What is wrong with the options alone, before any pass runs (InputError)."""
    if options.method not in METHODS:
        raise InputError(f"unknown method {options.method!r}; available: {', '.join(METHODS)}")
    if options.method != "pca":
        options.training.check()
        check_device(options.training.device)
    if options.ceiling is None and options.traffic is None and options.peak is None:
        raise InputError("give a ceiling, a traffic budget, a peak, or a combination")
    if options.placement not in PLACEMENTS:
        raise InputError(f"unknown placement {options.placement!r}; available: {', '.join(PLACEMENTS)}")
    if options.peak is not None:
        _check_peak(options)
    if options.traffic is not None and options.objective not in OBJECTIVES:
        raise InputError(f"unknown objective {options.objective!r}; available: {', '.join(OBJECTIVES)}")
    if not (options.latency_weight >= 0 and math.isfinite(options.latency_weight)):
        raise InputError(f"the latency weight must be a finite number >= 0, got {options.latency_weight}")
    if options.ort_level is not None:
        ort_level(options.ort_level)  # an unknown level is an InputError naming the known ones
    if options.runtime is not None and options.runtime not in RUNTIMES:
        raise InputError(f"unknown runtime {options.runtime!r}; available: {', '.join(RUNTIMES)}")
    if options.traffic is not None and options.runtime:
        raise InputError("a traffic budget does not combine with --runtime ort yet")


def _check_peak(options: CompileOptions) -> None:
    size = peak_bytes(options)
    if size is not None and size < 1:
        raise InputError(f"--peak must be a positive size or {LOSSLESS}, got {options.peak}")
    if options.traffic is not None:
        raise InputError("--peak does not combine with --traffic yet")


def source_name(source: str | os.PathLike | onnx.ModelProto) -> str:
    return "<ModelProto>" if isinstance(source, onnx.ModelProto) else str(source)


def as_ceiling(ceiling: Ceiling | str) -> Ceiling:
    return ceiling if isinstance(ceiling, Ceiling) else parse_ceiling(ceiling)


def as_traffic(traffic: Ceiling | str) -> Ceiling:
    return traffic if isinstance(traffic, Ceiling) else parse_traffic(str(traffic))


def build_context(model: onnx.ModelProto, input_shapes: Any, act_bytes: int | None,
                  log: Log = lambda message: None) -> PassContext:
    """The pass context of one model: checked bytes per element and resolved input shapes."""
    if act_bytes is not None and act_bytes < 1:
        raise InputError(f"--act-bytes must be at least 1, got {act_bytes}")
    pinned = parse_input_shapes(input_shapes, model)
    return PassContext(input_shapes=resolve_input_shapes(model, pinned), act_bytes=act_bytes, log=log)


def write_report(result: CompileResult, folder: str | os.PathLike) -> None:
    """report.json, report.md and memory.png (see fmcompress/reports/compile.py)."""
    from .reports.compile import write_report as write

    write(result, folder)


VERIFY_SCHEMA_VERSION = 1


def verify_pair(original_source, compressed_source, *, ceiling: Ceiling | str | None = None,
                input_shapes: Any = None, data: str | os.PathLike | None = None, num_samples: int = 64,
                batch_size: int = 16, act_bytes: int | None = None, mean: tuple[float, ...] = DEFAULT_MEAN,
                std: tuple[float, ...] = DEFAULT_STD, scale: float = DEFAULT_SCALE, seed: int = 0,
                threads: int = 1, log: Log = lambda m: None) -> dict[str, Any]:
    """`fmcompress verify`: checks and fidelity of any (original, compressed) pair, on every sample."""
    from .data import data_warnings
    from .passes.memory import analyze_stored
    from .passes.prepare_data import fitting_batch_size, load_samples, num_classes
    from .passes.verify import check_model
    from .reports.compile import ceiling_verdict

    original, compressed = load_model(original_source), load_model(compressed_source)
    _same_interface(original, compressed)
    check_model(compressed, str(compressed_source))
    options = DataOptions(data=data, num_samples=num_samples, mean=mean, std=std, scale=scale, seed=seed)
    ctx = build_context(original, input_shapes, act_bytes, log)
    parsed = as_ceiling(ceiling) if ceiling is not None else None
    before = analyze_stored(original, ctx, parsed, source=str(original_source))
    ceiling_bytes = before.ceiling_bytes if parsed is not None else _recorded_ceiling(compressed)
    after = analyze_stored(compressed, ctx, Ceiling(bytes=ceiling_bytes) if ceiling_bytes else None,
                           source=str(compressed_source))
    batch = fitting_batch_size(original, ctx, batch_size)
    dataset = load_samples(original, ctx, options, num_classes(original, before.tensor_shapes))
    ctx.warnings += data_warnings(dataset)
    ctx.before, ctx.verification = before, {"after": after}
    measured = MeasurePass(original, dataset, batch_size=batch, threads=threads)(compressed, ctx).data
    verdict = ceiling_verdict(after, ceiling_bytes) if ceiling_bytes else {"over_ceiling": []}
    return {"schema_version": VERIFY_SCHEMA_VERSION, "original": str(original_source),
            "compressed": str(compressed_source), "ceiling_bytes": ceiling_bytes, **verdict,
            "not_compressible_over_ceiling": [m.name for m in after.over_ceiling(include_inputs=True)
                                              if not m.compressible] if ceiling_bytes else [],
            "peaks": after.peaks, "data": {"source": dataset.source, "surrogate": dataset.surrogate,
                                           "samples": len(dataset)},
            "fidelity": measured["fidelity"], "flops": measured["flops"], "latency_ms": measured["latency_ms"],
            "warnings": ctx.warnings}


def _same_interface(original: onnx.ModelProto, compressed: onnx.ModelProto) -> None:
    from .shapes import graph_inputs

    def names(values):
        return [v.name for v in values]

    if names(graph_inputs(original)) != names(graph_inputs(compressed)) or \
            names(original.graph.output) != names(compressed.graph.output):
        raise InputError("the two models have different inputs or outputs; verify compares a model with its "
                         "compressed version")


def _recorded_ceiling(compressed: onnx.ModelProto) -> int | None:
    """The ceiling `compile` recorded in the compressed model's metadata, if any."""
    meta = {p.key: p.value for p in compressed.metadata_props}
    value = meta.get("fmcompress.ceiling_bytes")
    return int(value) if value and value.isdigit() else None
