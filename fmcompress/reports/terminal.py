"""The `analyze` and `codec` tables on the terminal (rich).

Tables list one view: `stored` and `strict` list their tensors, `live` the live curve
(step, kernel group, bytes) and then the maps alive at its peak; `runtime` onnxruntime's
allocations and then those alive at its peak. On a terminal long names fold to the
console's width; anywhere else (CI logs, pipes, files) the table is as wide as its longest
name, so names are never broken. Tensor names are printed as plain text, never as rich markup.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..featuremaps import FeatureMap
from ..units import format_bytes
from . import format_shape
from .analysis import AnalysisReport, RuntimeView


def print_analysis(report: AnalysisReport, mode: str = "stored", top: int | None = None,
                   console: Console | None = None) -> None:
    """The table of one view (stored, live or strict), and a summary of all three."""
    console = console or Console()
    if mode == "runtime":
        if report.runtime is None:
            raise ValueError("print_analysis(mode='runtime') needs a report made with a runtime view")
        _print_table(console, _runtime_table(report, top, console.is_terminal))
        _print_table(console, _runtime_alive_table(report.runtime, console.is_terminal))
    elif mode == "live":
        _print_table(console, _live_table(report, top, console.is_terminal))
        _print_table(console, _alive_table(report, console.is_terminal))
    else:
        _print_table(console, _maps_table(report, mode, top, console.is_terminal))
    for line in _summary_lines(report):
        console.print(Text(line), soft_wrap=not console.is_terminal)


def _print_table(console: Console, table: Table) -> None:
    """On a terminal, fit the console; elsewhere widen it to the table so that no name is broken."""
    if console.is_terminal:
        console.print(table)
        return
    needed = console.measure(table, options=console.options.update_width(1 << 16)).maximum
    previous = console.width
    console.width = max(previous, needed)
    try:
        console.print(table)
    finally:
        console.width = previous


def _table(title: str, columns: list[tuple[str, str]], terminal: bool) -> Table:
    """Columns are (header, justify); cells fold on a terminal only (elsewhere `_print_table`
    widens the console to the table, so nothing needs to)."""
    table = Table(title=title, title_justify="left")
    for header, justify in columns:
        table.add_column(header, justify=justify, overflow="fold", no_wrap=not terminal)
    return table


def _title(report: AnalysisReport, what: str) -> str:
    ceiling = f" — ceiling {report.ceiling} = {report.ceiling_bytes} B" if report.ceiling else ""
    return f"{what} of {Path(report.source).name}{ceiling}"


def _maps_table(report: AnalysisReport, mode: str, top: int | None, terminal: bool) -> Table:
    maps = report.strict if mode == "strict" else report.stored
    rows = sorted(maps, key=lambda m: -m.bytes)[:top] if top else maps
    table = _table(_title(report, f"{mode} view"), [("#", "right"), ("feature map", "left"), ("shape", "left"),
                                                    ("bytes", "right"), ("producer", "left"), ("", "left")], terminal)
    for i, fmap in enumerate(rows):
        style = "bold red" if fmap.over_ceiling and fmap.not_compressible_reason is None else None
        producer = f"{fmap.producer_op} {fmap.producer}".strip() or "(graph input)"
        table.add_row(str(i), Text(fmap.name), format_shape(fmap.shape), f"{fmap.bytes:,}", Text(producer), _mark(fmap),
                      style=style)
    return table


def _live_table(report: AnalysisReport, top: int | None, terminal: bool) -> Table:
    """The live curve in execution order; with `top`, only the N fullest steps."""
    points = report.live
    if top:
        points = sorted(sorted(points, key=lambda p: -p.bytes)[:top], key=lambda p: p.step)
    peak = report.summary["live"].live_peak_step
    table = _table(_title(report, "live memory"), [("step", "right"), ("kernel group", "left"),
                                                   ("bytes alive", "right"), ("", "left")], terminal)
    for point in points:
        table.add_row(str(point.step), Text(point.node), f"{point.bytes:,}", "peak" if point.step == peak else "",
                      style="bold" if point.step == peak else None)
    return table


def _alive_table(report: AnalysisReport, terminal: bool) -> Table:
    summary = report.summary["live"]
    alive = sorted(report.alive_at(summary.live_peak_step), key=lambda m: -m.bytes)
    table = _table(f"stored maps alive at the peak (step {summary.live_peak_step}, "
                   f"{format_bytes(summary.live_peak_bytes)})",
                   [("feature map", "left"), ("shape", "left"), ("bytes", "right"), ("written at", "right"),
                    ("last read at", "right")], terminal)
    for fmap in alive:
        table.add_row(Text(fmap.name), format_shape(fmap.shape), f"{fmap.bytes:,}", str(fmap.step),
                      str(max(fmap.last_use, fmap.step)))
    return table


def _runtime_table(report: AnalysisReport, top: int | None, terminal: bool) -> Table:
    """onnxruntime's allocations in its execution order; with `top`, only the N largest."""
    view = report.runtime
    assert view is not None
    tensors = [t for t in view.tensors if t.role != "input"]
    rows = sorted(sorted(tensors, key=lambda t: -t.bytes)[:top], key=lambda t: t.step) if top else tensors
    table = _table(_title(report, f"runtime view (onnxruntime, {view.level} optimisations)"),
                   [("step", "right"), ("tensor", "left"), ("shape", "left"), ("bytes", "right"),
                    ("kernel", "left"), ("", "left")], terminal)
    for tensor in rows:
        note = "OVER" if tensor.over_ceiling else "view of its input" if tensor.bytes == 0 else ""
        table.add_row(str(tensor.step), Text(tensor.name), format_shape(tensor.shape), f"{tensor.bytes:,}",
                      Text(tensor.producer_op), note, style="bold red" if tensor.over_ceiling else None)
    return table


