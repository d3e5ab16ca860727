"""compile --int8 (passes/quantize.py, fmcompress/int8.py, passes/align_ranks.py,
passes/quantizable.py): onnxruntime's QDQ quantization of the verified model, the float
nodes left, the int8 fidelity, and the float outputs onnxruntime's tools accept."""

from __future__ import annotations

import importlib
import json
import platform
from dataclasses import replace

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
from fmcompress.compiler import peak_probe
from fmcompress.errors import InputError
from fmcompress.int8 import quantize_int8, quantized_layout
from fmcompress.memprobe import measure_peak
from fmcompress.passes.align_ranks import aligned_rank
from fmcompress.passes.base import PassContext, Pipeline
from fmcompress.passes.plan import PlannedMap
from fmcompress.passes.quantize import float_nodes, planned_act_bytes
from fmcompress.passes.runtime import integer_conv_workspaces, optimized_model, runtime_view
from fmcompress.passes.split_conv import SplitConvPass, integer_split
from fmcompress.passes.tile_bands import bands_for_budget, peak_band_bytes
from fmcompress.passes.tile_emit import pool_in_bands

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
    # quantize.py rule g: the original quantized alone, its fidelity to the float original and the latency against it
    baseline = section["original"]
    assert baseline["latency_ms"]["ratio"] > 0 and baseline["latency_ms"]["original_int8"] > 0
    assert 0 < baseline["fidelity"]["relative_error"] < 0.5  # int8 rounding, not a broken model
    assert baseline["fidelity"]["cosine_similarity"] > 0.9


def test_int8_tiled_bands_quantize_their_own_rows_of_the_input():
    """--runtime ort at 3KB: bands of a few rows each take their rows of the input by a float
    Gather (tile rule f'') and quantize them themselves (int8.py rule a'): no uint8 copy of the
    whole input; every band's Conv and Add integer."""
    result = _compile(ceiling="3KB", int8=True, runtime="ort")
    bands = sum(region["bands"] for region in result.report["runtime"]["regions"] if region["starts"][0] == "x")
    gathers = [node for node in result.model.graph.node if node.op_type == "Gather" and node.input[0] == "x"]
    assert len(gathers) == bands > 1 and result.report["int8"]["float_nodes"] == []
    for level in ("extended", "all"):
        ops = _ops(result.model, level)
        assert ops.count("QuantizeLinear") == len(gathers) and "Conv" not in ops  # the int64 Adds order the bands
    copies = [t for t in runtime_view(result.model, level="all").tensors if t.shape == [1, 3, SIZE, SIZE]]
    assert [t.name for t in copies] == ["x"]  # no uint8 copy of the whole input


def test_int8_tiled_bands_of_many_rows_slice_one_copy_of_the_input():
    """At 8KB the later bands need more than a quarter of the input's rows: they Slice one uint8
    copy of it (int8.py rule a), which would be smaller than their float rows."""
    result = _compile(ceiling="8KB", int8=True, runtime="ort")
    ops = [node.op_type for node in result.model.graph.node]
    quantized_input = [node for node in result.model.graph.node if node.op_type == "QuantizeLinear"
                       and node.input[0] == "x"]
    assert "Slice" in ops and len(quantized_input) == 1 and result.report["int8"]["float_nodes"] == []


def test_quantized_layout_is_the_calibrated_graph_without_a_calibration_run(monkeypatch):
    """int8.py rule e, on a peak probe's tiled graph (float band Gathers, an ordering Slice):
    the nodes and the runtime peak of `quantize_int8`'s model, and onnxruntime's calibrator
    never created."""
    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")  # the module, not its function
    probe = peak_probe(3 * 1024, "extended", int8=True)  # the last pass quantizes; stop before it
    tiled, _ = Pipeline(probe.passes[:-1]).run(residual_net(), PassContext(input_shapes={"x": (1, 3, SIZE, SIZE)},
                                                                            act_bytes=1))
    assert "Gather" in {node.op_type for node in tiled.graph.node}
    calibrated = quantize_int8(tiled, _inputs(2))

    def no_calibration(*args, **kwargs):
        raise AssertionError("rule e runs no calibration")

    monkeypatch.setattr(ort_quantize, "create_calibrator", no_calibration)
    layout = quantized_layout(tiled)
    assert [(n.op_type, list(n.input), list(n.output)) for n in layout.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in calibrated.graph.node]
    assert runtime_view(layout, level="all").peak_bytes == runtime_view(calibrated, level="all").peak_bytes


