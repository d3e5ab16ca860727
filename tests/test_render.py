"""The reports as drawn (fmcompress.reports: terminal, plot, markdown, progress), each
checked against the data it draws: the tables parsed back and compared with the analysis,
memory.png's bars and lines with the maps' bytes, report.md's tables with report.json's
figures, the training monitor's log with the events it was sent."""

from __future__ import annotations

import io
import json
import re
import struct
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from modeltools import random_projections
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.progress import Progress

from fmcompress import analyze
from fmcompress.cli import main
from fmcompress.compiler import build_context
from fmcompress.passes.fold import FoldProjectionsPass
from fmcompress.passes.plan import PlanPass
from fmcompress.reports.analysis import AnalysisReport
from fmcompress.reports.markdown import FIDELITY_ROWS, render_compile_markdown
from fmcompress.reports.plot import memory_figure, pair_maps, plot_memory
from fmcompress.reports.progress import _progress_event, training_monitor
from fmcompress.reports.terminal import print_analysis
from fmcompress.units import parse_ceiling

LONG_A = "/backbone/stage_one/block_zero/expand_conv/activation/Relu_output_0"
LONG_B = "/backbone/stage_one/block_zero/shortcut_conv/activation/Relu_output_0"
UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def test_analysis_module_pulls_in_no_drawing_library():
    code = ("import sys, fmcompress.reports.analysis; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'rich', 'matplotlib'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["[]"]


def branch_model(channels_b: int = 4) -> onnx.ModelProto:
    """x feeds two conv+Relu branches with long names that meet at a Concat (the live peak)."""
    rng = np.random.default_rng(0)
    conv = {"kernel_shape": [3, 3], "pads": [1] * 4}
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a0"],
                              name="/backbone/stage_one/block_zero/expand_conv/Conv", **conv),
             helper.make_node("Relu", ["a0"], [LONG_A]),
             helper.make_node("Conv", ["x", "wb"], ["b0"],
                              name="/backbone/stage_one/block_zero/shortcut_conv/Conv", **conv),
             helper.make_node("Relu", ["b0"], [LONG_B]),
             helper.make_node("Concat", [LONG_A, LONG_B], ["y"], name="concat", axis=1)]
    weights = {"wa": (4, 4, 3, 3), "wb": (channels_b, 4, 3, 3)}
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in weights.items()]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4 + channels_b, 8, 8])],
        initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# ---------------------------------------------------------------- analyze tables


def printed(report: AnalysisReport, mode: str, terminal: bool, width: int = 40) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=terminal, color_system=None)
    print_analysis(report, mode=mode, console=console)
    return buffer.getvalue()


def table_rows(text: str, columns: int) -> list[list[str]]:
    """The body rows of the printed tables that have `columns` columns, cells stripped."""
    rows = [[cell.strip() for cell in line.split("│")[1:-1]]
            for line in text.splitlines() if line.startswith("│")]
    return [row for row in rows if len(row) == columns]


def as_int(cell: str) -> int:
    return int(cell.replace(",", ""))


@pytest.mark.parametrize("mode", ["stored", "live", "strict"])
def test_tables_keep_long_names_whole_off_a_terminal(mode):
    report = analyze(branch_model(), ceiling="1KB")
    text = printed(report, mode, terminal=False)
    names = {"stored": [LONG_A, LONG_B], "strict": [LONG_A, LONG_B],
             "live": ["/backbone/stage_one/block_zero/expand_conv/Conv", LONG_A, LONG_B]}[mode]
    for name in names:
        assert name in text, name
    # on a terminal of the same width the table fits the terminal instead
    assert max(len(line) for line in printed(report, mode, terminal=True).splitlines()) <= 40


def test_cli_output_in_a_pipe_keeps_names_whole(tmp_path):
    path = tmp_path / "long.onnx"
    onnx.save(branch_model(), str(path))
    result = CliRunner(env={"COLUMNS": "40"}).invoke(main, ["analyze", str(path), "--ceiling", "1KB"])
    assert result.exit_code == 0, result.output
    assert LONG_A in result.output and LONG_B in result.output


