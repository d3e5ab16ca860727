"""Tiling rules for the ops onnxruntime-facing models add: strided Slice (a Focus stem, tile rule
d'''), and the runtime plan's names for what onnxruntime inlines or fuses (runtime_plan rule h).
Every tiled model runs in onnxruntime next to the untiled one and must agree to 1e-5."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from test_tile import Chain, check_tiled, run

from fmcompress.errors import InputError
from fmcompress.passes.base import PassContext
from fmcompress.passes.graph import Model
from fmcompress.passes.runtime import analyze_runtime
from fmcompress.passes.runtime_plan import TileToCeilingPass, plan_runtime
from fmcompress.passes.tile import tileable_region


def _slice(chain: Chain, src: str, starts, ends, axes, steps, dtype=np.int64, as_nodes: bool = False) -> str:
    """A Slice of `src` whose parameters are initializers (or Constant nodes)."""
    n = len(chain.nodes)
    names = []
    for part, values in zip(("starts", "ends", "axes", "steps"), (starts, ends, axes, steps), strict=True):
        name = f"s{n}_{part}"
        value = numpy_helper.from_array(np.array(values, dtype), name)
        if as_nodes:
            chain.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_const", value=value))
        else:
            chain.inits.append(value)
        names.append(name)
    return chain.node("Slice", [src, *names])


def focus(chain: Chain, **kwargs) -> str:
    """YOLOv5's Focus: x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]
    as torch exports it (a Slice along H, then along W), concatenated along channels."""
    big = 1 << 62
    rows = [_slice(chain, "x", [r], [big], [2], [2], **kwargs) for r in (0, 1)]
    parts = [_slice(chain, rows[r], [c], [big], [3], [2], **kwargs) for c in (0, 1) for r in (0, 1)]
    chain.channels *= 4
    return chain.node("Concat", parts, axis=1)


@pytest.mark.parametrize("height", [32, 34])
@pytest.mark.parametrize("as_nodes", [False, True])
def test_focus_stem_in_bands(height, as_nodes):
    chain = Chain((1, 3, height, 30))
    focus(chain, as_nodes=as_nodes)
    chain.conv(8, 3, pads=[1, 1, 1, 1])
    chain.node("Sigmoid", [chain.last])
    chain.conv(8, 3, pads=[1, 1, 1, 1], strides=[2, 2])
    model = chain.model()
    for bands in (1, 2, 3, out_rows(model, chain.last)):
        check_tiled(model, "x", chain.last, bands)


@pytest.mark.parametrize("start, end, step", [(3, 29, 3), (-20, -1, 2), (1, 1 << 30, 1), (-(1 << 30), 17, 4)])
@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_slice_along_rows_with_a_start_and_step(start, end, step, dtype):
    """Crops and strides along H (negative and out-of-range bounds clamped), mixed with W."""
    chain = Chain((1, 4, 31, 12))
    chain.conv(6, 3, pads=[1, 1, 1, 1])
    _slice(chain, chain.last, [1, start], [-1, end], [3, -2], [1, step], dtype=dtype)
    chain.conv(5, 3, pads=[1, 0, 1, 0])
    model = chain.model()
    for bands in (2, 3, out_rows(model, chain.last)):
        check_tiled(model, "x", chain.last, bands)


def test_slice_along_channels_with_a_step_is_row_local():
    chain = Chain((1, 8, 17, 9))
    chain.conv(8, 3, pads=[1, 1, 1, 1])
    _slice(chain, chain.last, [1], [8], [1], [3])
    chain.channels = 3
    chain.conv(4, 3, pads=[1, 1, 1, 1])
    check_tiled(chain.model(), "x", chain.last, 4)


@pytest.mark.parametrize("axes, steps, match", [([0], [1], "batch"), ([2], [-1], "positive step")])
def test_slice_rejections(axes, steps, match):
    chain = Chain((1, 4, 12, 12))
    chain.conv(4, 3, pads=[1, 1, 1, 1])
    _slice(chain, chain.last, [-1], [-(1 << 62)] if steps[0] < 0 else [1], axes, steps)
    with pytest.raises(InputError, match=match):
        tileable_region(chain.model(), "x", chain.last)


def out_rows(model: onnx.ModelProto, end: str) -> int:
    return tileable_region(model, "x", end).height(end)


# ---------------------------------------------------------------- onnxruntime's names

def hardswish_net(size: int = 64) -> onnx.ModelProto:
    """Conv, HardSwish (an opset-14 function onnxruntime inlines into HardSigmoid and Mul),
    strided conv, global pool: the MobileNetV3 stem."""
    chain = Chain((1, 3, size, size))
    chain.conv(16, 3, pads=[1, 1, 1, 1])
    chain.node("HardSwish", [chain.last])
    chain.conv(8, 3, pads=[1, 1, 1, 1], strides=[4, 4])
    chain.node("GlobalAveragePool", [chain.last])
    return chain.model(opset=17)


def test_inlined_hardswish_maps_to_the_graph_tensor():
    model = hardswish_net()
    ceiling = 64 * 1024
    ctx = PassContext(input_shapes={})
    ctx.runtime = analyze_runtime(model, ctx, ceiling_bytes=ceiling)
    foreign = [t.name for t in ctx.runtime.over_ceiling() if t.name.startswith("_inlfunc_HardSwish")]
    assert foreign, "onnxruntime no longer inlines HardSwish: the test lost its point"
    plan = plan_runtime(model, ctx, allow_projection=False)
    assert not plan.uncovered
    assert any(set(foreign) <= set(region.covers) for region in plan.regions)
    tiled = Model.from_proto(model)
    TileToCeilingPass(ceiling).run(tiled, PassContext(input_shapes={}))
    after = analyze_runtime(tiled.proto(), PassContext(input_shapes={}), ceiling_bytes=ceiling)
    assert not after.over_ceiling()
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(run(tiled.proto(), x)[0], run(model, x)[0], rtol=1e-5, atol=1e-5)


def test_fused_focus_maps_to_the_graph_tensor():
    """onnxruntime fuses the Focus Slices and Concat into SpaceToDepth and Gather; the plan
    covers both (under their Concat's name) with the Slices the fusion hid, and the tiled
    stem fits in onnxruntime."""
    chain = Chain((1, 3, 64, 64))
    focus(chain)
    chain.conv(16, 3, pads=[1, 1, 1, 1])
    chain.node("Relu", [chain.last])
    chain.conv(8, 3, pads=[1, 1, 1, 1], strides=[4, 4])
    model = chain.model(opset=17)
    ceiling = 16 * 1024  # the row Slices (24 KiB) that SpaceToDepth hides are above it too
    ctx = PassContext(input_shapes={})
    ctx.runtime = analyze_runtime(model, ctx, ceiling_bytes=ceiling)
    assert "space_to_depth_out" in {t.name for t in ctx.runtime.over_ceiling()}
    plan = plan_runtime(model, ctx, allow_projection=False)
    assert not plan.uncovered and [region.starts for region in plan.regions] == [["x"]]
    tiled = Model.from_proto(model)
    TileToCeilingPass(ceiling).run(tiled, PassContext(input_shapes={}))
    after = analyze_runtime(tiled.proto(), PassContext(input_shapes={}), ceiling_bytes=ceiling)
    assert not after.over_ceiling()
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(run(tiled.proto(), x)[0], run(model, x)[0], rtol=1e-5, atol=1e-5)


def test_map_read_only_by_a_banded_pool_is_covered():
    """SqueezeNet's classifier: a wide 1x1 conv read only by GlobalAveragePool. Once the pool
    runs in bands (runtime_plan rule f) the map exists only in bands: nothing is uncovered."""
    chain = Chain((1, 8, 12, 12))
    chain.conv(16, 3, pads=[1, 1, 1, 1])
    chain.node("Relu", [chain.last])
    chain.conv(200, 1)
    chain.node("Relu", [chain.last])
    chain.node("GlobalAveragePool", [chain.last])
    chain.node("Flatten", [chain.last])
    model = chain.model(opset=17)
    ceiling = 32 * 1024
    ctx = PassContext(input_shapes={})
    ctx.runtime = analyze_runtime(model, ctx, ceiling_bytes=ceiling)
    assert ctx.runtime.over_ceiling()
    plan = plan_runtime(model, ctx, allow_projection=False)
    assert plan.pools and not plan.uncovered
    tiled = Model.from_proto(model)
    TileToCeilingPass(ceiling).run(tiled, PassContext(input_shapes={}))
    assert not analyze_runtime(tiled.proto(), PassContext(input_shapes={}), ceiling_bytes=ceiling).over_ceiling()
    x = np.random.default_rng(0).standard_normal((1, 8, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(run(tiled.proto(), x)[0], run(model, x)[0], rtol=1e-5, atol=1e-5)


def test_a_pool_whose_every_start_is_above_the_ceiling_recomputes_from_a_projection():
    """A pre-activation ResNet's head: every residual map is above the ceiling, so the banded
    pool (runtime_plan rule f) can only recompute its input from a map that a projection
    makes fit; compile plans that projection and the ceiling holds in onnxruntime."""
    from fmcompress.compiler import CompileOptions, compile_model

    chain = Chain((1, 3, 32, 32))
    stem = chain.conv(32, 3, pads=[1, 1, 1, 1])
    block = stem
    for _ in range(6):  # pre-activation blocks: Relu, conv, Relu, conv, + identity
        chain.node("Relu", [block])
        chain.conv(32, 3, pads=[1, 1, 1, 1])
        chain.node("Relu", [chain.last])
        chain.conv(32, 3, pads=[1, 1, 1, 1])
        block = chain.node("Add", [chain.last, block])
    chain.node("Relu", [block])
    chain.node("GlobalAveragePool", [chain.last])
    chain.node("Flatten", [chain.last])
    model = chain.model(opset=17)
    ceiling = 64 * 1024  # a map is 128 KB; one band of a block's input and halo fits
    options = CompileOptions(ceiling="64KB", runtime="ort", method="pca", num_samples=8, batch_size=4,
                             latency_repeats=1, latency_rounds=1)
    result = compile_model(model, options)
    assert result.plan.maps  # the pool's start, projected
    assert sum(node.op_type == "GlobalAveragePool" for node in result.model.graph.node) > 1  # pooled in bands
    after = analyze_runtime(result.model, PassContext(input_shapes={}), ceiling_bytes=ceiling)
    assert not after.over_ceiling()


@pytest.mark.parametrize("opset", [11, 17])
def test_nearest_resize_with_sizes_computed_at_run_time_in_bands(opset):
    """HRNet's fuse: `F.interpolate(y, size=x.shape[-2:])` exports sizes made by Shape, Slice and
    Concat. Tile rule d' takes the factor from the static shapes and gives each band constant
    scales (and an empty roi, which opset 11 needs)."""
    chain = Chain((1, 3, 16, 16))
    chain.conv(8, 3, pads=[1, 1, 1, 1])
    low = chain.node("Relu", [chain.last])
    shape = chain.node("Shape", [low])
    lead = _slice(chain, shape, [0], [2], [0], [1])
    spatial = _slice(chain, shape, [2], [4], [0], [1])
    doubled = chain.node("Mul", [spatial, chain.const("two", np.array([2]))])
    sizes = chain.node("Concat", [lead, doubled], axis=0)
    resize_inputs = [low, chain.const("roi", np.zeros(0)), chain.const("scales", np.zeros(0)), sizes]
    chain.node("Resize", resize_inputs, mode="nearest", coordinate_transformation_mode="asymmetric",
               nearest_mode="floor")
    chain.conv(8, 3, pads=[1, 1, 1, 1])
    model = chain.model(opset=opset)
    for init in model.graph.initializer:  # the integer factor 2 for the sizes
        if init.name == "two":
            init.CopyFrom(numpy_helper.from_array(np.array([2], np.int64), "two"))
    check_tiled(model, "x", chain.last, 4)


def test_lrn_and_an_unsqueezed_scale_run_in_bands():
    """The onnx wheel's old Caffe models: LRN (across channels only, so row-local) and a BN
    scale given as an Unsqueeze of an initializer (constant-only arithmetic the region reads as
    a constant, evaluated by onnx.reference)."""
    chain = Chain((1, 3, 24, 24))
    chain.conv(8, 3, pads=[1, 1, 1, 1])
    chain.node("Relu", [chain.last])
    chain.node("LRN", [chain.last], size=5, alpha=1e-4, beta=0.75, bias=1.0)
    scale = chain.node("Unsqueeze", [chain.const("gamma", np.linspace(0.5, 1.5, 8)),
                                     chain.const("axes", np.array([1, 2]))])
    chain.inits[-1].CopyFrom(numpy_helper.from_array(np.array([1, 2], np.int64), "axes"))
    chain.last = chain.nodes[-2].output[0]
    chain.node("Mul", [chain.last, scale])
    chain.conv(8, 3, pads=[1, 1, 1, 1])
    check_tiled(chain.model(opset=17), "x", chain.last, 3)
