"""`compile` and `verify`: the pipeline of passes, wired.

compile = analysis -> plan -> fit -> fold BatchNorm -> fold projections -> verify ->
measure (each a pass of `fmcompress.passes`, run by one `Pipeline` over a shared
`PassContext`). This module only prepares what the passes need (the model, the
input shapes, the data and its split, the batch size the graph allows), records
what was done in the model's metadata and assembles the report. Nothing is written
here: the caller writes the model and the report atomically once everything passed.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from . import __version__
from .data import (
    DEFAULT_MEAN,
    DEFAULT_SCALE,
    DEFAULT_STD,
    Dataset,
    data_warnings,
    input_specs,
    load_dataset,
)
from .errors import InputError, VerificationError
from .featuremaps import Projection
from .memprobe import measure_peak
from .metrics import batch_is_free
from .modelio import load_model
from .passes import PassContext, Pipeline
from .passes.allocate import OBJECTIVES, AllocatePass, Allocation, parse_traffic, stored_traffic
from .passes.fit import DEFAULT_METHOD, METHODS, FitProjectionsPass
from .passes.fold import FoldProjectionsPass
from .passes.fold_bn import FoldBatchNormPass
from .passes.measure import MeasurePass
from .passes.memory import MemoryAnalysisPass
from .passes.plan import Plan, PlanPass
from .passes.runtime import RuntimeMemoryPass
from .passes.runtime_plan import RuntimePlan, RuntimePlanPass, TileToCeilingPass
from .passes.sink_concat import SinkConcatPass
from .passes.verify import VerifyPass, check_model
from .report import DEFAULT_ORT_LEVEL, AnalysisReport
from .shapes import graph_inputs, parse_input_shapes, resolve_input_shapes
from .training import TrainConfig, check_device
from .units import Ceiling, parse_ceiling

REPORT_SCHEMA_VERSION = 2
VERIFY_SCHEMA_VERSION = 1
Log = Callable[[str], None]


@dataclass
class CompileOptions:
    ceiling: Ceiling | str | None  # None: only a traffic budget (then `traffic` is required)
    input_shapes: Any = None  # ["x=1,3,224,224"] or {"x": (1, 3, 224, 224)}
    act_bytes: int | None = None
    method: str = DEFAULT_METHOD
    data: str | os.PathLike | None = None  # .npz, image folder, or None for the surrogate set
    num_samples: int = 256
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    scale: float = DEFAULT_SCALE
    held_out_fraction: float = 0.25
    batch_size: int = 16
    seed: int = 0
    latency_repeats: int = 20  # timed runs per model per round
    latency_rounds: int = 5  # interleaved rounds; the report gives the median and spread
    threads: int = 1  # onnxruntime intra-op threads for the latency figures
    min_agreement: float | None = None  # fidelity gate: held-out top-1 agreement, 0..1
    max_accuracy_drop: float | None = None  # fidelity gate: accuracy points lost (needs labels)
    training: TrainConfig = field(default_factory=TrainConfig)  # learned / random methods
    checkpoint: str | os.PathLike | None = None  # training checkpoint file, written after every epoch
    resume: bool = False  # continue from `checkpoint`
    monitor: Callable[[str, dict[str, Any]], None] | None = None  # training progress events
    runtime: str | None = None  # "ort": the ceiling holds for onnxruntime's allocations (tiling + projections)
    ort_level: str = DEFAULT_ORT_LEVEL  # onnxruntime's graph optimisations of the runtime view
    measure_memory: bool = True  # with runtime: measure the process peak of both models (fmcompress.memprobe)
    traffic: Ceiling | str | None = None  # budget on the total stored traffic (passes/allocate.py): 3x, 2MB
    objective: str = "traffic"  # or "traffic+latency": prefer maps whose projections fold
    latency_weight: float = 1.0  # traffic+latency: the weight of the latency term (passes/allocate.py rule f)


@dataclass
class CompileResult:
    model: onnx.ModelProto | None  # None for a plan-only run
    plan: Plan
    before: AnalysisReport
    after: AnalysisReport | None = None
    report: dict[str, Any] = field(default_factory=dict)
    projections: dict[str, Projection] = field(default_factory=dict)  # tensor name -> fitted P, U


def compile_model(source: str | os.PathLike | onnx.ModelProto, options: CompileOptions, *,
                  plan_only: bool = False, log: Log = lambda message: None) -> CompileResult:
    """Run the whole pipeline in memory; raise InputError / VerificationError on failure."""
    if options.method not in METHODS:
        raise InputError(f"unknown method {options.method!r}; available: {', '.join(METHODS)}")
    training = replace(options.training, batch_size=options.batch_size, seed=options.seed)
    if options.method != "pca":
        training.check()
        check_device(training.device)
    started = time.perf_counter()
    _check_budgets(options)
    model = load_model(source)
    ctx = build_context(model, options.input_shapes, options.act_bytes, log)
    ceiling = as_ceiling(options.ceiling) if options.ceiling is not None else NO_CEILING
    Pipeline([MemoryAnalysisPass(ceiling, source=source_name(source)), PlanPass(ceiling)]).run(model, ctx)
    plan, before = ctx.results["plan"], ctx.results["memory"]
    runtime_plan, working = None, model
    if options.runtime:
        runtime_plan, working = _plan_runtime(model, ctx, options, log)
    elif options.traffic is None:
        working, planning = _sink_concats(model, ctx, log)
        ctx.results["plan"] = planning.results["plan"]
    plan = ctx.results["plan"]
    log(f"plan: {len(plan.maps)} map(s) to project to fit {plan.ceiling} ({plan.ceiling_bytes} B)")
    allocation, prepared = None, None
    if options.traffic is not None:  # the allocation measures its proxies on the calibration part
        prepared = _prepare_data(model, ctx, options, before, log)
        allocation = _allocate(model, ctx, options, prepared, log)
        plan = allocation.plan
    if plan_only:
        warnings = _unsupported_warnings(model)
        report = {"plan": plan.to_dict(), "warnings": warnings, "sunk_concats": _sink_report(ctx)}
        if runtime_plan is not None:
            report["runtime_plan"] = runtime_plan.to_dict()
        if allocation is not None:
            report["allocation"] = allocation.to_dict()
        return CompileResult(None, plan, before, report=report)
    # the pipeline runs on `working` (the original, or with its Concats sunk);
    # verification and measurement compare with the original
    batch_size, dataset, calibration, held_out, warnings = prepared or _prepare_data(working, ctx, options, before,
                                                                                     log)
    training = replace(training, batch_size=batch_size)
    fit = FitProjectionsPass(calibration, held_out, method=options.method, batch_size=batch_size,
                             training=training, checkpoint=options.checkpoint, resume=options.resume,
                             monitor=options.monitor)
    tiling = [TileToCeilingPass(plan.ceiling_bytes, options.ort_level)] if options.runtime else []
    folded, ctx = Pipeline([
        fit,
        FoldBatchNormPass(),
        FoldProjectionsPass(),
        *tiling,
        VerifyPass(model, held_out, batch_size=batch_size, runtime_level=options.ort_level if options.runtime else None,
                   rewritten=working if working is not model else None),
        MeasurePass(model, held_out, batch_size=batch_size, threads=options.threads, rounds=options.latency_rounds,
                    repeats=options.latency_repeats, min_agreement=options.min_agreement,
                    max_accuracy_drop=options.max_accuracy_drop),
    ]).run(working, ctx)
    log("verified: onnx.checker, onnxruntime, executor agreement, ceiling")
    after = ctx.results["verify"]["after"]
    if allocation is not None:
        _check_traffic(allocation, after, log)
    _set_metadata(folded, plan, options, allocation)
    warnings += ctx.results["measure"]["warnings"]
    timings = {"total": time.perf_counter() - started, **ctx.timings}
    if options.runtime:  # both views' runtime peaks in the report's peaks
        before.runtime, after.runtime = ctx.results["runtime"], ctx.results["verify"]["runtime"]
    report = _report(source, options, plan, dataset, calibration, held_out, ctx, batch_size, warnings, timings)
    report["training"] = _training_report(fit, training)
    report["sunk_concats"] = _sink_report(ctx)
    report["allocation"] = allocation.to_dict(stored_traffic(after)) if allocation is not None else None
    if options.runtime:
        report["runtime"] = _runtime_report(model, folded, ctx, options)
    return CompileResult(folded, plan, before, after, report, projections=ctx.results["fit"])


RUNTIMES = ("ort",)
NO_CEILING = Ceiling(ratio=1.0, text="1x")  # --traffic alone: no map above the largest, so no cap


def _check_budgets(options: CompileOptions) -> None:
    if options.ceiling is None and options.traffic is None:
        raise InputError("give a ceiling, a traffic budget, or both")
    if options.traffic is not None and options.objective not in OBJECTIVES:
        raise InputError(f"unknown objective {options.objective!r}; available: {', '.join(OBJECTIVES)}")
    if not (options.latency_weight >= 0 and math.isfinite(options.latency_weight)):
        raise InputError(f"the latency weight must be a finite number >= 0, got {options.latency_weight}")
    if options.traffic is not None and options.runtime:
        raise InputError("a traffic budget does not combine with --runtime ort yet")


def _prepare_data(model: onnx.ModelProto, ctx: PassContext, options: CompileOptions, before: AnalysisReport,
                  log: Log) -> tuple[int, Dataset, Dataset, Dataset, list[str]]:
    """The batch size the graph allows, the data and its calibration / held-out split, data warnings."""
    warnings: list[str] = []
    batch_size = _batch_size(model, ctx, options.batch_size, warnings)
    dataset = _dataset(model, ctx, options, _num_classes(model, before), log)
    calibration, held_out = dataset.split(options.held_out_fraction, seed=options.seed)
    warnings += data_warnings(dataset, held_out)
    return batch_size, dataset, calibration, held_out, warnings


def _allocate(model: onnx.ModelProto, ctx: PassContext, options: CompileOptions, prepared: tuple,
              log: Log) -> Allocation:
    """--traffic: the greedy allocation (passes/allocate.py) replaces the ceiling's plan."""
    batch_size, _, calibration, _, _ = prepared
    budget = options.traffic if isinstance(options.traffic, Ceiling) else parse_traffic(str(options.traffic))
    allocate = AllocatePass(budget, calibration, objective=options.objective, batch_size=batch_size,
                            latency_weight=options.latency_weight,
                            seed=options.seed)
    Pipeline([allocate]).run(model, ctx)
    return ctx.results["allocate"]


