"""Tiling through layout changes (passes/tile.py rules a'', f', h'): a region follows the row
axis through Transposes into channel-last ops (LayerNormalization, MatMul by a constant,
elementwise with per-channel constants) and back, or through a Reshape that merges it with
the axes after it into a Concat (a YOLOv5 head). Every tiled model runs in onnxruntime next
to the untiled one and must agree to 1e-5."""

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
from fmcompress.passes.tile import TilePass, tile_region, tile_region_with_facts, tileable_region

NHWC, NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


def channel_last_block(chain: Chain, src: str) -> str:
    """ConvNeXt's block on `src` (NCHW): 7x7 depthwise conv, to NHWC, LayerNorm, MatMul, bias,
    erf GELU, MatMul, bias, layer scale, back to NCHW, residual Add."""
    c = chain.channels
    chain.conv(c, 7, src=src, group=c, pads=[3, 3, 3, 3])
    chain.node("Transpose", [chain.last], perm=NHWC)
    chain.node("LayerNormalization", [chain.last, chain.const(f"g{len(chain.nodes)}", chain.rng.uniform(0.5, 1.5, c)),
                                      chain.const(f"b{len(chain.nodes)}", chain.rng.standard_normal(c) * 0.1)],
               axis=-1, epsilon=1e-6)
    hidden = _linear(chain, c, 4 * c)
    half = chain.node("Mul", [hidden, chain.const(f"h{len(chain.nodes)}", np.float32(0.5))])
    scaled = chain.node("Div", [hidden, chain.const(f"s{len(chain.nodes)}", np.float32(2 ** 0.5))])
    erf = chain.node("Erf", [scaled])
    one = chain.node("Add", [erf, chain.const(f"o{len(chain.nodes)}", np.float32(1.0))])
    chain.node("Mul", [half, one])
    _linear(chain, 4 * c, c)
    chain.node("Mul", [chain.const(f"ls{len(chain.nodes)}", chain.rng.uniform(0.5, 1.5, c)), chain.last])
    back = chain.node("Transpose", [chain.last], perm=NCHW)
    return chain.node("Add", [src, back])


def _linear(chain: Chain, k: int, m: int) -> str:
    n = len(chain.nodes)
    product = chain.node("MatMul", [chain.last, chain.const(f"w{n}", chain.rng.standard_normal((k, m)) / k ** 0.5)])
    return chain.node("Add", [chain.const(f"bias{n}", chain.rng.standard_normal(m) * 0.1), product])


def convnext_stage(shape=(1, 3, 24, 20)) -> tuple[onnx.ModelProto, Chain]:
    chain = Chain(shape)
    stem = chain.conv(8, 2, strides=[2, 2])
    block = channel_last_block(chain, stem)
    channel_last_block(chain, block)
    chain.conv(16, 2, strides=[2, 2])
    return chain.model(opset=17), chain


def test_convnext_blocks_in_bands():
    model, chain = convnext_stage()
    region = tileable_region(model, "x", chain.last)
    assert {region.axes[t] for t in region.axes} == {1, 2}  # channel-last rows on axis 1
    for bands in (1, 2, 3, region.height(chain.last)):
        check_tiled(model, "x", chain.last, bands)


def test_matmul_macs_are_counted():
    model, chain = convnext_stage()
    _, facts = tile_region_with_facts(model, "x", chain.last, 3)
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 4 and facts.macs_tiled > facts.macs_untiled > 0


def test_a_channel_last_start_takes_its_rows_from_the_layout():
    """A start the graph made channel-last ([N, H, W, C]) has its rows on axis 1 (the graph's
    layout, rule a''), so a region from it back into NCHW convs validates and tiles; the NCHW
    map its residual Add reads is a side input with its rows on axis 2."""
    model, chain = convnext_stage()
    transposed = next(n for n in model.graph.node if n.op_type == "Transpose")
    stem = model.graph.node[0].output[0]
    starts = [transposed.output[0], stem]
    region = tileable_region(model, starts, chain.last)
    assert region.axes[transposed.output[0]] == 1 and region.axes[stem] == 2 and region.axes[chain.last] == 2
    for bands in (2, 3):
        check_tiled(model, starts, chain.last, bands)


def test_row_local_ops_on_a_channel_last_graph_input():
    """Without a layout change in the graph, a 4-D start keeps axis 2: a MatMul over its last
    axis and a LayerNorm are row-local along it too."""
    chain = Chain((1, 6, 10, 8))
    chain.node("LayerNormalization", ["x", chain.const("g", np.ones(8)), chain.const("b", np.zeros(8))], axis=-1)
    chain.node("MatMul", [chain.last, chain.const("w", chain.rng.standard_normal((8, 12)))])
    chain.node("Relu", [chain.last])
    for bands in (2, 5, 10):
        check_tiled(chain.model(opset=17), "x", chain.last, bands)


