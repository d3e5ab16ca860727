"""`compile` and `verify`: plan, calibrate, project, fold, emit, verify and report.

The pipeline of DESIGN.md: the analysis and plan passes choose the maps and
ranks; the training backend (torch executor) fits projections on calibration
data; BatchNorm and projection folding rewrite the graph; the emitted model is
checked (onnx.checker, onnxruntime, agreement with the executor, re-analysis
under the ceiling) and measured on held-out data. Nothing is written here: the
caller writes the model and the report atomically once everything passed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from . import __version__
from .data import DEFAULT_MEAN, DEFAULT_SCALE, DEFAULT_STD, Dataset, input_specs, load_dataset
from .errors import InputError, VerificationError
from .featuremaps import Projection
from .metrics import count_flops, fidelity, ort_latency, ort_session, run_ort
from .modelio import load_model
from .passes import PassContext
from .passes.fold import FoldProjectionsPass
from .passes.fold_bn import FoldBatchNormPass
from .passes.memory import MemoryAnalysisPass
from .passes.plan import Plan, PlanPass
from .report import AnalysisReport
from .shapes import graph_inputs, parse_input_shapes, resolve_input_shapes
from .units import Ceiling, parse_ceiling

METHODS = ("pca",)
AGREEMENT_TOLERANCE = 1e-4  # relative error of the emitted model against the executor
Log = Callable[[str], None]


@dataclass
class CompileOptions:
    ceiling: Ceiling | str
    input_shapes: Any = None  # ["x=1,3,224,224"] or {"x": (1, 3, 224, 224)}
    act_bytes: int | None = None
    method: str = "pca"
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


@dataclass
class CompileResult:
    model: onnx.ModelProto | None  # None for a plan-only run
    plan: Plan
    before: AnalysisReport
    after: AnalysisReport | None = None
    report: dict[str, Any] = field(default_factory=dict)


def compile_model(source: str | os.PathLike | onnx.ModelProto, options: CompileOptions, *,
                  plan_only: bool = False, log: Log = lambda message: None) -> CompileResult:
    """Run the whole pipeline in memory; raise InputError / VerificationError on failure."""
    if options.method not in METHODS:
        raise InputError(f"unknown method {options.method!r}; available: {', '.join(METHODS)}")
    started = time.perf_counter()
    model = load_model(source)
    ctx = build_context(model, options.input_shapes, options.act_bytes)
    ceiling = options.ceiling if isinstance(options.ceiling, Ceiling) else parse_ceiling(options.ceiling)
    before = MemoryAnalysisPass(ceiling, source=source_name(source)).run(model, ctx).data
    ctx.results["memory"] = before
    plan = PlanPass(ceiling).run(model, ctx).data
    log(f"plan: {len(plan.maps)} map(s) above {plan.ceiling} ({plan.ceiling_bytes} B)")
    if plan_only:
        return CompileResult(None, plan, before, report={"plan": plan.to_dict()})
    dataset = _dataset(model, ctx, options, _num_classes(model, before), log)
    calibration, held_out = dataset.split(options.held_out_fraction, seed=options.seed)
    executor = _executor(model)
    timings = {"analysis_and_plan": time.perf_counter() - started}
    projections = _fit(executor, plan, calibration, options, log)
    timings["calibration"] = time.perf_counter() - started - timings["analysis_and_plan"]
    folded, fold_log = _fold(model, plan, projections, ctx, options)
    check = verify_against_executor(folded, executor, projections, held_out, options.batch_size)
    after = _check_ceiling(folded, plan.ceiling_bytes, ctx, source_name(source))
    log("verified: onnx.checker, onnxruntime, executor agreement, ceiling")
    figures = measure(model, folded, held_out, before, after, options, log)
    timings["total"] = time.perf_counter() - started
    report = _report(source, options, plan, dataset, calibration, held_out, before, after, fold_log,
                     check, figures, timings)
    return CompileResult(folded, plan, before, after, report)


def source_name(source: str | os.PathLike | onnx.ModelProto) -> str:
    return "<ModelProto>" if isinstance(source, onnx.ModelProto) else str(source)


def build_context(model: onnx.ModelProto, input_shapes: Any, act_bytes: int | None) -> PassContext:
    """The pass context of one model: checked bytes per element and resolved input shapes."""
    if act_bytes is not None and act_bytes < 1:
        raise InputError(f"--act-bytes must be at least 1, got {act_bytes}")
    pinned = parse_input_shapes(input_shapes, model)
    return PassContext(input_shapes=resolve_input_shapes(model, pinned), act_bytes=act_bytes)


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


def _executor(model: onnx.ModelProto):
    try:
        from .backend import OnnxModule
    except ImportError as exc:  # torch is an extra
        raise InputError(f"compile needs torch: pip install 'fmcompress[torch]' ({exc})") from None
    return OnnxModule(model).eval()


def _torch_batches(dataset: Dataset, batch_size: int, names: list[str]):
    import torch

    def batches():
        for inputs, _ in dataset.batches(batch_size):
            yield tuple(torch.from_numpy(np.ascontiguousarray(inputs[name])) for name in names)

    return batches


def _fit(executor, plan: Plan, calibration: Dataset, options: CompileOptions, log: Log) -> dict[str, Projection]:
    from .backend.projection import fit_pca

    maps = [(m.name, m.channels, m.k) for m in plan.maps]
    batches = _torch_batches(calibration, options.batch_size, list(executor.input_names))

    def progress(i: int, name: str) -> None:
        log(f"pca {i + 1}/{len(maps)}: {name} {plan.maps[i].channels} -> {plan.maps[i].k} channels")

    return fit_pca(executor, maps, batches, progress=progress)


def _fold(model: onnx.ModelProto, plan: Plan, projections: dict[str, Projection], ctx: PassContext,
          options: CompileOptions) -> tuple[onnx.ModelProto, dict[str, Any]]:
    folded = FoldBatchNormPass().run(model, ctx).model
    result = FoldProjectionsPass(projections).run(folded, ctx) if projections else None
    folded = result.model if result else folded
    _set_metadata(folded, plan, options)
    try:
        onnx.checker.check_model(folded, full_check=True)
    except Exception as exc:  # the checker raises several exception types
        raise VerificationError(f"the emitted model fails onnx.checker: {str(exc).splitlines()[0]}") from None
    return folded, (result.data if result else {})


def _set_metadata(model: onnx.ModelProto, plan: Plan, options: CompileOptions) -> None:
    entries = {
        "fmcompress.version": __version__,
        "fmcompress.method": options.method,
        "fmcompress.ceiling": plan.ceiling,
        "fmcompress.ceiling_bytes": str(plan.ceiling_bytes),
        "fmcompress.plan": json.dumps([{"name": m.name, "C": m.channels, "k": m.k} for m in plan.maps]),
    }
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def verify_against_executor(folded: onnx.ModelProto, executor, projections: dict[str, Projection],
                            held_out: Dataset, batch_size: int, samples: int = 8) -> dict[str, Any]:
    """The emitted model's outputs equal the executor-with-projections outputs (relative 1e-4)."""
    import torch

    from .backend.projection import install_projections

    subset = held_out.subset(np.arange(min(samples, len(held_out))))
    try:
        session = ort_session(folded)
    except InputError as exc:
        raise VerificationError(str(exc)) from None
    emitted = run_ort(session, subset.batches(batch_size))
    install_projections(executor, projections)
    try:
        with torch.no_grad():
            names = list(executor.input_names)
            reference = [torch.cat(outs).numpy() for outs in zip(*(
                executor(*batch) for batch in _torch_batches(subset, batch_size, names)()), strict=True)]
    finally:
        executor.clear_transforms()
    worst = max(_relative(e, r) for e, r in zip(emitted, reference, strict=True))
    if not worst <= AGREEMENT_TOLERANCE:
        raise VerificationError(f"the emitted model disagrees with the training backend: relative error "
                                f"{worst:.3g} > {AGREEMENT_TOLERANCE:g}")
    return {"checker": "ok", "onnxruntime": "ok", "executor_relative_error": worst, "samples": len(subset)}


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))