def test_stored_table_marks_exactly_the_maps_over_the_ceiling():
    """x, a: 1 KiB; b: 2 KiB; y (the graph output): 3 KiB; the ceiling 1536 B."""
    ceiling = 1536
    report = analyze(branch_model(channels_b=8), ceiling=str(ceiling))
    rows = {row[1]: row for row in table_rows(printed(report, "stored", False, width=200), 6)}
    assert {name: as_int(row[3]) for name, row in rows.items()} == {m.name: m.bytes for m in report.stored}
    over = {m.name for m in report.stored if m.bytes > ceiling}
    assert over == {LONG_B, "y"}
    marked = {name for name, row in rows.items() if row[5]}
    assert marked == over
    compressible = {name for name in over if next(m for m in report.stored if m.name == name).compressible}
    assert {name for name, row in rows.items() if row[5] == "OVER"} == compressible == {LONG_B}


def test_strict_table_lists_every_tensor_with_its_bytes():
    report = analyze(branch_model())
    rows = table_rows(printed(report, "strict", terminal=False, width=200), 6)
    assert {row[1]: as_int(row[3]) for row in rows} == {m.name: m.bytes for m in report.strict}
    assert {"a0", "b0"} <= {row[1] for row in rows}  # what the stored view leaves out


def test_live_table_lists_the_curve_and_the_maps_alive_at_the_peak():
    report = analyze(branch_model())
    each = 4 * 8 * 8 * 4
    assert [p.bytes for p in report.live] == [2 * each, 3 * each, 4 * each]  # x+a, x+a+b, a+b+y
    text = printed(report, "live", terminal=False)
    curve = table_rows(text, 4)
    assert [(int(r[0]), r[1], as_int(r[2])) for r in curve] == [(p.step, p.node, p.bytes) for p in report.live]
    peak = max(report.live, key=lambda p: p.bytes)
    assert [int(r[0]) for r in curve if r[3]] == [peak.step]
    alive = [m for m in report.stored if m.step <= peak.step <= max(m.last_use, m.step)]
    alive_rows = table_rows(text, 5)
    assert [r[0] for r in alive_rows] == [m.name for m in sorted(alive, key=lambda m: -m.bytes)]
    assert [r[0] for r in alive_rows] == ["y", LONG_A, LONG_B]  # largest first


def test_runtime_table_marks_the_allocations_over_the_ceiling():
    ceiling = 1536
    report = analyze(branch_model(channels_b=8), ceiling=str(ceiling), runtime="extended")
    assert report.runtime is not None
    rows = table_rows(printed(report, "runtime", terminal=False, width=200), 6)
    counted = [t for t in report.runtime.tensors if t.role != "input"]
    assert [(r[1], as_int(r[3])) for r in rows] == [(t.name, t.bytes) for t in counted]
    over = {t.name for t in counted if t.bytes > ceiling and t.role != "output"}  # outputs: the caller's
    assert {r[1] for r in rows if r[5] == "OVER"} == over and LONG_B in over


# ---------------------------------------------------------------- memory.png


@pytest.fixture(scope="module")
def compressed_pair(zoo_onnx):
    """ResNet-18 (32x32) and its folded compression at 4x with random orthonormal projections."""
    model = onnx.load(str(zoo_onnx("resnet18_small", (1, 3, 32, 32))))
    ctx = build_context(model, None, None)
    plan = PlanPass(parse_ceiling("4x"))(model, ctx).data
    projections = random_projections(plan)
    result = FoldProjectionsPass(projections)(model, ctx)
    before = analyze(model, ceiling="4x")
    after = analyze(result.model, ceiling=str(plan.ceiling_bytes))
    return before, after, plan, result.data


def test_maps_pair_by_name_not_position(compressed_pair):
    before, after, plan, fold_data = compressed_pair
    after.stored.reverse()  # another execution order must not matter
    pairs = pair_maps(before.stored, after)
    for planned in plan.maps:  # stored under `<name>/fmc_k<k>`, k channels
        assert pairs[planned.name].name == fold_data[planned.name]["stored"]
        assert pairs[planned.name].shape[1] == planned.k
    assert pairs["input"].name == "input" and pairs["output"].name == "output"
    # an explicit mapping wins (a tool that renamed the stored tensors)
    first, second = plan.maps[0].name, plan.maps[1].name
    swapped = pair_maps(before.stored, after, {first: fold_data[second]["stored"]})
    assert swapped[first].name == fold_data[second]["stored"]


