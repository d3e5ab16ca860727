"""compile's report: the dict of report.json (documented in docs/json.md), the emitted
model's metadata, and the files of `--report` (report.json, report.md, memory.png).

Everything here is read from the typed `PassContext` the pipeline filled, except the
runtime figures, which are those of the files themselves:

a. Every report has a `runtime` section: onnxruntime's peak before and after, computed
   (the runtime view, passes/runtime.py) and measured (fmcompress.memprobe, a fresh
   process) at the report's level: the one `--ort-level` names, else `all`, what a
   session a user opens runs. "after" is the emitted model exactly as it will be
   written (metadata set, value_info dropped); "before" is the input file as given.
b. With `--runtime ort` the views the pipeline planned and verified with are reused
   when they are at the report's level; otherwise the views are computed again there.
c. The peak rose when after > before + max(64 KiB, 5%) on the measured figures where both
   were measured (two processes measuring one model differ by a few percent), else when
   after > before on the computed ones (exact: the same file gives the same figure).
   Then a warning in `warnings` (and the last line) says so: plain compile fits the stored
   maps, while onnxruntime also materialises the full-width tensors beside them.
d. Where onnxruntime's figures cannot be had (the runtime view fails) the section is null
   and a warning says why; the compile itself stands.
e. The arena: `arena` gives both files' live bytes at every execution step, and `at_peak`
   the tensors alive at each one's peak step (passes/peak_plan.py `peak_facts`: largest
   first, the long-lived ones flagged). With `--peak`, `peak` is the peak plan (the size,
   the ceiling chosen, lossless or not, every trial) and the verified figures; the emitted
   model's measured peak is then VerifyPeakPass's (one probe of the same file and level).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from .. import __version__
from ..errors import InputError
from ..memprobe import SWITCH, PeakMeasurement, measure_peak, measurement_enabled
from ..passes import PassContext
from ..passes.allocate import Allocation, stored_traffic
from ..passes.peak_plan import arena, peak_facts
from ..passes.plan import Plan
from ..passes.quantize import quantize_report
from ..passes.runtime import analyze_runtime
from ..passes.runtime_plan import COVERING_REWRITES
from ..units import format_bytes
from .analysis import AnalysisReport, RuntimeView

if TYPE_CHECKING:
    from ..compiler import CompileOptions, CompileResult

REPORT_SCHEMA_VERSION = 2
ROSE_SLACK_BYTES = 64 * 1024  # rule c: a measurement moves by a few percent between processes
ROSE_SLACK_RATIO = 0.05
PROBE_ROUNDS = 5


def compile_report(source, original: onnx.ModelProto, emitted: onnx.ModelProto, options: CompileOptions,
                   ctx: PassContext, total_seconds: float) -> dict[str, Any]:
    """report.json's content for a compile that passed every check."""
    from ..compiler import source_name

    plan, before, after = ctx.plan, ctx.before, ctx.verification["after"]
    runtime = runtime_section(source, original, emitted, options, ctx)  # rules a-d; may add a warning
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
        "maps": _maps(plan, after, ctx.folds or {}, ctx.map_costs or [], ctx.equalized or []),
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
        "runtime": runtime,
        "int8": quantize_report(ctx),
    }


def plan_report(model: onnx.ModelProto, ctx: PassContext) -> dict[str, Any]:
    """`compile --plan-only`'s report: the plan, what compile would refuse, the Concats sunk."""
    report = {"plan": ctx.plan.to_dict(), "warnings": _unsupported_warnings(model), "sunk_concats": _sunk(ctx)}
    if ctx.runtime_plan is not None:
        report["runtime_plan"] = ctx.runtime_plan.to_dict()
    if ctx.peak is not None:
        report["peak"] = ctx.peak.to_dict()
    if ctx.allocation is not None:
        report["allocation"] = ctx.allocation.to_dict()
    return report


