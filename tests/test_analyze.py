"""The memory analysis pass: grouping rules on small graphs, the paper's ResNet-18 figures,
real models from PyPI wheels checked against onnxruntime, and every bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from fmcompress import analyze
from fmcompress.cli import main
from fmcompress.errors import InputError
from fmcompress.evaluation.thirdparty import REAL_MODELS, real_model
from fmcompress.passes import PassContext, Pipeline
from fmcompress.passes.memory import MemoryAnalysisPass

RNG = np.random.default_rng(0)


def weight(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def conv(name: str, x: str, w: str, out: str, k: int = 3, **attrs) -> onnx.NodeProto:
    pads = [k // 2] * 4
    return helper.make_node("Conv", [x, w], [out], name=name, kernel_shape=[k, k], pads=pads, **attrs)


def make_model(nodes, inits, out: str, out_shape, in_shape=(1, 4, 8, 8), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, list(out_shape))], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def stored_names(model, **kwargs) -> list[str]:
    return [m.name for m in analyze(model, **kwargs).stored]


def test_conv_relu_chain_keeps_only_group_outputs():
    model = make_model(
        [conv("c1", "x", "w1", "a"), helper.make_node("Relu", ["a"], ["r"], name="relu"),
         conv("c2", "r", "w2", "y")],
        [weight("w1", 8, 4, 3, 3), weight("w2", 8, 8, 3, 3)], "y", (1, 8, 8, 8))
    report = analyze(model)
    assert [m.name for m in report.stored] == ["x", "r", "y"]
    assert [m.role for m in report.stored] == ["input", "map", "output"]
    assert report.stored[1].bytes == 8 * 8 * 8 * 4
    assert {m.name for m in report.strict} == {"x", "a", "r", "y"}


def test_swish_pattern_and_hardswish_pattern_fuse_into_the_conv_group():
    model = make_model(
        [conv("c1", "x", "w1", "a"), helper.make_node("Sigmoid", ["a"], ["s"]),
         helper.make_node("Mul", ["a", "s"], ["silu"]),
         conv("c2", "silu", "w2", "b"),
         helper.make_node("Add", ["b", "three"], ["b3"]), helper.make_node("Clip", ["b3", "zero", "six"], ["cl"]),
         helper.make_node("Mul", ["b", "cl"], ["bm"]), helper.make_node("Div", ["bm", "six"], ["hs"]),
         conv("c3", "hs", "w3", "y")],
        [weight("w1", 8, 4, 3, 3), weight("w2", 8, 8, 3, 3), weight("w3", 8, 8, 3, 3),
         numpy_helper.from_array(np.array(3, np.float32), "three"),
         numpy_helper.from_array(np.array(0, np.float32), "zero"),
         numpy_helper.from_array(np.array(6, np.float32), "six")], "y", (1, 8, 8, 8))
    assert stored_names(model) == ["x", "silu", "hs", "y"]


def test_residual_block_with_downsample_is_expanded_on_read():
    nodes = [
        conv("stem", "x", "w0", "s0"), helper.make_node("Relu", ["s0"], ["X"], name="stem_relu"),
        conv("c1", "X", "w1", "a", strides=[2, 2]), helper.make_node("Relu", ["a"], ["ar"]),
        conv("c2", "ar", "w2", "b"),
        helper.make_node("Conv", ["X", "wd"], ["d"], name="down", kernel_shape=[1, 1], strides=[2, 2]),
        helper.make_node("Add", ["b", "d"], ["sum"]), helper.make_node("Relu", ["sum"], ["out"]),
        helper.make_node("GlobalAveragePool", ["out"], ["y"]),
    ]
    model = make_model(nodes, [weight("w0", 8, 4, 3, 3), weight("w1", 16, 8, 3, 3), weight("w2", 16, 16, 3, 3),
                               weight("wd", 16, 8, 1, 1)], "y", (1, 16, 1, 1))
    assert stored_names(model) == ["x", "X", "ar", "y"]


def test_constants_and_shape_arithmetic_are_not_feature_maps():
    # paddle2onnx style: the weight is a Constant node; the reshape target comes from Shape.
    w = helper.make_node("Constant", [], ["w"], value=weight("wv", 8, 4, 3, 3))
    nodes = [w, conv("c1", "x", "w", "a"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Shape", ["r"], ["shp"]),
             helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
             helper.make_node("Reshape", ["r", "target"], ["y"])]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "axes"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1")]
    model = make_model(nodes, inits, "y", (1, 512))
    report = analyze(model)
    assert [m.name for m in report.stored] == ["x", "y"]  # the Reshape view joins the conv chain
    assert {m.name for m in report.strict} == {"x", "a", "r", "y"}


def test_quantized_maps_count_their_integer_bytes_and_act_bytes_overrides():
    nodes = [conv("c1", "x", "w1", "a"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "sc", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "sc", "zp"], ["dq"]),
             conv("c2", "dq", "w2", "y")]
    inits = [weight("w1", 8, 4, 3, 3), weight("w2", 8, 8, 3, 3),
             numpy_helper.from_array(np.array(0.1, np.float32), "sc"),
             numpy_helper.from_array(np.array(0, np.uint8), "zp")]
    model = make_model(nodes, inits, "y", (1, 8, 8, 8))
    report = analyze(model)
    q = {m.name: m for m in report.stored}["q"]
    assert [m.name for m in report.stored] == ["x", "q", "y"]
    assert (q.dtype, q.bytes) == ("uint8", 8 * 8 * 8)
    assert {m.name: m.bytes for m in analyze(model, act_bytes=1).stored}["y"] == 8 * 8 * 8


def test_live_view_sums_the_maps_alive_at_once():
    # x feeds two branches that meet at an Add: x, a and b are alive together.
    nodes = [conv("ca", "x", "wa", "a0"), helper.make_node("Relu", ["a0"], ["a"]),
             conv("cb", "x", "wb", "b0"), helper.make_node("Relu", ["b0"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["y"], axis=1)]
    model = make_model(nodes, [weight("wa", 4, 4, 3, 3), weight("wb", 4, 4, 3, 3)], "y", (1, 8, 8, 8))
    report = analyze(model)
    each = 4 * 8 * 8 * 4
    assert report.peaks["stored"] == 2 * each  # the Concat output
    assert report.peaks["live"] == 4 * each  # a, b and y while Concat runs (x is dead by then)
    assert max(p.bytes for p in report.live) == report.summary["live"].live_peak_bytes


def test_onnxruntime_fills_in_shapes_of_contrib_ops():
    nodes = [conv("c1", "x", "w1", "a"),
             helper.make_node("Gelu", ["a"], ["g"], domain="com.microsoft", name="gelu"),
             conv("c2", "g", "w2", "y")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[weight("w1", 8, 4, 3, 3), weight("w2", 8, 8, 3, 3)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    report = analyze(model)
    assert {m.name: m.shape for m in report.strict}["g"] == [1, 8, 8, 8]


def test_unknown_custom_op_is_named():
    nodes = [conv("c1", "x", "w1", "a"), helper.make_node("Frobnicate", ["a"], ["g"], domain="acme.ops"),
             conv("c2", "g", "w2", "y")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[weight("w1", 8, 4, 3, 3), weight("w2", 8, 8, 3, 3)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("acme.ops", 1)])
    with pytest.raises(InputError, match="acme.ops::Frobnicate"):
        analyze(model)


def test_pipeline_runs_the_pass_and_keeps_its_result():
    model = make_model([conv("c1", "x", "w1", "y")], [weight("w1", 8, 4, 3, 3)], "y", (1, 8, 8, 8))
    out, ctx = Pipeline([MemoryAnalysisPass()]).run(model, PassContext())
    assert out is model
    assert [m.name for m in ctx.memory.stored] == ["x", "y"]


# --- the paper's ResNet-18 configuration -------------------------------------------------


def test_resnet18_at_4x_marks_the_papers_nine_maps(resnet18_224, tmp_path):
    json_path = tmp_path / "a.json"
    result = CliRunner().invoke(main, ["analyze", str(resnet18_224), "--ceiling", "4x", "--json", str(json_path)])
    assert result.exit_code == 0, result.output
    data = json.loads(json_path.read_text())
    assert data["ceiling_bytes"] == 200704
    over = [m for m in data["stored"] if m["over_ceiling"] and m["role"] == "map"]
    shapes = sorted(tuple(m["shape"][1:]) for m in over)
    assert shapes == [(64, 56, 56)] * 5 + [(128, 28, 28)] * 4
    assert data["not_compressible_over_ceiling"] == ["input"]  # 3x224x224 floats, a graph input
    assert set(data["peaks"]) == {"stored", "live", "strict", "runtime"}
    assert data["peaks"]["runtime"] > 3_000_000  # onnxruntime's full-width 64x112x112 stem output


def test_fail_over_ceiling_is_a_ci_gate(resnet18_224):
    runner = CliRunner()
    failed = runner.invoke(main, ["analyze", str(resnet18_224), "--ceiling", "4x", "--fail-over-ceiling", "-q"])
    assert failed.exit_code == 1
    assert "9 stored feature map(s) above the ceiling of 200704 bytes" in failed.output


def test_graph_inputs_trip_the_gate_only_when_included(tmp_path):
    # the 4x8x8 input (1024 B) is the largest tensor; the strided conv's 8x4x4 maps are 512 B
    model = make_model([conv("c1", "x", "w1", "a", strides=[2, 2]), helper.make_node("Relu", ["a"], ["r"]),
                        conv("c2", "r", "w2", "y")],
                       [weight("w1", 8, 4, 3, 3), weight("w2", 8, 8, 3, 3)], "y", (1, 8, 4, 4))
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    runner = CliRunner()
    passed = runner.invoke(main, ["analyze", str(path), "--ceiling", "600", "--fail-over-ceiling"])
    assert passed.exit_code == 0, passed.output
    assert "over (graph input)" in passed.output and "over it but not compressible: 1 graph input" in passed.output
    gated = runner.invoke(main, ["analyze", str(path), "--ceiling", "600", "--fail-over-ceiling", "--include-inputs", "-q"])
    assert gated.exit_code == 1 and "x" in gated.output


def test_table_modes_and_plot(resnet18_224, tmp_path):
    runner = CliRunner()
    for mode in ("stored", "live", "strict"):
        result = runner.invoke(main, ["analyze", str(resnet18_224), "--ceiling", "4x", "--mode", mode, "--top", "3"])
        assert result.exit_code == 0 and "peaks: stored 784.0 KiB" in result.output
    plot = tmp_path / "m.png"
    assert runner.invoke(main, ["analyze", str(resnet18_224), "--ceiling", "4x", "--plot", str(plot), "-q"]).exit_code == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def recognizer_like_model() -> onnx.ModelProto:
    """A text recognizer's shape: conv maps, then a [1, 96, 64] softmax output larger than any of them."""
    nodes = [conv("c1", "x", "w1", "a"), helper.make_node("Relu", ["a"], ["r"]),
             conv("c2", "r", "w2", "b"), helper.make_node("Relu", ["b"], ["r2"]),
             conv("c3", "r2", "w3", "logits", k=1),
             helper.make_node("Reshape", ["logits", "target"], ["seq"]),
             helper.make_node("Softmax", ["seq"], ["probs"], axis=1)]
    inits = [weight("w1", 8, 4, 3, 3), weight("w2", 16, 8, 3, 3), weight("w3", 96, 16, 1, 1),
             numpy_helper.from_array(np.array([1, 96, 64], np.int64), "target")]
    return make_model(nodes, inits, "probs", (1, 96, 64))


