"""SplitColumnsPass: compute a product by blocks of its output columns, never whole.

Attention's fused projection (`qkv = Linear(dim, 3 * dim)(x)`, then q, k, v picked out of
it) makes one tensor three times the size of each of q, k, v, and every token reads every
other, so neither bands nor chunks of positions can split it. Each block of the product's
columns is the product with the same block of the weight's columns, so each reader's block
can be computed on its own and the full product is never made. Rules:

a. A candidate is a MatMul whose right operand is a constant [K, M], or a Gemm with a
   constant B (transB as it is, M its output columns), transA=0 and a C absent or constant,
   optionally followed by an Add of a constant bias (ones but for its last dim, M or 1);
   the output T (the product, or the biased one; the product then read by the Add alone)
   must not be a graph output and must be read only by readers that each take contiguous
   blocks of T's last axis:
   (i) a Split along the last axis: block j is output j (widths from shape inference);
   (ii) a Slice along the last axis alone, step 1, constant starts and ends;
   (iii) a Reshape of T to [lead..., G, rest...] (lead: T's dims but the last, kept; G *
       prod(rest) = M exactly, from shape inference), read only by a Transpose, read only by
       Gathers with a constant scalar index g on the axis the Transpose moved G to: Gather
       g takes columns [g * B, (g + 1) * B), B = prod(rest) (the Reshape is row-major).
b. The rewrite: per block, the product with the weight's (and C's) column block, the Add
   with the bias's, then for (iii) a Reshape to [lead..., rest...] (leading dims copied,
   as 0, so a dynamic batch stays dynamic) and a Transpose with the Gather's permutation
   less G (left out when it is the identity). The last node writes the reader's output
   under its name; the product, the Add and the readers are removed. The columns of each
   block are computed by the same dot products as before: exact up to float rounding.
c. A candidate is rewritten only when T is above `budget_bytes` and every block fits it;
   otherwise it is left as it is (a block above the budget stays uncovered).
d. The rewrite edits `model.graph` in place: the block nodes take the product's place in
   the node order, named `<node>/block<i>/...` (unique, by `Namer`); shapes come from ONNX
   shape inference of `model.proto()` with the context's input shapes.
e. `split_uncovered` is the runtime plan's coverage check: of a list of allocations, those
   the pass would not bring under the ceiling. The tensors a candidate's rewrite removes
   (the product, the biased output, the Reshape's and Transpose's) are covered, and so is
   what onnxruntime names for one (MatMul and Add fused into a Gemm between Reshapes,
   passes/runtime_names.py).

Entry point: `SplitColumnsPass(budget_bytes).run(model, ctx)`; `result.data` lists each split
product with its columns and blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from fmcompress.featuremaps import FeatureMap
from fmcompress.shapes import TensorInfo, infer_tensor_infos, resolve_input_shapes

from .base import PassContext
from .covering import CoveringRewrite
from .graph import Model
from .graphutil import Namer, constant_value, detach, optional_constant, optional_input

_ONNX = (None, "", "ai.onnx")


@dataclass
class _Take:
    """A reader's block of columns [start, stop) and how it becomes the reader's output."""

    start: int
    stop: int
    output: gs.Tensor  # the tensor the block writes, under its name (rule b)
    shape: list[int] | None = None  # (iii): the Reshape's target, 0 for each kept leading dim
    perm: list[int] | None = None  # (iii): the Transpose less G; None when the identity


@dataclass
class _Candidate:
    product: gs.Node
    bias: gs.Node | None  # the Add of rule a
    takes: list[_Take]
    readers: list[gs.Node]  # the nodes the blocks replace (Split, Slice, Reshape, Transpose, Gathers)
    columns: int  # M

    @property
    def removed(self) -> list[str]:
        """Rule e: the tensors no longer made once the blocks are."""
        nodes = [self.product, *([self.bias] if self.bias else []), *self.readers]
        kept = {take.output.name for take in self.takes}
        return [out.name for node in nodes for out in node.outputs if out.name not in kept]


class SplitColumnsPass(CoveringRewrite):
    """Computes every product above `budget_bytes` by the column blocks its readers take (rules a-d)."""

    name = "split-columns"

    def find(self, model: Model, ctx: PassContext) -> list[_Candidate]:
        return _candidates(model, ctx, self.budget_bytes)

    def anchor(self, candidate: _Candidate) -> gs.Node:
        return candidate.product

    def emit(self, candidate: _Candidate, namer: Namer, opset: int) -> list[gs.Node]:
        return _rewrite(candidate, namer)

    def record(self, candidate: _Candidate) -> dict:
        return {"node": candidate.product.name, "columns": candidate.columns,
                "blocks": [[take.start, take.stop] for take in candidate.takes]}

    def covers(self, candidate: _Candidate) -> list[str]:  # rule e
        return candidate.removed


def split_uncovered(proto: onnx.ModelProto, uncovered: list[FeatureMap], budget_bytes: int,
                    ctx: PassContext, aliases: dict[str, str]) -> list[FeatureMap]:
    """Rule e (`CoveringRewrite.uncovered`)."""
    return SplitColumnsPass(budget_bytes).uncovered(proto, uncovered, ctx, aliases)


def _candidates(model: Model, ctx: PassContext, budget: int) -> list[_Candidate]:
    if not any(_may_split(node) for node in model.graph.nodes):
        return []  # no shape inference for the many graphs without a candidate
    proto = model.proto()
    infos = infer_tensor_infos(proto, resolve_input_shapes(proto, ctx.input_shapes))
    outputs = {t.name for t in model.graph.outputs}
    opset = model.opset
    found = []
    for node in model.graph.nodes:
        cand = _candidate(node, infos, outputs, opset)
        if cand is None:
            continue
        info = infos[(cand.bias or cand.product).outputs[0].name]
        per_column = _bytes(info, ctx.act_bytes) // cand.columns
        if per_column * cand.columns > budget and all(per_column * (t.stop - t.start) <= budget
                                                      for t in cand.takes):
            found.append(cand)  # rule c
    return found


def _may_split(node: gs.Node) -> bool:
    """A cheap look at rule a before shape inference: a MatMul or Gemm whose output, or its
    Add's, is read by the ops of (i)-(iii)."""
    if node.op not in ("MatMul", "Gemm") or len(node.outputs) != 1:
        return False
    readers = list(node.outputs[0].outputs)
    readers += [r for add in readers if add.op == "Add" for out in add.outputs for r in out.outputs]
    return any(r.op in ("Split", "Slice", "Reshape") for r in readers)


