"""Differential tests of TilePass: every tiled model is run in onnxruntime next to the untiled
one on the same random input and must agree to float rounding (and pass onnx.checker)."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from fmcompress.errors import InputError
from fmcompress.passes.base import PassContext
from fmcompress.passes.tile import (
    TilePass,
    bands_for_budget,
    peak_band_bytes,
    pool_in_bands,
    tile_region,
    tile_region_with_facts,
    tileable_region,
)

RNG_SEED = 0


class Chain:
    """Builds a single-input NCHW model one node at a time; `last` is the newest tensor."""

    def __init__(self, shape: tuple[int, ...], dtype=np.float32, seed: int = RNG_SEED):
        self.dtype = np.dtype(dtype)
        self.elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.rng = np.random.default_rng(seed)
        self.shape = shape
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.last = "x"
        self.channels = shape[1]

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, self.dtype), name))
        return name

    def node(self, op: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or f"t{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"n{len(self.nodes)}_{op}", **attrs))
        self.last = out
        return out

    def conv(self, out_ch: int, k: int | tuple[int, int], src: str | None = None, group: int = 1,
             bias: bool = True, in_ch: int | None = None, **attrs) -> str:
        kh, kw = (k, k) if isinstance(k, int) else k
        in_ch = in_ch or self.channels
        n = len(self.nodes)
        fan_in = in_ch // group * kh * kw
        inputs = [src or self.last,
                  self.const(f"w{n}", self.rng.standard_normal((out_ch, in_ch // group, kh, kw)) / fan_in ** 0.5)]
        if bias:
            inputs.append(self.const(f"b{n}", self.rng.standard_normal(out_ch) * 0.1))
        self.channels = out_ch
        return self.node("Conv", inputs, kernel_shape=[kh, kw], group=group, **attrs)

    def bn(self, src: str | None = None) -> str:
        n, c = len(self.nodes), self.channels
        params = [self.rng.uniform(0.5, 1.5, c), self.rng.standard_normal(c) * 0.1,
                  self.rng.standard_normal(c) * 0.1, self.rng.uniform(0.5, 1.5, c)]
        names = [self.const(f"bn{n}_{i}", p) for i, p in enumerate(params)]
        return self.node("BatchNormalization", [src or self.last, *names])

    def model(self, outputs: list[str] | None = None, opset: int = 19) -> onnx.ModelProto:
        outs = [helper.make_tensor_value_info(name, self.elem, None) for name in (outputs or [self.last])]
        graph = helper.make_graph(self.nodes, "chain", [helper.make_tensor_value_info("x", self.elem, self.shape)],
                                  outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        helper.set_model_props(model, {"source": "test_tile"})
        graph = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
        inferred = {v.name: v for v in [*graph.value_info, *graph.output]}
        for out in model.graph.output:  # declare the output shapes, as exporters do
            if out.name in inferred:
                out.CopyFrom(inferred[out.name])
        return model


def run(model: onnx.ModelProto, x: np.ndarray, profile: str | None = None):
    """Outputs; with `profile` (a file prefix) also the path of onnxruntime's profiler trace."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"x": x})
    return (outputs, session.end_profiling()) if profile else outputs


def runs(model: onnx.ModelProto) -> bool:
    """Whether onnxruntime accepts the untiled model (a window larger than its input is no model)."""
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    try:
        run(model, np.zeros(shape, np.float32))
    except Exception:
        return False
    return True


