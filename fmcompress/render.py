"""Presentation of the reports: the `analyze` tables (rich), memory.png (matplotlib) and report.md.

The data lives in `fmcompress.report` (AnalysisReport) and in compile's report dict;
this module only draws it. Rules of the presentation:

* Tables list one view: `stored` and `strict` list their tensors, `live` the live
  curve (step, kernel group, bytes) and then the maps alive at its peak.
* On a terminal long names fold to the console's width; anywhere else (CI logs,
  pipes, files) the table is as wide as its longest name, so names are never broken.
* Tensor names are printed as plain text, never as rich markup.
* memory.png pairs before/after maps by name: a compressed map X is stored under
  another name (the fold pass writes `X/fmc_k<k>`); `stored_as` gives that mapping,
  else it is read from the names. Maps that are never compressed (graph inputs and
  outputs, integer maps) are grey and hatched; the largest maps are labelled.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .featuremaps import FeatureMap
from .modelio import write_bytes_atomic
from .report import AnalysisReport, RuntimeView
from .units import format_bytes

LABELLED_MAPS = 5  # the largest maps named on memory.png
BEFORE, AFTER, BLOCKED, CEILING = "tab:blue", "tab:green", "0.55", "tab:red"

# ---------------------------------------------------------------- analyze tables


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
        table.add_row(str(i), Text(fmap.name), _shape(fmap.shape), f"{fmap.bytes:,}", Text(producer), _mark(fmap),
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
        table.add_row(Text(fmap.name), _shape(fmap.shape), f"{fmap.bytes:,}", str(fmap.step),
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
        table.add_row(str(tensor.step), Text(tensor.name), _shape(tensor.shape), f"{tensor.bytes:,}",
                      Text(tensor.producer_op), note, style="bold red" if tensor.over_ceiling else None)
    return table


def _runtime_alive_table(view: RuntimeView, terminal: bool) -> Table:
    alive = sorted(view.alive_at(view.peak_step), key=lambda t: -t.bytes)
    table = _table(f"allocated at the runtime peak (step {view.peak_step}, {format_bytes(view.peak_bytes)})",
                   [("tensor", "left"), ("shape", "left"), ("bytes", "right"), ("written at", "right"),
                    ("last read at", "right")], terminal)
    for tensor in alive:
        table.add_row(Text(tensor.name), _shape(tensor.shape), f"{tensor.bytes:,}", str(tensor.step),
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
        table.add_row(Text(row.name), _shape(row.shape), f"{row.raw_bpe:.1f}", f"{row.zstd_bpe:.3f}",
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


def _shape(shape: list[int]) -> str:
    return "x".join(map(str, shape))


# ---------------------------------------------------------------- memory.png


def plot_memory(report: AnalysisReport, path: str | os.PathLike, after: AnalysisReport | None = None,
                stored_as: Mapping[str, str] | None = None) -> None:
    """memory.png: `memory_figure` written atomically."""
    import matplotlib.pyplot as plt

    figure = memory_figure(report, after, stored_as)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    write_bytes_atomic(buffer.getvalue(), Path(path))


def memory_figure(report: AnalysisReport, after: AnalysisReport | None = None,
                  stored_as: Mapping[str, str] | None = None):
    """Stored map sizes in execution order (before/after paired by name) with the ceiling line,
    and the live-memory curve. `stored_as` maps an original map name to the name the compressed
    model stores it under. Returns the matplotlib Figure (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, (ax_maps, ax_live) = plt.subplots(2, 1, figsize=(11, 7), constrained_layout=True,
                                           gridspec_kw={"height_ratios": [3, 2]})
    before = sorted(report.stored, key=lambda m: m.step)
    _bars(ax_maps, list(range(len(before))), before, 0.8, 0.45 if after else 0.85)
    handles = [Patch(color=BEFORE, alpha=0.45 if after else 0.85, label="before" if after else "stored map")]
    new = 0
    if after is not None:
        xs, maps = _after_positions(before, after, stored_as)
        _bars(ax_maps, xs, maps, 0.45, 0.9, AFTER)
        handles.append(Patch(color=AFTER, alpha=0.9, label="after"))
        new = len(xs) - sum(x < len(before) for x in xs)
    if report.ceiling_bytes is not None:
        handles.append(ax_maps.axhline(report.ceiling_bytes / 1024, color=CEILING, linestyle="--",
                                       label=f"ceiling {report.ceiling} ({format_bytes(report.ceiling_bytes)})"))
    if any(m.not_compressible_reason for m in report.stored + (after.stored if after else [])):
        handles.append(Patch(facecolor=BLOCKED, hatch="//", edgecolor="0.25",
                             label="graph input/output or integer map: not compressible"))
    _label_largest(ax_maps, before)
    ax_maps.legend(handles=handles, loc="upper right", fontsize=8)
    ax_maps.set(title=f"stored feature maps of {Path(report.source).name}", ylabel="KiB",
                xlabel="stored map, in the original's execution order"
                + (f" ({new} map(s) new in the compressed model at the end)" if new else ""))
    ax_maps.xaxis.get_major_locator().set_params(integer=True)
    _draw_live(ax_live, report, after)
    return fig


def _bars(ax, xs: list[int], maps: list[FeatureMap], width: float, alpha: float, color: str = BEFORE) -> None:
    """One bar per map; maps that are never compressed are grey and hatched."""
    bars = ax.bar(xs, [m.bytes / 1024 for m in maps], width=width, color=color, alpha=alpha)
    for bar, fmap in zip(bars, maps, strict=True):
        if fmap.not_compressible_reason:
            bar.set(facecolor=BLOCKED, hatch="//", edgecolor="0.25", linewidth=0)


def _after_positions(before: list[FeatureMap], after: AnalysisReport,
                     stored_as: Mapping[str, str] | None) -> tuple[list[int], list[FeatureMap]]:
    """x of each after map: its original's position when paired, else after the originals."""
    pairs = pair_maps(before, after, stored_as)
    paired = {id(m) for m in pairs.values()}
    new = [m for m in sorted(after.stored, key=lambda m: m.step) if id(m) not in paired]
    xs = [i for i, m in enumerate(before) if m.name in pairs] + list(range(len(before), len(before) + len(new)))
    return xs, [pairs[m.name] for m in before if m.name in pairs] + new


def pair_maps(before: list[FeatureMap], after: AnalysisReport,
              stored_as: Mapping[str, str] | None = None) -> dict[str, FeatureMap]:
    """Original map name -> the after map that stores it: `stored_as`, the same name, or `<name>/fmc_k<k>`."""
    by_name = {m.name: m for m in after.stored}
    pairs: dict[str, FeatureMap] = {}
    for fmap in before:
        target = (stored_as or {}).get(fmap.name, fmap.name)
        if target not in by_name:
            pattern = re.compile(re.escape(fmap.name) + r"/fmc_k\d+(/\d+)?")
            target = next((name for name in by_name if pattern.fullmatch(name)), target)
        if target in by_name:
            pairs[fmap.name] = by_name[target]
    return pairs


def _label_largest(ax, maps: list[FeatureMap]) -> None:
    """Name the largest maps, vertically above their bars (the y range grows to make room)."""
    ranked = sorted(range(len(maps)), key=lambda i: -maps[i].bytes)[:LABELLED_MAPS]
    top = max((m.bytes for m in maps), default=0) / 1024
    for i in ranked:
        ax.annotate(_short(maps[i].name), (i, maps[i].bytes / 1024), xytext=(0, 3), textcoords="offset points",
                    rotation=90, fontsize=7, ha="center", va="bottom")
    ax.set_ylim(0, top * 1.7 if top else 1)


def _short(name: str, limit: int = 28) -> str:
    """A tensor name short enough for a label: torch's repeated module prefixes
    (`/layer1/layer1.0/relu/Relu_output_0` -> `layer1.0/relu/Relu`) dropped, then the tail kept."""
    parts = [p for p in re.sub(r"_output_0$", "", name).split("/") if p]
    kept = [p for i, p in enumerate(parts) if i + 1 == len(parts) or not parts[i + 1].startswith(p + ".")]
    short = "/".join(kept) or name
    return short if len(short) <= limit else "…" + short[-(limit - 1):]


def _draw_live(ax, report: AnalysisReport, after: AnalysisReport | None) -> None:
    for label, rep, color in (("before", report, BEFORE), ("after", after, AFTER)):
        if rep is None:
            continue
        ax.plot([p.step for p in rep.live], [p.bytes / 1024 for p in rep.live], color=color,
                label=f"{label}: peak {format_bytes(rep.summary['live'].live_peak_bytes)}")
    ax.set(title="live memory (sum of stored maps alive)", xlabel="kernel group (execution order)", ylabel="KiB")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="upper right", fontsize=8)


