"""compile's report: the dict of report.json (documented in docs/json.md), the emitted
model's metadata, and the files of `--report` (report.json, report.md, memory.png).

Everything here is read from the typed `PassContext` the pipeline filled; nothing is
computed again except the runtime peaks measured in a fresh process (fmcompress.memprobe).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from .. import __version__
from ..memprobe import measure_peak
from ..passes import PassContext
from ..passes.allocate import Allocation, stored_traffic
from ..passes.plan import Plan
from ..passes.runtime_plan import COVERING_REWRITES
from ..shapes import resolve_input_shapes
from .analysis import AnalysisReport

if TYPE_CHECKING:
    from ..compiler import CompileOptions, CompileResult

REPORT_SCHEMA_VERSION = 2


def compile_report(source, original: onnx.ModelProto, emitted: onnx.ModelProto, options: CompileOptions,
                   ctx: PassContext, total_seconds: float) -> dict[str, Any]:
    """report.json's content for a compile that passed every check."""
    from ..compiler import source_name

    plan, before, after = ctx.plan, ctx.before, ctx.verification["after"]
    if options.runtime:  # both views' runtime peaks in the report's peaks
        before.runtime, after.runtime = ctx.runtime_before, ctx.verification["runtime"]
    dataset, measured = ctx.dataset, ctx.measurement
    checks = {key: value for key, value in ctx.verification.items() if key not in ("after", "runtime")}
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "fmcompress_version": __version__,
        "model": source_name(source),
        "method": options.method,
        "ceiling": plan.ceiling,
        "ceiling_bytes": plan.ceiling_bytes,
        "act_bytes": plan.act_bytes,
        "input_shapes": {k: list(v) for k, v in before.input_shapes.items()},
        "batch_size": ctx.batch_size,
        "data": {"source": dataset.source, "surrogate": dataset.surrogate, "samples": len(dataset),
                 "calibration": len(ctx.calibration), "held_out": len(ctx.held_out),
                 "skipped": dataset.skipped, "labels": dataset.labels is not None},
        "maps": _maps(plan, after, ctx.folds or {}),
        "not_compressible": plan.not_compressible,
        "verification": {**checks, **ceiling_verdict(after, plan.ceiling_bytes)},
        "fidelity": measured["fidelity"],
        "gate": measured["gate"],
        "flops": measured["flops"],
        "latency_ms": measured["latency_ms"],
        "peaks": {"before": before.peaks, "after": after.peaks},
        "warnings": ctx.warnings,
        "timings_s": {k: round(v, 3) for k, v in {"total": total_seconds, **ctx.timings}.items()},
        "training": _training(ctx),
        "sunk_concats": _sunk(ctx),
        "allocation": ctx.allocation.to_dict(stored_traffic(after)) if ctx.allocation is not None else None,
        **({"runtime": _runtime(original, emitted, ctx, options)} if options.runtime else {}),
    }


def plan_report(model: onnx.ModelProto, ctx: PassContext) -> dict[str, Any]:
    """`compile --plan-only`'s report: the plan, what compile would refuse, the Concats sunk."""
    report = {"plan": ctx.plan.to_dict(), "warnings": _unsupported_warnings(model), "sunk_concats": _sunk(ctx)}
    if ctx.runtime_plan is not None:
        report["runtime_plan"] = ctx.runtime_plan.to_dict()
    if ctx.allocation is not None:
        report["allocation"] = ctx.allocation.to_dict()
    return report


def _maps(plan: Plan, after: AnalysisReport, folds: dict[str, dict]) -> list[dict[str, Any]]:
    after_maps = {m.name: m for m in after.stored}
    maps = []
    for planned in plan.maps:
        stored = folds.get(planned.name, {}).get("stored", planned.name)
        maps.append({"name": planned.name, "shape": planned.shape, "C": planned.channels, "k": planned.k,
                     "bytes_before": planned.bytes_before, "bytes_after": planned.bytes_after, "stored_as": stored,
                     "stored_shape": after_maps[stored].shape if stored in after_maps else None,
                     "fold": folds.get(planned.name, {})})
    return maps