def check_tiled(model: onnx.ModelProto, start: str, end: str, bands: int, rtol=1e-5, atol=1e-5,
                seed: int = 1) -> onnx.ModelProto:
    tiled = tile_region(model, start, end, bands)
    onnx.checker.check_model(tiled, full_check=True)
    assert tiled.opset_import == model.opset_import and tiled.ir_version == model.ir_version
    assert tiled.metadata_props == model.metadata_props
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    for want, got in zip(run(model, x), run(tiled, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    return tiled


def out_height(model: onnx.ModelProto, end: str) -> int:
    return tileable_region(model, "x", end).height(end)


# ---------------------------------------------------------------- convs

@pytest.mark.parametrize("k, stride, dilation, pads", [
    (1, 1, 1, [0, 0, 0, 0]), (3, 1, 1, [1, 1, 1, 1]), (3, 2, 1, [1, 1, 1, 1]), (5, 2, 1, [2, 2, 2, 2]),
    (7, 2, 1, [3, 3, 3, 3]), (3, 1, 2, [2, 2, 2, 2]), (3, 2, 2, [0, 1, 3, 2]), (5, 1, 1, [0, 2, 4, 1]),
    (3, 3, 1, [2, 0, 0, 1]),
])
def test_conv_chains_odd_sizes(k, stride, dilation, pads):
    chain = Chain((1, 3, 37, 29))
    chain.conv(8, k, strides=[stride, stride], dilations=[dilation, dilation], pads=pads)
    chain.node("Relu", [chain.last])
    chain.conv(6, 3, pads=[1, 1, 1, 1])
    model = chain.model()
    height = out_height(model, chain.last)
    for bands in sorted({2, 3, 5, height // 2 + 1, height}):
        check_tiled(model, "x", chain.last, bands)


def test_grouped_and_depthwise_convs():
    chain = Chain((1, 8, 23, 19))
    chain.conv(8, 3, group=4, pads=[1, 1, 1, 1])
    chain.conv(8, 3, group=8, strides=[2, 2], pads=[1, 0, 1, 0])
    chain.node("Clip", [chain.last, chain.const("lo", 0.0), chain.const("hi", 6.0)])
    chain.conv(4, 1, bias=False)
    model = chain.model()
    for bands in (2, 4, 7, out_height(model, chain.last)):
        check_tiled(model, "x", chain.last, bands)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_auto_pad(auto_pad):
    chain = Chain((1, 3, 30, 21))
    chain.conv(6, 4, strides=[2, 2], auto_pad=auto_pad)
    chain.node("HardSwish", [chain.last])
    chain.conv(5, 3, auto_pad=auto_pad)
    model = chain.model()
    for bands in (2, 3, out_height(model, chain.last)):
        check_tiled(model, "x", chain.last, bands)


def test_start_inside_graph_and_constant_broadcasts():
    chain = Chain((1, 3, 33, 17))
    first = chain.conv(6, 3, pads=[1, 1, 1, 1])
    chain.node("Mul", [chain.last, chain.const("scale", np.linspace(0.5, 2, 6).reshape(6, 1, 1))])
    chain.node("Add", [chain.last, chain.const("shift", np.full((1, 1, 1, 17), 0.25))])
    chain.node("PRelu", [chain.last, chain.const("slope", np.full((6, 1, 1), 0.1))])
    chain.conv(4, 3, strides=[2, 2])
    model = chain.model()
    check_tiled(model, first, chain.last, 4)


# ---------------------------------------------------------------- pools

@pytest.mark.parametrize("op, attrs", [
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    ("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)),
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 0], dilations=[2, 2])),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0)),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0,
                         ceil_mode=1)),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1,
                         ceil_mode=1)),
    ("AveragePool", dict(kernel_shape=[2, 2], strides=[2, 2], count_include_pad=1, ceil_mode=1,
                         pads=[1, 0, 0, 0])),
    ("LpPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], p=2)),
])
@pytest.mark.parametrize("height", [36, 37])
def test_pools(op, attrs, height):
    chain = Chain((1, 4, height, 29))
    chain.conv(6, 3, pads=[1, 1, 1, 1])
    chain.node(op, [chain.last], **attrs)
    chain.conv(4, 1)
    model = chain.model()
    try:
        for bands in sorted({2, 3, 4, out_height(model, chain.last)}):
            check_tiled(model, "x", chain.last, bands)
    except InputError as exc:  # the one case a band cannot reproduce exactly (rule e)
        assert "count_include_pad=1 overhangs" in str(exc)
        assert op == "AveragePool" and attrs.get("ceil_mode") and attrs["count_include_pad"]


# ---------------------------------------------------------------- branches