def test_memory_figure_draws_the_maps_bytes_the_ceiling_and_the_live_curves(compressed_pair):
    before, after, plan, fold_data = compressed_pair
    figure = memory_figure(before, after)
    maps_axis, live_axis = figure.axes
    ordered = sorted(before.stored, key=lambda m: m.step)
    bars = list(maps_axis.patches)
    before_bars, after_bars = bars[:len(ordered)], bars[len(ordered):]
    assert [bar.get_height() for bar in before_bars] == pytest.approx([m.bytes / 1024 for m in ordered])
    after_by_name = {m.name: m for m in after.stored}
    after_at = {round(bar.get_x() + bar.get_width() / 2): bar.get_height() for bar in after_bars}
    for planned in plan.maps:  # each compressed map's bar sits on its original, at its stored bytes
        position = [m.name for m in ordered].index(planned.name)
        stored = after_by_name[fold_data[planned.name]["stored"]]
        assert after_at[position] == pytest.approx(stored.bytes / 1024)
    never = [m for m in before.stored + after.stored if m.not_compressible_reason]
    assert len([bar for bar in bars if bar.get_hatch() == "//"]) == len(never)
    assert {m.role for m in never} >= {"input", "output"}  # and the classifier's 2-D maps
    ceilings = [line.get_ydata()[0] for line in maps_axis.lines]
    assert ceilings == [pytest.approx(before.ceiling_bytes / 1024)]
    curves = [list(line.get_ydata()) for line in live_axis.lines]
    assert curves == [[p.bytes / 1024 for p in report.live] for report in (before, after)]


def test_memory_figure_names_the_five_largest_maps(compressed_pair):
    before, after, _, _ = compressed_pair
    maps_axis = memory_figure(before, after).axes[0]
    ordered = sorted(before.stored, key=lambda m: m.step)
    largest = sorted(range(len(ordered)), key=lambda i: -ordered[i].bytes)[:5]
    labelled = {round(label.xy[0]): label.get_text() for label in maps_axis.texts}
    assert sorted(labelled) == sorted(largest)
    for position, text in labelled.items():
        assert text.lstrip("…") in ordered[position].name


def test_memory_png_is_a_png_of_the_figure_size(compressed_pair, tmp_path):
    before, after, _, _ = compressed_pair
    path = tmp_path / "memory.png"
    plot_memory(before, path, after=after)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (11 * 110, 7 * 110)  # 11x7 inches at 110 dpi


# ---------------------------------------------------------------- report.md