def test_int8_global_pool_in_bands_runs_in_integer_kernels():
    """At 4KB the last map is pooled in bands (passes/tile_emit.py rule i): per-band
    GlobalAveragePools weighted and added run as QLinearGlobalAveragePool, QLinearMul and
    QLinearAdd; no float band is left, and every map holds the ceiling (quantize rule f)."""
    result = _compile(ceiling="4KB", int8=True, runtime="ort")
    section = result.report["int8"]
    assert section["float_nodes"] == [] and section["float_bytes"] == 0
    assert section["integer_ops"].get("com.microsoft.QLinearGlobalAveragePool", 0) > 1
    assert section["largest_allocation_bytes"] > 0 and "over_ceiling" in section


def test_pool_in_bands_is_exact_in_float():
    """Rule i in float: the weighted band means equal the untiled pool (uneven bands too)."""
    model = residual_net()
    pooled = pool_in_bands(model, "r2", "gap", 5, {"x": (1, 3, SIZE, SIZE)})
    feeds = _inputs(1)[0]
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(pooled.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert sum(node.op_type == "GlobalAveragePool" for node in pooled.graph.node) == 5


# (C, M, H, kernel, stride, group): a symmetric 3x3 (indirection), a symmetric pointwise, the
# 3-channel stem (int32 output and im2col), a depthwise 64 (symmetric), a depthwise 24 (not)
SINGLE_CONVS = [(64, 64, 112, 3, 1, 1), (64, 64, 112, 1, 1, 1), (3, 64, 224, 7, 2, 1), (24, 24, 112, 3, 1, 24)]


def single_conv(c: int, m: int, h: int, k: int, s: int, group: int) -> onnx.ModelProto:
    """A QDQ int8 Conv, Relu and GlobalAveragePool on a c x h x h input (quantize_int8)."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((m, c // group, k, k)) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[k, k], strides=[s, s],
                              pads=[k // 2] * 4, group=group),
             helper.make_node("Relu", ["y"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["out"], name="gap")]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, h])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, m, 1, 1])],
                              [numpy_helper.from_array(weight, "w"),
                               numpy_helper.from_array(np.zeros(m, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return quantize_int8(model, [{"x": rng.random((1, c, h, h), np.float32)} for _ in range(2)])


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="rule e' models x86 MLAS")
@pytest.mark.parametrize("level", ["extended", "all"])
def test_integer_conv_workspaces_match_measured_peak(level):
    """passes/runtime.py rule e': the computed peak of one QLinearConv (its maps and whole-map
    buffers) against fmcompress.memprobe's measurement: at most 10% above it and 15% below
    (the probe reads low where pages were already resident: the pointwise conv at `all`,
    1568 KiB computed, measures 1408-1448 KiB in some fresh processes and 1548 KiB in others),
    where the view without them was 2 to 9 times low."""
    for case in SINGLE_CONVS:
        model = single_conv(*case)
        shapes = {"x": (1, case[0], case[2], case[2])}
        view = runtime_view(model, shapes, level=level)
        measured = measure_peak(model, shapes, level=level, rounds=9).bytes  # the median: one low round is noise
        if measured is None:
            pytest.skip("the probe cannot measure here")
        assert [t for t in view.tensors if t.role == "workspace"] or case[3] == 1, case
        assert -0.15 * view.peak_bytes <= measured - view.peak_bytes <= 0.10 * view.peak_bytes, \
            (case, level, measured, view.peak_bytes)


def test_integer_conv_workspace_parts():
    """Rule e': which buffers each kind of QLinearConv allocates (x86 MLAS)."""
    stem = integer_conv_workspaces((64, 3, 7, 7), 224 * 224, 112 * 112, 1, False)
    assert {k: n for k, (n, _) in stem.items()} == {"gemm_output": 64 * 12544, "im2col": 147 * 12544,
                                                    "transpose_input": 3 * 50176, "transpose_output": 64 * 12544}
    assert stem["gemm_output"][1].itemsize == 4
    symmetric = integer_conv_workspaces((64, 64, 3, 3), 3136, 3136, 1, False, channels_last=True)
    assert symmetric == {"indirection": (9 * 3136, np.dtype(np.uint64))}
    assert integer_conv_workspaces((64, 64, 1, 1), 3136, 3136, 1, True, channels_last=True) == {}
    assert set(integer_conv_workspaces((83, 64, 3, 3), 3136, 3136, 1, False, channels_last=True)) == {
        "gemm_output", "im2col"}  # 83 filters: no symmetric kernel (align_ranks rule a aligns ranks)


