"""compile's report.md, drawn from report.json's dict (docs/json.md).

One section a part of the report: header and data, warnings, fidelity, training, cost
(FLOPs, latency, the memory views' peaks and onnxruntime's, computed and measured),
onnxruntime's arena (the --peak verdict, its top steps before and after, the tensors alive
at each peak), compressed maps, maps over the ceiling that cannot be compressed,
verification. Optional parts are left out when the report lacks them, so older reports
still render.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..units import format_bytes
from . import format_shape


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
             f"kept held-out {training.get('metric')} {training.get('best_score', float('nan')):.4f} at epoch "
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
    sections = (_md_header, _md_warnings, _md_fidelity, _md_training, _md_cost, _md_arena, _md_maps,
                _md_not_compressible, _md_verification)
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
                 ("sequence_agreement", "sequence agreement with the original (CTC decodings{ignored})", "{:.2%}"),
                 ("accuracy_reference", "accuracy, original", "{:.2%}"),
                 ("accuracy_candidate", "accuracy, compressed", "{:.2%}"),
                 ("accuracy_drop_error", "accuracy drop, standard error (same samples, paired)", "{:.2%}"),
                 ("cosine_similarity", "output cosine similarity", "{:.4g}"),
                 ("relative_error", "output relative error", "{:.4g}"),
                 ("max_abs_error", "output max abs error", "{:.4g}"))


def _ignored(fidelity: Mapping[str, Any]) -> str:
    """What sequence agreement left out (`metrics.space_classes`), for its row's label."""
    classes = fidelity.get("ignored_classes") or ()
    return f", space class {', '.join(map(str, classes))} left out" if classes else ""


def _md_fidelity(report: Mapping[str, Any]) -> list[str]:
    fidelity = report.get("fidelity") or {}
    rows = [f"| {label.format(ignored=_ignored(fidelity))} | {fmt.format(fidelity[key])} |"
            for key, label, fmt in FIDELITY_ROWS if fidelity.get(key) is not None]
    gate = report.get("gate") or {}
    for key, label, fmt in (("min_agreement", "gate: minimum agreement", "{:.2%}"),
                            ("max_accuracy_drop", "gate: maximum accuracy drop (points)", "{:g}")):
        if gate.get(key) is not None:
            rows.append(f"| {label} | {fmt.format(gate[key])} |")
    if not rows:
        return []
    return ["## Fidelity on held-out data", "", "| figure | value |", "| --- | --- |", *rows, "",
            *_md_output_figures(fidelity.get("outputs") or [])]


def _md_output_figures(outputs: list[Mapping[str, Any]]) -> list[str]:
    """Per output, and per channel group of a detection head; left out for one plain output
    (the overall figures say it all)."""
    if len(outputs) < 2 and not any(entry.get("channels") for entry in outputs):
        return []
    lines = ["| output | shape | cosine | relative error | max abs error | correlation |",
             "| --- | --- | --- | --- | --- | --- |"]
    for entry in outputs:
        lines.append(f"| `{entry['name']}` | {format_shape(entry.get('shape', []))} | "
                     f"{_figure_cells(entry)} | |")
        channels = entry.get("channels") or {}
        for group in channels.get("groups", []):
            lines.append(f"| `{entry['name']}` {group['name']} (channels {group['channels'][0]}-"
                         f"{group['channels'][1] - 1}) | | {_figure_cells(group)} | "
                         f"{_correlations(group, channels.get('channels', []))} |")
    return [*lines, ""]


def _figure_cells(figures: Mapping[str, Any]) -> str:
    return " | ".join(f"{figures[key]:.4g}" for key in ("cosine_similarity", "relative_error", "max_abs_error"))


def _correlations(group: Mapping[str, Any], channels: list[Mapping[str, Any]]) -> str:
    """The group's pooled correlation, and the range of its channels' correlations."""
    pooled = "n/a" if group.get("correlation") is None else f"{group['correlation']:.4g}"
    start, stop = group["channels"]
    values = [c["correlation"] for c in channels if start <= c["index"] < stop and c.get("correlation") is not None]
    return f"{pooled} ({min(values):.3g} to {max(values):.3g} per channel)" if len(values) > 1 else pooled


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
        lines += _runtime_rows(report.get("runtime"))
        lines.append("")
    return lines if len(lines) > 2 else []


def _runtime_rows(runtime: Mapping[str, Any] | None) -> list[str]:
    """onnxruntime's peak of both files, computed and measured (reports/compile.py rules a-c)."""
    if not runtime or "before" not in runtime:
        return []
    rows = []
    for kind in ("computed", "measured"):
        before, after = (runtime[side].get(f"{kind}_peak_bytes") for side in ("before", "after"))
        if before is not None and after is not None:
            rose = " (rose)" if runtime.get("rose") and runtime.get("rose_basis") == kind else ""
            rows.append(f"| onnxruntime peak ({runtime.get('level')}), {kind} | {format_bytes(before)} | "
                        f"{format_bytes(after)}{rose} |")
    return rows


TOP_STEPS = 5  # the arena's busiest steps listed per model
ALIVE_ROWS = 8  # tensors listed per peak


