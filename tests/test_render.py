"""Presentation (fmcompress.render) apart from the data (fmcompress.report): analyze tables in
every mode and off a terminal, memory.png pairing maps by name, and compile's report.md."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from modeltools import random_projections
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from fmcompress import analyze
from fmcompress.cli import main
from fmcompress.compiler import build_context
from fmcompress.passes.fold import FoldProjectionsPass
from fmcompress.passes.plan import PlanPass
from fmcompress.render import (
    memory_figure,
    pair_maps,
    plot_memory,
    print_analysis,
    render_compile_markdown,
)
from fmcompress.units import parse_ceiling

LONG_A = "/backbone/stage_one/block_zero/expand_conv/activation/Relu_output_0"
LONG_B = "/backbone/stage_one/block_zero/shortcut_conv/activation/Relu_output_0"


def test_report_module_holds_data_only():
    code = ("import sys, fmcompress.report as r; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'rich', 'matplotlib'}), "
            "hasattr(r, 'print_analysis'), hasattr(r, 'plot_memory'), hasattr(r, 'render_compile_markdown'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["[]", "False", "False", "False"]


def branch_model() -> onnx.ModelProto:
    """x feeds two conv+Relu branches with long names that meet at a Concat (the live peak)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a0"], name="/backbone/stage_one/block_zero/expand_conv/Conv",
                              kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["a0"], [LONG_A]),
             helper.make_node("Conv", ["x", "wb"], ["b0"], name="/backbone/stage_one/block_zero/shortcut_conv/Conv",
                              kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["b0"], [LONG_B]),
             helper.make_node("Concat", [LONG_A, LONG_B], ["y"], name="concat", axis=1)]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), w) for w in ("wa", "wb")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def printed(report, mode: str, terminal: bool, width: int = 40) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=terminal, color_system=None)
    print_analysis(report, mode=mode, console=console)
    return buffer.getvalue()


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


def test_live_mode_lists_the_curve_and_the_maps_alive_at_the_peak():
    report = analyze(branch_model())
    each = 4 * 8 * 8 * 4
    assert [p.bytes for p in report.live] == [2 * each, 3 * each, 4 * each]  # x+a, x+a+b, a+b+y
    text = printed(report, "live", terminal=False)
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows[:3]] == ["0", "1", "2"]
    assert "concat" in rows[2] and f"{4 * each:,}" in rows[2] and "peak" in rows[2]
    assert "alive at the peak (step 2" in text
    alive = [row.split("│")[1].strip() for row in rows[3:]]
    assert alive == ["y", LONG_A, LONG_B]  # largest first
    assert "feature map" not in text.split("alive at the peak")[0]  # the curve, not the stored table


def test_strict_mode_lists_every_tensor():
    text = printed(analyze(branch_model()), "strict", terminal=False, width=200)
    assert "a0" in text and "b0" in text and "strict view" in text


# ---------------------------------------------------------------- memory.png


@pytest.fixture(scope="module")
def compressed_pair(zoo_onnx):
    """ResNet-18 (32x32) and its folded compression at 4x with random orthonormal projections."""
    model = onnx.load(str(zoo_onnx("resnet18_small", (1, 3, 32, 32))))
    ctx = build_context(model, None, None)
    plan = PlanPass(parse_ceiling("4x")).run(model, ctx).data
    projections = random_projections(plan)
    result = FoldProjectionsPass(projections).run(model, ctx)
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


def test_memory_figure_marks_what_cannot_be_compressed_and_names_the_largest(compressed_pair, tmp_path):
    before, after, plan, _ = compressed_pair
    figure = memory_figure(before, after)
    maps_axis = figure.axes[0]
    legend = [text.get_text() for text in maps_axis.get_legend().get_texts()]
    assert legend[:2] == ["before", "after"] and any("not compressible" in t for t in legend)
    assert any(t.startswith("ceiling 4x") for t in legend)
    hatched = [patch for patch in maps_axis.patches if patch.get_hatch() == "//"]
    assert len(hatched) == 4  # input and output, before and after
    labels = [text.get_text() for text in maps_axis.texts]
    largest = sorted(before.stored, key=lambda m: -m.bytes)[:5]
    assert len(labels) == 5 and "relu/Relu" in labels[0]
    assert all(any(label.lstrip("…") in m.name or label in m.name for m in largest) for label in labels)
    plot_memory(before, tmp_path / "memory.png", after=after)
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- report.md