def test_residual_blocks():
    chain = Chain((1, 8, 31, 27))
    x = "x"
    chain.conv(8, 3, pads=[1, 1, 1, 1])
    chain.bn()
    chain.node("Relu", [chain.last])
    chain.conv(8, 3, pads=[1, 1, 1, 1])
    block1 = chain.node("Relu", [chain.node("Add", [chain.bn(), x])])
    # downsample block: strided 3x3 main path, strided 1x1 conv on the skip
    chain.conv(12, 3, strides=[2, 2], pads=[1, 1, 1, 1])
    chain.node("Relu", [chain.last])
    main = chain.conv(12, 3, pads=[1, 1, 1, 1])
    skip = chain.conv(12, 1, src=block1, in_ch=8, strides=[2, 2])
    chain.node("Relu", [chain.node("Add", [main, skip])])
    model = chain.model()
    for bands in (2, 3, 5, 16):
        check_tiled(model, "x", chain.last, bands)


def test_swish():
    chain = Chain((1, 4, 25, 20))
    chain.conv(6, 3, strides=[2, 2], pads=[1, 1, 1, 1])
    conv = chain.last
    chain.node("Mul", [conv, chain.node("Sigmoid", [conv])])
    chain.conv(4, 3, pads=[1, 1, 1, 1])
    model = chain.model()
    for bands in (2, 6, 13):
        check_tiled(model, "x", chain.last, bands)


# ---------------------------------------------------------------- the ResNet-18 stem

