"""compile --peak: onnxruntime's live peak under a size (passes/peak_plan.py), analyze
--fail-over-peak, and the arena in the report."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from fmcompress import api
from fmcompress.cli import main
from fmcompress.evaluation.thirdparty import ort_quantize_static
from fmcompress.memprobe import PeakMeasurement
from fmcompress.passes.peak_plan import peak_facts
from fmcompress.passes.runtime import runtime_view

FAST = {"method": "pca", "num_samples": 8, "latency_rounds": 1, "latency_repeats": 1, "measure_memory": False}


def _weight(rng: np.random.Generator, name: str, *shape: int) -> onnx.TensorProto:
    fan_in = int(np.prod(shape[1:]))
    return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name)


def _conv(x: str, w: str, y: str, k: int = 3) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w], [y], name=y, kernel_shape=[k, k], pads=[k // 2] * 4)


def _model(nodes: list, inits: list, channels: int, size: int, classes: int = 10) -> onnx.ModelProto:
    nodes = [*nodes, helper.make_node("GlobalAveragePool", [nodes[-1].output[0]], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                          [1, channels, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def conv_chain(size: int = 32) -> onnx.ModelProto:
    """Three 3x3 convs with ReLUs at full resolution (16, 32, 16 channels), then a classifier."""
    rng = np.random.default_rng(0)
    nodes = [_conv("x", "w0", "c0"), helper.make_node("Relu", ["c0"], ["r0"], name="r0"),
             _conv("r0", "w1", "c1"), helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
             _conv("r1", "w2", "c2"), helper.make_node("Relu", ["c2"], ["r2"], name="r2")]
    inits = [_weight(rng, "w0", 16, 3, 3, 3), _weight(rng, "w1", 32, 16, 3, 3), _weight(rng, "w2", 16, 32, 3, 3),
             _weight(rng, "fc", 10, 16)]
    return _model(nodes, inits, 3, size)


def skip_net(size: int = 32) -> onnx.ModelProto:
    """a = conv(x) (64 channels), then a narrower strided branch (32, 128, 32 channels at half
    resolution) beside a 2x2 max pool of a, joined by a Concat: a is held across the branch."""
    rng = np.random.default_rng(2)
    nodes = [_conv("x", "w0", "a"),
             helper.make_node("Conv", ["a", "w1"], ["b"], name="b", kernel_shape=[3, 3], pads=[1] * 4, strides=[2, 2]),
             _conv("b", "w2", "c"), _conv("c", "w3", "d", k=1),
             helper.make_node("MaxPool", ["a"], ["p"], name="p", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Concat", ["p", "d"], ["s"], name="s", axis=1)]
    inits = [_weight(rng, "w0", 64, 3, 3, 3), _weight(rng, "w1", 32, 64, 3, 3), _weight(rng, "w2", 128, 32, 3, 3),
             _weight(rng, "w3", 32, 128, 1, 1), _weight(rng, "fc", 10, 96)]
    return _model(nodes, inits, 3, size)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_peak_met_lossless_on_a_conv_chain():
    model = conv_chain()
    before = runtime_view(model, level="all").peak_bytes
    size = before // 2
    result = api.compile(model, peak=f"{size}B", **FAST)
    runtime = result.report["runtime"]
    peak = runtime["peak"]
    assert peak["lossless"] and not result.report["maps"]
    assert len(result.model.graph.node) > len(model.graph.node)  # computed in bands (of the pool's input)
    assert peak["verified"]["computed_peak_bytes"] <= size < before == peak["before_peak_bytes"]
    assert runtime_view(result.model, level="all").peak_bytes == peak["verified"]["computed_peak_bytes"]
    # the largest ceiling that meets the size: every larger trial was over it
    assert all(t["peak_bytes"] is None or t["peak_bytes"] > size for t in peak["trials"]
               if t["ceiling_bytes"] > peak["ceiling_bytes"])
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(result.model, x), _run(model, x), rtol=1e-4, atol=1e-5)
    arena = runtime["arena"]
    assert max(arena["before"]["bytes"]) == before and max(arena["after"]["bytes"]) <= size
    assert len(arena["after"]["bytes"]) == len(arena["after"]["steps"]) > len(arena["before"]["bytes"])


def test_a_skip_connection_sets_the_peak():
    """`a` is held whole across the strided branch for the max pool: at the peak (the branch's
    widest conv) it is long-lived and holds most of the bytes; analyze says so."""
    facts = peak_facts(runtime_view(skip_net()))
    assert facts["set_by_long_lived"] and facts["node"] == "c"
    assert [(t["name"], t["long_lived"]) for t in facts["alive"]] == [("a", True), ("c", False), ("b", False)]
    assert sum(t["bytes"] for t in facts["alive"]) == facts["peak_bytes"]


def test_tiled_the_peak_is_set_by_what_bands_hold_for_later(tmp_path):
    """Under --peak the bands are small; what is held across them (the branch's start b, the pool's
    bands kept for the Concat) sets the emitted model's peak, and the report says so."""
    result = api.compile(skip_net(), peak="128KB", **FAST)
    runtime = result.report["runtime"]
    assert runtime["peak"]["lossless"] and runtime["peak"]["verified"]["computed_peak_bytes"] <= 128 * 1024
    facts = runtime["at_peak"]["after"]
    assert facts["set_by_long_lived"] and [t["name"] for t in facts["alive"] if t["long_lived"]]
    assert runtime["at_peak"]["before"]["alive"][0]["name"] == "reorder_token_0"  # a, in NCHWc at `all`