def _check_ceiling(model: onnx.ModelProto, ceiling_bytes: int, ctx: PassContext, source: str) -> AnalysisReport:
    after = MemoryAnalysisPass(Ceiling(bytes=ceiling_bytes), source=source).run(model, ctx).data
    over = after.over_ceiling()
    if over:
        names = ", ".join(f"{m.name} ({m.bytes} B)" for m in over[:5])
        raise VerificationError(f"{len(over)} stored feature map(s) of the emitted model are above the ceiling "
                                f"of {ceiling_bytes} B: {names}")
    return after


def measure(original: onnx.ModelProto, compressed: onnx.ModelProto, held_out: Dataset, before: AnalysisReport,
            after: AnalysisReport, options: CompileOptions, log: Log) -> dict[str, Any]:
    """Fidelity on held-out data, FLOPs and onnxruntime latency, original against compressed."""
    reference = run_ort(original, held_out.batches(options.batch_size))
    candidate = run_ort(compressed, held_out.batches(options.batch_size))
    quality = fidelity(reference, candidate, held_out.labels).to_dict()
    flops = {"before": count_flops(original, before.tensor_shapes),
             "after": count_flops(compressed, after.tensor_shapes)}
    flops["ratio"] = flops["after"] / flops["before"] if flops["before"] else None
    one = {name: array[:1] for name, array in held_out.inputs.items()}
    latency = ort_latency({"original": original, "compressed": compressed}, one, repeats=options.latency_repeats)
    latency["ratio"] = latency["compressed"] / latency["original"]
    log(f"fidelity: {_fidelity_line(quality)}; latency ratio {latency['ratio']:.2f}")
    return {"fidelity": quality, "flops": flops, "latency_ms": latency}