def _check_traffic(allocation: Allocation, after: AnalysisReport, log: Log) -> None:
    """The budget, on the emitted model's stored view (folding may only shrink what was planned)."""
    traffic = stored_traffic(after)
    if traffic > allocation.budget_bytes:
        raise VerificationError(f"the emitted model stores {traffic} B of feature maps, above the traffic budget "
                                f"{allocation.budget} ({allocation.budget_bytes} B); nothing was written")
    log(f"traffic: {allocation.traffic_before} B -> {traffic} B "
        f"({allocation.traffic_before / max(traffic, 1):.2f}x; budget {allocation.budget_bytes} B)")


def _plan_runtime(model: onnx.ModelProto, ctx: PassContext, options: CompileOptions,
                  log: Log) -> tuple[RuntimePlan, onnx.ModelProto]:
    """compile --runtime ort: sink Concats above the ceiling below their per-position readers,
    then plan tiling regions on the runtime view; project only their ends.

    SinkConcatPass (exact) runs first: a detection head's anchor Concat then never holds
    every anchor at once. The plan is made on the graph it returns (its own stored and
    runtime views), which the rest of the pipeline compiles; `ctx` keeps the original's
    views for the report. Where some allocation no region covers (a Resize or Concat of a
    feature pyramid, which bands cannot cross), every stored map above the ceiling is
    projected as well: U is then carried through those ops and they run narrow.
    TileToCeilingPass re-plans on the folded graph and fails with the tensors that still
    do not fit. Returns the runtime plan and the graph to compile.
    """
    if options.runtime not in RUNTIMES:
        raise InputError(f"unknown runtime {options.runtime!r}; available: {', '.join(RUNTIMES)}")
    plan: Plan = ctx.results["plan"]
    ctx.results["runtime"] = RuntimeMemoryPass(options.ort_level, plan.ceiling_bytes).run(model, ctx).data
    working, planning = _sink_concats(model, ctx, log)
    if working is not model:
        planning.results["runtime"] = RuntimeMemoryPass(options.ort_level, plan.ceiling_bytes).run(working,
                                                                                                   planning).data
    stored_plan = planning.results["plan"]
    runtime_plan = RuntimePlanPass(allow_projection=True).run(working, planning).data
    maps = runtime_plan.projected
    if runtime_plan.uncovered:
        chosen = {m.name for m in maps}
        maps = sorted([*maps, *(m for m in stored_plan.maps if m.name not in chosen)], key=lambda m: m.step)
        log(f"runtime plan: {len(runtime_plan.uncovered)} allocation(s) no band covers; projecting every "
            f"stored map above the ceiling too")
    ctx.results["plan"] = replace(plan, maps=maps)
    log(f"runtime plan: {len(runtime_plan.regions)} tiled region(s), {len(maps)} projected map(s)")
    return runtime_plan, working