def test_convnext_plan_tiles_through_transposes_and_fits_in_onnxruntime():
    """The runtime plan finds regions through the Transposes (the 4x wide MLP tensors, and what
    onnxruntime fuses them into, are above the ceiling; the block ends fit) and once tiled no
    allocation is above the ceiling."""
    model, _ = convnext_stage((1, 3, 32, 32))
    ceiling = 16 * 1024  # 8-channel maps (8 KiB) fit, the 32-channel MLP tensors (32 KiB) do not
    ctx = PassContext(input_shapes={})
    ctx.runtime = analyze_runtime(model, ctx, ceiling_bytes=ceiling)
    assert ctx.runtime.over_ceiling()
    plan = plan_runtime(model, ctx, allow_projection=False)
    assert not plan.uncovered and plan.regions
    tiled = Model.from_proto(model)
    TileToCeilingPass(ceiling).run(tiled, PassContext(input_shapes={}))
    assert not analyze_runtime(tiled.proto(), PassContext(input_shapes={}), ceiling_bytes=ceiling).over_ceiling()
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(run(tiled.proto(), x)[0], run(model, x)[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- a YOLOv5 head


def yolo_head(computed_shape: bool, channels: int = 18, width: int = 12, depth: int = 6) -> tuple[onnx.ModelProto, list[str]]:
    """Two detect levels: Conv -> Transpose(0,2,3,1) -> Reshape [N, -1, depth], concatenated along
    axis 1 into the graph output. With `computed_shape`, each Reshape target is computed at run
    time from Shape(level 0's conv output) (torch's export), so Shape reads a region intermediate."""
    chain = Chain((1, 4, 16, width))
    convs = [chain.conv(channels, 3, src="x", pads=[1, 1, 1, 1]),
             chain.conv(channels, 3, src="x", pads=[1, 1, 1, 1], strides=[2, 2], in_ch=4)]
    if computed_shape:
        shape = chain.node("Shape", [convs[0]])
        batch = chain.node("Gather", [shape, chain.const("zero", np.array(0))], axis=0)
        chain.inits[-1] = numpy_helper.from_array(np.array(0, np.int64), "zero")
        chain.inits.append(numpy_helper.from_array(np.array([0], np.int64), "axes0"))
        chain.inits.append(numpy_helper.from_array(np.array([-1, depth], np.int64), "rest"))
        lead = chain.node("Unsqueeze", [batch, "axes0"])
        target = chain.node("Concat", [lead, "rest"], axis=0)
    else:
        chain.inits.append(numpy_helper.from_array(np.array([1, -1, depth], np.int64), "target"))
        target = "target"
    levels = []
    for conv in convs:
        transposed = chain.node("Transpose", [conv], perm=NHWC)
        levels.append(chain.node("Reshape", [transposed, target]))
    chain.node("Concat", levels, "output", axis=1)
    return chain.model(["output"], opset=17), levels


@pytest.mark.parametrize("computed_shape", [False, True])
def test_yolo_head_levels_are_spliced_into_the_output_concat(computed_shape):
    model, levels = yolo_head(computed_shape)
    x = np.random.default_rng(2).standard_normal((1, 4, 16, 12)).astype(np.float32)
    for bands in (1, 3, 7, 20):  # 20: more bands than level 0 has rows, so bands cut rows
        tiled = Model.from_proto(model)
        result = TilePass([("x", level, bands) for level in levels]).run(tiled, PassContext())
        proto = tiled.proto()
        onnx.checker.check_model(proto, full_check=True)
        names = {out for node in proto.graph.node for out in node.output}
        assert not names & set(levels)  # rule f': no full-size level is written
        assert [node.op_type for node in proto.graph.node].count("Concat") == 1  # the shape arithmetic died
        assert [r.bands for r in result.data] == [bands, bands]
        np.testing.assert_allclose(run(proto, x)[0], run(model, x)[0], rtol=1e-5, atol=1e-5)


def test_reshape_that_splits_rows_unevenly_is_rejected():
    model, levels = yolo_head(False, channels=10, width=5, depth=4)  # 5 * 10 = 50 not a multiple of 4
    with pytest.raises(InputError, match="whole positions") as error:
        tileable_region(model, "x", levels[0])
    assert "\n" not in str(error.value)


def test_yolo_head_plan_splices_and_fits_in_onnxruntime():
    """Runtime plan rule c: a level above the ceiling whose one reader is the output Concat is
    an end that fits; tiled, no allocation but the graph output is above the ceiling."""
    model, _ = yolo_head(True)
    ceiling = 8 * 1024  # each level (13.8 KiB, 3.5 KiB) and its conv; the output is the caller's
    ctx = PassContext(input_shapes={})
    ctx.runtime = analyze_runtime(model, ctx, ceiling_bytes=ceiling)
    assert ctx.runtime.over_ceiling()
    plan = plan_runtime(model, ctx, allow_projection=False)
    assert not plan.uncovered and plan.regions
    tiled = Model.from_proto(model)
    TileToCeilingPass(ceiling).run(tiled, PassContext(input_shapes={}))
    assert not analyze_runtime(tiled.proto(), PassContext(input_shapes={}), ceiling_bytes=ceiling).over_ceiling()
    x = np.random.default_rng(0).standard_normal((1, 4, 16, 12)).astype(np.float32)
    np.testing.assert_allclose(run(tiled.proto(), x)[0], run(model, x)[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- rejections


def _rejected(chain: Chain, match: str) -> None:
    with pytest.raises(InputError, match=match) as error:
        tileable_region(chain.model(opset=17), "x", chain.last)
    assert "\n" not in str(error.value)


def test_matmul_over_the_rows_is_rejected():
    """A Transpose that moves the rows to the last axis, then a MatMul contracting it."""
    chain = Chain((1, 4, 8, 6))
    chain.conv(4, 3, pads=[1, 1, 1, 1])
    chain.node("Transpose", [chain.last], perm=[0, 1, 3, 2])
    chain.node("MatMul", [chain.last, chain.const("w", np.ones((8, 5)))])
    _rejected(chain, "contracts the last axis")


def test_layernorm_over_the_rows_is_rejected():
    chain = Chain((1, 4, 8, 6))
    chain.conv(4, 3, pads=[1, 1, 1, 1])
    chain.node("Transpose", [chain.last], perm=NHWC)
    chain.node("LayerNormalization", [chain.last, chain.const("g", np.ones((8, 6, 4)))], axis=1)
    _rejected(chain, "normalises axes 1..3")


def test_transpose_of_the_batch_axis_is_rejected():
    chain = Chain((1, 4, 8, 6))
    chain.conv(4, 3, pads=[1, 1, 1, 1])
    chain.node("Transpose", [chain.last], perm=[1, 0, 2, 3])
    _rejected(chain, "batch axis")


def test_constant_varying_along_channel_last_rows_is_rejected():
    chain = Chain((1, 4, 8, 6))
    chain.conv(4, 3, pads=[1, 1, 1, 1])
    chain.node("Transpose", [chain.last], perm=NHWC)
    chain.node("Add", [chain.last, chain.const("per_row", np.ones((8, 1, 1)))])
    _rejected(chain, "varies along the rows")


def test_conv_on_channel_last_rows_is_rejected():
    chain = Chain((1, 4, 8, 6))
    chain.conv(4, 3, pads=[1, 1, 1, 1])
    chain.node("Transpose", [chain.last], perm=NHWC)
    chain.conv(4, 1, in_ch=6)
    _rejected(chain, "rows on axis 2")


def test_shape_and_size_of_an_intermediate_read_outside_keep_a_free_batch():
    """Rule h': Shape (whole, or from axis 1) and Size of a region intermediate read outside
    the region become its static sizes with the batch dim from the start's Shape, so the tiled
    model still runs at another batch."""
    chain = Chain((1, 4, 10, 8))
    inner = chain.conv(6, 3, pads=[1, 1, 1, 1])
    end = chain.conv(5, 3, pads=[1, 1, 1, 1])
    chain.node("Shape", [inner], "whole")
    chain.node("Shape", [inner], "tail", start=1)
    chain.node("Size", [inner], "size")
    int64 = onnx.TensorProto.INT64
    outputs = [helper.make_tensor_value_info(end, onnx.TensorProto.FLOAT, ["N", 5, 10, 8]),
               *(helper.make_tensor_value_info(name, int64, shape) for name, shape in
                 (("whole", [4]), ("tail", [3]), ("size", [])))]
    graph = helper.make_graph(chain.nodes, "shapes", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                   ["N", 4, 10, 8])],
                              outputs, chain.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    tiled = tile_region(model, "x", end, 3, {"x": (1, 4, 10, 8)})
    onnx.checker.check_model(tiled, full_check=True)
    assert inner not in {out for node in tiled.graph.node for out in node.output}
    x = np.random.default_rng(3).standard_normal((2, 4, 10, 8)).astype(np.float32)
    for want, got in zip(run(model, x), run(tiled, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