def full_report() -> dict:
    """The shape of report.json's dict (reports/compile.py), with the optional parts present."""
    return {
        "model": "/models/r18.onnx", "method": "pca", "ceiling": "4x", "ceiling_bytes": 200704,
        "data": {"source": "surrogate", "surrogate": True, "samples": 64, "calibration": 48,
                 "held_out": 16},
        "maps": [{"name": "/maxpool/MaxPool_output_0", "shape": [1, 64, 56, 56], "C": 64, "k": 16,
                  "bytes_before": 802816, "bytes_after": 200704,
                  "stored_as": "/maxpool/MaxPool_output_0/fmc_k16",
                  "cost_alone": {"metric": "top-1 agreement", "alone": 0.9375, "drop_points": 6.25,
                                 "accuracy_drop_points": None, "samples": 16,
                                 "in_chain": 0.96875, "added_points": 3.125}},
                 {"name": "/layer1/Relu_output_0", "shape": [1, 64, 56, 56], "C": 64, "k": 12,
                  "bytes_before": 802816, "bytes_after": 150528, "stored_as": "/layer1/Relu_output_0"}],
        "not_compressible": [{"name": "input", "role": "input", "shape": [1, 3, 224, 224],
                              "dtype": "float32", "bytes": 602112, "reason": "graph input", "step": 0},
                             {"name": "q", "role": "map", "shape": [1, 64, 56, 56], "dtype": "uint8",
                              "bytes": 200705, "reason": "integer dtype", "step": 3},
                             {"name": "out", "role": "output", "shape": [1, 1000], "dtype": "float32",
                              "bytes": 4000, "reason": None, "step": 9}],
        "warnings": ["top-1 agreement with the original is only 75.0% on held-out data (below 90%)"],
        "fidelity": {"top1_agreement": 0.75, "accuracy_reference": None, "accuracy_candidate": None,
                     "cosine_similarity": 0.98765, "relative_error": 0.1234, "max_abs_error": 2.5},
        "gate": {"min_agreement": 0.5, "max_accuracy_drop": None},
        "flops": {"before": 1_819_066_368, "after": 1_500_000_000, "ratio": 0.8246},
        "latency_ms": {"original": 10.0, "compressed": 9.0, "ratio": 0.9,
                       "spread": {"original": [9.5, 10.5], "compressed": [8.8, 9.4],
                                  "ratio": [0.85, 0.95]},
                       "rounds": 5, "repeats": 20, "threads": 1},
        "peaks": {"before": {"stored": 802816, "live": 2408448, "strict": 3211264},
                  "after": {"stored": 602112, "live": 802816, "strict": 3211264}},
        "verification": {"checker": "ok", "onnxruntime": "ok", "relative_error": 4.1e-8,
                         "executor_relative_error": 3.2e-7, "samples": 8,
                         "max_stored_bytes_after": 200704, "ceiling_ok": True},
    }


def sections(text: str) -> dict[str, list[str]]:
    """report.md's `## ` sections: heading -> its lines (blank lines dropped)."""
    found: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = found.setdefault(line[3:], [])
        elif current is not None and line:
            current.append(line)
    return found


def markdown_table(lines: list[str]) -> list[list[str]]:
    """The body rows of the first markdown table in `lines` (header and rule dropped)."""
    rows = [line for line in lines if line.startswith("|")]
    return [[cell.strip().strip("`") for cell in row.strip("|").split(" | ")] for row in rows[2:]]


def parse_size(text: str) -> tuple[float, int]:
    """`784.0 KiB` -> (802816.0, the unit's scale)."""
    number, unit = text.split()
    return float(number) * UNITS[unit], UNITS[unit]


def test_markdown_has_a_section_for_each_part_of_the_report_and_none_for_missing_parts():
    report = full_report()
    json.dumps(report)  # the input is what report.json holds
    full = sections(render_compile_markdown(report))
    assert list(full) == ["Warnings", "Fidelity on held-out data", "Cost", "Compressed maps",
                          "Over the ceiling, not compressible", "Verification"]
    minimal = {"model": "m.onnx", "method": "pca", "ceiling": "256KB", "ceiling_bytes": 262144, "maps": []}
    assert list(sections(render_compile_markdown(minimal))) == ["Compressed maps"]


def test_markdown_header_names_the_model_file_and_the_ceiling():
    title, _, summary = render_compile_markdown(full_report()).splitlines()[:3]
    assert title.startswith("# ") and title.endswith(" r18.onnx") and "/models" not in title
    assert "4x" in summary and f"{200704:,} B" in summary and "pca" in summary


def test_markdown_map_tables_hold_the_reports_figures():
    report = full_report()
    found = sections(render_compile_markdown(report))
    rows = markdown_table(found["Compressed maps"])
    expected = [[m["name"], "x".join(map(str, m["shape"])), str(m["C"]), str(m["k"]),
                 f"{m['bytes_before']:,}", f"{m['bytes_after']:,}",
                 m["stored_as"] if m["stored_as"] != m["name"] else "",
                 "6.2" if m.get("cost_alone") else "",  # 6.25 points, one decimal
                 "3.1" if m.get("cost_alone") else ""] for m in report["maps"]]
    assert rows == expected
    assert "drop in top-1 agreement on 16 held-out samples" in "\n".join(found["Compressed maps"])
    blocked = markdown_table(found["Over the ceiling, not compressible"])
    assert [(r[0], r[1], as_int(r[2])) for r in blocked] == [
        (e["name"], "x".join(map(str, e["shape"])), e["bytes"]) for e in report["not_compressible"]]
    assert [r[3] for r in blocked][:2] == ["graph input", "integer dtype"]  # the reason given
    assert report["not_compressible"][2]["role"] in blocked[2][3]  # else the role


