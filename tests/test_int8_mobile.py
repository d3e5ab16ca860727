"""compile --int8 end to end on a mobile block (issue #21's test list): a depthwise conv,
HardSwish (which onnxruntime has no integer kernel for) and a residual Add, checked on
the graph onnxruntime itself optimises and runs; the exact rewrites fmcompress/int8.py
makes for onnxruntime's integer kernels (rule a'')."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from fmcompress import api
from fmcompress.passes.div_to_mul import DivToMulPass
from fmcompress.passes.hard_activations import HardActivationsPass
from fmcompress.passes.runtime import optimized_model

SIZE = 32


def mobile_block(act: str = "HardSwish") -> onnx.ModelProto:
    """stem conv 3->16, Relu; depthwise 3x3 (group 16), `act`; pointwise 16->16; Add with
    the stem; global pool; classifier. `act` "inlined": HardSwish as onnxruntime inlines it
    and paddle2onnx writes it, `x * Clip(x + 3, 0, 6) / 6`."""
    inlined = act == "inlined"
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32),
                                       name)

    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="stem", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="stem_relu"),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], name="depthwise", kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1], group=16),
             *(inlined_hardswish("c1", "h1") if inlined else [helper.make_node(act, ["c1"], ["h1"], name="activation")]),
             helper.make_node("Conv", ["h1", "w2"], ["c2"], name="pointwise", kernel_shape=[1, 1]),
             helper.make_node("Add", ["c2", "r0"], ["s"], name="add"),
             helper.make_node("GlobalAveragePool", ["s"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc", transB=1)]
    inits = [weight("w0", 16, 3, 3, 3), weight("w1", 16, 1, 3, 3), weight("w2", 16, 16, 1, 1), weight("fc", 10, 16)]
    inits += [numpy_helper.from_array(np.array(value, np.float32), name)
              for name, value in (("three", 3.0), ("zero", 0.0), ("six", 6.0))] if inlined else []
    graph = helper.make_graph(nodes, "mobile", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def inlined_hardswish(x: str, out: str) -> list[onnx.NodeProto]:
    return [helper.make_node("Add", [x, "three"], ["hs_shift"], name="hs_add"),
            helper.make_node("Clip", ["hs_shift", "zero", "six"], ["hs_gate"], name="hs_clip"),
            helper.make_node("Mul", [x, "hs_gate"], ["hs_product"], name="hs_mul"),
            helper.make_node("Div", ["hs_product", "six"], [out], name="hs_div")]


def test_int8_mobile_block_runs_wholly_in_integer_kernels():
    """HardSwish has no integer kernel in onnxruntime; written as Mul, Add and Clip
    (passes/hard_activations.py) every conv, the activation and the Add run on uint8."""
    result = api.compile(mobile_block(), ceiling="8KB", int8=True, method="pca", num_samples=16,
                         latency_rounds=1, latency_repeats=1, measure_memory=False)
    section = result.report["int8"]
    ops = [node.op_type for node in optimized_model(result.model, section["level"]).graph.node]
    assert "Conv" not in ops and "FusedConv" not in ops and "HardSwish" not in ops and "HardSigmoid" not in ops
    assert sum(count for op, count in section["integer_ops"].items() if op.endswith("QLinearConv")) >= 3
    assert section["float_nodes"] == [] and section["float_bytes"] == 0
    _assert_close_to(mobile_block(), result.model)


def test_int8_report_names_the_float_node_left_and_its_bytes():
    """Tanh has no integer kernel: it, and only what it needs, is named with its bytes."""
    result = api.compile(mobile_block("Tanh"), ceiling="8KB", int8=True, method="pca", num_samples=16,
                         latency_rounds=1, latency_repeats=1, measure_memory=False)
    section = result.report["int8"]
    runs = optimized_model(result.model, section["level"])
    floats = section["float_nodes"]
    assert floats and section["float_bytes"] == sum(entry["bytes"] for entry in floats) > 0
    assert {entry["op"] for entry in floats} == {"DequantizeLinear", "Tanh"}
    produced = {out: node for node in runs.graph.node for out in node.output}
    for entry in floats:  # every listed tensor is a float map the graph onnxruntime runs really makes
        assert entry["tensor"] in produced and sorted(entry["shape"]) == sorted([1, 16, SIZE, SIZE])  # NHWC at `all`
        assert entry["bytes"] == 4 * 16 * SIZE * SIZE
    _assert_close_to(mobile_block("Tanh"), result.model)


def _assert_close_to(model: onnx.ModelProto, quantized: onnx.ModelProto) -> None:
    x = np.random.default_rng(2).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    got = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert got[0].shape == (1, 10) and np.corrcoef(got[0].ravel(), expected[0].ravel())[0, 1] > 0.9


def test_int8_inlined_hardswish_runs_wholly_in_integer_kernels():
    """Its Div by 6 becomes a Mul by 1/6 (passes/div_to_mul.py), which onnxruntime runs as
    QLinearMul: no float map is left, where the Div kept two (its DequantizeLinear's and its own)."""
    model = mobile_block("inlined")
    result = api.compile(model, ceiling="8KB", int8=True, method="pca", num_samples=16,
                         latency_rounds=1, latency_repeats=1, measure_memory=False)
    section = result.report["int8"]
    assert section["float_nodes"] == [] and section["float_bytes"] == 0
    assert "Div" not in [node.op_type for node in optimized_model(result.model, section["level"]).graph.node]
    assert section["integer_ops"].get("com.microsoft.QLinearMul", 0) >= 2  # x * gate, and * 1/6
    _assert_close_to(model, result.model)


def test_div_to_mul_keeps_the_function_and_leaves_what_it_cannot_rewrite():
    """Rule a against onnx's reference implementation; a constant divided by a map, and a
    division by a constant holding a zero, stay Divs."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 3])
    nodes = [helper.make_node("Div", ["x", "per_channel"], ["a"], name="by_channel"),
             helper.make_node("Div", ["a", "six"], ["b"], name="by_scalar"),
             helper.make_node("Div", ["six", "b"], ["c"], name="of_constant"),
             helper.make_node("Div", ["c", "with_zero"], ["y"], name="by_zero")]
    inits = [numpy_helper.from_array(np.array([[[2.0]], [[-4.0]]], np.float32), "per_channel"),
             numpy_helper.from_array(np.array(6.0, np.float32), "six"),
             numpy_helper.from_array(np.array([[[0.0]], [[3.0]]], np.float32), "with_zero")]
    model = helper.make_model(helper.make_graph(nodes, "divs", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    result = DivToMulPass()(model)
    rewritten = result.model
    onnx.checker.check_model(rewritten, full_check=True)
    assert result.data["rewritten"] == 2
    assert [node.op_type for node in rewritten.graph.node] == ["Mul", "Mul", "Div", "Div"]
    assert [node.op_type for node in model.graph.node] == ["Div"] * 4  # the input model is untouched
    feed = {"x": np.random.default_rng(0).uniform(0.5, 2.0, (1, 2, 3, 3)).astype(np.float32)}
    with np.errstate(divide="ignore"):
        expected = ReferenceEvaluator(model).run(None, feed)[0]
        got = ReferenceEvaluator(rewritten).run(None, feed)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_hard_activations_are_their_mul_add_and_clip():
    """passes/hard_activations.py rules a and b against onnx's reference implementation."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 4])
    nodes = [helper.make_node("HardSigmoid", ["x"], ["gate"], name="gate", alpha=0.3, beta=0.4),
             helper.make_node("HardSwish", ["gate"], ["swish"], name="swish"),
             helper.make_node("Add", ["swish", "x"], ["y"], name="sum")]
    model = helper.make_model(helper.make_graph(nodes, "hard", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    rewritten = HardActivationsPass()(model).model
    onnx.checker.check_model(rewritten, full_check=True)
    assert sorted({node.op_type for node in rewritten.graph.node}) == ["Add", "Clip", "Mul"]
    feed = {"x": np.linspace(-8, 8, 24, dtype=np.float32).reshape(1, 2, 3, 4)}  # both clip bounds reached
    np.testing.assert_allclose(ReferenceEvaluator(rewritten).run(None, feed)[0],
                               ReferenceEvaluator(model).run(None, feed)[0], rtol=1e-6, atol=1e-7)
