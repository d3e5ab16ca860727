"""Helpers shared by the BN-folding, insertion and projection-folding passes.

They work on onnx-graphsurgeon graphs: reading constant values whether they are
initializers or Constant nodes (paddle2onnx emits the latter), naming new nodes
and tensors uniquely under `fmc/`, building 1x1 convs (Conv2d for NCHW maps,
Conv1d for NCL maps), and writing a rewritten
graph back into a copy of the original model so that its ir_version, opsets,
metadata and functions stay as they were.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from fmcompress.onnxutil import constant_attr_value

from .ops import CONV_OPS


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output; None for anything else."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) != 1 or tensor.inputs[0].op != "Constant":
        return None
    return constant_attr_value(tensor.inputs[0].attrs)


def batchnorm_affine(bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift) per channel of an inference BatchNormalization with constant parameters
    (y = scale * x + shift, in float64), or None where a parameter is computed."""
    params = [constant_value(t) for t in bn.inputs[1:5]] if len(bn.inputs) == 5 else [None]
    if any(p is None for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)  # type: ignore[union-attr]
    scale = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    return scale, beta - mean * scale


def optional_input(node: gs.Node, index: int) -> gs.Tensor | None:
    """Input `index` of `node`, or None when it is absent or left empty ('')."""
    if index < len(node.inputs) and node.inputs[index].name:
        return node.inputs[index]
    return None


def optional_constant(node: gs.Node, index: int) -> tuple[bool, np.ndarray | None]:
    """(known, value) of an optional input: known is False for a computed (non-constant) input."""
    tensor = optional_input(node, index)
    if tensor is None:
        return True, None
    value = constant_value(tensor)
    return value is not None, value


def group_one_conv_weight(node: gs.Node) -> np.ndarray | None:
    """The constant weight of a Conv/ConvTranspose with group=1, or None if it has another form."""
    if node.op not in CONV_OPS or int(node.attrs.get("group", 1)) != 1 or len(node.inputs) < 2:
        return None
    weight = constant_value(node.inputs[1])
    return weight if weight is not None and weight.ndim >= 3 else None


def conv_bias(node: gs.Node) -> np.ndarray | None:
    tensor = optional_input(node, 2)
    return None if tensor is None else constant_value(tensor)


class Namer:
    """Hands out node and tensor names not yet used in a graphsurgeon graph, the one naming
    helper of every rewriting pass."""

    def __init__(self, graph: gs.Graph):
        self.taken = {node.name for node in graph.nodes} | set(graph.tensors())

    def __call__(self, base: str) -> str:
        name, n = base, 0
        while name in self.taken:
            n += 1
            name = f"{base}/{n}"
        self.taken.add(name)
        return name


def node_index(graph: gs.Graph, node: gs.Node) -> int:
    """Where `node` itself is in `graph.nodes` (gs nodes compare by value, `list.index` by ==)."""
    return next(i for i, other in enumerate(graph.nodes) if other is node)


def detach(nodes: Iterable[gs.Node]) -> None:
    """Unlink nodes from their tensors, so that a new node can be the only producer of their
    outputs (or so that nodes built for a rewrite that was given up leave no trace)."""
    for node in nodes:
        node.inputs.clear()
        node.outputs.clear()


def set_conv_params(node: gs.Node, namer: Namer, weight: np.ndarray, bias: np.ndarray | None) -> None:
    """Give a conv new (uniquely named) weight and bias constants; old ones die in cleanup."""
    base = f"fmc/{node.name or node.outputs[0].name}"
    node.inputs[1] = gs.Constant(namer(f"{base}/W"), np.ascontiguousarray(weight))
    if bias is not None:
        bias_tensor = gs.Constant(namer(f"{base}/B"), np.ascontiguousarray(bias))
        if len(node.inputs) > 2:
            node.inputs[2] = bias_tensor
        else:
            node.inputs.append(bias_tensor)


def conv1x1(graph: gs.Graph, namer: Namer, name: str, source: gs.Tensor, matrix: np.ndarray,
            output: gs.Variable, rank: int = 4) -> gs.Node:
    """Append `output = matrix @ source` (channel mixing per pixel) as a 1x1 Conv named `name`.

    `rank` is that of source and output (N, C, spatial...): 4 gives a Conv2d with weight
    [k, C, 1, 1], 3 a Conv1d with weight [k, C, 1] and kernel_shape [1].
    """
    spatial = rank - 2
    node_name = namer(name)
    weight = gs.Constant(namer(f"{node_name}/W"), np.ascontiguousarray(matrix.reshape(*matrix.shape, *[1] * spatial)))
    node = gs.Node("Conv", name=node_name, attrs={"kernel_shape": [1] * spatial},
                   inputs=[source, weight], outputs=[output])
    graph.nodes.append(node)
    return node


def new_variable(namer: Namer, base: str) -> gs.Variable:
    """A fresh tensor with no dtype/shape, so no (possibly stale) value_info is written for it."""
    return gs.Variable(namer(base))
