"""passes/conv_transpose_as_conv.py: an upsampling head (ConvTranspose k=s, its bias as an Add,
BatchNormalization, Relu, a second ConvTranspose, Sigmoid; PP-OCR's detector head in small)
against onnx's reference implementation, and in int8 against onnxruntime's optimised graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from fmcompress.int8 import quantize_int8
from fmcompress.passes.base import PassContext
from fmcompress.passes.conv_transpose_as_conv import ConvTransposeAsConvPass
from fmcompress.passes.quantize import float_nodes

SHAPE = (1, 4, 6, 5)  # odd sizes: rows and columns must not be confused


def upsampling_head(batch: int | str = 1, kernel: int = 2, stride: int = 2) -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def const(name: str, value: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value, np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="stem", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("ConvTranspose", ["r0", "wt0"], ["t0"], name="up0", kernel_shape=[kernel, kernel],
                              strides=[stride, stride]),
             helper.make_node("Add", ["t0", "bias0"], ["a0"]),
             helper.make_node("BatchNormalization", ["a0", "gamma", "beta", "mean", "var"], ["n0"]),
             helper.make_node("Relu", ["n0"], ["r1"]),
             helper.make_node("ConvTranspose", ["r1", "wt1", "bt1"], ["t1"], name="up1", kernel_shape=[2, 2],
                              strides=[2, 2]),
             helper.make_node("Sigmoid", ["t1"], ["y"])]
    channels = 6
    inits = [const("w0", rng.standard_normal((8, SHAPE[1], 3, 3)) * 0.3),
             const("wt0", rng.standard_normal((8, channels, kernel, kernel)) * 0.3),
             const("bias0", rng.standard_normal((1, channels, 1, 1))),
             const("gamma", rng.uniform(0.5, 2, channels)), const("beta", rng.standard_normal(channels)),
             const("mean", rng.standard_normal(channels)), const("var", rng.uniform(0.5, 2, channels)),
             const("wt1", rng.standard_normal((channels, 2, 2, 2)) * 0.3), const("bt1", rng.standard_normal(2))]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *SHAPE[1:]])
    height, width = (2 * ((size - 1) * stride + kernel) for size in SHAPE[2:])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2, height, width])
    return helper.make_model(helper.make_graph(nodes, "head", [x], [y], inits),
                             opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ReferenceEvaluator(model).run(None, {"x": x})[0]


def test_both_convtransposes_become_convs_and_compute_the_same():
    model = onnx.shape_inference.infer_shapes(upsampling_head())  # value_info, as exporters leave it
    result = ConvTransposeAsConvPass()(model)
    rewritten = result.model
    onnx.checker.check_model(rewritten, full_check=True)
    onnx.shape_inference.infer_shapes(rewritten, strict_mode=True)  # no stale shape of a kept name
    assert result.data["rewritten"] == ["up0", "up1"]
    ops = [node.op_type for node in rewritten.graph.node]
    assert "ConvTranspose" not in ops and "BatchNormalization" not in ops and "Add" not in ops  # rule c folds
    assert ops.count("Reshape") == 4 and ops.count("Transpose") == 2
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    expected = _run(model, x)
    assert expected.shape == (1, 2, 4 * SHAPE[2], 4 * SHAPE[3])
    np.testing.assert_allclose(_run(rewritten, x), expected, rtol=1e-5, atol=1e-6)


def test_a_symbolic_batch_is_copied_and_unpinned_sizes_leave_the_model_alone():
    model = upsampling_head(batch="N")
    rewritten = ConvTransposeAsConvPass()(model).model  # a leading symbolic dim is the batch
    x = np.random.default_rng(2).standard_normal((3, *SHAPE[1:])).astype(np.float32)
    np.testing.assert_allclose(_run(rewritten, x), _run(model, x), rtol=1e-5, atol=1e-6)
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    assert ConvTransposeAsConvPass()(model).data["rewritten"] == []
    pinned = ConvTransposeAsConvPass()(model, PassContext(input_shapes={"x": SHAPE})).data["rewritten"]
    assert pinned == ["up0", "up1"]


@pytest.mark.parametrize(("kernel", "stride"), [(3, 2), (2, 1)])
def test_overlapping_or_strided_apart_kernels_stay_convtranspose(kernel, stride):
    result = ConvTransposeAsConvPass()(upsampling_head(kernel=kernel, stride=stride))
    assert result.data["rewritten"] == ["up1"]
    assert [node.name for node in result.model.graph.node if node.op_type == "ConvTranspose"] == ["up0"]


def test_int8_head_runs_without_a_float_map():
    """Unrewritten, onnxruntime's CPU provider runs both ConvTransposes (and the BatchNormalization
    their bias Add keeps apart from them) in float; rewritten (quantize_int8 rule a''), nothing
    but the graph's own output is float."""
    model = upsampling_head()
    rng = np.random.default_rng(3)
    quantized = quantize_int8(model, [{"x": rng.standard_normal(SHAPE).astype(np.float32)} for _ in range(4)])
    assert float_nodes(quantized, {"x": SHAPE}, "all") == []
    assert "ConvTranspose" not in {node.op_type for node in quantized.graph.node}