def _bytes(info: TensorInfo, act_bytes: int | None) -> int:
    return info.numel * (act_bytes or info.dtype.itemsize)


def _candidate(node: gs.Node, infos: dict[str, TensorInfo], outputs: set[str],
               opset: int) -> _Candidate | None:
    """Rule a for one node; None when it is not a candidate."""
    columns = _product_columns(node, infos)
    if columns is None:
        return None
    tensor = node.outputs[0]
    rank = len(infos[tensor.name].shape)
    if rank == 0 or infos[tensor.name].shape[-1] != columns:
        return None
    bias = _bias(tensor, columns, rank, outputs)
    if bias is not None:
        tensor = bias.outputs[0]
    if tensor.name in outputs or not tensor.outputs:
        return None
    takes, readers = [], []
    for reader in tensor.outputs:
        if reader.domain not in _ONNX or not reader.inputs or reader.inputs[0] is not tensor or any(
                t is tensor for t in reader.inputs[1:]):
            return None
        found = _reader_takes(reader, columns, infos, outputs, opset)
        if found is None:
            return None
        takes += found
        readers += [reader] if reader.op != "Reshape" else _reshape_chain(reader)
    return _Candidate(node, bias, takes, readers, columns) if takes else None


def _product_columns(node: gs.Node, infos: dict[str, TensorInfo]) -> int | None:
    """Rule a: M of a MatMul or Gemm with a constant weight; None for anything else."""
    if node.op not in ("MatMul", "Gemm") or node.domain not in _ONNX or len(node.inputs) < 2:
        return None
    if len(node.outputs) != 1 or node.outputs[0].name not in infos or node.inputs[0].name not in infos:
        return None
    weight = constant_value(node.inputs[1])
    if weight is None or weight.ndim != 2:
        return None
    if node.op == "MatMul":
        return int(weight.shape[1])
    known, _ = optional_constant(node, 2)
    if node.attrs.get("transA", 0) or not known:
        return None
    return int(weight.shape[0] if node.attrs.get("transB", 0) else weight.shape[1])