# ---------------------------------------------------------------- report.md


def _md_training(report: Mapping[str, Any]) -> list[str]:
    """How the projections were trained (learned / random): settings, best epoch, the curve."""
    training = report.get("training")
    if not training:
        return []
    config = training.get("config", {})
    lines = ["## Training", "",
             f"{len(training.get('history', []))} epoch(s), {config.get('schedule')} schedule, "
             f"{config.get('optimizer')} at lr {config.get('lr')}, loss {config.get('loss')}, on "
             f"{training.get('device')}{' x' + str(training['world_size']) if training.get('world_size', 1) > 1 else ''}; "
             f"best held-out {training.get('metric')} {training.get('best_score', float('nan')):.4f} at epoch "
             f"{training.get('best_epoch')}{' (stopped early at the target)' if training.get('stopped_early') else ''}.",
             ""]
    block = training.get("block_stage")
    if block:
        lines += [f"Block reconstruction first: {block['epochs']} epoch(s) a map over {len(block['maps'])} map(s) in "
                  f"{block['seconds']:.1f} s; held-out {training.get('metric')} after it (epoch 0) "
                  f"{training.get('initial_score', float('nan')):.4f}.", ""]
    lines += ["| epoch | stage | maps | train loss | held-out score |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['epoch']} | {r['stage']} | {r['active_maps']} | {r['loss']:.4g} | {r['score']:.4f} |"
              for r in training.get("history", [])]
    return [*lines, ""]