def full_report() -> dict:
    """The shape of compiler._report's dict, with the optional parts present."""
    return {
        "model": "/models/r18.onnx", "method": "pca", "ceiling": "4x", "ceiling_bytes": 200704,
        "data": {"source": "surrogate", "surrogate": True, "samples": 64, "calibration": 48, "held_out": 16},
        "maps": [{"name": "/maxpool/MaxPool_output_0", "shape": [1, 64, 56, 56], "C": 64, "k": 16,
                  "bytes_before": 802816, "bytes_after": 200704,
                  "stored_as": "/maxpool/MaxPool_output_0/fmc_k16"}],
        "not_compressible": [{"name": "input", "role": "input", "shape": [1, 3, 224, 224], "dtype": "float32",
                              "bytes": 602112, "reason": "graph input", "step": 0},
                             {"name": "q", "role": "map", "shape": [1, 64, 56, 56], "dtype": "uint8",
                              "bytes": 200705 * 1, "reason": "integer dtype", "step": 3}],
        "warnings": ["top-1 agreement with the original is only 75.0% on held-out data (below 90%)"],
        "fidelity": {"top1_agreement": 0.75, "accuracy_reference": None, "accuracy_candidate": None,
                     "cosine_similarity": 0.98765, "relative_error": 0.1234, "max_abs_error": 2.5},
        "gate": {"min_agreement": 0.5, "max_accuracy_drop": None},
        "flops": {"before": 1_819_066_368, "after": 1_500_000_000, "ratio": 0.8246},
        "latency_ms": {"original": 10.0, "compressed": 9.0, "ratio": 0.9,
                       "spread": {"original": [9.5, 10.5], "compressed": [8.8, 9.4], "ratio": [0.85, 0.95]},
                       "rounds": 5, "repeats": 20, "threads": 1},
        "peaks": {"before": {"stored": 802816, "live": 2408448, "strict": 3211264},
                  "after": {"stored": 602112, "live": 802816, "strict": 3211264}},
        "verification": {"checker": "ok", "onnxruntime": "ok", "relative_error": 4.1e-8,
                         "executor_relative_error": 3.2e-7, "samples": 8,
                         "max_stored_bytes_after": 200704, "ceiling_ok": True},
    }


def test_markdown_shows_every_part_of_the_report():
    text = render_compile_markdown(full_report())
    json.dumps(full_report())  # the input is what report.json holds
    assert text.startswith("# fmcompress report: r18.onnx\n")
    assert "Ceiling **4x** (200,704 B), method **pca**, 1 feature map(s) compressed." in text
    assert "**Surrogate data**" in text and "(48 calibration, 16 held out)" in text
    assert "## Warnings\n\n- top-1 agreement with the original is only 75.0%" in text
    assert "| top-1 agreement with the original | 75.00% |" in text
    assert "| output cosine similarity | 0.9877 |" in text and "accuracy, original" not in text
    assert "| gate: minimum agreement | 50.00% |" in text
    assert "FLOPs 1,819,066,368 -> 1,500,000,000 (x0.825)." in text
    assert ("onnxruntime latency 10.00 ms -> 9.00 ms (ratio 0.90, per-round ratio 0.85 to 0.95, "
            "5 interleaved rounds of 20 runs, 1 thread(s), measured side by side).") in text
    assert "| stored peak | 784.0 KiB | 588.0 KiB |" in text and "| live peak | 2.3 MiB | 784.0 KiB |" in text
    assert ("| `/maxpool/MaxPool_output_0` | 1x64x56x56 | 64 | 16 | 802,816 | 200,704 | "
            "`/maxpool/MaxPool_output_0/fmc_k16` |") in text
    assert "## Over the ceiling, not compressible" in text
    assert "| `input` | 1x3x224x224 | 602,112 | graph input |" in text
    assert "| `q` | 1x64x56x56 | 200,705 | integer dtype |" in text
    assert ("relative error against the original with its projections inserted 4.1e-08 on 8 held-out samples, "
            "against the training backend 3.2e-07") in text
    assert "largest compressible stored map after 200,704 B <= ceiling" in text


