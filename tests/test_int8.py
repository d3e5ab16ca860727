"""compile --int8 (passes/quantize.py): onnxruntime's QDQ quantization of the verified model,
the float nodes left, the int8 fidelity, and the float outputs onnxruntime's tools accept."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from modeltools import with_float_type
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from fmcompress import api
from fmcompress.cli import main
from fmcompress.errors import InputError
from fmcompress.passes.quantize import float_nodes, planned_act_bytes, quantize_int8
from fmcompress.passes.runtime import optimized_model

SIZE = 32


def residual_net(act: str = "Relu", size: int = SIZE) -> onnx.ModelProto:
    """A stem conv, one residual block (conv, `act`, conv, Add with the stem), a strided conv, a classifier."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        scale = 1 / np.sqrt(np.prod(shape[1:]))
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="stem", **conv),
        helper.make_node("Relu", ["c0"], ["r0"], name="stem_relu"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", **conv),
        helper.make_node(act, ["c1"], ["a1"], name="act1"),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], name="conv2", **conv),
        helper.make_node("Add", ["c2", "r0"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="down", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc", transB=1),
    ]
    inits = [weight("w0", 16, 3, 3, 3), weight("w1", 16, 16, 3, 3), weight("w2", 16, 16, 3, 3),
             weight("w3", 32, 16, 3, 3), weight("fc", 10, 32)]
    inits += [numpy_helper.from_array(np.full(c, 0.05, np.float32), f"b{i}") for i, c in enumerate((16, 16, 16, 32))]
    graph = helper.make_graph(nodes, "residual",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _ops(model: onnx.ModelProto, level: str = "extended") -> list[str]:
    return [node.op_type for node in optimized_model(model, level).graph.node]


def _inputs(count: int = 4, size: int = SIZE) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, 3, size, size)).astype(np.float32)} for _ in range(count)]


def _compile(**options):
    return api.compile(residual_net(), method="pca", num_samples=16, latency_rounds=1, latency_repeats=1,
                       measure_memory=False, **options)


def test_int8_compile_residual_is_qdq_and_fully_integer():
    """A projected map (16 KiB at one byte, ceiling 8KB): QDQ out, every Conv and the residual
    Add integer in onnxruntime, nothing left in float, planned at one byte, gate on the int8 model."""
    result = _compile(ceiling="8KB", int8=True)
    model = result.model
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert result.report["act_bytes"] == 1 and result.plan.maps
    section = result.report["int8"]
    assert section["float_nodes"] == [] and section["float_bytes"] == 0
    assert section["integer_ops"].get("com.microsoft.QLinearAdd") == 1
    assert not {"Conv", "Add"} & set(_ops(model))
    assert section["fidelity"]["top1_agreement"] is not None and section["fidelity"]["cosine_similarity"] > 0.9
    # MeasurePass measured the int8 model against the original: int8 rounding shows in its figures
    assert result.report["fidelity"]["relative_error"] > 1e-4
    assert result.report["flops"]["after"] > 0
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": _inputs(1)[0]["x"]})[0].shape == (1, 10)
    assert [i.shape for i in session.get_inputs()] == [["N", 3, SIZE, SIZE]]  # the interface kept


def test_int8_tiled_quantizes_the_input_once():
    """--runtime ort: bands of the input, each band Slice on one uint8 copy of it (rule a),
    every band's Conv and Add integer."""
    result = _compile(ceiling="8KB", int8=True, runtime="ort")
    assert any("_band" in node.name for node in result.model.graph.node)
    assert result.report["int8"]["float_nodes"] == []
    for level in ("extended", "all"):
        ops = _ops(result.model, level)
        assert ops.count("QuantizeLinear") == 1 and "Conv" not in ops  # the int64 Adds order the bands


def test_int8_lists_a_global_pool_summed_in_bands():
    """At 4KB the last map is pooled in bands (passes/tile_emit.py rule i: per-band ReduceSums,
    summed): onnxruntime has no integer ReduceSum, so each band is dequantized; the list says so."""
    result = _compile(ceiling="4KB", int8=True, runtime="ort")
    found = result.report["int8"]["float_nodes"]
    assert {entry["op"] for entry in found} == {"DequantizeLinear", "ReduceSum", "Sum"}
    assert result.report["int8"]["float_bytes"] == sum(entry["bytes"] for entry in found) > 0
    assert all("_band" in entry["node"] or entry["op"] == "Sum" for entry in found)


@pytest.mark.parametrize("runtime", [None, "ort"])
def test_onnxruntime_quantization_accepts_the_float_output(tmp_path, runtime):
    """quant_pre_process (symbolic shape inference included) and quantize_static take compile's
    float output; tiled bands keep static shapes (passes/tile_emit.py rule g)."""
    result = _compile(ceiling="16KB" if runtime else "8KB", runtime=runtime)
    assert any("_band" in node.name for node in result.model.graph.node) == bool(runtime)
    source, prepared, quantized = (str(tmp_path / f"{n}.onnx") for n in ("float", "pre", "int8"))
    onnx.save(result.model, source)
    quant_pre_process(source, prepared)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(_inputs())

        def get_next(self):
            return next(self.batches, None)

    quantize_static(prepared, quantized, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    session = ort.InferenceSession(quantized, providers=["CPUExecutionProvider"])
    assert session.run(None, _inputs(1)[0])[0].shape == (1, 10)


def test_float_nodes_name_what_has_no_integer_kernel():
    """Rule c: onnxruntime has no integer Tanh: the Tanh and the DequantizeLinear before it
    run in float, each on a 16x32x32 float map; the rest is integer."""
    quantized = quantize_int8(residual_net("Tanh"), _inputs())
    found = float_nodes(quantized, {"x": (1, 3, SIZE, SIZE)}, "extended")
    assert [(entry["op"], entry["bytes"]) for entry in found] == [("DequantizeLinear", 16 * SIZE * SIZE * 4),
                                                                  ("Tanh", 16 * SIZE * SIZE * 4)]
    assert found[1]["node"] == "act1" and found[1]["shape"] == [1, 16, SIZE, SIZE]


def test_int8_plans_at_one_byte_and_refuses_other_act_bytes():
    assert planned_act_bytes(True, None) == 1 and planned_act_bytes(False, 2) == 2
    with pytest.raises(InputError, match="--act-bytes 2 contradicts"):
        planned_act_bytes(True, 2)


def test_cli_int8_exit_codes(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(residual_net(), str(path))
    runner = CliRunner()
    bad = runner.invoke(main, ["compile", str(path), "--ceiling", "8KB", "--int8", "--act-bytes", "2", "-q"])
    assert bad.exit_code == 2 and "--act-bytes 2 contradicts" in bad.output
    assert not (tmp_path / "net.fmc.onnx").exists()
    half = tmp_path / "half.onnx"
    onnx.save(with_float_type(residual_net(), TensorProto.FLOAT16), str(half))
    refused = runner.invoke(main, ["compile", str(half), "--ceiling", "8KB", "--int8", "--method", "pca",
                                   "--num-samples", "8", "-q"])
    assert refused.exit_code == 2 and "--int8 quantizes float32 models" in refused.output, refused.output
    assert not (tmp_path / "half.fmc.onnx").exists()