def _sink_concats(model: onnx.ModelProto, ctx: PassContext, log: Log) -> tuple[onnx.ModelProto, PassContext]:
    """SinkConcatPass (exact) against the plan's ceiling: the graph to compile, and the
    context that holds its stored view and plan (`ctx` itself when nothing was sunk; a
    new one otherwise, so that `ctx` keeps the original's views for the report)."""
    plan: Plan = ctx.results["plan"]
    sunk = SinkConcatPass(plan.ceiling_bytes).run(model, ctx)
    ctx.results[SinkConcatPass.name] = sunk.data
    if not sunk.modified:
        return model, ctx
    planning = PassContext(input_shapes=ctx.input_shapes, act_bytes=ctx.act_bytes, log=ctx.log)
    fixed = Ceiling(bytes=plan.ceiling_bytes, text=plan.ceiling)
    Pipeline([MemoryAnalysisPass(fixed), PlanPass(fixed)]).run(sunk.model, planning)
    log(f"plan: {len(sunk.data)} Concat(s) above the ceiling sunk below their per-position readers (exact)")
    return sunk.model, planning


def _sink_report(ctx: PassContext) -> list[dict[str, Any]]:
    return [asdict(fact) for fact in ctx.results.get(SinkConcatPass.name) or []]


def _runtime_report(original: onnx.ModelProto, emitted: onnx.ModelProto, ctx: PassContext,
                    options: CompileOptions) -> dict[str, Any]:
    """Runtime peak before and after, computed and (where the platform allows) measured."""
    before, after = ctx.results["runtime"], ctx.results["verify"]["runtime"]
    shapes = resolve_input_shapes(original, ctx.input_shapes)
    figures: dict[str, Any] = {"level": options.ort_level, "ceiling_bytes": after.ceiling_bytes}
    for name, model, view in (("before", original, before), ("after", emitted, after)):
        measured = measure_peak(model, shapes, level=options.ort_level) if options.measure_memory else None
        view.measured_peak_bytes = measured.bytes if measured else None
        figures[name] = {"computed_peak_bytes": view.peak_bytes, "measured_peak_bytes": view.measured_peak_bytes,
                         "largest_bytes": view.largest_bytes, "largest_name": view.largest_name}
    tiled = ctx.results["tile"]
    figures["regions"] = [{"starts": r.starts, "end": r.end, "bands": r.bands, "projected_end": r.projected}
                          for r in tiled["plan"].regions]
    figures["tile_facts"] = [asdict(facts) for facts in tiled["regions"]]
    figures["split_convs"] = tiled["split_convs"]
    figures["lossless"] = not ctx.results["plan"].maps
    return figures