def _md_arena(report: Mapping[str, Any]) -> list[str]:
    """onnxruntime's arena (reports/compile.py rule e): the --peak verdict, the busiest steps of
    each model, and the tensors alive at each one's peak."""
    runtime = report.get("runtime") or {}
    arena, at_peak = runtime.get("arena"), runtime.get("at_peak") or {}
    if not arena:
        return []
    lines = ["## onnxruntime's arena", "", *_peak_verdict(runtime.get("peak")),
             "| model | step | node | live |", "| --- | --- | --- | --- |"]
    for side in ("before", "after"):
        steps = arena.get(side) or {"bytes": [], "steps": []}
        busiest = sorted(range(len(steps["bytes"])), key=lambda i: -steps["bytes"][i])[:TOP_STEPS]
        lines += [f"| {side} | {i} | `{steps['steps'][i]}` | {format_bytes(steps['bytes'][i])} |" for i in busiest]
    lines.append("")
    for side in ("before", "after"):
        if side in at_peak:
            lines += _alive_table(side, at_peak[side])
    return lines


def _peak_verdict(peak: Mapping[str, Any] | None) -> list[str]:
    if not peak:
        return []
    verified = peak.get("verified") or {}
    measured = verified.get("measured_peak_bytes")
    how = ("lossless: tiling alone" if peak.get("lossless") else
           "not lossless: tiling alone could not get there, projections make up the rest")
    figures = f"computed {format_bytes(verified.get('computed_peak_bytes', peak.get('predicted_peak_bytes', 0)))}"
    figures += f", measured {format_bytes(measured)}" if measured is not None else (
        f" ({verified['measure_note']})" if verified.get("measure_note") else "")
    asked = (f"`--peak` {format_bytes(peak['peak_bytes'])} met" if peak.get("peak_bytes") is not None
             else "`--peak lossless` (the smallest peak tiling alone reaches)")
    return [f"{asked} ({peak.get('level')}): {figures}, from "
            f"{format_bytes(peak.get('before_peak_bytes', 0))}; per-allocation ceiling "
            f"{format_bytes(peak['ceiling_bytes'])} chosen over {len(peak.get('trials', []))} trial(s); {how}.", ""]


def _alive_table(side: str, facts: Mapping[str, Any]) -> list[str]:
    lasting = (" Long-lived tensors (skip connections, a region's start kept for its bands) set it: "
               f"{format_bytes(facts['long_lived_bytes'])}." if facts.get("set_by_long_lived") else "")
    lines = [f"Alive at the peak {side} ({format_bytes(facts['peak_bytes'])}, step {facts['step']}, "
             f"{facts.get('alive_count', len(facts['alive']))} tensor(s)).{lasting}", "",
             "| tensor | shape | bytes | op | long-lived |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| `{t['name']}` | {format_shape(t.get('shape', []))} | {format_bytes(t['bytes'])} | "
              f"{t.get('op') or t.get('role', '')} | {'yes' if t.get('long_lived') else ''} |"
              for t in facts["alive"][:ALIVE_ROWS]]
    return [*lines, ""]


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
    lines = ["## Compressed maps", "", "| map | shape | C | k | bytes before | bytes after | stored as | "
             "cost alone (points) | added in the chain (points) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for entry in maps:
        stored = entry.get("stored_as")
        name = f"`{entry['name']}`"
        if entry.get("before_activation_of"):
            name = f"`{entry['before_activation_of']}`, projected before its activation at {name}"
        lines.append(f"| {name} | {format_shape(entry['shape'])} | {entry['C']} | {entry['k']} | "
                     f"{entry['bytes_before']:,} | {entry['bytes_after']:,} | "
                     f"{f'`{stored}`' if stored and stored != entry['name'] else ''} | {_cost(entry.get('cost_alone'))} | "
                     f"{_added(entry.get('cost_alone'))} |")
    costed = [entry["cost_alone"] for entry in maps if entry.get("cost_alone")]
    if costed:
        lines += ["", f"Cost alone: the drop in {costed[0]['metric']} on {costed[0]['samples']} held-out samples "
                      "with that map's projection the only one in place (a map that hurts shows here). Added in "
                      "the chain: the drop with that map and every one before it in place, less the drop at the "
                      "map before; these sum to the drop with every map in place. Learned projections correct "
                      "the ones before them, so a map can cost more alone than in the chain (one fitted to what earlier "
                      "projections left of its map can cost everything alone): the chain's shares are the ones "
                      "that add up."]
    return [*lines, ""]


def _added(cost: Mapping[str, Any] | None) -> str:
    return "" if not cost or cost.get("added_points") is None else f"{cost['added_points']:.1f}"


def _cost(cost: Mapping[str, Any] | None) -> str:
    if not cost:
        return ""
    accuracy = cost.get("accuracy_drop_points")
    return f"{cost['drop_points']:.1f}" + ("" if accuracy is None else f" (accuracy {accuracy:.1f})")


def _md_not_compressible(report: Mapping[str, Any]) -> list[str]:
    entries = report.get("not_compressible") or []
    if not entries:
        return []
    lines = ["## Over the ceiling, not compressible", "", "| tensor | shape | bytes | reason |",
             "| --- | --- | --- | --- |"]
    for entry in entries:
        reason = entry.get("reason") or f"graph {entry.get('role', '?')}"
        lines.append(f"| `{entry['name']}` | {format_shape(entry.get('shape', []))} | {entry.get('bytes', 0):,} | {reason} |")
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