def test_report_md_has_the_arena_and_the_verdict(tmp_path):
    path = tmp_path / "chain.onnx"
    onnx.save(conv_chain(), str(path))
    size = runtime_view(conv_chain(), level="all").peak_bytes // 2
    done = CliRunner().invoke(main, ["compile", str(path), "--peak", f"{size}B", "--method", "pca",
                                     "--num-samples", "8", "--report", str(tmp_path / "report"), "-q"])
    assert done.exit_code == 0, done.output
    assert "(lossless)" in done.stdout.splitlines()[-1]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## onnxruntime's arena" in text and "lossless: tiling alone" in text and "Alive at the peak after" in text
    assert (tmp_path / "report" / "memory.png").stat().st_size > 0
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["runtime"]["peak"]["verified"]["ok"]


def test_an_unmeetable_peak_is_refused_before_data_and_writes_nothing(tmp_path):
    path = tmp_path / "skip.onnx"
    onnx.save(skip_net(), str(path))
    out = tmp_path / "skip.fmc.onnx"
    done = CliRunner().invoke(main, ["compile", str(path), "--peak", "8KB", "--method", "pca",
                                     "--num-samples", "8", "-o", str(out)])
    assert done.exit_code == 1, done.output
    assert "cannot be brought to 8.0 KiB" in done.stderr and "smallest found" in done.stderr
    assert not out.exists()


def test_verify_refuses_a_measured_peak_over_the_size(tmp_path, monkeypatch):
    """The planned peak holds when computed, but the fresh process measures more: exit 1, nothing written."""
    import fmcompress.passes.peak_plan as peak_plan

    monkeypatch.setenv("FMCOMPRESS_MEASURE_MEMORY", "1")
    import fmcompress.reports.compile as report

    monkeypatch.setenv("FMCOMPRESS_MEASURE_MEMORY", "1")
    for module in (peak_plan, report):
        monkeypatch.setattr(module, "measure_peak", lambda *a, **k: PeakMeasurement(1 << 30, [1 << 30]))
    path = tmp_path / "chain.onnx"
    onnx.save(conv_chain(), str(path))
    size = runtime_view(conv_chain(), level="all").peak_bytes // 2
    out = tmp_path / "chain.fmc.onnx"
    done = CliRunner().invoke(main, ["compile", str(path), "--peak", f"{size}B", "--method", "pca",
                                     "--num-samples", "8", "-o", str(out), "--json", str(tmp_path / "r.json")])
    assert done.exit_code == 1, done.output
    assert "measured" in done.stderr and "nothing was written" in done.stderr
    assert not out.exists() and not (tmp_path / "r.json").exists()


def test_verify_says_when_the_peak_cannot_be_measured(monkeypatch):
    import fmcompress.passes.peak_plan as peak_plan
    import fmcompress.reports.compile as report

    monkeypatch.setenv("FMCOMPRESS_MEASURE_MEMORY", "1")
    for module in (peak_plan, report):
        monkeypatch.setattr(module, "measure_peak", lambda *a, **k: PeakMeasurement(None, [], "no /proc here"))
    size = runtime_view(conv_chain(), level="all").peak_bytes // 2
    result = api.compile(conv_chain(), peak=f"{size}B", **{**FAST, "measure_memory": True})
    verified = result.report["runtime"]["peak"]["verified"]
    assert verified["measured_peak_bytes"] is None
    assert verified["measure_note"] == "no /proc here; the computed figure stands"
    assert verified["computed_peak_bytes"] <= size


def test_analyze_fail_over_peak_exit_codes(tmp_path):
    path = tmp_path / "skip.onnx"
    onnx.save(skip_net(), str(path))
    peak = runtime_view(skip_net()).peak_bytes
    runner = CliRunner()
    over = runner.invoke(main, ["analyze", str(path), "--peak", f"{peak - 1}B", "--fail-over-peak", "-q"])
    assert over.exit_code == 1 and "above --peak" in over.stderr
    held = runner.invoke(main, ["analyze", str(path), "--peak", f"{peak}B", "--fail-over-peak"])
    assert held.exit_code == 0, held.output
    assert "<= --peak" in held.stdout and "(they set the peak)" in held.stdout
    assert runner.invoke(main, ["analyze", str(path), "--fail-over-peak"]).exit_code == 2  # needs --peak
    assert runner.invoke(main, ["analyze", str(path), "--peak", "lots"]).exit_code == 2