def test_align_ranks_rounds_down_to_multiples_of_8():
    planned = PlannedMap("m", [1, 128, 28, 28], 83, 100352, 83 * 784, "conv", 3)
    assert aligned_rank(planned).k == 80 and aligned_rank(planned).bytes_after == 80 * 784
    assert aligned_rank(replace(planned, k=5)).k == 5 and aligned_rank(replace(planned, k=16)).k == 16


def test_int8_band_sizing_counts_integer_conv_buffers():
    """passes/tile_bands.py: planned at one byte, a band's size includes its QLinearConv's
    int32 output (the 3-channel stem: 4 B per filter and position, 4x its uint8 map)."""
    model = residual_net()
    shapes = {"x": (1, 3, SIZE, SIZE)}
    map_only = peak_band_bytes(model, "x", "r0", 8, 1, input_shapes=shapes, workspaces=False)
    with_buffers = peak_band_bytes(model, "x", "r0", 8, 1, input_shapes=shapes)
    assert with_buffers == 4 * 16 * 4 * SIZE  # 16 filters x 4 rows x 32 positions, int32
    assert map_only == 6 * SIZE * 3 * 4  # the band's 6 input rows, float (taken by Gather: tile rule f'')
    assert peak_band_bytes(model, "x", "r0", 4, 1, input_shapes=shapes, workspaces=False) <= 4096
    assert bands_for_budget(model, "x", "r0", 4096, 1, input_shapes=shapes) == 16  # 2 rows: 4 KiB of int32


def float_conv(c: int, m: int, h: int, k: int) -> onnx.ModelProto:
    """One float Conv (c -> m channels, k x k, same padding) on a c x h x h input."""
    rng = np.random.default_rng(3)
    weight = numpy_helper.from_array((rng.standard_normal((m, c, k, k)) * 0.1).astype(np.float32), "w")
    bias = numpy_helper.from_array((rng.standard_normal(m) * 0.1).astype(np.float32), "b")
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[k, k], pads=[k // 2] * 4)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, h])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, m, h, h])], [weight, bias])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _split_int8(model: onnx.ModelProto, budget: int, act_bytes: int | None = 1):
    """SplitConvPass at `budget` (planned at `act_bytes`) and the filter counts of the convs it leaves."""
    result = SplitConvPass(budget)(model, PassContext(act_bytes=act_bytes))
    weights = {init.name: init for init in result.model.graph.initializer}
    filters = [weights[n.input[1]].dims[0] for n in result.model.graph.node if n.op_type == "Conv"]
    return result, filters


def _workspaces(model: onnx.ModelProto, shape: tuple[int, ...], level: str) -> list[tuple[str, int]]:
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    quantized = quantize_int8(model, [{"x": x}])
    view = runtime_view(quantized, {"x": shape}, level=level)
    return [(t.name, t.bytes) for t in view.tensors if t.role == "workspace"]


def test_int8_split_parts_are_multiples_of_8():
    """split_conv rule b'': 128 filters on 49 positions: 43/43/42 in float, 48/40/40 planned at one
    byte, so that every part runs MLAS's symmetric int8 kernel (an indirection buffer, no int32
    output, no im2col); the outputs are exact either way."""
    model = float_conv(16, 128, 7, 3)
    floats, float_parts = _split_int8(model, 4096, act_bytes=None)
    assert float_parts == [43, 43, 42] and floats.data == [{"node": "conv", "filters": 128, "parts": 3}]
    result, parts = _split_int8(model, 4096)
    assert parts == [48, 40, 40] and all(p % 8 == 0 for p in parts)
    assert integer_split(256, 256, 9, 98, False, 65536, cap=98) == [88, 88, 80]  # ResNet-18's layer3 band
    x = np.random.default_rng(5).standard_normal((1, 16, 7, 7)).astype(np.float32)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
           for m in (model, result.model)]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-5, atol=1e-5)
    for level in ("extended", "all"):
        buffers = _workspaces(result.model, (1, 16, 7, 7), level)
        assert buffers and all(name.endswith(":indirection") or ":transpose" in name for name, _ in buffers), buffers
        assert max(size for _, size in buffers) <= 4096