def source_name(source: str | os.PathLike | onnx.ModelProto) -> str:
    return "<ModelProto>" if isinstance(source, onnx.ModelProto) else str(source)


def as_ceiling(ceiling: Ceiling | str) -> Ceiling:
    return ceiling if isinstance(ceiling, Ceiling) else parse_ceiling(ceiling)


def build_context(model: onnx.ModelProto, input_shapes: Any, act_bytes: int | None,
                  log: Log = lambda message: None) -> PassContext:
    """The pass context of one model: checked bytes per element and resolved input shapes."""
    if act_bytes is not None and act_bytes < 1:
        raise InputError(f"--act-bytes must be at least 1, got {act_bytes}")
    pinned = parse_input_shapes(input_shapes, model)
    return PassContext(input_shapes=resolve_input_shapes(model, pinned), act_bytes=act_bytes, log=log)


def _unsupported_warnings(model: onnx.ModelProto) -> list[str]:
    """What `--plan-only` says about ops the training backend cannot run (compile refuses them)."""
    try:
        import torch  # noqa: F401 - only asks whether the extra is installed
    except ImportError:
        return ["torch is not installed: compile needs it (pip install 'fmcompress[torch]')"]
    from .backend import unsupported_ops

    ops = unsupported_ops(model)
    if not ops:
        return []
    listed = ", ".join(f"{op} x{count}" for op, count in sorted(ops.items()))
    return [f"compile will refuse this model: the training backend does not support {listed}"]