@pytest.mark.parametrize("flags", [["--peak", "64KB", "--traffic", "2x"], ["--peak", "0"]])
def test_peak_usage_errors(tmp_path, flags):
    path = tmp_path / "chain.onnx"
    onnx.save(conv_chain(), str(path))
    assert CliRunner().invoke(main, ["compile", str(path), *flags, "--method", "pca"]).exit_code == 2


def test_the_peak_pipeline_plans_first_and_verifies_last():
    from fmcompress.compiler import CompileOptions, build_pipeline

    names = [p.name for p in build_pipeline(CompileOptions(peak="512KB")).passes]
    assert names == ["peak-plan", "runtime", "sink-concat", "plan", "runtime", "runtime-plan", "prepare-data", "fit",
                     "map-cost", "fold-bn", "fold-projections", "tile-to-ceiling", "verify", "verify-peak", "measure"]


def test_the_int8_peak_pipeline_verifies_the_quantized_model():
    from fmcompress.compiler import CompileOptions, build_pipeline

    names = [p.name for p in build_pipeline(CompileOptions(peak="512KB", int8=True)).passes]
    assert names.index("quantize") < names.index("verify-peak") < names.index("measure")


def test_int8_probes_size_the_quantized_graph():
    """Rule g: an int8 probe's peak is its quantized graph's, the input's uint8 copy counted
    (the float graph at one byte leaves it out: graph inputs are the caller's)."""
    from fmcompress.compiler import build_context, peak_probe
    from fmcompress.passes.peak_plan import probe_peak

    model = conv_chain()
    ctx = build_context(model, None, 1)
    ceiling = 32 * 1024
    plain = probe_peak(model, ctx, ceiling, lambda c: peak_probe(c, "all"), "all")
    quantized = probe_peak(model, ctx, ceiling, lambda c: peak_probe(c, "all", int8=True), "all")
    copies = [t for t in quantized.view.tensors if t.producer_op == "QuantizeLinear" and t.bytes == 3 * 32 * 32]
    assert copies and copies[0].dtype == "uint8"
    assert not [t for t in plain.view.tensors if t.dtype == "uint8"]
    assert quantized.peak_bytes > plain.peak_bytes  # the integer convs' buffers, the input's copy


def test_an_int8_peak_holds_for_the_quantized_model_as_onnxruntime_runs_it():
    """--peak with --int8 (peak_plan.py rule g): planned at one byte, verified on the int8 model
    at its own dtypes; a size the float model at one byte would meet but its int8 buffers do not
    is not passed on the plan's word."""
    model = conv_chain()
    float_peak = runtime_view(model, level="all").peak_bytes
    size = float_peak // 6  # under the float peak's quarter: bands are needed even at one byte
    result = api.compile(model, peak=f"{size}B", int8=True, **FAST)
    verified = result.report["runtime"]["peak"]["verified"]
    assert verified["computed_peak_bytes"] <= size
    int8_view = runtime_view(result.model, level="all")  # every tensor at its own dtype
    assert int8_view.peak_bytes == verified["computed_peak_bytes"]
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in result.model.graph.node}
    assert result.report["int8"]["float_nodes"] == []


def test_a_ceiling_with_the_peak_caps_every_allocation():
    """--ceiling with --peak: the search starts at the ceiling, and the ceiling holds too."""
    model = conv_chain()
    size = runtime_view(model, level="all").peak_bytes
    result = api.compile(model, peak=f"{size}B", ceiling="32KB", **FAST)
    peak = result.report["runtime"]["peak"]
    assert peak["trials"][0]["ceiling_bytes"] == 32 * 1024 >= peak["ceiling_bytes"]
    assert not runtime_view(result.model, ceiling_bytes=peak["ceiling_bytes"]).over_ceiling()