def _fidelity_line(quality: dict[str, Any]) -> str:
    parts = []
    if quality.get("top1_agreement") is not None:
        parts.append(f"top-1 agreement {quality['top1_agreement']:.1%}")
    if quality.get("accuracy_candidate") is not None:
        parts.append(f"accuracy {quality['accuracy_reference']:.1%} -> {quality['accuracy_candidate']:.1%}")
    parts.append(f"cosine {quality['cosine_similarity']:.4f}")
    parts.append(f"relative error {quality['relative_error']:.3g}")
    return ", ".join(parts)


def _report(source, options: CompileOptions, plan: Plan, dataset: Dataset, calibration: Dataset,
            held_out: Dataset, before: AnalysisReport, after: AnalysisReport, fold_log: dict[str, Any],
            check: dict[str, Any], figures: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    after_maps = {m.name: m for m in after.stored}
    maps = []
    for planned in plan.maps:
        stored = fold_log.get(planned.name, {}).get("stored", planned.name)
        entry = {"name": planned.name, "shape": planned.shape, "C": planned.channels, "k": planned.k,
                 "bytes_before": planned.bytes_before, "bytes_after": planned.bytes_after, "stored_as": stored,
                 "stored_shape": after_maps[stored].shape if stored in after_maps else None,
                 "fold": fold_log.get(planned.name, {})}
        maps.append(entry)
    return {
        "schema_version": 1,
        "fmcompress_version": __version__,
        "model": source_name(source),
        "method": options.method,
        "ceiling": plan.ceiling,
        "ceiling_bytes": plan.ceiling_bytes,
        "act_bytes": plan.act_bytes,
        "input_shapes": {k: list(v) for k, v in before.input_shapes.items()},
        "data": {"source": dataset.source, "surrogate": dataset.surrogate, "samples": len(dataset),
                 "calibration": len(calibration), "held_out": len(held_out), "skipped": dataset.skipped,
                 "labels": dataset.labels is not None},
        "maps": maps,
        "not_compressible": plan.not_compressible,
        "verification": {**check, "max_stored_bytes_after": max((m.bytes for m in after.stored if m.role == "map"),
                                                                 default=0), "ceiling_ok": True},
        **figures,
        "peaks": {"before": before.peaks, "after": after.peaks},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }


def verify_pair(original_source, compressed_source, *, ceiling: Ceiling | str | None = None,
                input_shapes: Any = None, data: str | os.PathLike | None = None, num_samples: int = 64,
                batch_size: int = 16, act_bytes: int | None = None, log: Log = lambda m: None) -> dict[str, Any]:
    """`fmcompress verify`: checks and fidelity of any (original, compressed) pair."""
    original, compressed = load_model(original_source), load_model(compressed_source)
    _same_interface(original, compressed)
    try:
        onnx.checker.check_model(compressed, full_check=True)
    except Exception as exc:  # the checker raises several exception types
        raise VerificationError(f"{compressed_source}: fails onnx.checker: {str(exc).splitlines()[0]}") from None
    options = CompileOptions(ceiling=ceiling or "1", input_shapes=input_shapes, act_bytes=act_bytes, data=data,
                             num_samples=num_samples, batch_size=batch_size)
    ctx = build_context(original, input_shapes, act_bytes)
    parsed = parse_ceiling(ceiling) if isinstance(ceiling, str) else ceiling
    before = MemoryAnalysisPass(parsed, source=str(original_source)).run(original, ctx).data
    ceiling_bytes = before.ceiling_bytes if parsed is not None else _recorded_ceiling(compressed)
    after = MemoryAnalysisPass(Ceiling(bytes=ceiling_bytes) if ceiling_bytes else None,
                               source=str(compressed_source)).run(compressed, ctx).data
    dataset = _dataset(original, ctx, options, _num_classes(original, before), log)
    figures = measure(original, compressed, dataset, before, after, options, log)
    over = after.over_ceiling() if ceiling_bytes else []
    return {"ceiling_bytes": ceiling_bytes, "over_ceiling": [m.name for m in over],
            "peaks": after.peaks, "data": {"source": dataset.source, "surrogate": dataset.surrogate,
                                           "samples": len(dataset)}, **figures}


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
    from .report import plot_memory, render_compile_markdown

    folder = Path(folder)
    write_bytes_atomic(json.dumps(result.report, indent=2).encode(), folder / "report.json")
    write_bytes_atomic(render_compile_markdown(result.report).encode(), folder / "report.md")
    plot_memory(result.before, folder / "memory.png", after=result.after)
