"""One definition of compressible (FeatureMap.not_compressible_reason, featuremaps.layout_reason):
the analysis, the relative ceiling, the plan and the projection check agree. A 5-D map (a
channel shuffle) and a 2-D map (a [T, classes] MatMul) above a `4x` ceiling are reported as
not compressible with their reason, never as compressible and then infeasible."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from fmcompress import api
from fmcompress.cli import main
from fmcompress.compiler import CompileOptions, compile_model
from fmcompress.errors import InputError
from fmcompress.featuremaps import Projection, layout_reason
from fmcompress.passes import Model
from fmcompress.passes.insert import InsertProjectionsPass

SHUFFLE_5D = "r5"
CHANNEL_LAST = "ln"
CHANNEL_LAST_MAPS = {"nhwc", CHANNEL_LAST, "mm"}  # [N, H, W, C] between the two Transposes
CHANNEL_LAST_REASON = "channel-last [N, H, W, C] map: P and U act on axis 1, its rows"


def _weights(rng: np.random.Generator, name: str, *shape: int) -> onnx.TensorProto:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name)


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def channel_shuffle() -> onnx.ModelProto:
    """Conv -> Reshape [1, 2, 8, 16, 16] -> Transpose -> Reshape back -> Conv -> classifier."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["a0"]),
        helper.make_node("Reshape", ["a0", "s5"], [SHUFFLE_5D]),
        helper.make_node("Transpose", [SHUFFLE_5D], ["t5"], perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["t5", "s4"], ["shuffled"]),
        helper.make_node("Conv", ["shuffled", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a1"]),
        helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["p1"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1),
    ]
    inits = [_weights(rng, "w0", 16, 3, 3, 3), _weights(rng, "w1", 16, 16, 3, 3), _weights(rng, "fc", 10, 16),
             numpy_helper.from_array(np.array([1, 2, 8, 16, 16], np.int64), "s5"),
             numpy_helper.from_array(np.array([1, 16, 16, 16], np.int64), "s4")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)


def sequence_matmul() -> onnx.ModelProto:
    """Convs to [1, 8, 1, 32] -> [T=32, 8] -> MatMul to a 2-D [32, 64] map -> MatMul to [32, classes]."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["a"]),
        helper.make_node("Conv", ["a", "w0"], ["c0"], kernel_shape=[4, 3], pads=[0, 1, 0, 1]),
        helper.make_node("Relu", ["c0"], ["a0"]),
        helper.make_node("Reshape", ["a0", "s2"], ["cw"]),
        helper.make_node("Transpose", ["cw"], ["steps"], perm=[1, 0]),
        helper.make_node("MatMul", ["steps", "m1"], ["hidden"]),
        helper.make_node("Relu", ["hidden"], ["h"]),
        helper.make_node("MatMul", ["h", "m2"], ["y"]),
    ]
    inits = [_weights(rng, "w", 8, 1, 3, 3), _weights(rng, "w0", 8, 8, 4, 3), _weights(rng, "m1", 8, 64), _weights(rng, "m2", 64, 5),
             numpy_helper.from_array(np.array([8, 32], np.int64), "s2")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 32])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 5])], inits)


def channel_last_block() -> onnx.ModelProto:
    """ConvNeXt's block: Conv -> Transpose to [N, H, W, C] -> LayerNorm -> MatMul -> Transpose back."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["c"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("LayerNormalization", ["nhwc", "scale", "bias"], [CHANNEL_LAST], axis=-1),
        helper.make_node("MatMul", [CHANNEL_LAST, "m"], ["mm"]),
        helper.make_node("Transpose", ["mm"], ["back"], perm=[0, 3, 1, 2]),
        helper.make_node("Relu", ["back"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1),
    ]
    inits = [_weights(rng, "w", 16, 3, 3, 3), _weights(rng, "m", 16, 32), _weights(rng, "fc", 10, 32),
             numpy_helper.from_array(np.ones(16, np.float32), "scale"),
             numpy_helper.from_array(np.zeros(16, np.float32), "bias")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)


def test_layout_rule():
    assert layout_reason(4, 16) is None and layout_reason(3, 2) is None
    assert layout_reason(5, 2) == "5-D map, not a 4-D NCHW or 3-D NCL map"
    assert layout_reason(2, 64) == "2-D map, not a 4-D NCHW or 3-D NCL map"
    assert layout_reason(4, 1) == "one channel: nothing to project"
    assert layout_reason(None, None).startswith("map of unknown rank")
    assert layout_reason(4, 16, channels_last=True) == CHANNEL_LAST_REASON


@pytest.mark.parametrize(("build", "name", "reason"), [
    (channel_shuffle, SHUFFLE_5D, "5-D map, not a 4-D NCHW or 3-D NCL map"),
    (sequence_matmul, "h", "2-D map, not a 4-D NCHW or 3-D NCL map"),
    (channel_last_block, CHANNEL_LAST, CHANNEL_LAST_REASON),
])
def test_analysis_refuses_what_compile_cannot_project(build, name, reason):
    model = build()
    report = api.analyze(model, ceiling="4x")
    fmap = next(m for m in report.stored if m.name == name)
    assert (fmap.compressible, fmap.not_compressible_reason) == (False, reason)
    # the relative ceiling divides the largest 4-D / 3-D float map between groups, by hand:
    projectable = [int(np.prod(m.shape)) * 4 for m in report.stored
                   if m.role == "map" and len(m.shape) in (3, 4) and m.shape[1] >= 2 and m.name not in CHANNEL_LAST_MAPS]
    assert report.ceiling_bytes == max(projectable) // 4
    assert fmap.bytes > report.ceiling_bytes
    assert name not in [m.name for m in report.over_ceiling()]
    assert name in report.to_dict()["not_compressible_over_ceiling"]
    # the projection check gives the same reason
    channels = fmap.shape[1]
    with pytest.raises(InputError, match=re.escape(f"cannot project '{name}': {reason}")):
        InsertProjectionsPass({name: Projection(np.eye(1, channels), np.eye(channels, 1))})(Model.of(model))


def test_analyze_table_names_the_reason(tmp_path):
    path = tmp_path / "shuffle.onnx"
    onnx.save(channel_shuffle(), path)
    result = CliRunner().invoke(main, ["analyze", str(path), "--ceiling", "4x"], terminal_width=200)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if f" {SHUFFLE_5D} " in line)
    assert "over (5-D map, not a 4-D NCHW or 3-D NCL map)" in row


@pytest.mark.parametrize(("build", "name"), [(channel_shuffle, SHUFFLE_5D), (sequence_matmul, "h"),
                                             (channel_last_block, CHANNEL_LAST)])
def test_compile_meets_the_ceiling_analyze_resolved(build, name):
    model = build()
    before = api.analyze(model, ceiling="4x")
    result = compile_model(model, CompileOptions(ceiling="4x", method="pca", num_samples=8, batch_size=4,
                                                 latency_repeats=1, latency_rounds=1))
    assert result.plan.ceiling_bytes == before.ceiling_bytes
    assert {m.stored for m in result.plan.maps} == {m.name for m in before.over_ceiling()} != set()
    skipped = {entry["name"]: entry["reason"] for entry in result.report["not_compressible"]}
    assert skipped[name] == next(m for m in before.stored if m.name == name).not_compressible_reason
    assert all(m.bytes <= before.ceiling_bytes for m in result.after.stored if m.compressible)