def test_relative_ceiling_divides_the_largest_compressible_map_not_the_output(tmp_path):
    model = recognizer_like_model()
    sizes = {m.name: m.bytes for m in analyze(model).stored}
    assert sizes == {"x": 1024, "r": 2048, "r2": 4096, "probs": 96 * 64 * 4}  # the output is the largest
    report = analyze(model, ceiling="4x")
    assert report.ceiling_bytes == 4096 // 4  # r2, the largest compressible map
    assert [m.name for m in report.over_ceiling()] == ["r", "r2"]
    path, json_path = tmp_path / "rec.onnx", tmp_path / "a.json"
    onnx.save(model, str(path))
    result = CliRunner().invoke(main, ["analyze", str(path), "--ceiling", "4x", "--json", str(json_path)])
    assert result.exit_code == 0, result.output
    data = json.loads(json_path.read_text())
    assert data["ceiling_bytes"] == 1024
    assert (data["over_ceiling"], data["not_compressible_over_ceiling"]) == (["r", "r2"], ["probs"])
    assert "over (graph output)" in result.output


def test_relative_ceiling_needs_a_compressible_map(tmp_path):
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)]
    model = make_model(nodes, [weight("w", 10, 256)], "y", (1, 10))
    path = tmp_path / "mlp.onnx"
    onnx.save(model, str(path))
    message = run_bad([str(path), "--ceiling", "4x"], tmp_path)
    assert "largest compressible stored map" in message and "has none" in message
    assert analyze(model, ceiling="100").ceiling_bytes == 100  # an absolute ceiling needs none


