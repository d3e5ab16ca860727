"""`fmcompress compile`: the options bound to CompileOptions, the run, the outputs written together."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

# compile_model and write_report are looked up on the module at call time (tests replace them)
from .. import compiler
from ..errors import Interrupted
from .binding import (
    BUDGET,
    GATES,
    METHOD,
    PLACEMENT,
    TRAINING,
    bound_options,
    compile_options,
    data_options,
)
from .failures import handle_errors, warn
from .outputs import check_outputs, default_checkpoint, default_output, not_compressible_note

Log = Callable[[str], None]


@click.command(name="compile")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@bound_options(BUDGET)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the compressed model [default: MODEL.fmc.onnx].")
@METHOD.option()
@PLACEMENT.option()
@data_options()
@bound_options(TRAINING)
@click.option("--json-log", type=click.Path(dir_okay=False, path_type=Path),
              help="Write training progress as JSON lines (one event a line) to this file.")
@bound_options(GATES)
@click.option("--plan-only", is_flag=True, help="Only plan (maps and ranks); with --json, write the plan there.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the report (or the plan with --plan-only) as JSON.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write report.json, report.md and memory.png into this folder.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
@handle_errors
def compile_command(model: Path, output: Path | None, json_log: Path | None, plan_only: bool,
                    json_path: Path | None, report_dir: Path | None, quiet: bool, **bound: Any) -> None:
    """Compress MODEL so that every stored feature map fits under --ceiling (and/or their total under --traffic).

    Plans a rank per map above the ceiling, fits projections on calibration data,
    folds them into the graph, verifies the result (onnx.checker, onnxruntime,
    agreement with the training backend, the ceiling, the fidelity gates) and writes it
    atomically. Graph inputs and outputs are never compressed: the last line names those
    above the ceiling. The report gives onnxruntime's peak before and after, computed and
    measured (--ort-level, default all); the last line says when it rose.
    """
    from ..reports.progress import training_monitor

    if bound["ceiling"] is None and bound["traffic"] is None and bound["peak"] is None and not bound["int8"]:
        raise click.UsageError("missing option '--ceiling' (or '--traffic', '--peak' or '--int8')",
                               ctx=click.get_current_context())
    given = click.get_current_context().get_parameter_source("calibrate") is click.core.ParameterSource.COMMANDLINE
    if given and not bound["int8"]:
        raise click.UsageError("--calibrate sets the ranges of --int8's quantization; add --int8",
                               ctx=click.get_current_context())
    output = output or default_output(model)
    trains = bound["method"] != "pca" and not plan_only
    checkpoint = (bound["checkpoint"] or default_checkpoint(model, output)) if trains else None
    primary = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes and talks
    quiet = quiet or not primary
    check_outputs([(None if plan_only else output, "file"), (json_path, "file"),
                   (None if plan_only else report_dir, "dir"), (checkpoint, "file"), (json_log, "file")],
                  [model, bound["data"]])
    log: Log = (lambda message: None) if quiet else (lambda message: click.echo(message, err=True))
    interrupted = False
    try:
        with training_monitor(quiet=quiet, json_log=json_log if primary else None, log=log) as monitor:
            options = compile_options(bound, checkpoint=checkpoint if primary else None, monitor=monitor)
            result = _compile_resumably(model, options, plan_only, log, checkpoint)
        if primary:
            _write_outputs(result, output, json_path, report_dir, plan_only)
    except Interrupted:
        interrupted = True
        raise
    finally:
        if checkpoint is not None and primary and not interrupted:
            checkpoint.unlink(missing_ok=True)  # only an interrupted run keeps its checkpoint


def _compile_resumably(model: Path, options: compiler.CompileOptions, plan_only: bool, log: Log,
                       checkpoint: Path | None) -> compiler.CompileResult:
    """compile_model; on Ctrl-C during training, say where the checkpoint is and how to resume."""
    try:
        return compiler.compile_model(model, options, plan_only=plan_only, log=log)
    except KeyboardInterrupt as exc:
        if checkpoint is not None and checkpoint.exists():
            raise Interrupted(f"interrupted; no model was written. The training checkpoint {checkpoint} holds the "
                              "last finished epoch: run the same command with --resume to continue") from exc
        raise


def _write_outputs(result: compiler.CompileResult, output: Path, json_path: Path | None,
                   report_dir: Path | None, plan_only: bool) -> None:
    warn(result.report.get("warnings", []))
    blocked = not_compressible_note(result.report.get("not_compressible", result.plan.not_compressible),
                                    result.plan.ceiling_bytes)
    if plan_only:
        _write_plan(result, json_path, blocked)
        return
    import json

    from ..modelio import output_transaction, save_model_atomic, write_bytes_atomic

    with output_transaction():  # the model, the JSON and the report land together or not at all
        save_model_atomic(result.model, output)
        if json_path:
            write_bytes_atomic(json.dumps(result.report, indent=2).encode(), json_path)
        if report_dir:
            compiler.write_report(result, report_dir)
    runtime = result.report.get("runtime")
    if runtime and "regions" in runtime:  # --runtime ort: the ceiling held is onnxruntime's: the stored view's maps may exist only in bands
        blocked = not_compressible_note([entry for entry in result.report.get("not_compressible", [])
                                         if isinstance(entry, dict) and entry.get("role") in ("input", "output")],
                                        result.plan.ceiling_bytes).replace("not compressible and above", "above")
        held = (f"{len(runtime['regions'])} region(s) tiled; every onnxruntime allocation but the graph's "
                f"inputs and outputs <= {result.plan.ceiling_bytes} B")
    else:
        held = f"every compressible stored map <= {result.plan.ceiling_bytes} B"
    click.echo(f"wrote {output}: {len(result.plan.maps)} map(s) compressed; {held}"
               f"{_traffic_note(result.report.get('allocation'))}{_peak_note(runtime)}{blocked}{_rose_note(runtime)}")


def _peak_note(runtime: dict[str, Any] | None) -> str:
    """`; onnxruntime's peak 480.0 KiB computed, 452.0 KiB measured <= 512.0 KiB (lossless)` or ''."""
    verified = ((runtime or {}).get("peak") or {}).get("verified")
    if not verified:
        return ""
    from ..units import format_bytes

    measured = verified.get("measured_peak_bytes")
    return (f"; onnxruntime's peak {format_bytes(verified['computed_peak_bytes'])} computed"
            + (f", {format_bytes(measured)} measured" if measured is not None else "")
            + (f" <= {format_bytes(verified['peak_bytes'])}" if verified.get("peak_bytes") is not None
               else f" from {format_bytes(runtime['peak']['before_peak_bytes'])}, the smallest tiling alone reaches")
            + f" ({'lossless' if runtime['peak']['lossless'] else 'projected'})")


def _rose_note(runtime: dict[str, Any] | None) -> str:
    """`; onnxruntime's peak rose: 4884 -> 7764 KiB measured` or '' (reports/compile.py rule c)."""
    from ..reports.compile import rose_note

    return f"; {rose_note(runtime)}" if runtime and runtime.get("rose") else ""


def _write_plan(result: compiler.CompileResult, json_path: Path | None, blocked: str) -> None:
    """--plan-only: the plan as JSON (with the runtime plan and allocation), a line per map."""
    import json

    from ..modelio import write_bytes_atomic

    if json_path:
        plan = result.plan.to_dict()
        for key in ("runtime_plan", "allocation", "peak"):
            if key in result.report:
                plan[key] = result.report[key]
        write_bytes_atomic(json.dumps(plan, indent=2).encode(), json_path)
    for entry in result.plan.maps:
        click.echo(f"{entry.name}  {'x'.join(map(str, entry.shape))}  k={entry.k}")
    if not result.plan.maps:
        click.echo(f"nothing to compress: every compressible stored map is at or under "
                   f"{result.plan.ceiling_bytes} B{blocked}")


def _traffic_note(allocation: dict[str, Any] | None) -> str:
    """`; stored traffic 229.0 KiB -> 76.1 KiB (3.01x, budget 3x)` or ''."""
    if not allocation:
        return ""
    from ..units import format_bytes

    return (f"; stored traffic {format_bytes(allocation['traffic_before_bytes'])} -> "
            f"{format_bytes(allocation['traffic_after_bytes'])} ({allocation['traffic_ratio']:.2f}x, budget "
            f"{allocation['budget']})")