def _maps(plan: Plan, after: AnalysisReport, folds: dict[str, dict], costs: list[dict[str, Any]],
          equalized: list[dict[str, Any]]) -> list[dict[str, Any]]:
    after_maps = {m.name: m for m in after.stored}
    cost_of = {cost["name"]: {k: v for k, v in cost.items() if k != "name"} for cost in costs}
    spread_of = {entry["name"]: entry["spread"] for entry in equalized}
    maps = []
    for planned in plan.maps:
        stored = folds.get(planned.name, {}).get("stored", planned.name)
        maps.append({"name": planned.name, "before_activation_of": planned.stored_map,
                     "shape": planned.shape, "C": planned.channels, "k": planned.k,
                     "bytes_before": planned.bytes_before, "bytes_after": planned.bytes_after, "stored_as": stored,
                     "stored_shape": after_maps[stored].shape if stored in after_maps else None,
                     "fold": folds.get(planned.name, {}), "cost_alone": cost_of.get(planned.name),
                     "range_spread": spread_of.get(planned.name)})
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
            "initial_score": result.initial_score, "initial_loss": result.initial_loss,
            "block_stage": record.block_stage,
            "stopped_early": result.stopped_early,
            "stop_reason": result.stop_reason, "stopped_at_step": result.stopped_at_step,
            "history": [asdict(r) for r in result.history]}


def runtime_section(source, original: onnx.ModelProto, emitted: onnx.ModelProto, options: CompileOptions,
                    ctx: PassContext) -> dict[str, Any] | None:
    """Rules a-d: the runtime figures of the input and of the model as written; the views go
    into the analyses' peaks (`peaks.before.runtime`, `peaks.after.runtime`)."""
    from ..compiler import plan_level, report_level

    level = report_level(options)
    try:
        views = _runtime_views(original, emitted, ctx, level, reuse=options.runtime and level == plan_level(options))
    except InputError as exc:
        ctx.warnings.append(f"onnxruntime's runtime figures are unavailable: {exc}")
        return None
    ctx.before.runtime, ctx.verification["after"].runtime = views
    measuring = measurement_enabled(options.measure_memory)
    figures: dict[str, Any] = {"level": level, "measured": measuring, "measure_note": _measure_note(options)}
    models = (source if isinstance(source, str | os.PathLike) else original, emitted)
    for side, model, view in zip(("before", "after"), models, views, strict=True):
        measured = _verified_peak(ctx) if side == "after" else None  # --peak measured it already (rule e)
        if measured is None and measuring:
            measured = measure_peak(model, ctx.input_shapes, level=level, rounds=PROBE_ROUNDS)
        view.measured_peak_bytes = measured.bytes if measured else None
        if measured is not None and measured.bytes is None:
            figures["measure_note"] = measured.reason
        figures[side] = {"computed_peak_bytes": view.peak_bytes, "measured_peak_bytes": view.measured_peak_bytes,
                         "largest_bytes": view.largest_bytes, "largest_name": view.largest_name}
    figures.update(_rise(figures, bool(options.runtime)))
    if figures["warning"]:
        ctx.warnings.append(figures["warning"])
    measured = any(figures[side]["measured_peak_bytes"] is not None for side in ("before", "after"))
    ctx.log(f"onnxruntime ({level}): peak {_pair(figures, 'computed')} computed"
            + (f", {_pair(figures, 'measured')} measured{_unmeasured_note(figures)}" if measured else ""))
    if options.runtime:
        figures.update(_tiling(ctx, plan_level(options), views[1].ceiling_bytes))
    figures.update(_arena(views, ctx))
    return figures


def _arena(views: tuple[RuntimeView, RuntimeView], ctx: PassContext) -> dict[str, Any]:
    """Rule e."""
    sides = ("before", "after")
    figures: dict[str, Any] = {"arena": {side: arena(view) for side, view in zip(sides, views, strict=True)},
                               "at_peak": {side: peak_facts(view) for side, view in zip(sides, views, strict=True)}}
    if ctx.peak is not None:
        figures["peak"] = {**ctx.peak.to_dict(), "verified": ctx.verification.get("peak")}
    return figures


def _verified_peak(ctx: PassContext) -> PeakMeasurement | None:
    """The emitted model's peak as VerifyPeakPass measured it (the same file, level and rounds)."""
    verified = (ctx.verification or {}).get("peak") or {}
    if verified.get("measured_peak_bytes") is None:
        return None
    return PeakMeasurement(verified["measured_peak_bytes"], verified["rounds"])


