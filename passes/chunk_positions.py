"""ChunkPositionsPass: compute a per-position classifier in chunks of positions.

A recognizer's classifier (a MatMul over thousands of classes at every time step) makes one
tensor [.., T, M] that bands cannot cover: rows of a feature map are not its positions.
Every position is computed on its own, so the positions can be computed in chunks. Rules:

a. A candidate is a MatMul whose right operand is a constant [K, M] and whose left
   operand is [.., T, K] (T: the position axis, the second last), or a Gemm with a constant
   B (transB as it is), transA=0 and a C that does not vary along T (absent, [M] or [1, M]),
   on a [T, K] left operand.
b. Its chain: from the product's output, while the tensor has exactly one reader and is not
   a graph output, a reader of passes/ops.py CHUNK_UNARY_OPS, CHUNK_BINARY_OPS (every other
   input a constant whose broadcast does not vary along T), or CHUNK_SOFTMAX_OPS over the
   last axis joins it. The chain's end must be a graph output (the caller receives it
   whole), so that the Concat of rule c is the only full-size tensor and it is the caller's.
c. When a tensor of the product and its chain is above `budget_bytes`, the left operand is
   sliced along T into chunks of t positions, t the most positions whose every chain
   tensor fits the budget (t >= 1, else no rewrite); each chunk runs the product and the
   chain, and a Concat along T writes the chain's end.
d. The rewrite is exact: each position is computed by the same ops on the same values, so
   the outputs are unchanged up to float rounding (tests check against onnxruntime).
e. The rewrite edits `model.graph` in place: the chunk nodes take the product's place,
   named `<node>/chunk<i>/...` and `<end>/concat` (unique, by `Namer`); shapes come from ONNX
   shape inference of `model.proto()`.
f. `ChunkPositionsPass(budget).uncovered` (passes/covering.py) is the runtime plan's coverage
   check: the allocations of a list that the pass would not bring under the ceiling: the chain tensors of a candidate are covered, and
   so is what onnxruntime names for one (a MatMul and Add fused into a Gemm between Reshapes,
   passes/runtime_names.py).

Entry point: `ChunkPositionsPass(budget_bytes).run(model, ctx)`; `result.data` lists each
chunked product with its positions, chunk size and chunk count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from fmcompress.shapes import TensorInfo, infer_tensor_infos, resolve_input_shapes

from .base import PassContext
from .covering import CoveringRewrite
from .graph import Model
from .graphutil import Namer, constant_value, detach, optional_input
from .ops import CHUNK_BINARY_OPS, CHUNK_SOFTMAX_OPS, CHUNK_UNARY_OPS


@dataclass
class _Candidate:
    product: gs.Node
    chain: list[gs.Node]  # the product's readers, in order (rule b)
    axis: int  # the position axis of the left operand and of every chain tensor
    positions: int
    chunk: int  # t of rule c

    @property
    def tensors(self) -> list[str]:
        return [node.outputs[0].name for node in [self.product, *self.chain]]


class ChunkPositionsPass(CoveringRewrite):
    """Computes every per-position product above `budget_bytes` in chunks (rules a-e)."""

    name = "chunk-positions"

    def find(self, model: Model, ctx: PassContext) -> list[_Candidate]:
        return _candidates(model, ctx, self.budget_bytes)

    def anchor(self, candidate: _Candidate) -> gs.Node:
        return candidate.product

    def emit(self, candidate: _Candidate, namer: Namer, opset: int) -> list[gs.Node]:
        return _chunk(candidate, namer, opset)

    def record(self, candidate: _Candidate) -> dict:
        return {"node": candidate.product.name, "positions": candidate.positions, "chunk": candidate.chunk,
                "chunks": math.ceil(candidate.positions / candidate.chunk)}

    def covers(self, candidate: _Candidate) -> list[str]:  # rule f
        return candidate.tensors





def _candidates(model: Model, ctx: PassContext, budget: int) -> list[_Candidate]:
    proto = model.proto()
    if not any(node.op_type in ("MatMul", "Gemm") for node in proto.graph.node):
        return []
    infos = infer_tensor_infos(proto, resolve_input_shapes(proto, ctx.input_shapes))
    outputs = {t.name for t in model.graph.outputs}
    opset = model.opset
    found = []
    for node in model.graph.nodes:
        axis = _product_axis(node, infos)
        if axis is None:
            continue
        chain = _chain(node, axis, infos, outputs, opset)
        if chain is None:
            continue
        cand = _Candidate(node, chain, axis, infos[node.inputs[0].name].shape[axis], 0)
        per_position = max(_bytes(infos[name], ctx.act_bytes) // cand.positions for name in cand.tensors)
        if per_position * cand.positions <= budget or per_position > budget:
            continue  # fits already, or one position alone is above the budget
        cand.chunk = budget // per_position
        found.append(cand)
    return found


def _bytes(info: TensorInfo, act_bytes: int | None) -> int:
    return info.numel * (act_bytes or info.dtype.itemsize)


def _product_axis(node: gs.Node, infos: dict[str, TensorInfo]) -> int | None:
    """Rule a: the position axis of a candidate's left operand; None if not a candidate."""
    if node.op not in ("MatMul", "Gemm") or node.domain not in (None, "", "ai.onnx") or len(node.inputs) < 2:
        return None
    left = infos.get(node.inputs[0].name)
    right = constant_value(node.inputs[1])
    if left is None or right is None or right.ndim != 2 or len(left.shape) < 2 or not node.outputs:
        return None
    if node.op == "MatMul":
        return len(left.shape) - 2
    if len(left.shape) != 2 or node.attrs.get("transA", 0):
        return None
    bias = optional_input(node, 2)
    if bias is not None:
        value = constant_value(bias)
        if value is None or (value.ndim == 2 and value.shape[0] != 1) or value.ndim > 2:
            return None
    return 0


