"""Projecting a map before its activation: the rule (passes/before_activation.py), the one U
its readers share (fold rule h'), the stored view of the result, and compile end to end."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from test_fold import GraphBuilder, check_fold, projection

from fmcompress import api
from fmcompress.passes.base import PassContext
from fmcompress.passes.before_activation import tensor_before_activation
from fmcompress.passes.fold import FoldProjectionsPass
from fmcompress.passes.memory import GraphIndex

C = 8  # channels of every test map


def hardswish(b: GraphBuilder, x: str) -> str:
    """HardSwish as paddle2onnx writes it: x * clip(x + 3, 0, 6) / 6."""
    shifted = b.node("Add", [x, b.const(np.float32(3))])
    clipped = b.node("Clip", [shifted, b.const(np.float32(0)), b.const(np.float32(6))])
    return b.node("Div", [b.node("Mul", [x, clipped]), b.const(np.float32(6))])


def affine(b: GraphBuilder, x: str) -> str:
    """A learnable scalar affine block (x * a + b), as PP-LCNetV3 has around its activations."""
    return b.node("Add", [b.node("Mul", [x, b.const(np.float32(1.3))]), b.const(np.float32(0.1))])


def batch_norm(b: GraphBuilder, x: str) -> str:
    rng = b.rng
    params = [b.const((rng.random(C) + 0.5).astype(np.float32)), b.const(rng.standard_normal(C).astype(np.float32)),
              b.const(rng.standard_normal(C).astype(np.float32) * 0.1), b.const((rng.random(C) + 0.5).astype(np.float32))]
    return b.node("BatchNormalization", [x, *params])


def block(kind: str) -> tuple[onnx.ModelProto, str, str | None]:
    """(model, the stored map X, the tensor its projection should move to or None)."""
    b = GraphBuilder(in_channels=3)
    conv = b.conv("x", 3, C, bias=kind != "bn-relu")
    expected = conv
    if kind == "bn-relu":
        expected = batch_norm(b, conv)
        stored = b.node("Relu", [expected])
    elif kind == "affine-hardswish":
        expected = affine(b, conv)
        stored = affine(b, hardswish(b, expected))
    elif kind == "swish":
        stored = b.node("Mul", [conv, b.node("Sigmoid", [conv])])
    elif kind == "no-activation":
        stored, expected = batch_norm(b, conv), None
    elif kind == "residual":
        stored, expected = b.node("Relu", [b.node("Add", [conv, b.conv("x", 3, C)])]), None
    elif kind == "read-outside":  # the conv's output also feeds another branch
        stored, expected = b.node("Relu", [conv]), None
        side = b.conv(conv, C, C)
    elif kind == "resized":  # U is carried through the Resize instead (passes/plan.py)
        stored, expected = b.node("Relu", [conv]), None
        stored_up = b.node("Resize", [stored, "", b.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    elif kind == "split":  # a channel Split would write the map's halves whole (YOLOv8's C2f)
        stored, expected = b.node("Relu", [conv]), None
        halves = b.node("Split", [stored, b.const(np.array([C // 2, C // 2], np.int64))], n_out=2, axis=1)
    elif kind == "se-gate":  # squeeze-excitation reads it by a pooling and a Mul: both compute it as they read
        stored = b.node("Relu", [conv])
        gate = b.node("Sigmoid", [b.conv(b.node("GlobalAveragePool", [stored]), C, C)])
        gated = b.node("Mul", [stored, gate])
    out = b.conv(gated if kind == "se-gate" else stored, C, 4, k=3, pads=[1, 1, 1, 1])
    outputs = [out]
    if kind == "split":
        outputs += [b.conv(half, C // 2, 4) for half in halves]
    if kind == "read-outside":
        outputs.append(side)
    if kind == "resized":
        outputs.append(b.conv(stored_up, C, 4))
    return b.model(outputs), stored, expected


@pytest.mark.parametrize("kind", ["bn-relu", "affine-hardswish", "swish", "se-gate", "no-activation", "residual",
                                  "read-outside", "resized", "split"])
def test_the_projection_moves_to_the_linear_part_before_the_activation(kind):
    model, stored, expected = block(kind)
    assert tensor_before_activation(GraphIndex(model), stored) == expected


@pytest.mark.parametrize(("c_in", "k", "group", "moves"), [
    (3, 1, 1, True),  # a pointwise conv widening 3 to 8 channels: T has rank at most 4
    (16, 1, 1, True),  # a pointwise conv narrowing 16 to 8: T is a linear image of its input
    (3, 3, 1, False),  # a spatial conv
    (C, 3, C, False),  # depthwise
    (C, 1, 4, False),  # grouped pointwise: each group its own linear map
])
def test_pointwise_placement_moves_only_maps_after_a_pointwise_conv(c_in, k, group, moves):
    """Rule e: `--placement pointwise` (the default) moves a map only after a group-1 1x1 conv."""
    b = GraphBuilder(in_channels=c_in)
    conv = b.conv("x", c_in, C, k=k, group=group, pads=[k // 2] * 4)
    stored = b.node("Relu", [conv])
    model = b.model([b.conv(stored, C, 4, k=3, pads=[1, 1, 1, 1])])
    index = GraphIndex(model)
    assert tensor_before_activation(index, stored) == conv  # rules a and b alone move every one
    assert tensor_before_activation(index, stored, pointwise_only=True) == (conv if moves else None)


def test_an_activation_s_readers_share_one_u_and_the_stored_view_keeps_only_z():
    model, stored, before = block("affine-hardswish")
    k = 2
    data = check_fold(model, {before: projection(C, k)})  # against the insertion reference in onnxruntime
    assert list(data[before]["consumers"].values()).count("explicit") == 2  # two readers ...
    result = FoldProjectionsPass({before: projection(C, k)})(model, PassContext(input_shapes={"x": (1, 3, 8, 8)}))
    u_convs = [n for n in result.model.graph.node if n.name.startswith("fmc/U/")]
    assert len(u_convs) == 1  # ... one U (rule h')
    report = api.analyze(result.model, ceiling=f"{k * 8 * 8 * 4}B")
    assert stored not in {m.name for m in report.stored}  # computed on the fly in the 3x3 conv
    assert not report.over_ceiling()


def test_readers_that_do_not_converge_keep_a_u_each():
    b = GraphBuilder(in_channels=3)
    conv = b.conv("x", 3, C)
    outputs = [b.conv(b.node("Relu", [conv]), C, 4, k=3, pads=[1, 1, 1, 1]),
               b.conv(b.node("Sigmoid", [conv]), C, 4, k=3, pads=[1, 1, 1, 1])]
    model = b.model(outputs)
    check_fold(model, {conv: projection(C, 2)})
    result = FoldProjectionsPass({conv: projection(C, 2)})(model, PassContext(input_shapes={"x": (1, 3, 8, 8)}))
    assert len([n for n in result.model.graph.node if n.name.startswith("fmc/U/")]) == 2


@pytest.mark.parametrize(("kind", "placement"), [("affine-hardswish", "before"), ("affine-hardswish", "after"),
                                               ("affine-hardswish", "pointwise"), ("se-gate", "before")])
def test_compile_projects_before_the_activation_and_meets_the_ceiling(kind, placement):
    model, stored, before = block(kind)
    ceiling = f"{2 * 8 * 8 * 4}B"  # two channels of an 8-channel map
    result = api.compile(model, ceiling=ceiling, method="pca", num_samples=16, latency_rounds=1,
                         latency_repeats=1, placement=placement)
    entry = next(m for m in result.report["maps"] if stored in (m["name"], m["before_activation_of"]))
    assert result.report["verification"]["ceiling_ok"]
    if placement != "after":  # the block's conv is pointwise: rule e moves it too
        assert (entry["name"], entry["before_activation_of"]) == (before, stored)
    else:
        assert (entry["name"], entry["before_activation_of"]) == (stored, None)
    stored_maps = api.analyze(result.model, ceiling=ceiling)
    assert not stored_maps.over_ceiling()


@pytest.mark.parametrize("shape", [(), (1, C, 1, 1)])
def test_p_folds_through_the_affine_ops_after_the_conv(shape):
    """Fold rule a': a map projected before its activation ends in x * a + b after its conv;
    P goes into the conv's weights, checked against the insertion reference in onnxruntime."""
    b = GraphBuilder(in_channels=3)
    conv = b.conv("x", 3, C)
    scale = b.const((b.rng.random(shape) + 0.5).astype(np.float32))
    shifted = b.node("Sub", [b.node("Div", [b.node("Mul", [scale, conv]), b.const(np.float32(2))]),
                             b.const(b.rng.standard_normal(shape).astype(np.float32))])
    out = b.conv(b.node("Relu", [shifted]), C, 4, k=3, pads=[1, 1, 1, 1])
    data = check_fold(b.model([out]), {shifted: projection(C, 2)})
    assert data[shifted]["producer"] == "folded"


def test_p_stays_explicit_where_the_affine_chain_is_read_elsewhere():
    b = GraphBuilder(in_channels=3)
    conv = b.conv("x", 3, C)
    scaled = b.node("Mul", [conv, b.const(np.float32(1.5))])
    shifted = b.node("Add", [scaled, b.const(np.float32(0.2))])
    outputs = [b.conv(b.node("Relu", [shifted]), C, 4), b.conv(scaled, C, 4)]
    data = check_fold(b.model(outputs), {shifted: projection(C, 2)})
    assert data[shifted]["producer"] == "explicit"
