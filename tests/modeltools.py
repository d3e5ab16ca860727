"""Helpers several test modules share (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from fmcompress.featuremaps import Projection

NUMPY_FLOAT = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def with_float_type(model: onnx.ModelProto, elem_type: int) -> onnx.ModelProto:
    """A copy whose float weights, inputs and outputs are `elem_type`, without value_info
    (so passes must find the dtype themselves)."""
    converted = onnx.ModelProto.FromString(model.SerializeToString())
    for init in converted.graph.initializer:
        if init.data_type in NUMPY_FLOAT and init.data_type != elem_type:
            array = numpy_helper.to_array(init).astype(NUMPY_FLOAT[elem_type])
            init.CopyFrom(numpy_helper.from_array(array, init.name))
    for value in [*converted.graph.input, *converted.graph.output]:
        if value.type.tensor_type.elem_type in NUMPY_FLOAT:
            value.type.tensor_type.elem_type = elem_type
    del converted.graph.value_info[:]
    return converted


def random_projections(plan, seed: int = 0) -> dict[str, Projection]:
    """A random orthonormal P (U = P^T) for every planned map."""
    rng = np.random.default_rng(seed)
    projections = {}
    for fmap in plan.maps:
        q, _ = np.linalg.qr(rng.standard_normal((fmap.channels, fmap.k)))
        projections[fmap.name] = Projection(q.T, q)
    return projections


def tiny_classifier() -> onnx.ModelProto:
    """Conv -> Relu (r1) -> Conv -> Relu (r2) -> GlobalAveragePool -> Flatten -> Gemm: 10 logits."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1)]
    inits = [numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.4, "w1"),
             numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.2, "w2"),
             numpy_helper.from_array(rng.standard_normal((10, 16)).astype(np.float32), "fc")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def sequence_head() -> onnx.ModelProto:
    """tiny_classifier's convs, then r2 [N, 16, 8, 8] max-pooled to 2x2 and read as 4 steps of 16
    classes, softmaxed per step: the output shape of a CTC recognizer."""
    model = tiny_classifier()
    graph = model.graph
    del graph.node[4:]
    graph.initializer.append(numpy_helper.from_array(np.array([0, 16, 4], np.int64), "steps"))
    graph.node.extend([helper.make_node("MaxPool", ["r2"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
                       helper.make_node("Reshape", ["pooled", "steps"], ["seq"]),
                       helper.make_node("Transpose", ["seq"], ["tseq"], perm=[0, 2, 1]),
                       helper.make_node("Softmax", ["tseq"], ["probs"], axis=-1)])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 4, 16]))
    return model


class ChannelBottleneck(torch.nn.Module):
    """A trainable rank-k channel projection U P (two 1x1 convs), as fmcompress learns them."""

    def __init__(self, channels: int, rank: int):
        super().__init__()
        self.p = torch.nn.Conv2d(channels, rank, 1, bias=False)
        self.u = torch.nn.Conv2d(rank, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.p(x))
