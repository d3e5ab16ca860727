"""Per-op differential tests: OnnxModule against onnxruntime AND onnx.reference.

Each case is a one-node graph built with onnx.helper; constant inputs (shapes, axes,
weights) are initializers, the rest graph inputs. Outputs must match both references:
same dtype and shape, float32 relative error at most 1e-5, integers and booleans exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from fmcompress.backend import OnnxModule

RNG = np.random.default_rng(0)


def f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def pos(*shape: int) -> np.ndarray:
    return (RNG.random(shape) + 0.1).astype(np.float32)


def i64(*values: Any) -> np.ndarray:
    return np.array(values, dtype=np.int64)


@dataclass
class Init:
    """A constant input: becomes an initializer."""

    value: np.ndarray


@dataclass
class Case:
    id: str
    op: str
    inputs: list[Any]  # np.ndarray (graph input), Init (initializer) or None (absent optional)
    attrs: dict[str, Any] = field(default_factory=dict)
    opsets: tuple[int, ...] = (17,)
    outputs: int = 1
    ort_only: str = ""  # why onnx.reference cannot serve as a second reference here


def C(id: str, op: str, inputs: list[Any], opsets: tuple[int, ...] = (17,), outputs: int = 1,
      ort_only: str = "", **attrs: Any) -> Case:
    return Case(id, op, inputs, attrs, opsets, outputs, ort_only)


X4 = f32(2, 4, 6, 6)
# onnx.reference's LRN sums over channels 0..N-1 only (its loop runs over the batch axis) and
# takes 4-D inputs only: it serves where N == C (LRN-batch-equals-channels). onnxruntime takes
# odd sizes and 4-D inputs only: every case is also checked against the definition
# (test_lrn_matches_the_spec), the even and non-4-D ones against it alone
REF_LRN = "onnx.reference's LRN loops over the batch axis, not the channels"
LRN_CASES = [
    Case("LRN-3", "LRN", [f32(2, 7, 5, 5)], {"size": 3}, ort_only=REF_LRN),
    Case("LRN-5-alexnet", "LRN", [4 * f32(1, 9, 4, 4)], {"size": 5, "alpha": 1e-4, "beta": 0.75, "bias": 1.0},
         ort_only=REF_LRN),
    Case("LRN-2", "LRN", [f32(2, 6, 3, 3)], {"size": 2, "alpha": 0.5, "beta": 0.5, "bias": 2.0}, ort_only=REF_LRN),
    Case("LRN-4", "LRN", [f32(1, 8, 3, 4)], {"size": 4, "alpha": 0.3, "beta": 1.2, "bias": 0.7}, ort_only=REF_LRN),
    Case("LRN-wide", "LRN", [f32(1, 3, 4, 4)], {"size": 6, "alpha": 0.9, "beta": 0.6, "bias": 1.5},
         ort_only=REF_LRN),
    Case("LRN-1d", "LRN", [f32(2, 5, 7)], {"size": 3, "alpha": 0.2, "beta": 0.9, "bias": 1.1}, ort_only=REF_LRN),
    Case("LRN-3d", "LRN", [f32(1, 6, 2, 3, 3)], {"size": 4, "alpha": 0.1, "beta": 0.75, "bias": 1.0},
         ort_only=REF_LRN),
]
# onnx.reference applies opset-13 semantics to Softmax-11 (onnxruntime follows the spec: 2-D coercion)
REF_SOFTMAX_11 = "onnx.reference ignores the opset-11 2-D coercion"
CASES: list[Case] = [
    # -------- activations
    *[C(name, name, [f32(2, 3, 5)]) for name in
      ("Relu", "Sigmoid", "Tanh", "Erf", "Exp", "Abs", "Neg", "Floor", "Ceil", "HardSwish", "Identity",
       "Softplus", "Reciprocal")],
    C("Sqrt", "Sqrt", [pos(2, 3, 5)]),
    C("Log", "Log", [pos(2, 3, 5)]),
    C("LeakyRelu", "LeakyRelu", [f32(2, 3, 5)], alpha=0.2),
    C("LeakyRelu-default", "LeakyRelu", [f32(2, 3, 5)]),
    C("Elu", "Elu", [f32(2, 3, 5)], alpha=0.5),
    C("HardSigmoid-default", "HardSigmoid", [3 * f32(2, 3, 5)]),
    C("HardSigmoid-paddle", "HardSigmoid", [3 * f32(2, 3, 5)], alpha=0.1666667, beta=0.5),
    C("Gelu", "Gelu", [f32(2, 3, 5)], opsets=(20,)),
    C("Gelu-tanh", "Gelu", [f32(2, 3, 5)], opsets=(20,), approximate="tanh"),
    C("PRelu-channel", "PRelu", [f32(2, 4, 3, 3), Init(f32(4, 1, 1))]),
    C("PRelu-scalar", "PRelu", [f32(2, 4, 3, 3), Init(f32(1))]),
    C("PRelu-full", "PRelu", [f32(2, 4, 3), Init(f32(4, 3))]),
    C("Clip", "Clip", [f32(2, 3, 5), Init(np.array(-0.5, np.float32)), Init(np.array(0.7, np.float32))],
      opsets=(11, 13)),
    C("Clip-no-min", "Clip", [f32(2, 3, 5), None, Init(np.array(0.3, np.float32))], opsets=(11, 13)),
    C("Clip-no-max", "Clip", [f32(2, 3, 5), Init(np.array(0.0, np.float32))], opsets=(11, 13)),
    C("Clip-none", "Clip", [f32(2, 3, 5)], opsets=(11, 13)),
    C("Clip-dynamic-bounds", "Clip", [f32(2, 3, 5), np.array(-0.2, np.float32), np.array(0.4, np.float32)]),
    C("Clip-int", "Clip", [i64(-5, 0, 3, 9), Init(i64(-2)[0]), Init(i64(4)[0])], opsets=(13,)),
    C("Softmax-11-flatten", "Softmax", [f32(2, 3, 4)], opsets=(11,), axis=1, ort_only=REF_SOFTMAX_11),
    C("Softmax-11-default", "Softmax", [f32(2, 3, 4)], opsets=(11,), ort_only=REF_SOFTMAX_11),
    C("Softmax-13-axis1", "Softmax", [f32(2, 3, 4)], opsets=(13,), axis=1),
    C("Softmax-13-default", "Softmax", [f32(2, 3, 4)], opsets=(13,)),
    C("LogSoftmax-11", "LogSoftmax", [f32(2, 3, 4)], opsets=(11,), axis=1, ort_only=REF_SOFTMAX_11),
    C("LogSoftmax-13", "LogSoftmax", [f32(2, 3, 4)], opsets=(13,), axis=1),
    C("Dropout", "Dropout", [f32(2, 3)], opsets=(11, 13)),
    # -------- binary and logic
    C("Add-broadcast", "Add", [f32(2, 3, 4, 5), Init(f32(3, 1, 1))]),
    C("Sub", "Sub", [f32(2, 3, 4), f32(4)]),
    C("Mul", "Mul", [f32(2, 3, 4), f32(2, 1, 4)]),
    C("Div", "Div", [f32(2, 3, 4), pos(3, 1)]),
    C("Div-int-trunc", "Div", [i64(-7, 7, -8, 9), i64(2, -2, 3, 4)]),
    C("Pow", "Pow", [pos(2, 3), f32(2, 3)]),
    C("Pow-square", "Pow", [f32(2, 3), Init(np.array(2.0, np.float32))]),
    C("Pow-int-exponent", "Pow", [f32(2, 3), Init(i64(3))]),
    C("Pow-int-base", "Pow", [i64(1, 2, 3), Init(i64(2))]),
    C("Pow-fraction", "Pow", [pos(2, 3), Init(np.array(0.5, np.float32))]),
    C("Min", "Min", [f32(2, 3), f32(3), f32(1, 3)]),
    C("Max", "Max", [f32(2, 3), f32(3), f32(1, 3)]),
    C("Equal", "Equal", [i64(1, 2, 3), i64(1, 0, 3)]),
    C("Less", "Less", [f32(2, 3), f32(2, 3)]),
    C("Greater", "Greater", [f32(2, 3), Init(np.array(0.0, np.float32))]),
    C("Not", "Not", [np.array([True, False])]),
    C("And", "And", [np.array([True, False, True]), np.array([True, True, False])]),
    C("Or", "Or", [np.array([True, False, False]), np.array([True, True, False])]),
    C("Where", "Where", [f32(2, 3) > 0, f32(2, 3), f32(3)]),
    # -------- matrix
    C("MatMul", "MatMul", [f32(2, 3, 4), Init(f32(4, 5))]),
    C("MatMul-batched", "MatMul", [f32(2, 3, 4), f32(2, 4, 5)]),
    C("Gemm", "Gemm", [f32(3, 4), Init(f32(5, 4)), Init(f32(5))], transB=1),
    C("Gemm-transA-alpha-beta", "Gemm", [f32(4, 3), Init(f32(4, 5)), Init(f32(3, 5))],
      transA=1, alpha=0.5, beta=2.0),
    C("Gemm-no-C", "Gemm", [f32(3, 4), f32(4, 5)], alpha=1.5),
    C("Einsum", "Einsum", [f32(2, 3, 4), f32(2, 4, 5)], equation="bij,bjk->bik"),
    C("Einsum-transpose", "Einsum", [f32(2, 3, 4, 5)], equation="nchw->nhwc"),
    # -------- convolution
    C("Conv", "Conv", [X4, Init(f32(8, 4, 3, 3)), Init(f32(8))], pads=[1, 1, 1, 1]),
    C("Conv-stride-dilation", "Conv", [X4, Init(f32(8, 4, 3, 3))], strides=[2, 2], dilations=[2, 2],
      pads=[2, 2, 2, 2]),
    C("Conv-asym-pads", "Conv", [X4, Init(f32(8, 4, 3, 3))], pads=[0, 1, 1, 2]),
    C("Conv-group", "Conv", [X4, Init(f32(6, 2, 3, 3))], group=2),
    C("Conv-depthwise", "Conv", [X4, Init(f32(4, 1, 3, 3)), Init(f32(4))], group=4, pads=[1, 1, 1, 1]),
    *[C(f"Conv-{mode}", "Conv", [f32(1, 2, 7, 8), Init(f32(3, 2, 4, 3))], strides=[2, 3], auto_pad=mode)
      for mode in ("SAME_UPPER", "SAME_LOWER", "VALID")],
    C("Conv-1d", "Conv", [f32(2, 3, 9), Init(f32(4, 3, 3))], pads=[1, 0]),
    C("Conv-3d", "Conv", [f32(1, 2, 4, 5, 5), Init(f32(3, 2, 3, 3, 3))], pads=[1, 1, 1, 1, 1, 1]),
    C("ConvTranspose", "ConvTranspose", [X4, Init(f32(4, 3, 3, 3)), Init(f32(3))], strides=[2, 2],
      pads=[1, 1, 1, 1], output_padding=[1, 1]),
    C("ConvTranspose-paddle", "ConvTranspose", [X4, Init(f32(4, 3, 2, 2)), Init(f32(3))], strides=[2, 2]),
    C("ConvTranspose-asym", "ConvTranspose", [X4, Init(f32(4, 3, 3, 3))], strides=[2, 2], pads=[0, 1, 1, 0]),
    C("ConvTranspose-group-dilation", "ConvTranspose", [X4, Init(f32(4, 2, 3, 3))], group=2, dilations=[2, 2],
      ort_only="onnx.reference ConvTranspose fails on group > 1"),
    C("ConvTranspose-output-shape", "ConvTranspose", [X4, Init(f32(4, 3, 3, 3))], strides=[2, 2],
      output_shape=[12, 13], ort_only="onnx.reference ConvTranspose fails on output_shape"),
    # -------- normalisation
    C("BatchNormalization", "BatchNormalization",
      [X4, Init(f32(4)), Init(f32(4)), Init(f32(4)), Init(pos(4))], opsets=(15,), epsilon=1e-3),
    C("BatchNormalization-11", "BatchNormalization",
      [X4, Init(f32(4)), Init(f32(4)), Init(f32(4)), Init(pos(4))], opsets=(11,), epsilon=1e-3,
      ort_only="onnx.reference BatchNormalization-9 uses batch statistics"),
    C("InstanceNormalization", "InstanceNormalization", [X4, Init(f32(4)), Init(f32(4))]),
    # LRN, where onnxruntime runs it (odd sizes, 4-D)
    *[case for case in LRN_CASES if case.attrs["size"] % 2 and case.inputs[0].ndim == 4],
    C("LRN-batch-equals-channels", "LRN", [f32(4, 4, 3, 3)], size=3, alpha=0.4, beta=0.8, bias=1.3),
    C("LayerNormalization", "LayerNormalization", [f32(2, 3, 8), Init(f32(8)), Init(f32(8))]),
    C("LayerNormalization-axis1", "LayerNormalization", [f32(2, 3, 4), Init(f32(3, 4))], axis=1),
    # -------- pooling
    C("MaxPool", "MaxPool", [X4], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    C("MaxPool-ceil", "MaxPool", [f32(1, 2, 7, 7)], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    C("MaxPool-asym", "MaxPool", [X4], kernel_shape=[3, 3], pads=[0, 1, 2, 1],
      ort_only="onnx.reference MaxPool reads asymmetric pads in the wrong order"),
    C("MaxPool-dilation", "MaxPool", [X4], kernel_shape=[2, 2], dilations=[2, 2]),
    C("MaxPool-same-upper", "MaxPool", [f32(1, 2, 7, 7)], kernel_shape=[3, 3], strides=[2, 2],
      auto_pad="SAME_UPPER"),
    C("MaxPool-yolo-sppf", "MaxPool", [X4], kernel_shape=[5, 5], pads=[2, 2, 2, 2]),
    C("MaxPool-1d", "MaxPool", [f32(2, 3, 9)], kernel_shape=[3], strides=[2]),
    C("AveragePool", "AveragePool", [X4], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    C("AveragePool-include-pad", "AveragePool", [X4], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
      count_include_pad=1),
    C("AveragePool-ceil", "AveragePool", [f32(1, 2, 7, 7)], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    C("AveragePool-asym", "AveragePool", [X4], kernel_shape=[3, 3], pads=[0, 1, 2, 1]),
    C("AveragePool-asym-include", "AveragePool", [X4], kernel_shape=[3, 3], pads=[0, 1, 2, 1],
      count_include_pad=1),
    C("GlobalAveragePool", "GlobalAveragePool", [X4]),
    C("GlobalMaxPool", "GlobalMaxPool", [X4]),
    # -------- shapes and layout
    C("Flatten-0", "Flatten", [X4], axis=0),
    C("Flatten-2", "Flatten", [X4], axis=2),
    C("Flatten-neg", "Flatten", [X4], axis=-1),
    C("Reshape", "Reshape", [X4, Init(i64(0, -1, 3))]),
    C("Reshape-allowzero", "Reshape", [f32(0, 3), Init(i64(3, 0))], opsets=(14,), allowzero=1),
    C("Transpose", "Transpose", [X4], perm=[0, 2, 3, 1]),
    C("Transpose-default", "Transpose", [f32(2, 3, 4)]),
    C("Squeeze-11", "Squeeze", [f32(1, 3, 1, 2)], opsets=(11,), axes=[0, -2]),
    C("Squeeze-13", "Squeeze", [f32(1, 3, 1, 2), Init(i64(0, -2))], opsets=(13,)),
    C("Squeeze-all", "Squeeze", [f32(1, 3, 1, 2)], opsets=(11, 13)),
    C("Unsqueeze-11", "Unsqueeze", [f32(3, 2)], opsets=(11,), axes=[0, -1]),
    C("Unsqueeze-13", "Unsqueeze", [f32(3, 2), Init(i64(0, -1))], opsets=(13,)),
    C("Concat", "Concat", [f32(2, 3), f32(2, 1), Init(f32(2, 2))], axis=-1),
    C("Split-11", "Split", [f32(2, 6)], opsets=(11,), outputs=2, axis=1, split=[2, 4]),
    C("Split-11-equal", "Split", [f32(2, 6)], opsets=(11,), outputs=3, axis=1),
    C("Split-13", "Split", [f32(2, 6), Init(i64(1, 5))], opsets=(13, 18), outputs=2, axis=1),
    C("Split-18-num-outputs", "Split", [f32(7, 2)], opsets=(18,), outputs=3, num_outputs=3),
    C("Slice", "Slice", [X4, Init(i64(1, -4)), Init(i64(100, -1))], opsets=(11, 13)),
    C("Slice-axes-steps", "Slice", [X4, Init(i64(5, 0)), Init(i64(-100, 6)), Init(i64(3, 1)), Init(i64(-1, 2))],
      opsets=(11, 13)),
    C("Slice-step2", "Slice", [X4, Init(i64(1)), Init(i64(6)), Init(i64(2)), Init(i64(2))]),
    C("Gather", "Gather", [f32(5, 3), Init(i64(0, -1, 2))]),
    C("Gather-axis1-2d", "Gather", [f32(2, 5, 3), Init(np.array([[0, 4], [-2, 1]], np.int64))], axis=1),
    C("Gather-scalar", "Gather", [i64(4, 5, 6, 7), Init(np.array(-1, np.int64))]),
    C("GatherElements", "GatherElements", [f32(3, 4), Init(np.array([[0, -1], [2, 1], [3, 3]], np.int64))],
      axis=1),
    C("Shape", "Shape", [X4]),
    C("Shape-15-start-end", "Shape", [X4], opsets=(15,), start=1, end=-1),
    C("Size", "Size", [X4]),
    C("Cast-float-to-int", "Cast", [3 * f32(2, 5)], to=TensorProto.INT64),
    C("Cast-int-to-float", "Cast", [i64(1, -2, 3)], to=TensorProto.FLOAT),
    C("Cast-to-bool", "Cast", [np.array([0.0, 1.5, -2.0], np.float32)], to=TensorProto.BOOL),
    C("ConstantOfShape", "ConstantOfShape", [Init(i64(2, 3))],
      value=numpy_helper.from_array(np.array([1.5], np.float32))),
    C("ConstantOfShape-int", "ConstantOfShape", [Init(i64(2, 3))],
      value=numpy_helper.from_array(np.array([7], np.int64))),
    C("ConstantOfShape-default", "ConstantOfShape", [Init(i64(4))]),
    C("Expand", "Expand", [f32(3, 1), Init(i64(2, 1, 4))]),
    C("Expand-smaller-shape", "Expand", [f32(2, 3, 4), Init(i64(3, 1))]),
    C("Tile", "Tile", [f32(2, 3), Init(i64(2, 3))]),
    C("Range-int", "Range", [Init(np.array(1, np.int64)), Init(np.array(10, np.int64)), Init(np.array(3, np.int64))]),
    C("Range-float", "Range", [np.array(0.5, np.float32), np.array(3.0, np.float32), np.array(0.5, np.float32)]),
    C("DepthToSpace-DCR", "DepthToSpace", [f32(1, 8, 2, 3)], blocksize=2),
    C("DepthToSpace-CRD", "DepthToSpace", [f32(1, 8, 2, 3)], blocksize=2, mode="CRD"),
    C("SpaceToDepth", "SpaceToDepth", [f32(1, 2, 4, 6)], blocksize=2),
    # -------- reductions
    *[C(f"{name}-13", name, [X4], opsets=(13,), axes=[1, -1]) for name in
      ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceL2")],
    *[C(f"{name}-18", name, [X4, Init(i64(1, -1))], opsets=(18,)) for name in
      ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceSum")],
    C("ReduceSum-11", "ReduceSum", [X4], opsets=(11,), axes=[2], keepdims=0),
    C("ReduceSum-13", "ReduceSum", [X4, Init(i64(2))], opsets=(13,), keepdims=0),
    C("ReduceMean-all", "ReduceMean", [X4], opsets=(13, 18), keepdims=0),
    C("ReduceSum-noop", "ReduceSum", [X4, Init(i64())], opsets=(13,), noop_with_empty_axes=1),
    C("ArgMax", "ArgMax", [f32(3, 4, 5)], axis=1, keepdims=0),
    C("ArgMax-last", "ArgMax", [np.array([[1, 3, 3], [2, 2, 0]], np.float32)], axis=1, select_last_index=1),
    C("TopK", "TopK", [f32(3, 6), Init(i64(3))], outputs=2),
    C("TopK-smallest-axis0", "TopK", [f32(5, 3), Init(i64(2))], outputs=2, axis=0, largest=0),
    # -------- padding
    C("Pad-constant", "Pad", [X4, Init(i64(0, 0, 1, 2, 0, 0, 2, 1)), Init(np.array(0.5, np.float32))],
      opsets=(11, 18)),
    C("Pad-reflect", "Pad", [X4, Init(i64(0, 0, 1, 2, 0, 0, 2, 1))], opsets=(11, 18), mode="reflect"),
    C("Pad-edge", "Pad", [X4, Init(i64(0, 0, 1, 2, 0, 0, 2, 1))], opsets=(11, 18), mode="edge"),
    C("Pad-negative", "Pad", [X4, Init(i64(0, 0, -1, 2, 0, 0, 1, -2))], opsets=(11,),
      ort_only="onnx.reference Pad rejects negative pads"),
    C("Pad-18-axes", "Pad", [X4, Init(i64(1, 2, 2, 1)), None, Init(i64(2, -1))], opsets=(18,), mode="edge"),
    C("Pad-reflect-3d", "Pad", [f32(2, 3, 5), Init(i64(0, 0, 2, 0, 0, 1))], opsets=(13,), mode="reflect"),
    # -------- resizing
    C("Resize-nearest-asym-floor", "Resize", [X4, Init(f32(0)), Init(np.array([1, 1, 2, 2], np.float32))],
      opsets=(11, 13), mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
    C("Resize-nearest-default-x3", "Resize", [X4, None, Init(np.array([1, 1, 3, 3], np.float32))],
      opsets=(13,)),
    C("Resize-nearest-prefer-ceil", "Resize", [X4, None, Init(np.array([1, 1, 2.5, 1.5], np.float32))],
      opsets=(13, 19), nearest_mode="round_prefer_ceil"),
    C("Resize-nearest-ceil-align", "Resize", [X4, None, None, Init(i64(2, 4, 9, 4))], opsets=(13,),
      nearest_mode="ceil", coordinate_transformation_mode="align_corners"),
    C("Resize-linear-half-pixel", "Resize", [X4, None, Init(np.array([1, 1, 2, 2], np.float32))],
      opsets=(13, 18, 19), mode="linear"),
    C("Resize-linear-down", "Resize", [X4, None, Init(np.array([1, 1, 0.5, 0.5], np.float32))],
      opsets=(13,), mode="linear"),
    C("Resize-linear-sizes-align", "Resize", [X4, Init(f32(0)), Init(f32(0)), Init(i64(2, 4, 11, 5))], opsets=(11, 13),
      mode="linear", coordinate_transformation_mode="align_corners"),
    C("Resize-linear-pytorch", "Resize", [X4, None, None, Init(i64(2, 4, 1, 9))], opsets=(13,),
      mode="linear", coordinate_transformation_mode="pytorch_half_pixel"),
    C("Resize-linear-asym", "Resize", [X4, None, Init(np.array([1, 1, 1.5, 2.5], np.float32))],
      opsets=(13,), mode="linear", coordinate_transformation_mode="asymmetric"),
    C("Resize-cubic", "Resize", [X4, None, Init(np.array([1, 1, 2, 1.5], np.float32))], opsets=(13,),
      mode="cubic"),
    C("Resize-cubic-exclude", "Resize", [X4, None, Init(np.array([1, 1, 2, 0.5], np.float32))],
      opsets=(13,), mode="cubic", exclude_outside=1, cubic_coeff_a=-0.5),
    C("Resize-18-axes", "Resize", [X4, None, Init(np.array([2, 3], np.float32))], opsets=(18,),
      axes=[2, 3], mode="linear"),
    C("Resize-18-not-larger", "Resize", [X4, None, None, Init(i64(10, 8))], opsets=(18,), axes=[2, 3],
      mode="linear", keep_aspect_ratio_policy="not_larger"),
    C("Resize-19-symmetric", "Resize", [X4, None, Init(np.array([1, 1, 1.7, 2.3], np.float32))],
      opsets=(19,), mode="linear", coordinate_transformation_mode="half_pixel_symmetric"),
    C("Upsample-9", "Upsample", [X4, Init(np.array([1, 1, 2, 3], np.float32))], opsets=(9,)),
]


def _value_info(name: str, array: np.ndarray) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)


def build(case: Case, opset: int, output_types: list[int] | None = None) -> tuple[onnx.ModelProto, dict]:
    """The case as a one-node model, and the feeds of its graph inputs."""
    names, inputs, inits, feeds = [], [], [], {}
    for i, value in enumerate(case.inputs):
        if value is None:
            names.append("")
        elif isinstance(value, Init):
            names.append(f"c{i}")
            inits.append(numpy_helper.from_array(value.value, f"c{i}"))
        else:
            names.append(f"x{i}")
            inputs.append(_value_info(f"x{i}", value))
            feeds[f"x{i}"] = value
    outs = [f"y{i}" for i in range(case.outputs)]
    node = helper.make_node(case.op, names, outs, name="node", **case.attrs)
    types = output_types or [TensorProto.UNDEFINED] * case.outputs
    outputs = [helper.make_tensor_value_info(n, t, None) for n, t in zip(outs, types, strict=True)]
    graph = helper.make_graph([node], case.id, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset <= 18 else 9
    return model, feeds


def assert_same(actual: torch.Tensor, expected: np.ndarray, who: str) -> None:
    got = actual.detach().cpu().numpy()
    expected = np.asarray(expected)
    assert got.dtype == expected.dtype, f"{who}: dtype {got.dtype} != {expected.dtype}"
    assert got.shape == expected.shape, f"{who}: shape {got.shape} != {expected.shape}"
    if np.issubdtype(expected.dtype, np.floating):
        scale = max(float(np.linalg.norm(expected)), 1e-12)
        assert float(np.linalg.norm(got - expected)) / scale <= 1e-5, f"{who}: relative error too large"
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=who)
    else:
        np.testing.assert_array_equal(got, expected, err_msg=who)


PARAMS = [pytest.param(case, opset, id=f"{case.id}-op{opset}") for case in CASES for opset in case.opsets]


@pytest.mark.parametrize(("case", "opset"), PARAMS)
def test_op_matches_onnxruntime_and_reference(case: Case, opset: int) -> None:
    model, feeds = build(case, opset)
    if case.ort_only:  # every such case outputs its first input's type
        first = next(v.value if isinstance(v, Init) else v for v in case.inputs)
        reference = [first] * case.outputs
    else:
        reference = ReferenceEvaluator(model).run(None, feeds)
    typed, _ = build(case, opset, [helper.np_dtype_to_tensor_dtype(np.asarray(r).dtype) for r in reference])
    runtime = ort.InferenceSession(typed.SerializeToString(), providers=["CPUExecutionProvider"])
    expected_ort = runtime.run(None, feeds)
    with torch.no_grad():
        actual = OnnxModule(typed)(*[torch.from_numpy(np.array(v)) for v in feeds.values()])
    assert len(actual) == case.outputs
    for got, want_ort, want_ref in zip(actual, expected_ort, reference, strict=True):
        assert_same(got, want_ort, "onnxruntime")
        if not case.ort_only:
            assert_same(got, want_ref, "onnx.reference")


def lrn_by_definition(x: np.ndarray, size: int, alpha: float = 1e-4, beta: float = 0.75,
                      bias: float = 1.0) -> np.ndarray:
    """ONNX LRN, channel by channel as the operator's definition reads (float64)."""
    x = x.astype(np.float64)
    square_sum = np.zeros_like(x)
    channels = x.shape[1]
    for c in range(channels):
        begin = max(0, c - (size - 1) // 2)
        end = min(channels - 1, c + (size - 1 + 1) // 2)  # c + ceil((size - 1) / 2)
        square_sum[:, c] = (x[:, begin:end + 1] ** 2).sum(axis=1)
    return x / (bias + alpha / size * square_sum) ** beta


@pytest.mark.parametrize("case", LRN_CASES, ids=[case.id for case in LRN_CASES])
def test_lrn_matches_the_spec(case: Case) -> None:
    model, feeds = build(case, 17)
    with torch.no_grad():
        (actual,) = OnnxModule(model)(*[torch.from_numpy(v) for v in feeds.values()])
    expected = lrn_by_definition(case.inputs[0], **case.attrs)
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-5, atol=1e-6)