def _bias(tensor: gs.Tensor, columns: int, rank: int, outputs: set[str]) -> gs.Node | None:
    """Rule a: the Add of a constant bias that alone reads the product, or None."""
    if tensor.name in outputs or len(tensor.outputs) != 1:
        return None
    add = tensor.outputs[0]
    if add.op != "Add" or add.domain not in _ONNX or len(add.inputs) != 2 or len(add.outputs) != 1:
        return None
    others = [t for t in add.inputs if t is not tensor]
    value = constant_value(others[0]) if len(others) == 1 else None
    if value is None or value.ndim > rank or any(d != 1 for d in value.shape[:-1]):
        return None
    return add if not value.ndim or value.shape[-1] in (1, columns) else None


def _reader_takes(reader: gs.Node, columns: int, infos: dict[str, TensorInfo], outputs: set[str],
                  opset: int) -> list[_Take] | None:
    rank = len(infos[reader.inputs[0].name].shape)
    if reader.op == "Split":
        return _split_takes(reader, columns, rank, infos)
    if reader.op == "Slice":
        return _slice_take(reader, columns, rank, opset)
    if reader.op == "Reshape":
        return _gather_takes(reader, columns, infos, outputs)
    return None


def _split_takes(split: gs.Node, columns: int, rank: int, infos: dict[str, TensorInfo]) -> list[_Take] | None:
    """Rule a (i): output j takes the next block, as wide as shape inference says."""
    if int(split.attrs.get("axis", 0)) % rank != rank - 1:
        return None
    takes, start = [], 0
    for out in split.outputs:
        if out.name not in infos:
            return None
        width = infos[out.name].shape[-1]
        takes.append(_Take(start, start + width, out))
        start += width
    return takes if start == columns else None


def _slice_take(node: gs.Node, columns: int, rank: int, opset: int) -> list[_Take] | None:
    """Rule a (ii): one axis, the last, step 1; the block as numpy clamps it."""
    if opset < 10:
        values = [node.attrs.get(key) for key in ("starts", "ends", "axes")] + [None]
    else:
        known = [optional_constant(node, i) for i in range(1, 5)]
        if not all(ok for ok, _ in known):
            return None
        values = [value for _, value in known]
    starts, ends, axes, steps = (None if v is None else [int(x) for x in np.ravel(v)] for v in values)
    axes = [0] if axes is None else axes  # one start: axis 0 by default
    if starts is None or ends is None or len(starts) != 1 or len(ends) != 1 or len(axes) != 1:
        return None
    if axes[0] % rank != rank - 1 or steps not in (None, [1]):
        return None
    start, stop, _ = slice(starts[0], ends[0]).indices(columns)
    return [_Take(start, stop, node.outputs[0])] if stop > start else None


def _reshape_chain(reshape: gs.Node) -> list[gs.Node]:
    """The Reshape, its Transpose and the Gathers of rule a (iii) (already checked)."""
    transpose = reshape.outputs[0].outputs[0]
    return [reshape, transpose, *transpose.outputs[0].outputs]


def _gather_takes(reshape: gs.Node, columns: int, infos: dict[str, TensorInfo],
                  outputs: set[str]) -> list[_Take] | None:
    """Rule a (iii): Reshape to [lead..., G, rest...], Transpose, Gathers of G."""
    lead = infos[reshape.inputs[0].name].shape[:-1]
    shaped = reshape.outputs[0]
    shape = infos[shaped.name].shape if shaped.name in infos else ()
    if len(shape) <= len(lead) or tuple(shape[:len(lead)]) != tuple(lead):
        return None
    groups, rest = shape[len(lead)], list(shape[len(lead) + 1:])
    width = math.prod(rest)
    if groups * width != columns or shaped.name in outputs or len(shaped.outputs) != 1:
        return None
    transpose = shaped.outputs[0]
    if transpose.op != "Transpose" or transpose.domain not in _ONNX or transpose.inputs[0] is not shaped:
        return None
    perm = [int(p) for p in transpose.attrs.get("perm", range(len(shape) - 1, -1, -1))]
    axis = perm.index(len(lead))
    moved = transpose.outputs[0]
    if moved.name in outputs or not moved.outputs:
        return None
    less = [p if p < len(lead) else p - 1 for i, p in enumerate(perm) if i != axis]  # perm without G
    takes = []
    for gather in moved.outputs:
        g = _gathered(gather, moved, axis, len(shape), groups)
        if g is None:
            return None
        takes.append(_Take(g * width, (g + 1) * width, gather.outputs[0], [0] * len(lead) + rest,
                           None if less == sorted(less) else less))
    return takes