def test_peak_lossless_takes_the_smallest_peak_tiling_alone_reaches():
    """Rule h: no size; the search goes down while tiling alone takes a ceiling, and of the lossless
    trials near the lowest peak the largest ceiling is kept; nothing is projected, outputs agree."""
    from fmcompress.passes.peak_plan import NEAR_LOWEST

    model = conv_chain()
    result = api.compile(model, peak="lossless", **FAST)
    peak = result.report["runtime"]["peak"]
    lossless = [t for t in peak["trials"] if t["lossless"] and t["peak_bytes"] is not None]
    lowest = min(t["peak_bytes"] for t in lossless)
    assert peak["peak_bytes"] is None and peak["lossless"] and not result.report["maps"]
    assert peak["predicted_peak_bytes"] <= NEAR_LOWEST * lowest < peak["before_peak_bytes"]
    assert peak["ceiling_bytes"] == max(t["ceiling_bytes"] for t in lossless
                                        if t["peak_bytes"] <= NEAR_LOWEST * lowest)
    # it stopped where tiling alone no longer could (a projection or a refusal below), or at the floor
    below = [t for t in peak["trials"] if t["ceiling_bytes"] < min(t["ceiling_bytes"] for t in lossless)]
    assert below and all(not t["lossless"] or t["peak_bytes"] is None for t in below)
    assert runtime_view(result.model, level="all").peak_bytes == peak["verified"]["computed_peak_bytes"]
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(result.model, x), _run(model, x), rtol=1e-4, atol=1e-5)


def test_smallest_lossless_prefers_fewer_bands_for_nearly_the_same_peak():
    from fmcompress.passes.peak_plan import PeakTrial, choose

    trials = [PeakTrial(64 << 10, 400 << 10), PeakTrial(32 << 10, 210 << 10), PeakTrial(16 << 10, 200 << 10),
              PeakTrial(8 << 10, 100 << 10, lossless=False, projected=["a"]), PeakTrial(4 << 10, None, lossless=False)]
    assert choose(trials, None).ceiling_bytes == 32 << 10  # 210 is within a tenth of 200
    trials[1].peak_bytes = 230 << 10
    assert choose(trials, None).ceiling_bytes == 16 << 10


def test_the_walk_down_stops_where_lower_ceilings_stop_lowering_the_peak(monkeypatch):
    """Rule b': an unmeetable size on a V-shaped peak (lowest at a 64 KiB ceiling): two steps in a
    row above the lowest end the walk, a bisection just below the lowest follows, and no ceiling
    under half of it is probed (the walk used to go on to the planner's refusal)."""
    from fmcompress.passes import peak_plan

    def v_shaped(model, ctx, ceiling, probe, level):
        return peak_plan.PeakTrial(ceiling, 200 * 1024 + abs(ceiling - 64 * 1024) * 4, lossless=False, projected=["a"])

    monkeypatch.setattr(peak_plan, "probe_peak", v_shaped)
    trials = peak_plan.peak_search(None, None, 100 * 1024, lambda c: None, "all", highest=1024 * 1024)
    ceilings = [t.ceiling_bytes // 1024 for t in trials]
    lowest = peak_plan.lowest(trials).ceiling_bytes // 1024
    assert 56 <= lowest <= 64  # the walk's step nearest the bottom of the V
    assert sorted(set(ceilings))[:2] == [30, 43]  # two steps below the lowest, then no further down
    assert all(lowest // 2 < c < lowest for c in ceilings[-3:])  # the bisection just below the lowest
    met = peak_plan.peak_search(None, None, 300 * 1024, lambda c: None, "all", highest=1024 * 1024)
    assert peak_plan.choose(met, 300 * 1024).peak_bytes <= 300 * 1024  # a size that is met stops as before


def test_int8_alone_quantizes_with_a_smaller_peak_than_quantize_static():
    """`compile --int8` alone is `--peak lossless --int8`: onnxruntime's tools quantize the original,
    tiled losslessly, and its peak (int8 graph at its own dtypes, as onnxruntime runs it) is below what
    onnxruntime's own quantize_static flow gives the same model."""
    from fmcompress.compiler import CompileOptions

    assert CompileOptions(int8=True).peak == "lossless" and CompileOptions(int8=True).runtime == "ort"
    assert CompileOptions(int8=True, ceiling="1GB").peak is None  # a quantize-only run stays one
    model = conv_chain()
    result = api.compile(model, int8=True, **FAST)
    peak = result.report["runtime"]["peak"]
    assert peak["lossless"] and not result.report["maps"] and result.report["int8"]["float_nodes"] == []
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(4)]
    theirs = runtime_view(ort_quantize_static(model, feeds), level="all").peak_bytes
    ours = runtime_view(result.model, level="all").peak_bytes
    assert ours == peak["verified"]["computed_peak_bytes"] < theirs
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert np.corrcoef(_run(result.model, x).ravel(), _run(model, x).ravel())[0, 1] > 0.99


def test_cli_int8_alone_says_what_it_did(tmp_path):
    path = tmp_path / "chain.onnx"
    onnx.save(conv_chain(), str(path))
    runner = CliRunner()
    done = runner.invoke(main, ["compile", str(path), "--int8", "--method", "pca", "--num-samples", "8",
                                "-q"])
    assert done.exit_code == 0, done.output
    assert "the smallest tiling alone reaches (lossless)" in done.stdout.splitlines()[-1]
    missing = runner.invoke(main, ["compile", str(path), "--method", "pca"])
    assert missing.exit_code == 2 and "--int8" in missing.output