def render_compile_markdown(report: Mapping[str, Any]) -> str:
    """report.md of `compile`: what was compressed, what it cost, how it was checked.

    Optional parts (data, warnings, fidelity, training, flops, latency, peaks,
    not_compressible, verification) are left out when the report lacks them.
    """
    sections = (_md_header, _md_warnings, _md_fidelity, _md_training, _md_cost, _md_maps, _md_not_compressible,
                _md_verification)
    lines: list[str] = []
    for section in sections:
        lines += section(report)
    return "\n".join(lines) + "\n"


def _md_header(report: Mapping[str, Any]) -> list[str]:
    lines = [f"# fmcompress report: {Path(str(report.get('model', 'model'))).name}", "",
             f"Ceiling **{report.get('ceiling')}** ({report.get('ceiling_bytes', 0):,} B), method "
             f"**{report.get('method', '?')}**, {len(report.get('maps', []))} feature map(s) compressed.", ""]
    data = report.get("data")
    if data:
        surrogate = (" **Surrogate data** (photographs shipped with scikit-image), not the model's own data: "
                     "fidelity is indicative only." if data.get("surrogate") else "")
        lines += [f"Data: {data.get('samples')} samples from `{data.get('source')}` ({data.get('calibration')} "
                  f"calibration, {data.get('held_out')} held out).{surrogate}", ""]
    return lines


def _md_warnings(report: Mapping[str, Any]) -> list[str]:
    warnings = list(report.get("warnings") or [])
    fidelity = report.get("fidelity") or {}
    agreement = fidelity.get("top1_agreement")
    if "warnings" not in report and agreement is not None and agreement < 0.9:  # reports without a warnings list
        warnings.append(f"top-1 agreement is {agreement:.1%}: this projection loses much of the model's "
                        "behaviour at this ceiling")
    return ["## Warnings", "", *[f"- {w}" for w in warnings], ""] if warnings else []