def test_markdown_tolerates_missing_optional_parts():
    minimal = {"model": "m.onnx", "method": "pca", "ceiling": "256KB", "ceiling_bytes": 262144, "maps": []}
    text = render_compile_markdown(minimal)
    assert "0 feature map(s) compressed" in text and "None: every stored map was already" in text
    for absent in ("## Warnings", "## Fidelity", "## Cost", "## Verification", "not compressible"):
        assert absent not in text
    partial = {**minimal, "latency_ms": {"original": 2.0, "compressed": 1.0}, "flops": {"before": 10, "after": 5,
                                                                                        "ratio": None}}
    text = render_compile_markdown(partial)
    assert "FLOPs 10 -> 5 (ratio n/a)." in text
    assert "onnxruntime latency 2.00 ms -> 1.00 ms (measured side by side)." in text


def test_markdown_of_an_older_report_without_warnings_warns_on_low_agreement():
    report = full_report()
    del report["warnings"], report["gate"]
    assert "## Warnings\n\n- top-1 agreement is 75.0%" in render_compile_markdown(report)


def test_markdown_shows_the_training_curve():
    from fmcompress.render import render_compile_markdown

    history = [{"epoch": i, "stage": "joint", "active_maps": 3, "loss": 1.0 / i, "score": 0.9 + i / 100,
                "lr": 1e-3, "held_out_loss": 0.1} for i in (1, 2)]
    report = {"model": "m.onnx", "ceiling": "4x", "ceiling_bytes": 10, "method": "learned", "maps": [],
              "training": {"config": {"schedule": "joint", "optimizer": "adam", "lr": 0.003, "loss": "kd"},
                           "device": "cpu", "world_size": 1, "metric": "agreement", "best_epoch": 2,
                           "best_score": 0.92, "stopped_early": True, "history": history}}
    markdown = render_compile_markdown(report)
    assert "## Training" in markdown and "best held-out agreement 0.9200 at epoch 2 (stopped early" in markdown
    assert "| 2 | joint | 3 | 0.5 | 0.9200 |" in markdown
    assert "## Training" not in render_compile_markdown({**report, "training": None})
    assert "Block reconstruction" not in markdown
    report["training"] |= {"initial_score": 0.875, "block_stage": {"epochs": 12, "seconds": 3.25, "maps": [
        {"name": "a", "first_loss": 0.5, "loss": 0.25}, {"name": "b", "first_loss": None, "loss": None}]}}
    assert ("Block reconstruction first: 12 epoch(s) a map over 2 map(s) in 3.2 s; held-out agreement after it "
            "(epoch 0) 0.8750.") in render_compile_markdown(report)


def test_progress_shows_the_block_stage_then_each_epoch():
    """A terminal's bars: maps done in the block stage, then steps done in each epoch."""
    from rich.console import Console
    from rich.progress import Progress

    from fmcompress.render import _progress_event

    out = io.StringIO()
    progress = Progress(console=Console(file=out, force_terminal=True, width=120))
    tasks: dict = {}
    for i, loss in enumerate([0.02, None, 0.05], start=1):
        _progress_event(progress, tasks, "block", {"map": i, "maps": 3, "name": f"m{i}", "first_loss": loss,
                                                   "loss": loss})
    _progress_event(progress, tasks, "epoch_start", {"epoch": 1, "epochs": 2, "stage": "joint", "steps": 4})
    for _ in range(4):
        _progress_event(progress, tasks, "step", {"step": 1, "loss": 0.5})
    block, epoch = (progress.tasks[tasks[key]] for key in ("block", "epoch"))
    assert (block.completed, block.total, block.fields["status"]) == (3, 3, "map 3: loss 0.05")
    assert (epoch.description, epoch.completed, epoch.total) == ("joint epoch 1/2", 4, 4)
    _progress_event(progress, tasks, "block", {"map": 2, "maps": 3, "name": "m2", "first_loss": None, "loss": None})
    assert progress.tasks[tasks["block"]].fields["status"] == "map 2: kept its PCA"