def stem(dtype=np.float32, size: int = 224) -> Chain:
    chain = Chain((1, 3, size, size), dtype)
    chain.conv(64, 7, strides=[2, 2], pads=[3, 3, 3, 3])
    chain.node("Relu", [chain.last])
    chain.node("MaxPool", [chain.last], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    chain.conv(16, 1, bias=False)
    return chain


def test_resnet18_stem_with_budget():
    chain = stem()
    model = chain.model()
    budget = 256 * 1024
    bands = bands_for_budget(model, "x", chain.last, budget)
    assert peak_band_bytes(model, "x", chain.last, bands) <= budget
    assert peak_band_bytes(model, "x", chain.last, bands - 1) > budget
    tiled, facts = tile_region_with_facts(model, "x", chain.last, bands)
    assert facts.bands == bands and sum(facts.rows_per_band) == 56
    assert facts.peak_band_bytes <= budget and 1 < facts.macs_ratio < 1.2
    assert facts.halo_rows["n0_Conv"] > 0 and facts.halo_rows["n3_Conv"] == 0
    check_tiled(model, "x", chain.last, bands)


def test_float16():
    chain = stem(np.float16, 64)
    model = chain.model()
    # float16 rounding: onnxruntime's fp16 conv rounds a few elements 1 ulp (~1e-3) apart
    # when the band changes its blocking; float32 tolerances would ask for more than fp16 holds
    tiled = check_tiled(model, "x", chain.last, 5, rtol=2e-3, atol=2e-3)
    assert tiled.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_bands_run_in_order(tmp_path):
    chain = stem(size=96)
    model = chain.model()
    tiled = tile_region(model, "x", chain.last, 6)
    x = np.random.default_rng(2).standard_normal((1, 3, 96, 96)).astype(np.float32)
    _, trace = run(tiled, x, profile=str(tmp_path / "trace"))
    with open(trace) as handle:
        events = [e for e in json.load(handle) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    spans: dict[int, tuple[float, float]] = {}
    for event in events:
        found = re.search(r"_band(\d+)", event["name"])
        if found:
            band, begin, end = int(found.group(1)), event["ts"], event["ts"] + event["dur"]
            low, high = spans.get(band, (begin, end))
            spans[band] = (min(low, begin), max(high, end))
    assert sorted(spans) == list(range(6))
    for band in range(5):
        assert spans[band][1] <= spans[band + 1][0]


def test_pass_interface():
    chain = stem(size=64)
    model = chain.model()
    ctx = PassContext()
    result = TilePass([("x", chain.last, None)], budget_bytes=32 * 1024)(model, ctx)
    assert result.modified and result.data[0].peak_band_bytes <= 32 * 1024
    assert not any(node.name == "n0_Conv" for node in result.model.graph.node)
    x = np.random.default_rng(3).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(run(result.model, x)[0], run(model, x)[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- rejections

def test_rejects_a_fractional_resize():
    chain = Chain((1, 3, 16, 16))
    chain.conv(4, 3, pads=[1, 1, 1, 1])
    chain.node("Resize", [chain.last, "", chain.const("scales", [1, 1, 1.5, 1.5])], mode="nearest")
    chain.conv(4, 3)
    with pytest.raises(InputError, match="integer upsampling"):
        tile_region(chain.model(), "x", chain.last, 2)


def test_rejects_global_pool_and_reshape():
    chain = Chain((1, 3, 16, 16))
    chain.conv(4, 3)
    chain.node("GlobalAveragePool", [chain.last])
    with pytest.raises(InputError, match="GlobalAveragePool"):
        tile_region(chain.model(), "x", chain.last, 1)


def test_rejects_intermediate_used_outside():
    chain = Chain((1, 3, 16, 16))
    inner = chain.conv(4, 3, pads=[1, 1, 1, 1])
    chain.conv(4, 3)
    model = chain.model([chain.last, inner])
    with pytest.raises(InputError, match=inner):
        tile_region(model, "x", chain.last, 2)


def test_rejects_a_region_without_starts():
    """A planner may find no run-time tensor behind a map (PP-OCRv4's recognizer has one):
    an InputError it can skip, not an IndexError."""
    chain = Chain((1, 3, 16, 16))
    chain.conv(4, 3)
    with pytest.raises(InputError, match="reads no tensor"):
        tileable_region(chain.model(), (), chain.last)


def test_rejects_non_constant_weights():
    chain = Chain((1, 3, 16, 16))
    weight = chain.node("Relu", [chain.const("w_raw", np.ones((4, 3, 3, 3)))])
    chain.node("Conv", ["x", weight], kernel_shape=[3, 3])
    with pytest.raises(InputError, match="neither computed from|constant"):
        tile_region(chain.model(), "x", chain.last, 2)


def test_rejects_too_small_budget():
    chain = stem(size=64)
    with pytest.raises(InputError, match="do not fit"):
        bands_for_budget(chain.model(), "x", chain.last, 1000)


# ---------------------------------------------------------------- property test

LAYER = st.one_of(
    st.tuples(st.just("Conv"), st.sampled_from([1, 2, 3, 5]), st.sampled_from([1, 2, 3]),
              st.sampled_from([1, 2]), st.lists(st.integers(0, 2), min_size=4, max_size=4)),
    st.tuples(st.sampled_from(["MaxPool", "AveragePool"]), st.sampled_from([2, 3]), st.sampled_from([1, 2]),
              st.sampled_from([0, 1]), st.lists(st.integers(0, 1), min_size=4, max_size=4)),
    st.tuples(st.just("Relu"), st.just(0), st.just(0), st.just(0), st.just([])),
)


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(layers=st.lists(LAYER, min_size=1, max_size=4), height=st.integers(12, 30),
       bands_seed=st.integers(0, 1000))
def test_random_chains(layers, height, bands_seed):
    chain = Chain((1, 3, height, 11))
    for op, k, stride, extra, pads in layers:
        if op == "Conv":
            chain.conv(4, k, strides=[stride, 1], dilations=[extra, 1], pads=pads)
        elif op == "Relu":
            chain.node("Relu", [chain.last])
        else:
            chain.node(op, [chain.last], kernel_shape=[k, k], strides=[stride, stride], pads=pads,
                       ceil_mode=extra)
    try:
        model = chain.model()
    except onnx.shape_inference.InferenceError:
        assume(False)  # a chain that shrinks the map to nothing is not a model
    dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assume(len(dims) == 4 and min(dims) > 0 and runs(model))
    try:
        bands = 1 + bands_seed % out_height(model, chain.last)
        check_tiled(model, "x", chain.last, bands)
    except InputError as exc:  # only the documented band rejections are allowed
        assert re.search(r"reads only padding|not below the kernel|overhangs", str(exc)), exc


def test_channel_split_and_concat_inside_a_band():
    """A C2f-style block (YOLOv8): Split along channels, a conv branch, Concat of all parts."""
    chain = Chain((1, 8, 23, 19))
    stem = chain.conv(16, 3, pads=[1, 1, 1, 1], strides=[2, 2])
    halves = ["half0", "half1"]
    chain.nodes.append(helper.make_node("Split", [stem, chain.const("sizes", np.array([8, 8]))], halves,
                                        name="split", axis=1))
    chain.inits[-1] = numpy_helper.from_array(np.array([8, 8], np.int64), "sizes")
    chain.channels = 8
    branch = chain.conv(8, 3, src="half1", pads=[1, 1, 1, 1])
    joined = chain.node("Concat", ["half0", "half1", branch], axis=1)
    chain.channels = 24
    chain.conv(8, 1, src=joined)
    model = chain.model()
    x = np.random.default_rng(4).standard_normal((1, 8, 23, 19)).astype(np.float32)
    expected = run(model, x)[0]
    for bands in (2, 5, 12):
        tiled = tile_region(model, "x", chain.last, bands)
        onnx.checker.check_model(tiled, full_check=True)
        np.testing.assert_allclose(run(tiled, x)[0], expected, rtol=1e-5, atol=1e-5)


def test_concat_along_rows_is_rejected():
    chain = Chain((1, 4, 8, 8))
    a = chain.conv(4, 3, pads=[1, 1, 1, 1])
    chain.node("Concat", [a, "x"], axis=2)
    with pytest.raises(InputError, match="channel axis"):
        tileable_region(chain.model(), "x", chain.last)


@pytest.mark.parametrize("transform, nearest", [("asymmetric", "floor"), ("half_pixel", "round_prefer_floor"),
                                                ("pytorch_half_pixel", "round_prefer_ceil")])
@pytest.mark.parametrize("factor", [2, 3])
def test_nearest_resize_inside_a_band(transform, nearest, factor):
    chain = Chain((1, 4, 9, 7))
    chain.conv(6, 3, pads=[1, 1, 1, 1])
    scales = chain.const("scales", np.array([1, 1, factor, factor]))
    chain.inits[-1] = numpy_helper.from_array(np.array([1, 1, factor, factor], np.float32), "scales")
    chain.node("Resize", [chain.last, "", scales], mode="nearest", coordinate_transformation_mode=transform,
               nearest_mode=nearest)
    chain.conv(5, 3, pads=[1, 1, 1, 1])
    model = chain.model()
    x = np.random.default_rng(5).standard_normal((1, 4, 9, 7)).astype(np.float32)
    expected = run(model, x)[0]
    for bands in (2, 4, 9 * factor):
        tiled = tile_region(model, "x", chain.last, bands)
        onnx.checker.check_model(tiled, full_check=True)
        np.testing.assert_allclose(run(tiled, x)[0], expected, rtol=1e-5, atol=1e-5)


def test_linear_resize_is_rejected():
    chain = Chain((1, 4, 8, 8))
    chain.inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    chain.node("Resize", ["x", "", "scales"], mode="linear")
    with pytest.raises(InputError, match="nearest"):
        tileable_region(chain.model(), "x", chain.last)


def test_side_inputs_feature_pyramid():
    """An FPN step: a coarse map upsampled and concatenated with a finer map computed earlier.
    The region starts at the coarse map and takes the finer one as a side input (rule a')."""
    chain = Chain((1, 3, 32, 24))
    fine = chain.conv(8, 3, pads=[1, 1, 1, 1], strides=[2, 2])  # 16x12
    chain.conv(16, 3, src=fine, pads=[1, 1, 1, 1], strides=[2, 2])  # 8x6
    coarse = chain.node("Relu", [chain.last])
    chain.inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    up = chain.node("Resize", [coarse, "", "scales"], mode="nearest")
    joined = chain.node("Concat", [up, fine], axis=1)
    chain.channels = 24
    chain.conv(4, 3, src=joined, pads=[1, 1, 1, 1])
    model = chain.model()
    x = np.random.default_rng(6).standard_normal((1, 3, 32, 24)).astype(np.float32)
    expected = run(model, x)[0]
    with pytest.raises(InputError, match="neither computed from"):
        tileable_region(model, coarse, chain.last)  # the finer map must be named as a side input
    for bands in (2, 5, 16):
        tiled = tile_region(model, [coarse, fine], chain.last, bands)
        onnx.checker.check_model(tiled, full_check=True)
        np.testing.assert_allclose(run(tiled, x)[0], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="not read by the region"):
        tileable_region(model, [coarse, fine, "x"], chain.last)


@pytest.mark.parametrize("kernel, stride, pads, output_padding, dilation, group", [
    (2, 2, [0, 0, 0, 0], [0, 0], 1, 1),  # PP-OCR's DB head
    (3, 2, [1, 1, 1, 1], [1, 1], 1, 1),  # "same" upsampling
    (4, 2, [1, 0, 2, 1], [0, 0], 1, 1),
    (3, 1, [1, 1, 1, 1], [0, 0], 2, 1),
    (3, 2, [0, 0, 0, 0], [1, 0], 1, 2),
    (1, 3, [0, 0, 0, 0], [2, 2], 1, 1),  # kernel below the stride: rows of zeros plus bias
])
def test_conv_transpose_inside_a_band(kernel, stride, pads, output_padding, dilation, group):
    chain = Chain((1, 4, 7, 6))
    chain.conv(6, 3, pads=[1, 1, 1, 1])
    rng = np.random.default_rng(7)
    weight = chain.const("wt", rng.standard_normal((6, 8 // group, kernel, kernel)) * 0.3)
    bias = chain.const("bt", rng.standard_normal(8) * 0.1)
    chain.node("ConvTranspose", [chain.last, weight, bias], kernel_shape=[kernel, kernel], strides=[stride, stride],
               pads=pads, output_padding=output_padding, dilations=[dilation, dilation], group=group)
    chain.channels = 8
    chain.node("Relu", [chain.last])
    chain.conv(3, 3, pads=[1, 1, 1, 1])
    model = chain.model()
    x = rng.standard_normal((1, 4, 7, 6)).astype(np.float32)
    expected = run(model, x)[0]
    height = expected.shape[2]
    for bands in sorted({2, 3, height // 2, height}):
        tiled = tile_region(model, "x", chain.last, bands)
        onnx.checker.check_model(tiled, full_check=True)
        np.testing.assert_allclose(run(tiled, x)[0], expected, rtol=1e-5, atol=1e-5, err_msg=f"{bands} bands")


def se_block() -> tuple[onnx.ModelProto, str, str]:
    """conv -> x; gate = HardSigmoid(conv(Relu(conv(GlobalAveragePool(x))))); conv(x * gate)."""
    chain = Chain((1, 3, 29, 17))
    x = chain.conv(12, 3, pads=[1, 1, 1, 1], strides=[2, 2])
    chain.node("GlobalAveragePool", [x], out="pooled")
    pool = chain.nodes[-1].name
    chain.conv(4, 1, src="pooled")
    chain.node("Relu", [chain.last])
    chain.conv(12, 1, in_ch=4)
    gate = chain.node("HardSigmoid", [chain.last])
    chain.node("Mul", [x, gate])
    chain.channels = 12
    chain.conv(6, 3, pads=[1, 1, 1, 1])
    return chain.model(), pool, gate


def test_squeeze_excitation_in_two_passes():
    """Rule i, then the gate as a per-channel side input: the map is never whole."""
    model, pool, gate = se_block()
    end = model.graph.output[0].name
    x = np.random.default_rng(8).standard_normal((1, 3, 29, 17)).astype(np.float32)
    expected = run(model, x)[0]
    with pytest.raises(InputError):
        tileable_region(model, "x", end)  # the pool needs every row
    for bands in (2, 3, 15):
        pooled = pool_in_bands(model, "x", pool, bands)
        # one pool per band (rule i), none over the whole map
        assert sum(n.op_type == "GlobalAveragePool" for n in pooled.graph.node) == bands
        tiled = tile_region(pooled, ["x", gate], end, bands)
        onnx.checker.check_model(tiled, full_check=True)
        np.testing.assert_allclose(run(tiled, x)[0], expected, rtol=1e-5, atol=1e-5)