def _sunk(ctx: PassContext) -> list[dict[str, Any]]:
    return [asdict(fact) for fact in ctx.sunk or []]


def _training(ctx: PassContext) -> dict[str, Any] | None:
    """What training did (null for pca): settings, the epoch history, the best epoch and its score."""
    record = ctx.training
    if record is None or record.result is None:
        return None
    result = record.result
    return {"config": asdict(record.config), "device": result.device, "world_size": result.world_size,
            "metric": result.metric, "best_epoch": result.best_epoch, "best_score": result.best_score,
            "initial_score": result.initial_score, "block_stage": record.block_stage,
            "stopped_early": result.stopped_early, "history": [asdict(r) for r in result.history]}


def _runtime(original: onnx.ModelProto, emitted: onnx.ModelProto, ctx: PassContext,
             options: CompileOptions) -> dict[str, Any]:
    """Runtime peak before and after, computed and (where the platform allows) measured."""
    before, after = ctx.runtime_before, ctx.verification["runtime"]
    shapes = resolve_input_shapes(original, ctx.input_shapes)
    figures: dict[str, Any] = {"level": options.ort_level, "ceiling_bytes": after.ceiling_bytes}
    for name, model, view in (("before", original, before), ("after", emitted, after)):
        measured = measure_peak(model, shapes, level=options.ort_level) if options.measure_memory else None
        view.measured_peak_bytes = measured.bytes if measured else None
        figures[name] = {"computed_peak_bytes": view.peak_bytes, "measured_peak_bytes": view.measured_peak_bytes,
                         "largest_bytes": view.largest_bytes, "largest_name": view.largest_name}
    tiled = ctx.tiling
    figures["regions"] = [{"starts": r.starts, "end": r.end, "bands": r.bands, "projected_end": r.projected}
                          for r in tiled["plan"].regions]
    figures["tile_facts"] = [asdict(facts) for facts in tiled["regions"]]
    figures["split_convs"] = tiled["split_convs"]
    for key in COVERING_REWRITES:  # chunked, split_columns, chunked_batch_axes
        figures[key] = tiled.get(key, [])
    figures["lossless"] = not ctx.plan.maps
    return figures


def ceiling_verdict(after: AnalysisReport, ceiling_bytes: int) -> dict[str, Any]:
    """Computed from the emitted model's analysis: the largest compressible stored map and the verdict."""
    largest = max((m.bytes for m in after.stored if m.compressible), default=0)
    over = [m.name for m in after.stored if m.compressible and m.bytes > ceiling_bytes]
    return {"max_stored_bytes_after": largest, "ceiling_ok": not over, "over_ceiling": over}


def _unsupported_warnings(model: onnx.ModelProto) -> list[str]:
    """What `--plan-only` says about ops the training backend cannot run (compile refuses them)."""
    try:
        import torch  # noqa: F401 - only asks whether the extra is installed
    except ImportError:
        return ["torch is not installed: compile needs it (pip install 'fmcompress[torch]')"]
    from ..backend import unsupported_ops

    ops = unsupported_ops(model)
    if not ops:
        return []
    listed = ", ".join(f"{op} x{count}" for op, count in sorted(ops.items()))
    return [f"compile will refuse this model: the training backend does not support {listed}"]


def set_metadata(model: onnx.ModelProto, plan: Plan, options: CompileOptions,
                 allocation: Allocation | None = None) -> None:
    """What compile did, in the emitted model's metadata_props (fmcompress.*)."""
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


def write_report(result: CompileResult, folder: str | os.PathLike) -> None:
    """report.json, report.md and memory.png (before/after with the ceiling line)."""
    from ..modelio import write_bytes_atomic
    from .markdown import render_compile_markdown
    from .plot import plot_memory

    folder = Path(folder)
    write_bytes_atomic(json.dumps(result.report, indent=2).encode(), folder / "report.json")
    write_bytes_atomic(render_compile_markdown(result.report).encode(), folder / "report.md")
    stored_as = {entry["name"]: entry["stored_as"] for entry in result.report.get("maps", [])}
    plot_memory(result.before, folder / "memory.png", after=result.after, stored_as=stored_as)