FIDELITY_ROWS = (("top1_agreement", "top-1 agreement with the original", "{:.2%}"),
                 ("sequence_agreement", "sequence agreement with the original (CTC decodings)", "{:.2%}"),
                 ("accuracy_reference", "accuracy, original", "{:.2%}"),
                 ("accuracy_candidate", "accuracy, compressed", "{:.2%}"),
                 ("cosine_similarity", "output cosine similarity", "{:.4g}"),
                 ("relative_error", "output relative error", "{:.4g}"),
                 ("max_abs_error", "output max abs error", "{:.4g}"))


def _md_fidelity(report: Mapping[str, Any]) -> list[str]:
    fidelity = report.get("fidelity") or {}
    rows = [f"| {label} | {fmt.format(fidelity[key])} |" for key, label, fmt in FIDELITY_ROWS
            if fidelity.get(key) is not None]
    gate = report.get("gate") or {}
    for key, label, fmt in (("min_agreement", "gate: minimum agreement", "{:.2%}"),
                            ("max_accuracy_drop", "gate: maximum accuracy drop (points)", "{:g}")):
        if gate.get(key) is not None:
            rows.append(f"| {label} | {fmt.format(gate[key])} |")
    return ["## Fidelity on held-out data", "", "| figure | value |", "| --- | --- |", *rows, ""] if rows else []


def _md_cost(report: Mapping[str, Any]) -> list[str]:
    lines = ["## Cost", ""]
    flops = report.get("flops")
    if flops:
        ratio = f"x{flops['ratio']:.3f}" if flops.get("ratio") is not None else "ratio n/a"
        lines += [f"FLOPs {flops['before']:,} -> {flops['after']:,} ({ratio}).", ""]
    latency = report.get("latency_ms")
    if latency and latency.get("original") is not None and latency.get("compressed") is not None:
        lines += [_latency_line(latency), ""]
    peaks = report.get("peaks")
    if peaks:
        lines += ["| view | before | after |", "| --- | --- | --- |"]
        lines += [f"| {view} peak | {format_bytes(peaks['before'][view])} | {format_bytes(peaks['after'][view])} |"
                  for view in ("stored", "live", "strict") if view in peaks.get("before", {})]
        lines.append("")
    return lines if len(lines) > 2 else []


def _latency_line(latency: Mapping[str, Any]) -> str:
    details = []
    if latency.get("ratio") is not None:
        details.append(f"ratio {latency['ratio']:.2f}")
    spread = (latency.get("spread") or {}).get("ratio")
    if spread:
        details.append(f"per-round ratio {spread[0]:.2f} to {spread[1]:.2f}")
    if latency.get("rounds"):
        details.append(f"{latency['rounds']} interleaved rounds of {latency.get('repeats', '?')} runs")
    if latency.get("threads"):
        details.append(f"{latency['threads']} thread(s)")
    details.append("measured side by side")
    return f"onnxruntime latency {latency['original']:.2f} ms -> {latency['compressed']:.2f} ms ({', '.join(details)})."