def test_markdown_fidelity_table_holds_every_figure_present():
    report = full_report()
    rows = dict(markdown_table(sections(render_compile_markdown(report))["Fidelity on held-out data"]))
    labels = {key: label for key, label, _ in FIDELITY_ROWS}
    present = {key: value for key, value in report["fidelity"].items() if value is not None}
    assert len(rows) == len(present) + 1  # and the one gate set
    for key, value in present.items():
        shown = rows[labels[key]]
        number = float(shown.rstrip("%")) / 100 if shown.endswith("%") else float(shown)
        assert number == pytest.approx(value, rel=1e-3), key


def test_markdown_cost_section_holds_flops_latency_and_peaks():
    report = full_report()
    lines = sections(render_compile_markdown(report))["Cost"]
    text = "\n".join(lines)
    flops = re.search(r"FLOPs ([\d,]+) -> ([\d,]+)", text)
    assert flops and (as_int(flops[1]), as_int(flops[2])) == (report["flops"]["before"], report["flops"]["after"])
    latency = re.search(r"([\d.]+) ms -> ([\d.]+) ms", text)
    assert latency and (float(latency[1]), float(latency[2])) == (10.0, 9.0)
    peaks = markdown_table(lines)
    assert len(peaks) == 3
    for view, before, after in peaks:
        name = view.split()[0]
        for shown, actual in ((before, report["peaks"]["before"][name]), (after, report["peaks"]["after"][name])):
            value, scale = parse_size(shown)
            assert abs(value - actual) <= 0.05 * scale, (view, shown, actual)


def test_markdown_cost_without_a_flops_ratio_or_latency_details():
    minimal = {"model": "m.onnx", "method": "pca", "ceiling": "256KB", "ceiling_bytes": 262144, "maps": [],
               "latency_ms": {"original": 2.0, "compressed": 1.0},
               "flops": {"before": 10, "after": 5, "ratio": None}}
    text = "\n".join(sections(render_compile_markdown(minimal))["Cost"])
    assert re.search(r"FLOPs 10 -> 5 \(ratio n/a\)", text)
    assert re.search(r"2\.00 ms -> 1\.00 ms", text) and "round" not in text


def test_markdown_verification_states_the_checks_and_the_ceiling_verdict():
    report = full_report()
    check = report["verification"]
    text = " ".join(sections(render_compile_markdown(report))["Verification"])
    for figure in (f"{check['relative_error']:.2g}", f"{check['executor_relative_error']:.2g}",
                   f"{check['max_stored_bytes_after']:,}", f"{check['samples']} held-out"):
        assert figure in text, figure
    failed = {**report, "verification": {**check, "ceiling_ok": False}}
    failed_text = " ".join(sections(render_compile_markdown(failed))["Verification"])
    assert " <= ceiling" in text and " > ceiling" in failed_text


def test_markdown_lists_the_reports_warnings_and_warns_on_low_agreement_without_a_list():
    report = full_report()
    assert sections(render_compile_markdown(report))["Warnings"] == [f"- {w}" for w in report["warnings"]]
    assert "Warnings" not in sections(render_compile_markdown({**report, "warnings": []}))
    del report["warnings"], report["gate"]  # an older report: no warnings list
    warned = sections(render_compile_markdown(report))["Warnings"]
    assert len(warned) == 1 and "75.0%" in warned[0]


