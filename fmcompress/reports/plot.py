"""memory.png: stored map sizes before/after with the ceiling line, the live curve, and, where the
reports carry onnxruntime's runtime view, its arena: live bytes per execution step before and after,
with the --peak line when given (matplotlib).

Before/after maps pair by name: a compressed map X is stored under another name (the fold
pass writes `X/fmc_k<k>`); `stored_as` gives that mapping, else it is read from the names.
Maps that are never compressed (graph inputs and outputs, integer maps) are grey and
hatched; the largest maps are labelled.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping
from pathlib import Path

from ..featuremaps import FeatureMap
from ..modelio import write_bytes_atomic
from ..units import format_bytes
from .analysis import AnalysisReport

LABELLED_MAPS = 5  # the largest maps named on memory.png
BEFORE, AFTER, BLOCKED, CEILING = "tab:blue", "tab:green", "0.55", "tab:red"


def plot_memory(report: AnalysisReport, path: str | os.PathLike, after: AnalysisReport | None = None,
                stored_as: Mapping[str, str] | None = None, peak_bytes: int | None = None) -> None:
    """memory.png: `memory_figure` written atomically."""
    import matplotlib.pyplot as plt

    figure = memory_figure(report, after, stored_as, peak_bytes)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    write_bytes_atomic(buffer.getvalue(), Path(path))


def memory_figure(report: AnalysisReport, after: AnalysisReport | None = None,
                  stored_as: Mapping[str, str] | None = None, peak_bytes: int | None = None):
    """Stored map sizes in execution order (before/after paired by name) with the ceiling line,
    and the live-memory curve. `stored_as` maps an original map name to the name the compressed
    model stores it under. Returns the matplotlib Figure (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    arena = report.runtime is not None
    fig, axes = plt.subplots(3 if arena else 2, 1, figsize=(11, 9.5 if arena else 7), constrained_layout=True,
                             gridspec_kw={"height_ratios": [3, 2, 2] if arena else [3, 2]})
    ax_maps, ax_live = axes[0], axes[1]
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
    if arena:
        _draw_arena(axes[2], report, after, peak_bytes)
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


def _draw_arena(ax, report: AnalysisReport, after: AnalysisReport | None, peak_bytes: int | None) -> None:
    """onnxruntime's live bytes per execution step of each model (its own steps: tiling adds some)."""
    for label, rep, color in (("before", report, BEFORE), ("after", after, AFTER)):
        view = rep.runtime if rep is not None else None
        if view is None:
            continue
        ax.plot([p.step for p in view.live], [p.bytes / 1024 for p in view.live], color=color,
                label=f"{label}: peak {format_bytes(view.peak_bytes)}")
    if peak_bytes is not None:
        ax.axhline(peak_bytes / 1024, color=CEILING, linestyle="--", label=f"--peak {format_bytes(peak_bytes)}")
    ax.set(title=f"onnxruntime's arena (live allocations, {report.runtime.level})",
           xlabel="execution step (onnxruntime's order)", ylabel="KiB")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="upper right", fontsize=8)
