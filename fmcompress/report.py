"""Typed reports (their JSON is their serialisation), rich tables and memory plots."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .featuremaps import FeatureMap
from .modelio import write_bytes_atomic
from .units import Ceiling, format_bytes

SCHEMA_VERSION = 1


@dataclass
class LivePoint:
    step: int
    node: str
    bytes: int


@dataclass
class ViewSummary:
    largest_bytes: int
    largest_name: str
    live_peak_bytes: int
    live_peak_step: int
    count: int


@dataclass
class AnalysisReport:
    """What the memory analysis pass found. `stored` is the paper's view; see DESIGN.md."""

    source: str
    input_shapes: dict[str, list[int]]
    act_bytes: int | None
    ceiling: str | None
    ceiling_bytes: int | None
    stored: list[FeatureMap]
    strict: list[FeatureMap]
    live: list[LivePoint]
    strict_live: list[LivePoint]
    summary: dict[str, ViewSummary] = field(default_factory=dict)
    # every tensor's static shape (weights included), for FLOPs and later passes; not serialised
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, *, source: str, input_shapes: dict[str, tuple[int, ...]], act_bytes: int | None,
              ceiling: Ceiling | None, stored: list[FeatureMap], strict: list[FeatureMap],
              live: list[LivePoint], strict_live: list[LivePoint],
              tensor_shapes: dict[str, tuple[int, ...]] | None = None) -> AnalysisReport:
        ceiling_bytes = None
        if ceiling is not None:
            largest = max((m.bytes for m in stored if m.role != "input"), default=0)
            ceiling_bytes = ceiling.resolve(largest)
            for fmap in stored:
                fmap.over_ceiling = fmap.bytes > ceiling_bytes
        report = cls(source=source, input_shapes={k: list(v) for k, v in input_shapes.items()},
                     act_bytes=act_bytes, ceiling=str(ceiling) if ceiling else None,
                     ceiling_bytes=ceiling_bytes, stored=stored, strict=strict, live=live,
                     strict_live=strict_live, tensor_shapes=dict(tensor_shapes or {}))
        stored_summary = _summarise(stored, live)  # the live view lists the same maps
        report.summary = {"stored": stored_summary, "live": stored_summary,
                          "strict": _summarise(strict, strict_live)}
        return report

    @property
    def peaks(self) -> dict[str, int]:
        """The headline figure of each view: largest stored map, live peak, largest tensor."""
        return {"stored": self.summary["stored"].largest_bytes,
                "live": self.summary["live"].live_peak_bytes,
                "strict": self.summary["strict"].largest_bytes}

    def over_ceiling(self, include_inputs: bool = False) -> list[FeatureMap]:
        """Stored maps above the ceiling; graph inputs and outputs only when asked."""
        return [m for m in self.stored if m.over_ceiling and (include_inputs or m.role == "map")]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["tensor_shapes"]
        data["schema_version"] = SCHEMA_VERSION
        data["peaks"] = self.peaks
        data["over_ceiling"] = [m.name for m in self.over_ceiling()]
        data["not_compressible_over_ceiling"] = [m.name for m in self.stored if m.over_ceiling and m.role != "map"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def write_json(self, path: str | os.PathLike) -> None:
        write_bytes_atomic(self.to_json().encode(), Path(path))


def _summarise(maps: list[FeatureMap], live: list[LivePoint]) -> ViewSummary:
    largest = max(maps, key=lambda m: m.bytes, default=None)
    peak = max(live, key=lambda p: p.bytes, default=None)
    return ViewSummary(largest_bytes=largest.bytes if largest else 0, largest_name=largest.name if largest else "",
                       live_peak_bytes=peak.bytes if peak else 0, live_peak_step=peak.step if peak else -1,
                       count=len(maps))


def print_analysis(report: AnalysisReport, mode: str = "stored", top: int | None = None, console=None) -> None:
    """A rich table of one view, and a summary of all three."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    maps = report.strict if mode == "strict" else report.stored
    rows = sorted(maps, key=lambda m: -m.bytes)[:top] if top else maps
    title = f"{mode} view of {Path(report.source).name}" + (f" — ceiling {report.ceiling} = {report.ceiling_bytes} B" if report.ceiling else "")
    table = Table(title=title, title_justify="left")
    for column, justify in (("#", "right"), ("feature map", "left"), ("shape", "left"), ("bytes", "right"),
                            ("producer", "left"), ("", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for i, fmap in enumerate(rows):
        mark = _mark(fmap, report.ceiling_bytes)
        style = "bold red" if fmap.over_ceiling and fmap.role == "map" else None
        table.add_row(str(i), fmap.name, "x".join(map(str, fmap.shape)), f"{fmap.bytes:,}",
                      f"{fmap.producer_op} {fmap.producer}".strip() or "(graph input)", mark, style=style)
    console.print(table)
    s = report.summary
    console.print(f"peaks: stored {format_bytes(s['stored'].largest_bytes)} ({s['stored'].largest_name}), "
                  f"live {format_bytes(s['live'].live_peak_bytes)}, "
                  f"strict {format_bytes(s['strict'].largest_bytes)} (live {format_bytes(s['strict'].live_peak_bytes)})")
    if report.ceiling_bytes is not None:
        over = report.over_ceiling()
        blocked = [m for m in report.stored if m.over_ceiling and m.role != "map"]
        console.print(f"{len(over)} stored feature map(s) over the ceiling"
                      + (f"; {len(blocked)} graph input/output(s) over it, not compressible" if blocked else ""))


def _mark(fmap: FeatureMap, ceiling_bytes: int | None) -> str:
    if ceiling_bytes is None or not fmap.over_ceiling:
        return ""
    return "OVER" if fmap.role == "map" else f"over ({fmap.role})"


def plot_memory(report: AnalysisReport, path: str | os.PathLike, after: AnalysisReport | None = None) -> None:
    """PNG: stored map sizes in execution order with the ceiling line, and the live-memory curve."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_maps, ax_live) = plt.subplots(2, 1, figsize=(10, 6.5), constrained_layout=True)
    for label, rep, color in (("before", report, "tab:blue"), ("after", after, "tab:green")):
        if rep is None:
            continue
        kib = [m.bytes / 1024 for m in rep.stored]
        ax_maps.bar(range(len(kib)), kib, color=color, alpha=0.6 if after else 0.9, label=label)
        ax_live.plot([p.step for p in rep.live], [p.bytes / 1024 for p in rep.live], color=color, label=label)
    if report.ceiling_bytes is not None:
        ax_maps.axhline(report.ceiling_bytes / 1024, color="tab:red", linestyle="--",
                        label=f"ceiling {report.ceiling} ({format_bytes(report.ceiling_bytes)})")
    ax_maps.set(title=f"stored feature maps of {Path(report.source).name}", xlabel="stored map (execution order)", ylabel="KiB")
    ax_live.set(title="live memory (sum of stored maps alive)", xlabel="kernel group (execution order)", ylabel="KiB")
    for axis in (ax_maps, ax_live):
        axis.xaxis.get_major_locator().set_params(integer=True)
    ax_maps.legend(loc="upper right")
    if after is not None:
        ax_live.legend(loc="upper right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(buffer.getvalue(), Path(path))


def render_compile_markdown(report: dict[str, Any]) -> str:
    """report.md of `compile`: what was compressed, what it cost, how it was checked."""
    data, fid, flops, lat = report["data"], report["fidelity"], report["flops"], report["latency_ms"]
    lines = [
        f"# fmcompress report: {Path(report['model']).name}",
        "",
        f"Ceiling **{report['ceiling']}** ({report['ceiling_bytes']:,} B), method **{report['method']}**, "
        f"{len(report['maps'])} feature map(s) compressed.",
        "",
        f"Data: {data['samples']} samples from `{data['source']}` ({data['calibration']} calibration, "
        f"{data['held_out']} held out)." + (" **Surrogate data** (photographs shipped with scikit-image), "
                                           "not the model's own data: fidelity is indicative only."
                                           if data["surrogate"] else ""),
        "",
        "## Fidelity on held-out data",
        "",
        "| figure | value |",
        "| --- | --- |",
    ]
    for key, label in (("top1_agreement", "top-1 agreement with the original"),
                       ("accuracy_reference", "accuracy, original"), ("accuracy_candidate", "accuracy, compressed"),
                       ("cosine_similarity", "output cosine similarity"), ("relative_error", "output relative error"),
                       ("max_abs_error", "output max abs error")):
        if fid.get(key) is not None:
            value = fid[key]
            lines.append(f"| {label} | {value:.2%} |" if key.startswith(("top1", "accuracy")) else f"| {label} | {value:.4g} |")
    if fid.get("top1_agreement") is not None and fid["top1_agreement"] < 0.9:
        lines += ["", f"**Warning:** top-1 agreement is {fid['top1_agreement']:.1%}: this projection loses much of "
                      "the model's behaviour at this ceiling."]
    lines += [
        "",
        "## Cost",
        "",
        f"FLOPs {flops['before']:,} -> {flops['after']:,} (x{flops['ratio']:.3f}); onnxruntime latency "
        f"{lat['original']:.2f} ms -> {lat['compressed']:.2f} ms (ratio {lat['ratio']:.2f}, measured side by side).",
        "",
        "| view | before | after |",
        "| --- | --- | --- |",
    ]
    for view in ("stored", "live", "strict"):
        lines.append(f"| {view} peak | {format_bytes(report['peaks']['before'][view])} | "
                     f"{format_bytes(report['peaks']['after'][view])} |")
    lines += ["", "## Compressed maps", "", "| map | shape | C | k | bytes before | bytes after |",
              "| --- | --- | --- | --- | --- | --- |"]
    for entry in report["maps"]:
        lines.append(f"| `{entry['name']}` | {'x'.join(map(str, entry['shape']))} | {entry['C']} | {entry['k']} | "
                     f"{entry['bytes_before']:,} | {entry['bytes_after']:,} |")
    for entry in report["not_compressible"]:
        lines.append(f"| `{entry['name']}` ({entry['role']}, not compressible) | {'x'.join(map(str, entry['shape']))} "
                     f"| | | {entry['bytes']:,} | {entry['bytes']:,} |")
    check = report["verification"]
    lines += ["", "## Verification", "",
              f"onnx.checker {check['checker']}, onnxruntime {check['onnxruntime']}, relative error against the "
              f"training backend {check['executor_relative_error']:.2g} on {check['samples']} held-out samples, "
              f"largest stored map after {check['max_stored_bytes_after']:,} B <= ceiling.", ""]
    return "\n".join(lines)