def _runtime_views(original: onnx.ModelProto, emitted: onnx.ModelProto, ctx: PassContext, level: str,
                   reuse: bool) -> tuple[RuntimeView, RuntimeView]:
    """Rule b: the pipeline's views where they are at `level`, else both computed there."""
    if reuse and ctx.runtime_before is not None and "runtime" in ctx.verification:
        return ctx.runtime_before, ctx.verification["runtime"]
    return (analyze_runtime(original, ctx, level, ctx.plan.ceiling_bytes),
            analyze_runtime(emitted, ctx, level, ctx.plan.ceiling_bytes))


def _measure_note(options: CompileOptions) -> str | None:
    if not options.measure_memory:
        return "not measured: measure_memory is off"
    if not measurement_enabled():
        return f"not measured: {SWITCH}=0"
    return None


def _pair(figures: dict[str, Any], kind: str) -> str:
    """`before -> after`; a side the probe could not measure (memprobe rule f) reads "n/a"."""
    before, after = (figures[side][f"{kind}_peak_bytes"] for side in ("before", "after"))
    return " -> ".join("n/a" if value is None else format_bytes(value) for value in (before, after))


def _unmeasured_note(figures: dict[str, Any]) -> str:
    """Why a side reads "n/a" (the reason's first clause, e.g. "below the probe's resolution")."""
    unmeasured = [side for side in ("before", "after") if figures[side]["measured_peak_bytes"] is None]
    if not unmeasured or not figures.get("measure_note"):
        return ""
    return f" ({', '.join(unmeasured)}: {figures['measure_note'].split(':')[0]})"


def _rise(figures: dict[str, Any], tiled: bool) -> dict[str, Any]:
    """Rule c: whether the peak rose, on which figures, and the warning that says so."""
    measured = [figures[side]["measured_peak_bytes"] for side in ("before", "after")]
    basis = "measured" if None not in measured else "computed"
    before, after = (figures[side][f"{basis}_peak_bytes"] for side in ("before", "after"))
    slack = max(ROSE_SLACK_BYTES, ROSE_SLACK_RATIO * before) if basis == "measured" else 0
    rose = after > before + slack
    if not rose:
        return {"rose": False, "rose_basis": basis, "warning": None}
    why = ("every allocation is under the ceiling, but more of them are alive at once" if tiled else
           "compile fits the stored maps, and onnxruntime also allocates the full-width tensors beside them "
           "(each projected conv's output before its projection, explicit 1x1 convs); --runtime ort holds the "
           "ceiling in onnxruntime's own allocations")
    note = rose_note(figures, basis)
    return {"rose": True, "rose_basis": basis, "warning": f"{note} ({figures['level']} optimisations); {why}"}


def rose_note(figures: dict[str, Any], basis: str | None = None) -> str:
    """`onnxruntime's peak rose: 4884 -> 7764 KiB measured` (the compile's last line, rule c), on
    `basis` or else the section's `rose_basis`."""
    basis = basis or figures["rose_basis"]
    before, after = (figures[side][f"{basis}_peak_bytes"] for side in ("before", "after"))
    return f"onnxruntime's peak rose: {before // 1024} -> {after // 1024} KiB {basis}"


def _tiling(ctx: PassContext, level: str, ceiling_bytes: int | None) -> dict[str, Any]:
    """--runtime ort: the ceiling held, the level planned at, the regions tiled and the rewrites."""
    tiled = ctx.tiling
    figures: dict[str, Any] = {"plan_level": level, "ceiling_bytes": ctx.verification["runtime"].ceiling_bytes}
    figures["regions"] = [{"starts": r.starts, "end": r.end, "bands": r.bands, "columns": r.columns, "projected_end": r.projected}
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
    peak = (result.report.get("runtime") or {}).get("peak") or {}
    plot_memory(result.before, folder / "memory.png", after=result.after, stored_as=stored_as,
                peak_bytes=peak.get("peak_bytes"))
