"""compile --runtime ort: the runtime plan, conv splitting, and the ceiling in onnxruntime itself."""

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
from fmcompress.errors import InputError, VerificationError
from fmcompress.passes import PassContext
from fmcompress.passes.fold import FoldProjectionsPass
from fmcompress.passes.runtime import conv_workspace_elements, runtime_view
from fmcompress.passes.split_conv import SplitConvPass


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def stem_net(size: int = 64) -> onnx.ModelProto:
    """A ResNet-style stem and one residual block at 1/4 resolution, then a classifier."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:]))
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="stem", kernel_shape=[7, 7], strides=[2, 2],
                         pads=[3, 3, 3, 3]),
        helper.make_node("Relu", ["c0"], ["r0"], name="stem_relu"),
        helper.make_node("MaxPool", ["r0"], ["p0"], name="pool", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["p0", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "p0"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="down", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc", transB=1),
    ]
    inits = [weight("w0", 32, 3, 7, 7), weight("w1", 32, 32, 3, 3), weight("w2", 32, 32, 3, 3),
             weight("w3", 64, 32, 3, 3), weight("fc", 10, 64)]
    inits += [numpy_helper.from_array(np.full(c, 0.05, np.float32), f"b{i}") for i, c in enumerate((32, 32, 32, 64))]
    graph = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_workspace_rule_matches_mlas():
    """Rule e of passes/runtime.py: full expansion only with more filters than output positions."""
    assert conv_workspace_elements((256, 256, 3, 3), (1, 256, 14, 14), 1, [1, 1], [1, 1, 1, 1]) == 196 * 2304
    assert conv_workspace_elements((64, 64, 3, 3), (1, 64, 28, 28), 1, [1, 1], [1, 1, 1, 1]) == 0
    assert conv_workspace_elements((512, 256, 1, 1), (1, 512, 7, 7), 1, [1, 1], [0, 0, 0, 0]) == 0  # a plain GEMM
    assert conv_workspace_elements((512, 256, 1, 1), (1, 512, 7, 7), 1, [2, 2], [0, 0, 0, 0]) == 49 * 256


def test_split_conv_is_exact_and_removes_the_scratch():
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((96, 16, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(96).astype(np.float32), "b")
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 96, 6, 6])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    before = onnx.ModelProto.FromString(model.SerializeToString())
    result = SplitConvPass(budget_bytes=1024)(model, PassContext())
    assert result.data == [{"node": "conv", "filters": 96, "parts": 3}]  # 96 filters, 36 positions
    assert model == before  # the input model is untouched
    onnx.checker.check_model(result.model, full_check=True)
    x = rng.standard_normal((1, 16, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(result.model, x), _run(model, x), rtol=1e-5, atol=1e-5)
    assert not [t for t in runtime_view(result.model).tensors if t.role == "workspace"]
    assert [t for t in runtime_view(model).tensors if t.role == "workspace"]


def test_a_grouped_conv_is_split_per_group_and_stays_exact():
    """Rule b' of split_conv: AlexNet's two-group convs expand each group's input; each group
    becomes its own group-1 convs over a Slice of its channels, concatenated in group order."""
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.standard_normal((96, 8, 3, 3)).astype(np.float32), "w")  # 2 groups of 48
    b = numpy_helper.from_array(rng.standard_normal(96).astype(np.float32), "b")
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                            group=2)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 96, 5, 5])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert [t for t in runtime_view(model).tensors if t.role == "workspace"]  # 48 filters a group > 25 positions
    result = SplitConvPass(budget_bytes=512)(model, PassContext())
    assert result.data == [{"node": "conv", "filters": 96, "parts": 4}]  # 2 groups x 2 parts of 24
    onnx.checker.check_model(result.model, full_check=True)
    x = rng.standard_normal((1, 16, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(_run(result.model, x), _run(model, x), rtol=1e-5, atol=1e-5)
    assert not [t for t in runtime_view(result.model).tensors if t.role == "workspace"]


def test_compile_runtime_ort_holds_the_ceiling_in_onnxruntime_and_tiling_is_exact(tmp_path):
    model = stem_net()
    ceiling = 16 * 1024
    result = api.compile(model, ceiling=f"{ceiling}B", method="pca", runtime="ort", num_samples=16,
                         measure_memory=False, latency_rounds=1, latency_repeats=2)
    runtime = result.report["runtime"]
    assert runtime["before"]["computed_peak_bytes"] > 3 * ceiling
    after = runtime_view(result.model, ceiling_bytes=ceiling)  # held at the planning level, extended
    reported = runtime_view(result.model, level="all")  # the report's figures: a user's default session
    assert not after.over_ceiling() and reported.peak_bytes == runtime["after"]["computed_peak_bytes"]
    assert runtime["regions"] and all(r["bands"] >= 2 for r in runtime["regions"])
    # exact: the same projections folded without tiling give the same outputs
    untiled = FoldProjectionsPass(result.projections)(model, PassContext()).model
    x = np.random.default_rng(2).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(result.model, x), _run(untiled, x), rtol=1e-4, atol=1e-5)
    assert result.report["peaks"]["after"]["runtime"] == reported.peak_bytes


def test_lossless_when_tiling_alone_fits():
    """A generous ceiling: every region ends at a tensor that fits, nothing is projected."""
    result = api.compile(stem_net(), ceiling="40KB", method="pca", runtime="ort", num_samples=16,
                         measure_memory=False, latency_rounds=1, latency_repeats=2)
    assert result.report["runtime"]["lossless"] and not result.report["maps"]
    x = np.random.default_rng(3).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(result.model, x), _run(stem_net(), x), rtol=1e-4, atol=1e-5)


def test_infeasible_runtime_ceiling_names_the_tensor():
    with pytest.raises(VerificationError, match="cannot be tiled or projected"):
        api.compile(stem_net(), ceiling="2KB", method="pca", runtime="ort", num_samples=16, measure_memory=False)


def test_cli_runtime_plan_only_and_report(tmp_path):
    path = tmp_path / "stem.onnx"
    onnx.save(stem_net(), str(path))
    plan_json = tmp_path / "plan.json"
    runner = CliRunner()
    planned = runner.invoke(main, ["compile", str(path), "--ceiling", "16KB", "--runtime", "ort", "--plan-only",
                                   "--json", str(plan_json), "-q"])
    assert planned.exit_code == 0, planned.output
    plan = json.loads(plan_json.read_text())
    assert plan["runtime_plan"]["regions"] and not plan["runtime_plan"]["uncovered"]
    out, report = tmp_path / "stem.fmc.onnx", tmp_path / "report.json"
    done = runner.invoke(main, ["compile", str(path), "--ceiling", "16KB", "--runtime", "ort", "--method", "pca",
                                "--num-samples", "16", "-o", str(out), "--json", str(report), "-q"])
    assert done.exit_code == 0, done.output
    data = json.loads(report.read_text())
    # the last line states onnxruntime's ceiling, not the stored view's (whose maps now exist in bands)
    regions = len(data["runtime"]["regions"])
    assert done.stdout.splitlines()[-1].startswith(
        f"wrote {out}: {len(data['maps'])} map(s) compressed; {regions} region(s) tiled; every onnxruntime "
        f"allocation but the graph's inputs and outputs <= 16384 B")
    after = data["runtime"]["after"]
    assert after["computed_peak_bytes"] < data["runtime"]["before"]["computed_peak_bytes"]
    for side in ("before", "after"):  # measured in a fresh process where /proc allows (a model this small
        measured = data["runtime"][side]["measured_peak_bytes"]  # may grow by no page at all)
        assert measured is None or (isinstance(measured, int) and measured >= 0)


def _softmax_net() -> onnx.ModelProto:
    """Conv, then a Softmax over all 1024 positions of each channel (no band can cross it), conv,
    classifier: at 16KB the 64 KiB Softmax output can be neither tiled nor projected."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        scale = np.sqrt(np.prod(shape[1:]))
        return numpy_helper.from_array((rng.standard_normal(shape) / scale).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["a0"]),
             helper.make_node("Reshape", ["a0", "s3"], ["flat"]),
             helper.make_node("Softmax", ["flat"], ["soft"], axis=2),
             helper.make_node("Reshape", ["soft", "s4"], ["back"]),
             helper.make_node("Conv", ["back", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["a1"]),
             helper.make_node("GlobalAveragePool", ["a1"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1)]
    inits = [weight("w0", 16, 3, 3, 3), weight("w1", 16, 16, 3, 3), weight("fc", 10, 16),
             numpy_helper.from_array(np.array([1, 16, 1024], np.int64), "s3"),
             numpy_helper.from_array(np.array([1, 16, 32, 32], np.int64), "s4")]
    graph = helper.make_graph(nodes, "softmax", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_infeasible_runtime_plan_stops_before_data_and_fit(tmp_path, monkeypatch):
    """Rule g: an allocation no band and no projection can bring under the ceiling (a Softmax
    over every position) is refused at plan time: exit 1, the uncovered message, no data, no fit."""
    from fmcompress.passes.fit import FitProjectionsPass
    from fmcompress.passes.prepare_data import PrepareDataPass

    calls = []
    monkeypatch.setattr(FitProjectionsPass, "run", lambda self, model, ctx: calls.append("fit"))
    monkeypatch.setattr(PrepareDataPass, "run", lambda self, model, ctx: calls.append("data"))
    path, out = tmp_path / "softmax.onnx", tmp_path / "out.onnx"
    onnx.save(_softmax_net(), path)
    result = CliRunner().invoke(main, ["compile", str(path), "--ceiling", "16KB", "--runtime", "ort",
                                       "--method", "pca", "--num-samples", "8", "-o", str(out)])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "cannot be tiled or projected under it" in lines[0], result.output
    assert "soft (Softmax, 65536 B)" in lines[0]
    assert calls == [] and not out.exists()


def focus_net(size: int = 64) -> onnx.ModelProto:
    """YOLOv5's Focus stem (strided Slices along H, then W, concatenated along channels), a
    strided conv, HardSwish (inlined by onnxruntime), a classifier."""
    rng = np.random.default_rng(1)
    big, nodes, inits = 1 << 62, [], []

    def ints(name: str, value: int) -> str:
        inits.append(numpy_helper.from_array(np.array([value], np.int64), name))
        return name

    def strided(src: str, out: str, axis: int, start: int) -> None:
        nodes.append(helper.make_node("Slice", [src, ints(f"{out}_s", start), ints(f"{out}_e", big),
                                                ints(f"{out}_a", axis), ints(f"{out}_t", 2)], [out], name=out))

    for r in (0, 1):
        strided("x", f"rows{r}", 2, r)
        for c in (0, 1):
            strided(f"rows{r}", f"part{r}{c}", 3, c)
    inits += [numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32),
                                      name) for name, shape in (("w0", (16, 12, 3, 3)), ("fc", (10, 16)))]
    nodes += [
        helper.make_node("Concat", ["part00", "part10", "part01", "part11"], ["focus"], name="focus", axis=1),
        helper.make_node("Conv", ["focus", "w0"], ["c0"], name="conv", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c0"], ["h0"], name="hswish"),
        helper.make_node("GlobalAveragePool", ["h0"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "focus", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_focus_stem_and_inlined_hardswish_tile_losslessly():
    """The strided Slices and onnxruntime's SpaceToDepth/Gather and HardSigmoid tensors that
    stand for them are covered by bands from the input: nothing projected, ceiling held."""
    ceiling = 20 * 1024
    result = api.compile(focus_net(), ceiling=f"{ceiling}B", method="pca", runtime="ort", num_samples=8,
                         measure_memory=False, latency_rounds=1, latency_repeats=2)
    assert result.report["runtime"]["lossless"] and not result.report["maps"]
    assert not runtime_view(result.model, ceiling_bytes=ceiling).over_ceiling()
    x = np.random.default_rng(3).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(result.model, x), _run(focus_net(), x), rtol=1e-4, atol=1e-5)


def wide_net(size: int = 128) -> onnx.ModelProto:
    """A 3x3 conv at full resolution (8 channels: one channel is size * size * 4 B), a 3x3
    conv at stride 4, a global pool and a classifier."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              strides=[4, 4]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1)]
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal((10, 8)).astype(np.float32), "fc")]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_map_whose_one_channel_is_above_the_ceiling_is_left_to_tiling():
    """At 40KB one channel of a 128x128 map (64 KB) cannot fit at any rank, so the stored
    plan alone refuses; with --runtime ort row bands split it, and compile holds, exactly."""
    with pytest.raises(InputError, match="cannot fit even at rank 1"):
        api.compile(wide_net(), ceiling="40KB", method="pca", num_samples=8, plan_only=True)
    result = api.compile(wide_net(), ceiling="40KB", method="pca", runtime="ort", num_samples=8,
                         measure_memory=False, latency_rounds=1, latency_repeats=1)
    skipped = {entry["name"]: entry["reason"] for entry in result.report["not_compressible"]}
    assert any("left to tiling" in reason for reason in skipped.values())
    assert result.report["runtime"]["lossless"] and not result.report["maps"]
    x = np.random.default_rng(4).standard_normal((1, 3, 128, 128)).astype(np.float32)
    np.testing.assert_allclose(_run(result.model, x), _run(wide_net(), x), rtol=1e-4, atol=1e-5)