def test_int8_split_brings_an_int32_output_under_the_ceiling():
    """split_conv rule a': a 3-channel conv's QLinearConv allocates an int32 output (32 filters
    x 256 positions x 4 B = 32 KiB) whatever its bands; planned at one byte it becomes two
    convs of 16 filters, and the int8 graph's every buffer fits 16 KiB. In float nothing splits."""
    model = float_conv(3, 32, 16, 3)
    assert SplitConvPass(16384)(model, PassContext()).data == []
    before = dict((name.split(":")[1], size) for name, size in _workspaces(model, (1, 3, 16, 16), "all"))
    assert before == {"gemm_output": 32 * 256 * 4, "im2col": 27 * 256}
    result, parts = _split_int8(model, 16384)
    assert parts == [16, 16] and result.data == [{"node": "conv", "filters": 32, "parts": 2}]
    for level in ("extended", "all"):
        buffers = _workspaces(result.model, (1, 3, 16, 16), level)
        assert max(size for _, size in buffers) <= 16384, buffers


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
    """quantize.py rule c: onnxruntime has no integer Tanh: the Tanh and the DequantizeLinear before it
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


def test_an_opset_11_model_with_a_constant_concat_is_quantized():
    """int8.py rule a on what PP-OCR's classifier is: opset 11 (converted to 17, or per-channel
    DequantizeLinear would be invalid) and a Concat of constants along axis -1, on which
    onnxruntime's symbolic shape inference asserts (it wants the literal 0) (onnx's shape inference instead)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    tail = numpy_helper.from_array(np.array([-1], dtype=np.int64), "tail")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Shape", ["r"], ["shape"]),
             helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
             helper.make_node("Concat", ["batch", "tail"], ["s"], axis=-1),  # the classifier's, as exported
             helper.make_node("Reshape", ["r", "s"], ["y"])]
    graph = helper.make_graph(nodes, "opset11", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 512])],
                              [weight, tail, numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
                               numpy_helper.from_array(np.array([1], dtype=np.int64), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    batches = [{"x": rng.random((1, 3, 8, 8), dtype=np.float32)} for _ in range(2)]
    quantized = quantize_int8(model, batches)
    assert next(o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx")) >= 13
    assert any(n.op_type == "DequantizeLinear" for n in quantized.graph.node)
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, batches[0])
    np.testing.assert_allclose(session.run(None, batches[0])[0], expected[0], atol=0.1 * np.abs(expected[0]).max())


def test_a_model_quantization_refuses_is_refused_before_the_fit(tmp_path, monkeypatch):
    """quantizable.py rule a: onnxruntime's refusal comes before any training, not after it."""
    import fmcompress.passes.quantizable as quantizable

    def refuse(model, batches, **options):
        raise InputError("onnxruntime's quantization refused the model (AssertionError: a stand-in)")

    monkeypatch.setattr(quantizable, "quantize_int8", refuse)
    monkeypatch.setattr("fmcompress.passes.fit.FitProjectionsPass.run",
                        lambda self, model, ctx: pytest.fail("the fit ran before the quantization check"))
    path = tmp_path / "net.onnx"
    onnx.save(residual_net(), str(path))
    result = CliRunner().invoke(main, ["compile", str(path), "--ceiling", "8KB", "--int8", "--num-samples", "8", "-q"])
    assert result.exit_code == 2 and "refused the model (AssertionError: a stand-in)" in result.output, result.output
    assert not (tmp_path / "net.fmc.onnx").exists()


@pytest.mark.real
def test_incomplete_symbolic_shapes_fall_back_and_write_nothing_in_the_working_directory(tmp_path, monkeypatch):
    """int8.py rule a on PP-OCR's recognizer: onnxruntime's symbolic shape inference gives up on it
    ("Incomplete symbolic shape inference", after saving its partial model in the working
    directory); onnx's shape inference takes over and the user's directory stays empty."""
    from fmcompress.evaluation.thirdparty import real_model

    model = onnx.load(str(real_model("ppocr-rec")))
    monkeypatch.chdir(tmp_path)
    feed = {model.graph.input[0].name: np.random.default_rng(0).standard_normal((1, 3, 48, 320)).astype(np.float32)}
    quantized = quantize_int8(model, [feed])
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in quantized.graph.node}
    assert list(tmp_path.iterdir()) == []


def _activation_scales(quantized: onnx.ModelProto) -> dict[str, float]:
    """The scale of every QuantizeLinear of an activation, by the tensor it quantizes."""
    values = {init.name: numpy_helper.to_array(init) for init in quantized.graph.initializer}
    return {node.input[0]: float(values[node.input[1]]) for node in quantized.graph.node
            if node.op_type == "QuantizeLinear" and values[node.input[1]].ndim == 0}


def _quantize_static_at_once(model: onnx.ModelProto, batches: list, method, tmp_path) -> onnx.ModelProto:
    """onnxruntime's own flow, every batch collected in one call (no striding): the reference."""
    from fmcompress.int8 import QUANTIZE_OPTIONS, calibration_reader

    source, quantized = str(tmp_path / "float.onnx"), str(tmp_path / "int8.onnx")
    onnx.save(model, source)
    quantize_static(source, quantized, calibration_reader(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, calibrate_method=method,
                    extra_options=dict(QUANTIZE_OPTIONS))
    return onnx.load(quantized)


@pytest.mark.parametrize("calibrate", ["minmax", "percentile"])
def test_calibration_collected_per_batch_matches_onnxruntime_at_once(tmp_path, calibrate):
    """int8.py rule b: ranges collected one batch at a time (bounded memory) are onnxruntime's own,
    collected over all batches at once: equal for MinMax, within a bin's width for Percentile,
    whose histograms merge across batches."""
    from fmcompress.int8 import calibration_method

    model, batches = residual_net(), _inputs(6)
    ours = _activation_scales(quantize_int8(model, batches, calibrate=calibrate))
    theirs = _activation_scales(_quantize_static_at_once(model, batches, calibration_method(calibrate), tmp_path))
    assert ours.keys() == theirs.keys() and len(ours) >= 5
    for name, scale in theirs.items():
        assert ours[name] == pytest.approx(scale, rel=0 if calibrate == "minmax" else 0.02), name


def test_percentile_calibration_ignores_a_rare_outlier():
    """int8.py rule b: one input pixel far out stretches MinMax's input range; Percentile's stays
    near the bulk's, so the rest keeps its resolution."""
    batches = _inputs(10, 64)  # 122880 input values: one is under the 0.001% Percentile leaves out
    batches[0]["x"][0, 0, 0, 0] = 1000.0
    minmax = _activation_scales(quantize_int8(residual_net(size=64), batches))
    percentile = _activation_scales(quantize_int8(residual_net(size=64), batches, calibrate="percentile"))
    assert minmax["x"] > 1000 / 255 * 0.99  # the outlier sets the range
    assert percentile["x"] < minmax["x"] / 50


def test_cli_calibrate(tmp_path):
    """--calibrate without --int8 is a usage error; with it, the report names the calibration."""
    path, report = tmp_path / "net.onnx", tmp_path / "report.json"
    onnx.save(residual_net(), str(path))
    runner = CliRunner()
    alone = runner.invoke(main, ["compile", str(path), "--ceiling", "8KB", "--calibrate", "percentile", "-q"])
    assert alone.exit_code == 2 and "add --int8" in alone.output
    assert not (tmp_path / "net.fmc.onnx").exists()
    done = runner.invoke(main, ["compile", str(path), "--ceiling", "8KB", "--int8", "--calibrate", "entropy",
                                "--method", "pca", "--num-samples", "16", "--json", str(report), "-q"])
    assert done.exit_code == 0, done.output
    section = json.loads(report.read_text())["int8"]
    assert section["calibration"] == "entropy" and section["calibration_trials"] == {}


def test_auto_calibration_keeps_percentile_where_an_outlier_ruins_minmax(tmp_path):
    """quantize.py rule a': one calibration pixel in 120000 far out makes MinMax's input range 1000 wide
    (every other pixel in one or two steps); auto scores both on the held-out part and keeps
    Percentile, the better by its recorded figures; the baseline is calibrated alike."""
    rng = np.random.default_rng(3)
    inputs = rng.standard_normal((40, 3, 64, 64)).astype(np.float32)
    inputs[::10, 0, 0, 0] = 1000.0  # 0.0008% of the values: under what Percentile (99.999) leaves out
    data = tmp_path / "data.npz"
    np.savez(data, x=inputs)
    result = api.compile(residual_net(size=64), ceiling="64KB", method="pca", data=str(data), num_samples=40,
                         int8=True, latency_rounds=1, latency_repeats=1, measure_memory=False)
    section = result.report["int8"]
    trials = section["calibration_trials"]
    assert set(trials) == {"minmax", "percentile"} and section["calibration"] == "percentile"
    assert trials["percentile"]["cosine_similarity"] > trials["minmax"]["cosine_similarity"]
    assert trials["percentile"]["relative_error"] < trials["minmax"]["relative_error"]
    assert section["fidelity"] == trials["percentile"]
    assert section["original"]["fidelity"]["cosine_similarity"] > trials["minmax"]["cosine_similarity"]


def test_calibration_score_ranks_accuracy_then_agreement_then_cosine():
    from fmcompress.passes.quantize import calibration_score

    labelled = {"accuracy_candidate": 0.9, "top1_agreement": 0.5, "cosine_similarity": 0.1}
    assert calibration_score(labelled) > calibration_score({**labelled, "accuracy_candidate": 0.8,
                                                            "top1_agreement": 1.0, "cosine_similarity": 1.0})
    unlabelled = {"accuracy_candidate": None, "top1_agreement": None, "sequence_agreement": 0.7,
                  "cosine_similarity": 0.5}
    assert calibration_score(unlabelled) > calibration_score({**unlabelled, "sequence_agreement": 0.6,
                                                              "cosine_similarity": 0.99})
    assert calibration_score({**unlabelled, "cosine_similarity": 0.6}) > calibration_score(unlabelled)


def test_histogram_calibration_of_a_tiled_model():
    """int8.py rule b: the empty Slices that order tiled bands (passes/tile_emit.py rule g) are found,
    left unquantized, and kept out of onnxruntime's histograms, which fail on them otherwise."""
    from fmcompress.int8 import empty_producers

    tiled = _compile(ceiling="8KB", runtime="ort").model
    empty = empty_producers(tiled)
    assert empty and {node.op_type for node in tiled.graph.node if node.name in empty} == {"Slice"}
    quantized = quantize_int8(tiled, _inputs(4), calibrate="percentile")
    outputs = {out for node in tiled.graph.node if node.name in empty for out in node.output}
    assert not any(node.input[0] in outputs for node in quantized.graph.node if node.op_type == "QuantizeLinear")
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, _inputs(1)[0])[0].shape == (1, 10)