# --- real models from PyPI wheels ---------------------------------------------------------


def onnxruntime_shapes(model: onnx.ModelProto, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [o for n in probe.graph.node for o in n.output if o]
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in {o.name for o in probe.graph.output})
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: RNG.standard_normal(shape).astype(np.float32)}
    return {o.name: tuple(v.shape) for o, v in zip(session.get_outputs(), session.run(None, feed), strict=True)}


@pytest.mark.real
@pytest.mark.parametrize("name", ["ppocr-cls", "ppocr-det", "yolov8n"])
def test_real_models_strict_shapes_equal_onnxruntime(name):
    path = real_model(name)
    shape = REAL_MODELS[name].input_shape
    report = analyze(path, ceiling="4x", input_shapes=[",".join(map(str, shape))])
    actual = onnxruntime_shapes(onnx.load(str(path)), shape)
    assert len(report.strict) > 50
    for fmap in report.strict:
        if fmap.role != "input":
            assert tuple(fmap.shape) == actual[fmap.name], fmap.name
    stored = {m.name for m in report.stored}
    assert stored <= {m.name for m in report.strict}
    assert report.peaks["strict"] >= report.peaks["stored"] > 0
    assert report.peaks["live"] >= report.peaks["stored"]
    assert report.over_ceiling()


