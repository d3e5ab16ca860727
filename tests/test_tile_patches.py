"""2-D patches (passes/tile.py rule c'): each row band cut again into column patches. Every
patched model runs in onnxruntime next to the untiled one and must agree to float rounding;
the planner takes patches only where no row bands fit, and what it plans holds."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from test_tile import Chain, run

from fmcompress import api
from fmcompress.errors import InputError
from fmcompress.passes.base import PassContext
from fmcompress.passes.graph import Model
from fmcompress.passes.runtime import runtime_view
from fmcompress.passes.tile import (
    TilePass,
    bands_for_budget,
    patches_for_budget,
    tile_model,
    tileable_region,
)
from fmcompress.shapes import infer_tensor_infos, resolve_input_shapes


def patched(model: onnx.ModelProto, start: str, end: str, bands: int, columns: int) -> onnx.ModelProto:
    tiled = Model.from_proto(model)
    facts = tile_model(tiled, tileable_region(tiled.proto(), start, end), bands, columns=columns)
    assert facts.columns == columns and facts.bands == bands
    proto = tiled.proto()
    onnx.checker.check_model(proto, full_check=True)
    return proto


def check_patched(model: onnx.ModelProto, start: str, end: str, bands: int, columns: int) -> onnx.ModelProto:
    proto = patched(model, start, end, bands, columns)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(bands * 31 + columns).standard_normal(shape).astype(np.float32)
    for want, got in zip(run(model, x), run(proto, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    return proto


def mobile_stage() -> Chain:
    """A MobileNetV2-like stage: stride-2 stem, an expanded inverted residual, a stride-2 exit."""
    chain = Chain((1, 3, 45, 38))
    chain.conv(8, 3, strides=[2, 2], pads=[1, 1, 1, 1])
    chain.node("Clip", [chain.last, chain.const("lo", 0.0), chain.const("hi", 6.0)])
    skip = chain.last
    chain.conv(24, 1)
    chain.node("Relu", [chain.last])
    chain.conv(24, 3, group=24, pads=[1, 1, 1, 1])
    chain.conv(8, 1)
    chain.node("Add", [skip, chain.last])
    chain.conv(4, 3, strides=[2, 2], auto_pad="SAME_UPPER")
    return chain


@pytest.mark.parametrize("bands, columns", [(1, 2), (2, 2), (3, 5), (7, 3), (12, 10)])  # 12 x 10: every patch one position)
def test_patches_of_an_inverted_residual_stage_are_exact(bands, columns):
    chain = mobile_stage()
    check_patched(chain.model(), "x", chain.last, bands, columns)


@pytest.mark.parametrize("k, stride, dilation, pads", [
    (3, 1, 1, [1, 1, 1, 1]), (5, 2, 1, [2, 1, 0, 2]), (3, 1, 2, [2, 2, 2, 2]), (3, 3, 1, [2, 0, 0, 1]),
])
def test_conv_windows_along_the_columns(k, stride, dilation, pads):
    chain = Chain((1, 3, 21, 37))
    chain.conv(6, k, strides=[stride, stride], dilations=[dilation, dilation], pads=pads)
    chain.node("Relu", [chain.last])
    chain.conv(5, (1, 3), pads=[0, 1, 0, 1])
    model = chain.model()
    for columns in (2, 3, 6):
        check_patched(model, "x", chain.last, 2, columns)


@pytest.mark.parametrize("op, attrs", [
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0, ceil_mode=1)),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)),
    ("LRN", dict(size=3)),
])
def test_pools_and_lrn_in_patches(op, attrs):
    chain = Chain((1, 4, 26, 31))
    chain.conv(6, 3, pads=[1, 1, 1, 1])
    chain.node(op, [chain.last], **attrs)
    chain.conv(4, 3, pads=[1, 1, 1, 1])
    model = chain.model()
    for bands, columns in ((2, 2), (3, 4), (5, 7)):
        check_patched(model, "x", chain.last, bands, columns)


def test_a_transposed_conv_is_not_cut_along_the_columns():
    chain = Chain((1, 4, 12, 12))
    chain.node("ConvTranspose", [chain.last, chain.const("wt", np.ones((4, 4, 2, 2)))], kernel_shape=[2, 2],
               strides=[2, 2])
    model = chain.model()
    with pytest.raises(InputError, match="axis 2"):
        tileable_region(model, "x", chain.last, axis=3)
    rows = tileable_region(model, "x", chain.last)
    infos = infer_tensor_infos(model, resolve_input_shapes(model, {}))
    assert patches_for_budget(model, rows, 1 << 20, None, infos) is None


def test_patches_fit_where_no_row_band_does():
    """A wide early map whose one output row needs many input rows: rows cannot reach the
    budget, patches can, and every tensor of the patched model is within the planned size."""
    chain = mobile_stage()
    model = chain.model()
    region = tileable_region(model, "x", chain.last)
    infos = infer_tensor_infos(model, resolve_input_shapes(model, {}))
    budget = 6000
    with pytest.raises(InputError, match="one-row bands"):
        bands_for_budget(model, "x", chain.last, budget, region=region)
    found = patches_for_budget(model, region, budget, None, infos)
    assert found is not None and found.columns > 1 and found.peak_bytes <= budget
    proto = check_patched(model, "x", chain.last, found.bands, found.columns)
    # the estimate bounds every allocation onnxruntime makes inside the region (its end excepted)
    sizes = [t.bytes for t in runtime_view(proto, level="basic").tensors
             if t.role == "map" and t.name not in ("x", chain.last)]
    assert max(sizes) <= found.peak_bytes
    # fewer patches than the one found overrun the budget
    smaller = patches_for_budget(model, region, found.peak_bytes - 1, None, infos)
    assert smaller is None or smaller.bands * smaller.columns >= found.bands * found.columns


def test_tile_pass_takes_a_column_count():
    chain = mobile_stage()
    model = Model.from_proto(chain.model())
    result = TilePass([("x", chain.last, 3, 4)])(model, PassContext())
    assert [(r.bands, r.columns) for r in result.data] == [(3, 4)]


def test_compile_runtime_ort_plans_patches_and_stays_exact():
    """`compile --runtime ort` at a ceiling no row band reaches: the plan takes patches,
    nothing is projected, and the model computes what the original does."""
    chain = mobile_stage()
    model = chain.model([chain.last])
    result = api.compile(model, ceiling="6KB", method="pca", runtime="ort", num_samples=4,
                         measure_memory=False, latency_rounds=1, latency_repeats=1)
    regions = result.report["runtime"]["regions"]
    assert any(r["columns"] > 1 for r in regions) and result.report["runtime"]["lossless"]
    x = np.random.default_rng(5).standard_normal((1, 3, 45, 38)).astype(np.float32)
    np.testing.assert_allclose(run(result.model, x)[0], run(model, x)[0], rtol=1e-4, atol=1e-5)