def _batch_size(model: onnx.ModelProto, ctx: PassContext, requested: int, warnings: list[str]) -> int:
    """The requested batch size, or 1 when the graph only runs at batch 1 (said in a warning)."""
    if requested == 1 or batch_is_free(model, input_specs(model, ctx.input_shapes)):
        return requested
    warnings.append("the model only runs at batch 1 (its graph fixes the batch dimension): calibrating and "
                    "measuring one sample at a time")
    return 1


def _dataset(model: onnx.ModelProto, ctx: PassContext, options: CompileOptions, classes: int | None,
             log: Log) -> Dataset:
    specs = input_specs(model, ctx.input_shapes)
    dataset = load_dataset(options.data, specs, num_samples=options.num_samples, mean=options.mean,
                           std=options.std, scale=options.scale, seed=options.seed, num_classes=classes)
    if len(dataset) < 2:
        raise InputError(f"need at least 2 samples of data (a calibration and a held-out part), got {len(dataset)}")
    skipped = f", {dataset.skipped} unreadable file(s) skipped" if dataset.skipped else ""
    log(f"data: {len(dataset)} sample(s) from {dataset.source}{skipped}")
    return dataset


def _num_classes(model: onnx.ModelProto, analysis: AnalysisReport) -> int | None:
    """Classes of a classifier's first output ([N, classes]), to check labels against."""
    first = analysis.tensor_shapes.get(model.graph.output[0].name)
    return int(first[1]) if first is not None and len(first) == 2 else None


def _set_metadata(model: onnx.ModelProto, plan: Plan, options: CompileOptions,
                  allocation: Allocation | None = None) -> None:
    entries = {
        "fmcompress.version": __version__,
        "fmcompress.method": options.method,
        "fmcompress.ceiling": plan.ceiling,
        "fmcompress.ceiling_bytes": str(plan.ceiling_bytes),
        "fmcompress.plan": json.dumps([{"name": m.name, "C": m.channels, "k": m.k} for m in plan.maps]),
    }
    if allocation is not None:
        entries.update({"fmcompress.traffic": allocation.budget, "fmcompress.traffic_bytes": str(allocation.budget_bytes),
                        "fmcompress.objective": allocation.objective})
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def _training_report(fit: FitProjectionsPass, config: TrainConfig) -> dict[str, Any] | None:
    """What training did (null for pca): settings, the epoch history, the best epoch and its score."""
    result = fit.training
    if result is None:
        return None
    return {"config": asdict(config), "device": result.device, "world_size": result.world_size,
            "metric": result.metric, "best_epoch": result.best_epoch, "best_score": result.best_score,
            "initial_score": result.initial_score, "block_stage": fit.block_stage,
            "stopped_early": result.stopped_early, "history": [asdict(r) for r in result.history]}


def ceiling_verdict(after: AnalysisReport, ceiling_bytes: int) -> dict[str, Any]:
    """Computed from the emitted model's analysis: the largest compressible stored map and the verdict."""
    largest = max((m.bytes for m in after.stored if m.compressible), default=0)
    over = [m.name for m in after.stored if m.compressible and m.bytes > ceiling_bytes]
    return {"max_stored_bytes_after": largest, "ceiling_ok": not over, "over_ceiling": over}


def _report(source, options: CompileOptions, plan: Plan, dataset: Dataset, calibration: Dataset,
            held_out: Dataset, ctx: PassContext, batch_size: int, warnings: list[str],
            timings: dict[str, float]) -> dict[str, Any]:
    before, verified, measured = ctx.results["memory"], ctx.results["verify"], ctx.results["measure"]
    after, fold_log = verified["after"], ctx.results["fold-projections"] or {}
    after_maps = {m.name: m for m in after.stored}
    maps = []
    for planned in plan.maps:
        stored = fold_log.get(planned.name, {}).get("stored", planned.name)
        maps.append({"name": planned.name, "shape": planned.shape, "C": planned.channels, "k": planned.k,
                     "bytes_before": planned.bytes_before, "bytes_after": planned.bytes_after, "stored_as": stored,
                     "stored_shape": after_maps[stored].shape if stored in after_maps else None,
                     "fold": fold_log.get(planned.name, {})})
    checks = {key: value for key, value in verified.items() if key not in ("after", "runtime")}
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "fmcompress_version": __version__,
        "model": source_name(source),
        "method": options.method,
        "ceiling": plan.ceiling,
        "ceiling_bytes": plan.ceiling_bytes,
        "act_bytes": plan.act_bytes,
        "input_shapes": {k: list(v) for k, v in before.input_shapes.items()},
        "batch_size": batch_size,
        "data": {"source": dataset.source, "surrogate": dataset.surrogate, "samples": len(dataset),
                 "calibration": len(calibration), "held_out": len(held_out), "skipped": dataset.skipped,
                 "labels": dataset.labels is not None},
        "maps": maps,
        "not_compressible": plan.not_compressible,
        "verification": {**checks, **ceiling_verdict(after, plan.ceiling_bytes)},
        "fidelity": measured["fidelity"],
        "gate": measured["gate"],
        "flops": measured["flops"],
        "latency_ms": measured["latency_ms"],
        "peaks": {"before": before.peaks, "after": after.peaks},
        "warnings": warnings,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }


def verify_pair(original_source, compressed_source, *, ceiling: Ceiling | str | None = None,
                input_shapes: Any = None, data: str | os.PathLike | None = None, num_samples: int = 64,
                batch_size: int = 16, act_bytes: int | None = None, mean: tuple[float, ...] = DEFAULT_MEAN,
                std: tuple[float, ...] = DEFAULT_STD, scale: float = DEFAULT_SCALE, seed: int = 0,
                threads: int = 1, log: Log = lambda m: None) -> dict[str, Any]:
    """`fmcompress verify`: checks and fidelity of any (original, compressed) pair."""
    original, compressed = load_model(original_source), load_model(compressed_source)
    _same_interface(original, compressed)
    check_model(compressed, str(compressed_source))
    options = CompileOptions(ceiling=ceiling or "1", input_shapes=input_shapes, act_bytes=act_bytes, data=data,
                             num_samples=num_samples, batch_size=batch_size, mean=mean, std=std, scale=scale,
                             seed=seed, threads=threads)
    ctx = build_context(original, input_shapes, act_bytes, log)
    parsed = as_ceiling(ceiling) if ceiling is not None else None
    before = MemoryAnalysisPass(parsed, source=str(original_source)).run(original, ctx).data
    ceiling_bytes = before.ceiling_bytes if parsed is not None else _recorded_ceiling(compressed)
    after = MemoryAnalysisPass(Ceiling(bytes=ceiling_bytes) if ceiling_bytes else None,
                               source=str(compressed_source)).run(compressed, ctx).data
    warnings: list[str] = []
    batch = _batch_size(original, ctx, batch_size, warnings)
    dataset = _dataset(original, ctx, options, _num_classes(original, before), log)
    warnings += data_warnings(dataset)
    ctx.results.update(memory=before, verify={"after": after})
    measured = MeasurePass(original, dataset, batch_size=batch, threads=threads, rounds=options.latency_rounds,
                           repeats=options.latency_repeats).run(compressed, ctx).data
    verdict = ceiling_verdict(after, ceiling_bytes) if ceiling_bytes else {"over_ceiling": []}
    return {"schema_version": VERIFY_SCHEMA_VERSION, "original": str(original_source),
            "compressed": str(compressed_source), "ceiling_bytes": ceiling_bytes, **verdict,
            "not_compressible_over_ceiling": [m.name for m in after.over_ceiling(include_inputs=True)
                                              if not m.compressible] if ceiling_bytes else [],
            "peaks": after.peaks, "data": {"source": dataset.source, "surrogate": dataset.surrogate,
                                           "samples": len(dataset)},
            "fidelity": measured["fidelity"], "flops": measured["flops"], "latency_ms": measured["latency_ms"],
            "warnings": warnings + measured["warnings"]}


def _same_interface(original: onnx.ModelProto, compressed: onnx.ModelProto) -> None:
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


def write_report(result: CompileResult, folder: str | os.PathLike) -> None:
    """report.json, report.md and memory.png (before/after with the ceiling line)."""
    from .modelio import write_bytes_atomic
    from .render import plot_memory, render_compile_markdown

    folder = Path(folder)
    write_bytes_atomic(json.dumps(result.report, indent=2).encode(), folder / "report.json")
    write_bytes_atomic(render_compile_markdown(result.report).encode(), folder / "report.md")
    stored_as = {entry["name"]: entry["stored_as"] for entry in result.report.get("maps", [])}
    plot_memory(result.before, folder / "memory.png", after=result.after, stored_as=stored_as)