@pytest.mark.real
@pytest.mark.parametrize("mode", ["stored", "live", "strict"])
def test_real_models_analyze_in_every_view_from_the_cli(mode, tmp_path):
    for name in ("ppocr-cls", "yolov8n"):
        shape = ",".join(map(str, REAL_MODELS[name].input_shape))
        result = CliRunner().invoke(main, ["analyze", str(real_model(name)), "--input-shape", shape,
                                           "--ceiling", "256KB", "--mode", mode, "--top", "5"])
        assert result.exit_code == 0, result.output
        assert "peaks: stored" in result.output


# --- bad input: one line, exit 2, nothing written -----------------------------------------


def run_bad(args: list[str], tmp_path) -> str:
    json_path = tmp_path / "out.json"
    result = CliRunner().invoke(main, ["analyze", *args, "--json", str(json_path)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert not json_path.exists()
    return lines[0]


def test_missing_file(tmp_path):
    assert "no such file" in run_bad([str(tmp_path / "nope.onnx")], tmp_path)


@pytest.mark.parametrize("content", [b"", b"\x08\x07\x12\x03abc\xff\xff\xff\xff", np.random.default_rng(1).bytes(5000),
                                     b'{"not": "a model"}\n'])
def test_files_that_are_not_models(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    assert "bad.onnx" in run_bad([str(path)], tmp_path)


def test_truncated_model(tmp_path, resnet18_224):
    path = tmp_path / "truncated.onnx"
    path.write_bytes(resnet18_224.read_bytes()[:100000])
    assert "truncated.onnx" in run_bad([str(path)], tmp_path)


def test_model_with_external_data(tmp_path):
    model = make_model([conv("c1", "x", "w1", "y")], [weight("w1", 64, 4, 3, 3)], "y", (1, 64, 8, 8))
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, size_threshold=0)
    assert "external data" in run_bad([str(tmp_path / "ext.onnx")], tmp_path)


def test_model_over_two_gigabytes(tmp_path):
    path = tmp_path / "huge.onnx"
    with open(path, "wb") as handle:  # sparse: no disk is used
        handle.truncate(2**31 + 10)
    assert "2 GB" in run_bad([str(path)], tmp_path)


def test_unresolved_dims_name_the_input_and_the_flag(tmp_path):
    message = run_bad([str(real_model("ppocr-cls"))], tmp_path)
    assert "x [1, 3, ?, ?]" in message and "--input-shape" in message


@pytest.mark.parametrize("spec, expected", [
    ("images=1,3,48,192", "not an input"), ("1,3,48", "rank 3"), ("x=1,4,48,192", "dim 1 is fixed to 3"),
    ("1,3,a,b", "invalid shape"), ("x=0,3,48,192", "at least 1"),
])
def test_bad_input_shapes(tmp_path, spec, expected):
    assert expected in run_bad([str(real_model("ppocr-cls")), "--input-shape", spec], tmp_path)


@pytest.mark.parametrize("ceiling", ["0", "-5KB", "abc", "0x", "4y"])
def test_bad_ceilings(tmp_path, resnet18_224, ceiling):
    assert "ceiling" in run_bad([str(resnet18_224), "--ceiling", ceiling], tmp_path)


def test_gate_without_ceiling_is_a_usage_error(resnet18_224, tmp_path):
    result = CliRunner().invoke(main, ["analyze", str(resnet18_224), "--fail-over-ceiling"])
    assert result.exit_code == 2 and "--ceiling" in result.output


def test_input_model_is_never_changed(resnet18_224, tmp_path):
    before = resnet18_224.read_bytes()
    CliRunner().invoke(main, ["analyze", str(resnet18_224), "--ceiling", "4x", "--json", str(tmp_path / "a.json")])
    assert resnet18_224.read_bytes() == before