def _gathered(gather: gs.Node, tensor: gs.Tensor, axis: int, rank: int, groups: int) -> int | None:
    """The block a Gather of a constant scalar index on `axis` picks, or None."""
    if gather.op != "Gather" or gather.domain not in _ONNX or len(gather.inputs) != 2 or gather.inputs[0] is not tensor:
        return None
    index = constant_value(gather.inputs[1])
    if int(gather.attrs.get("axis", 0)) % rank != axis or index is None or index.ndim != 0:
        return None
    if not np.issubdtype(index.dtype, np.integer) or not -groups <= int(index) < groups:
        return None
    return int(index) % groups


def _rewrite(cand: _Candidate, namer: Namer) -> list[gs.Node]:
    """Rule b: the block nodes, in order; the product, its Add and the readers are detached."""
    product, bias = cand.product, cand.bias
    left, weight = product.inputs[0], constant_value(product.inputs[1])
    extra = optional_input(product, 2)
    c_value = None if extra is None else constant_value(extra)
    bias_value, bias_first = None, False
    if bias is not None:
        bias_first = bias.inputs[1] is product.outputs[0]
        bias_value = constant_value(bias.inputs[0] if bias_first else bias.inputs[1])
    transposed = product.op == "Gemm" and bool(product.attrs.get("transB", 0))
    base = product.name or product.outputs[0].name
    detach([product, *([bias] if bias else []), *cand.readers])  # so that the blocks can write the outputs
    emitted = []
    for i, take in enumerate(cand.takes):
        name = f"{base}/block{i}"
        cols = slice(take.start, take.stop)
        block_w = weight[cols, :] if transposed else weight[:, cols]
        inputs = [left, _const(namer, f"fmc/{name}/W", block_w)]
        if c_value is not None:
            inputs.append(_const(namer, f"fmc/{name}/C", _columns(c_value, cols, cand.columns)))
        steps = [(product.op, inputs, dict(product.attrs))]
        if bias_value is not None:
            b = _const(namer, f"fmc/{name}/bias", _columns(bias_value, cols, cand.columns))
            steps.append(("Add", [b, None] if bias_first else [None, b], {}))
        if take.shape is not None:
            steps.append(("Reshape", [None, _const(namer, f"fmc/{name}/shape", np.array(take.shape, np.int64))], {}))
            if take.perm is not None:
                steps.append(("Transpose", [None], {"perm": take.perm}))
        emitted += _chain(steps, take.output, name, namer)
    return emitted


def _chain(steps: list[tuple[str, list, dict]], output: gs.Tensor, name: str, namer: Namer) -> list[gs.Node]:
    """One node per step, each reading the previous one's output where its inputs say None;
    the last writes `output`."""
    nodes, previous = [], None
    for j, (op, inputs, attrs) in enumerate(steps):
        out = output if j == len(steps) - 1 else gs.Variable(namer(f"{name}/{op.lower()}_out"))
        nodes.append(gs.Node(op, name=namer(f"{name}/{op.lower()}"), attrs=attrs,
                             inputs=[previous if t is None else t for t in inputs], outputs=[out]))
        previous = out
    return nodes


def _columns(value: np.ndarray, cols: slice, columns: int) -> np.ndarray:
    """The block of a bias or C: its last axis sliced when it spans the columns, else as it is."""
    return value[..., cols] if value.ndim and value.shape[-1] == columns else value


def _const(namer: Namer, name: str, value: np.ndarray) -> gs.Constant:
    return gs.Constant(namer(name), np.ascontiguousarray(value))