def _chain(product: gs.Node, axis: int, infos: dict[str, TensorInfo], outputs: set[str],
           opset: int) -> list[gs.Node] | None:
    """Rule b: the readers computed per chunk; None when the chain does not end at a graph output."""
    chain: list[gs.Node] = []
    tensor = product.outputs[0]
    while tensor.name not in outputs:
        if len(tensor.outputs) != 1:
            return None
        reader = tensor.outputs[0]
        info = infos.get(reader.outputs[0].name) if len(reader.outputs) == 1 else None
        if info is None or reader.domain not in (None, "", "ai.onnx") or not _per_position(
                reader, tensor, axis, len(info.shape), opset):
            return None
        chain.append(reader)
        tensor = reader.outputs[0]
    return chain


def _per_position(node: gs.Node, tensor: gs.Tensor, axis: int, rank: int, opset: int) -> bool:
    if node.op in CHUNK_SOFTMAX_OPS:
        default = -1 if opset >= 13 else 1
        return node.inputs[0] is tensor and int(node.attrs.get("axis", default)) % rank == rank - 1
    if node.op not in CHUNK_UNARY_OPS and node.op not in CHUNK_BINARY_OPS:
        return False
    if node.op in CHUNK_UNARY_OPS and node.inputs[0] is not tensor:
        return False
    for other in node.inputs:
        if other is tensor or not other.name:
            continue
        value = constant_value(other)
        if value is None:
            return False
        at = axis - (rank - value.ndim)  # numpy broadcasting aligns the last axes
        if at >= 0 and value.shape[at] != 1:
            return False
    return sum(1 for other in node.inputs if other is tensor) == 1


def _chunk(cand: _Candidate, namer: Namer, opset: int) -> list[gs.Node]:
    """Rule c: the Slices, the per-chunk product and chain, and the Concat writing the chain's end."""
    source = cand.product.inputs[0]
    end = (cand.chain[-1] if cand.chain else cand.product).outputs[0]
    originals = [cand.product, *cand.chain]
    base = cand.product.name or cand.product.outputs[0].name
    emitted, parts = [], []
    for i, start in enumerate(range(0, cand.positions, cand.chunk)):
        stop = min(start + cand.chunk, cand.positions)
        piece = gs.Variable(namer(f"{source.name}/chunk{i}"))
        emitted.append(_slice(namer(f"{base}/chunk{i}/slice"), source, piece, cand.axis, start, stop, opset))
        previous, current = source, piece  # the tensor each node reads, and its chunk
        for node in originals:
            out = gs.Variable(namer(f"{node.outputs[0].name}/chunk{i}"))
            inputs = [current if t is previous else t for t in node.inputs]
            emitted.append(gs.Node(node.op, name=namer(f"{node.name or base}/chunk{i}"), attrs=dict(node.attrs),
                                   inputs=inputs, outputs=[out], domain=node.domain))
            previous, current = node.outputs[0], out
        parts.append(current)
    detach(originals)  # so that the Concat can produce the end
    emitted.append(gs.Node("Concat", name=namer(f"{end.name}/concat"), attrs={"axis": cand.axis},
                           inputs=parts, outputs=[end]))
    return emitted


def _slice(name: str, source: gs.Tensor, output: gs.Variable, axis: int, start: int, stop: int,
           opset: int) -> gs.Node:
    if opset < 10:
        return gs.Node("Slice", name=name, attrs={"axes": [axis], "starts": [start], "ends": [stop]},
                       inputs=[source], outputs=[output])
    consts = [gs.Constant(f"{name}/{key}", np.array([value], dtype=np.int64))
              for key, value in (("starts", start), ("ends", stop), ("axes", axis))]
    return gs.Node("Slice", name=name, inputs=[source, *consts], outputs=[output])