def _md_maps(report: Mapping[str, Any]) -> list[str]:
    maps = report.get("maps") or []
    if not maps:
        return ["## Compressed maps", "", "None: every stored map was already at or under the ceiling.", ""]
    lines = ["## Compressed maps", "", "| map | shape | C | k | bytes before | bytes after | stored as |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for entry in maps:
        stored = entry.get("stored_as")
        lines.append(f"| `{entry['name']}` | {_shape(entry['shape'])} | {entry['C']} | {entry['k']} | "
                     f"{entry['bytes_before']:,} | {entry['bytes_after']:,} | "
                     f"{f'`{stored}`' if stored and stored != entry['name'] else ''} |")
    return [*lines, ""]


def _md_not_compressible(report: Mapping[str, Any]) -> list[str]:
    entries = report.get("not_compressible") or []
    if not entries:
        return []
    lines = ["## Over the ceiling, not compressible", "", "| tensor | shape | bytes | reason |",
             "| --- | --- | --- | --- |"]
    for entry in entries:
        reason = entry.get("reason") or f"graph {entry.get('role', '?')}"
        lines.append(f"| `{entry['name']}` | {_shape(entry.get('shape', []))} | {entry.get('bytes', 0):,} | {reason} |")
    return [*lines, ""]


def _md_verification(report: Mapping[str, Any]) -> list[str]:
    check = report.get("verification")
    if not check:
        return []
    parts = [f"onnx.checker {check.get('checker', '?')}", f"onnxruntime {check.get('onnxruntime', '?')}"]
    samples = f" on {check['samples']} held-out samples" if check.get("samples") else ""
    if check.get("relative_error") is not None:
        parts.append(f"relative error against the original with its projections inserted "
                     f"{check['relative_error']:.2g}{samples}")
    if check.get("executor_relative_error") is not None:
        parts.append(f"against the training backend {check['executor_relative_error']:.2g}"
                     + ("" if check.get("relative_error") is not None else samples))
    if check.get("max_stored_bytes_after") is not None:
        verdict = "<=" if check.get("ceiling_ok", True) else ">"
        parts.append(f"largest compressible stored map after {check['max_stored_bytes_after']:,} B {verdict} ceiling")
    return ["## Verification", "", ", ".join(parts) + ".", ""]


# ------------------------------------------------------------------ training progress

@contextlib.contextmanager
def training_monitor(*, quiet: bool = False, json_log: str | os.PathLike | None = None,
                     log: Callable[[str], None] = lambda message: None) -> Iterator[Callable[[str, dict], None]]:
    """A monitor for fmcompress.backend.train's events, shown as the place allows.

    On a terminal: rich progress bars, one for the block stage (maps done, the last
    one's block loss, ETA) and one per epoch (stage, epoch, step, loss, held-out
    score, ETA). Elsewhere (CI logs): one line per epoch through `log`. Nothing with
    `quiet`. `json_log`: every event as one JSON line, flushed as it happens.
    """
    handle = open(json_log, "w", encoding="utf-8") if json_log else None  # noqa: SIM115 - closed below
    console = Console(stderr=True)
    progress = None
    if not quiet and console.is_terminal:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=console)
        progress.start()
    tasks: dict[str, Any] = {}

    def monitor(event: str, fields: dict) -> None:
        if handle is not None:
            handle.write(json.dumps({"event": event, **fields}) + "\n")
            handle.flush()
        if quiet:
            return
        if progress is not None:
            _progress_event(progress, tasks, event, fields)
        elif event == "epoch_end":
            log(_epoch_line(fields))

    try:
        yield monitor
    finally:
        if progress is not None:
            progress.stop()
        if handle is not None:
            handle.close()


def _progress_event(progress, tasks: dict[str, Any], event: str, fields: dict) -> None:
    """One bar for the block stage (maps done), then one per epoch (steps done)."""
    if event == "block":
        if "block" not in tasks:
            tasks["block"] = progress.add_task("block stage", total=fields["maps"], status="")
        loss = "kept its PCA" if fields["loss"] is None else f"loss {fields['loss']:.4g}"
        progress.update(tasks["block"], completed=fields["map"], status=f"map {fields['map']}: {loss}")
    elif event == "epoch_start":
        description = f"{fields['stage']} epoch {fields['epoch']}/{fields['epochs']}"
        tasks["epoch"] = progress.add_task(description, total=fields["steps"], status="")
    elif event == "step" and "epoch" in tasks:
        progress.update(tasks["epoch"], advance=1, status=f"loss {fields['loss']:.4g}")
    elif event == "epoch_end" and "epoch" in tasks:
        progress.update(tasks["epoch"], status=_epoch_line(fields))


def _epoch_line(fields: dict) -> str:
    return (f"epoch {fields['epoch']} ({fields['stage']}, {fields['active_maps']} map(s)): loss {fields['loss']:.4g}, "
            f"held-out {fields['metric']} {fields['score']:.4f} (best {fields['best']:.4f})")