def training_report() -> dict:
    history = [{"epoch": i, "stage": "joint", "active_maps": 3, "loss": 1.0 / i, "score": 0.9 + i / 100,
                "lr": 1e-3, "held_out_loss": 0.1} for i in (1, 2)]
    return {"model": "m.onnx", "ceiling": "4x", "ceiling_bytes": 10, "method": "learned", "maps": [],
            "training": {"config": {"schedule": "joint", "optimizer": "adam", "lr": 0.003, "loss": "kd"},
                         "device": "cpu", "world_size": 1, "metric": "agreement", "best_epoch": 2,
                         "best_score": 0.92, "stopped_early": True, "history": history}}


def test_markdown_training_section_holds_the_curve_and_the_best_epoch():
    report = training_report()
    lines = sections(render_compile_markdown(report))["Training"]
    history = report["training"]["history"]
    rows = markdown_table(lines)
    assert [(int(r[0]), r[1], int(r[2])) for r in rows] == [(h["epoch"], h["stage"], h["active_maps"])
                                                           for h in history]
    assert [float(r[3]) for r in rows] == pytest.approx([h["loss"] for h in history], rel=1e-3)
    assert [float(r[4]) for r in rows] == pytest.approx([h["score"] for h in history], abs=1e-4)
    assert "0.9200" in lines[0] and "epoch 2" in lines[0]
    assert len([line for line in lines if not line.startswith("|")]) == 1  # no block stage
    assert "Training" not in sections(render_compile_markdown({**report, "training": None}))


def test_markdown_training_section_reports_the_block_stage():
    report = training_report()
    report["training"] |= {"initial_score": 0.875, "block_stage": {"epochs": 12, "seconds": 3.25, "maps": [
        {"name": "a", "first_loss": 0.5, "loss": 0.25}, {"name": "b", "first_loss": None, "loss": None}]}}
    block = [line for line in sections(render_compile_markdown(report))["Training"]
             if not line.startswith("|")][1]
    assert re.findall(r"\d+(?:\.\d+)?", block) == ["12", "2", "3.2", "0", "0.8750"]


# ---------------------------------------------------------------- training progress


def test_progress_shows_the_block_stage_then_each_epoch():
    """A terminal's bars: maps done in the block stage, then steps done in each epoch."""
    progress = Progress(console=Console(file=io.StringIO(), force_terminal=True, width=120))
    tasks: dict = {}
    for i, loss in enumerate([0.02, None, 0.05], start=1):
        _progress_event(progress, tasks, "block", {"map": i, "maps": 3, "name": f"m{i}", "first_loss": loss,
                                                   "loss": loss})
    _progress_event(progress, tasks, "epoch_start", {"epoch": 1, "epochs": 2, "stage": "joint", "steps": 4})
    for _ in range(4):
        _progress_event(progress, tasks, "step", {"step": 1, "loss": 0.5})
    block, epoch = (progress.tasks[tasks[key]] for key in ("block", "epoch"))
    assert (block.completed, block.total) == (3, 3) and "0.05" in block.fields["status"]
    assert (epoch.completed, epoch.total) == (4, 4) and "1/2" in epoch.description
    _progress_event(progress, tasks, "block", {"map": 2, "maps": 3, "name": "m2", "first_loss": None,
                                               "loss": None})
    assert "loss" not in progress.tasks[tasks["block"]].fields["status"]  # it kept its start


EPOCH_END = {"epoch": 1, "stage": "joint", "active_maps": 3, "loss": 0.5, "metric": "agreement",
             "score": 0.9, "best": 0.91}


@pytest.mark.parametrize("quiet", [False, True])
def test_monitor_off_a_terminal_logs_each_epoch_and_writes_every_event(tmp_path, quiet):
    events = [("epoch_start", {"epoch": 1, "epochs": 1, "stage": "joint", "steps": 2}),
              ("step", {"step": 1, "loss": 0.7}), ("epoch_end", EPOCH_END)]
    logged: list[str] = []
    with training_monitor(quiet=quiet, json_log=tmp_path / "events.jsonl", log=logged.append) as monitor:
        for event, fields in events:
            monitor(event, fields)
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"event": event, **fields} for event, fields in events]
    assert len(logged) == (0 if quiet else 1)
    if logged:
        assert "0.9000" in logged[0] and "0.9100" in logged[0]  # the score and the best so far