def _runtime_alive_table(view: RuntimeView, terminal: bool) -> Table:
    alive = sorted(view.alive_at(view.peak_step), key=lambda t: -t.bytes)
    table = _table(f"allocated at the runtime peak (step {view.peak_step}, {format_bytes(view.peak_bytes)})",
                   [("tensor", "left"), ("shape", "left"), ("bytes", "right"), ("written at", "right"),
                    ("last read at", "right")], terminal)
    for tensor in alive:
        table.add_row(Text(tensor.name), format_shape(tensor.shape), f"{tensor.bytes:,}", str(tensor.step),
                      str(max(tensor.last_use, tensor.step)))
    return table


def print_codec(report: Any, console: Console | None = None) -> None:
    """`fmcompress codec`: bits per element of each stored map, and the totals (a codec.CodecReport)."""
    console = console or Console()
    table = _table(f"lossless int8 coding of {Path(report.source).name}: {report.samples} sample(s), "
                   f"DC-AC window {report.window}",
                   [("feature map", "left"), ("shape", "left"), ("raw", "right"), ("zstd", "right"),
                    ("baseline", "right"), ("DC-AC", "right"), ("gain", "right")], console.is_terminal)
    for row in report.rows:
        table.add_row(Text(row.name), format_shape(row.shape), f"{row.raw_bpe:.1f}", f"{row.zstd_bpe:.3f}",
                      f"{row.baseline_bpe:.3f}", f"{row.dcac_bpe:.3f}", f"{row.gain_percent:.1f}%")
    _print_table(console, table)
    console.print(Text(f"bits per element: raw {report.total_bpe('raw'):.1f}, zstd {report.total_bpe('zstd'):.3f}, "
                       f"baseline {report.total_bpe('baseline'):.3f}, DC-AC {report.total_bpe('dcac'):.3f} "
                       f"({report.gain_percent:.1f}% fewer than the baseline)"), soft_wrap=not console.is_terminal)
    stacked = report.stacked()
    if stacked is not None:
        console.print(Text(f"with the projections: {stacked['projection_ratio']:.2f}x fewer elements than the "
                           f"original maps, {stacked['lossless_ratio']:.2f}x fewer bits than int8 by DC-AC: "
                           f"{stacked['total_ratio_vs_int8']:.2f}x fewer bits than the original maps in int8"),
                      soft_wrap=not console.is_terminal)


def runtime_summary(view: RuntimeView) -> str:
    measured = (f", measured {format_bytes(view.measured_peak_bytes)}"
                if view.measured_peak_bytes is not None else "")
    return (f"runtime {format_bytes(view.peak_bytes)}{measured} (onnxruntime {view.level}; "
            f"largest {format_bytes(view.largest_bytes)} {view.largest_name})")


def _summary_lines(report: AnalysisReport) -> list[str]:
    s = report.summary
    runtime = f", {runtime_summary(report.runtime)}" if report.runtime is not None else ""
    lines = [f"peaks: stored {format_bytes(s['stored'].largest_bytes)} ({s['stored'].largest_name}), "
             f"live {format_bytes(s['live'].live_peak_bytes)}, "
             f"strict {format_bytes(s['strict'].largest_bytes)} (live {format_bytes(s['strict'].live_peak_bytes)})"
             + runtime]
    if report.ceiling_bytes is not None:
        blocked = Counter(m.not_compressible_reason for m in report.not_compressible_over_ceiling())
        reasons = ", ".join(f"{count} {reason}" for reason, count in blocked.items())
        lines.append(f"{len(report.over_ceiling())} stored feature map(s) over the ceiling"
                     + (f"; over it but not compressible: {reasons}" if blocked else ""))
        if report.runtime is not None:
            lines.append(f"{len(report.runtime.over_ceiling())} onnxruntime allocation(s) over the ceiling "
                         "(graph inputs excepted)")
    return lines


def _mark(fmap: FeatureMap) -> str:
    if not fmap.over_ceiling:
        return ""
    reason = fmap.not_compressible_reason
    return "OVER" if reason is None else f"over ({reason})"

