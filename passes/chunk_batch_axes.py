"""ChunkBatchAxesPass: compute attention in chunks of its batch-like leading axes.

Attention over [N, P, T, d] makes scores softmax(q @ k^T * scale) of [N, P, heads, T, T]:
T x T for every (n, p, head), each computed on its own, so neither bands (every token reads
every other), chunks of positions (the scores are not a product by a constant) nor column
blocks can split it. The leading axes can: each chunk of (n, p, head) slices runs the same
ops on its own slices of q, k and v. Rules:

a. A candidate (the anchor) is a MatMul of two computed operands, both of rank >= 3, whose
   output, above `budget_bytes`, has batch axes (all but its last two) of which at least one
   is longer than 1. Those axes are the batch axes b; each has its length D_b.
b. Its region, and where each batch axis lies on each of its tensors (the axis map: b ->
   (axis, f), the tensor's axis holding b as its outermost part, index i of b being
   [i * f, (i + 1) * f) along it; or none, a tensor that does not vary along b):
   (i) the chain: from the anchor's output, while the tensor is above the budget and not a
       graph output, its one reader joins when it is a MatMul, a Transpose, a Reshape (static
       shapes), one of passes/ops.py CHUNK_UNARY_OPS, CHUNK_BINARY_OPS or CHUNK_SOFTMAX_OPS;
       the chain's end is the first tensor at or under the budget, or a graph output (the
       caller receives it whole);
   (ii) each op's map: elementwise ops and softmax align axes from the right (numpy
       broadcasting; an operand of length 1 there has none); a MatMul's batch dims likewise,
       its rows from the left operand, its columns from the right one; a Transpose permutes;
       a Reshape keeps b at the output axis j where the product of the dims before it is the
       same as before b's axis and D_b divides its length (f = its length / D_b);
   (iii) an op mixes b, and b cannot be a chunk axis, where a softmax normalises over b's
       axis (for opset < 13: over any axis from its `axis` on), a MatMul sums over it, or a
       Reshape does not keep it; an op not listed in (i) ends the region (a ReduceSum over
       any axis, say), so the chain must reach its end through listed ops alone;
   (iv) every other input of a region node is a region input (sliced per chunk along its
       mapped axes) or a constant (sliced likewise where it varies along a chunk axis);
       a Reshape's shape is made a constant per chunk. A region input above the budget that
       is not a graph input joins the region through its producer when that is a listed op,
       the input is read by the region alone and varies along every chunk axis, and the
       producer mixes none (so a k^T made by a Transpose of a graph input is transposed per
       chunk); one that does not join stays uncovered (rule f).
c. Chunking: the chunk axes are the batch axes longer than 1 that no region op mixes. A chunk
   takes one index of each axis of a set S, t indices of one axis A, every index of the
   others. What a chunk allocates must fit the budget: its part of every region tensor, the
   Slices of the region inputs (an input that varies along none of the chunk's axes is read
   as it is) and the partial Concats. Of every S and A, the one with the fewest chunks wins
   (t >= 1, chunks as even as that count allows; ties: the first A from the last batch axis,
   then the smallest S); none: no rewrite. Each chunk runs the region on its slices; Concats
   along A, then along each axis of S from the innermost, write the end.
d. The rewrite is exact: every (n, p, head) slice is computed by the same ops on the same
   values, so the outputs are unchanged up to float rounding (tests check against
   onnxruntime).
e. The rewrite edits `model.graph` in place: the chunk nodes take the place of the end's
   producer, named `<node>/chunk<i>` (each region node's copy), `<anchor>/chunk<i>/slice` and
   `<end>/concat...` (unique, by `Namer`); shapes come from ONNX shape inference of
   `model.proto()` with the context's input shapes. Anchors are taken in graph order; one
   already in an earlier region is not a candidate.
f. `batch_uncovered` is the runtime plan's coverage check: of a list of allocations, those
   the pass would not bring under the ceiling. A region's tensors but its end are covered,
   and so is what onnxruntime names for one (MatMul and Mul fused into a FusedMatMul that
   writes the Mul's output, passes/runtime_names.py); a region input above the budget stays
   uncovered (it is made whole before the region).

Entry point: `ChunkBatchAxesPass(budget_bytes).run(model, ctx)`; `result.data` lists each
chunked region with its anchor, end, chunk axes and chunk count.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from fmcompress.featuremaps import FeatureMap
from fmcompress.shapes import TensorInfo, infer_tensor_infos, resolve_input_shapes

from .base import PassContext
from .covering import CoveringRewrite
from .graph import Model
from .graphutil import Namer, constant_value, detach
from .ops import CHUNK_BINARY_OPS, CHUNK_SOFTMAX_OPS, CHUNK_UNARY_OPS

_ONNX = (None, "", "ai.onnx")
_LAYOUT_OPS = frozenset({"Transpose", "Reshape"})
_REGION_OPS = CHUNK_UNARY_OPS | CHUNK_BINARY_OPS | CHUNK_SOFTMAX_OPS | _LAYOUT_OPS | {"MatMul"}

Entry = tuple[int, int] | None  # (axis, f) of rule b, or None: the tensor does not vary along b
AxisMap = dict[int, Entry]  # batch axis b -> its entry


@dataclass
class _Region:
    anchor: gs.Node
    nodes: list[gs.Node]  # in graph order; the last writes `end`
    end: gs.Tensor
    dims: dict[int, int]  # D_b of every batch axis longer than 1
    maps: dict[str, AxisMap] = field(default_factory=dict)  # every tensor a region node reads or writes
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # of the region nodes' outputs
    mixed: set[int] = field(default_factory=set)  # rule b (iii)
    singles: tuple[int, ...] = ()  # S of rule c
    axis: int = -1  # A
    chunk: int = 0  # t
    chunks: int = 0

    @property
    def internal(self) -> list[str]:
        """Rule f: the tensors no longer made whole."""
        return [out.name for node in self.nodes for out in node.outputs if out is not self.end]

    def inputs(self) -> list[gs.Tensor]:
        """Rule b (iv): the computed tensors the region reads from outside, in order."""
        made = {id(out) for node in self.nodes for out in node.outputs}
        found: dict[int, gs.Tensor] = {}
        for node in self.nodes:
            for index, tensor in enumerate(node.inputs):
                if _data_input(node, index) and id(tensor) not in made and constant_value(tensor) is None:
                    found.setdefault(id(tensor), tensor)
        return list(found.values())


class ChunkBatchAxesPass(CoveringRewrite):
    """Computes every attention region above `budget_bytes` in chunks of its batch axes (rules a-e)."""

    name = "chunk-batch-axes"

    def find(self, model: Model, ctx: PassContext) -> list[_Region]:
        return _regions(model, ctx, self.budget_bytes)

    def anchor(self, candidate: _Region) -> gs.Node:
        return candidate.nodes[-1]  # the end's producer (rule e)

    def emit(self, candidate: _Region, namer: Namer, opset: int) -> list[gs.Node]:
        return _rewrite(candidate, namer, opset)

    def record(self, candidate: _Region) -> dict:
        return {"node": candidate.anchor.name, "end": candidate.end.name, "axes": dict(candidate.dims),
                "singles": list(candidate.singles), "axis": candidate.axis, "chunk": candidate.chunk,
                "chunks": candidate.chunks}

    def covers(self, candidate: _Region) -> list[str]:  # rule f
        return list(candidate.internal)


def batch_uncovered(proto: onnx.ModelProto, uncovered: list[FeatureMap], budget_bytes: int,
                    ctx: PassContext, aliases: dict[str, str]) -> list[FeatureMap]:
    """Rule f (`CoveringRewrite.uncovered`)."""
    return ChunkBatchAxesPass(budget_bytes).uncovered(proto, uncovered, ctx, aliases)


def _bytes(info: TensorInfo, act_bytes: int | None) -> int:
    return info.numel * (act_bytes or info.dtype.itemsize)


def _regions(model: Model, ctx: PassContext, budget: int) -> list[_Region]:
    if not any(_may_anchor(node) for node in model.graph.nodes):
        return []  # no shape inference for the many graphs without a candidate
    proto = model.proto()
    infos = infer_tensor_infos(proto, resolve_input_shapes(proto, ctx.input_shapes))
    outputs = {t.name for t in model.graph.outputs}
    inputs = {t.name for t in model.graph.inputs}
    opset = model.opset
    found: list[_Region] = []
    taken: set[int] = set()
    order = {id(node): i for i, node in enumerate(model.graph.nodes)}
    for node in model.graph.nodes:
        if id(node) in taken or not _may_anchor(node):
            continue
        region = _region(node, infos, outputs, inputs, opset, budget, ctx.act_bytes)
        if region is not None:
            region.nodes.sort(key=lambda n: order[id(n)])
            region.shapes = {out.name: tuple(infos[out.name].shape) for n in region.nodes for out in n.outputs}
        if region is not None and _choose_chunks(region, infos, budget, ctx.act_bytes):
            found.append(region)
            taken.update(id(n) for n in region.nodes)
    return found


def _may_anchor(node: gs.Node) -> bool:
    """Rule a before shape inference: a MatMul of two computed operands."""
    return (node.op == "MatMul" and node.domain in _ONNX and len(node.inputs) == 2 and len(node.outputs) == 1
            and all(constant_value(t) is None for t in node.inputs))


def _data_input(node: gs.Node, index: int) -> bool:
    """Whether input `index` of a region node carries data (a Reshape's shape does not)."""
    return bool(node.inputs[index].name) and not (node.op == "Reshape" and index == 1)


def _region(anchor: gs.Node, infos: dict[str, TensorInfo], outputs: set[str], inputs: set[str], opset: int,
            budget: int, act_bytes: int | None) -> _Region | None:
    """Rules a and b for one anchor; None when it is not a candidate."""
    out = anchor.outputs[0]
    info = infos.get(out.name)
    if info is None or len(info.shape) < 3 or _bytes(info, act_bytes) <= budget:
        return None
    if any(t.name not in infos or len(infos[t.name].shape) < 3 for t in anchor.inputs):
        return None
    dims = {b: d for b, d in enumerate(info.shape[:-2]) if d > 1}
    if not dims:
        return None
    region = _Region(anchor, [anchor], out, dims, maps={out.name: {b: (b, 1) for b in dims}})
    # (i): the chain
    tensor = out
    while _bytes(infos[tensor.name], act_bytes) > budget and tensor.name not in outputs:
        if len(tensor.outputs) != 1:
            return None
        reader = tensor.outputs[0]
        if not _listed(reader, infos):
            return None
        index = next(i for i, t in enumerate(reader.inputs) if t is tensor)
        if not _data_input(reader, index):
            return None
        out_map = _forward(reader, index, region, infos, opset)
        region.nodes.append(reader)
        tensor = reader.outputs[0]
        region.maps[tensor.name] = out_map
    region.end = tensor
    # (ii), (iv): the maps of every other input, backwards from each node's output
    for node in region.nodes:
        _operand_maps(node, region, infos, opset)
    # (iv): region inputs above the budget join through their producers
    grown = True
    while grown:
        grown = False
        members = {id(n) for n in region.nodes}
        for tensor in region.inputs():
            producer = _joinable(tensor, region, members, infos, inputs, opset, budget, act_bytes)
            if producer is not None:
                region.nodes.insert(0, producer)
                _operand_maps(producer, region, infos, opset)
                grown = True
                break
    return region


def _listed(node: gs.Node, infos: dict[str, TensorInfo]) -> bool:
    """Rule b (i): a node of a listed op, one output of known shape, data inputs of known shape."""
    if node.op not in _REGION_OPS or node.domain not in _ONNX or len(node.outputs) != 1:
        return False
    if node.outputs[0].name not in infos:
        return False
    if node.op == "MatMul" and (len(node.inputs) != 2 or any(
            t.name not in infos or len(infos[t.name].shape) < 2 for t in node.inputs)):
        return False
    if node.op == "Reshape" and (len(node.inputs) < 2 or node.inputs[0].name not in infos):
        return False
    return all(t.name in infos or constant_value(t) is not None
               for i, t in enumerate(node.inputs) if _data_input(node, i))


def _joinable(tensor: gs.Tensor, region: _Region, members: set[int], infos: dict[str, TensorInfo],
              inputs: set[str], opset: int, budget: int, act_bytes: int | None) -> gs.Node | None:
    """Rule b (iv): the producer of a region input that joins the region, or None."""
    info = infos.get(tensor.name)
    if info is None or tensor.name in inputs or _bytes(info, act_bytes) <= budget or len(tensor.inputs) != 1:
        return None
    producer = tensor.inputs[0]
    if not _listed(producer, infos) or any(id(reader) not in members for reader in tensor.outputs):
        return None
    entries = region.maps.get(tensor.name, {})
    chunkable = [b for b in region.dims if b not in region.mixed]
    if not chunkable or any(entries.get(b) is None for b in chunkable):
        return None  # it does not vary along a chunk axis: it would be made whole per chunk
    trial = _Region(region.anchor, [], region.end, region.dims, maps=dict(region.maps), mixed=set())
    _operand_maps(producer, trial, infos, opset)
    if any(b in trial.mixed for b in chunkable):
        return None
    return producer


def _forward(node: gs.Node, index: int, region: _Region, infos: dict[str, TensorInfo], opset: int) -> AxisMap:
    """Rule b (ii), (iii): the output's map from the map of input `index`; mixed axes are added
    to `region.mixed`."""
    in_map, mixed = region.maps[node.inputs[index].name], region.mixed
    in_shape = infos[node.inputs[index].name].shape
    out_shape = infos[node.outputs[0].name].shape
    out_map: AxisMap = {}
    for b, entry in in_map.items():
        if entry is None:
            out_map[b] = None
            continue
        axis, f = entry
        if node.op == "Transpose":
            perm = _perm(node, len(in_shape))
            out_map[b] = (perm.index(axis), f)
        elif node.op == "Reshape":
            kept = _keep(in_shape, out_shape, axis, region.dims[b])
            if kept is None:
                mixed.add(b)
            else:
                out_map[b] = kept
        elif node.op == "MatMul":
            rank, out_rank = len(in_shape), len(out_shape)
            if axis < rank - 2:
                out_map[b] = (axis + out_rank - rank, f)
            elif axis == rank - 2 and index == 0:
                out_map[b] = (out_rank - 2, f)
            elif axis == rank - 1 and index == 1:
                out_map[b] = (out_rank - 1, f)
            else:
                mixed.add(b)  # summed over
        else:  # elementwise and softmax: aligned from the right
            out_axis = axis + len(out_shape) - len(in_shape)
            if _normalises(node, out_axis, len(out_shape), opset):
                mixed.add(b)
            else:
                out_map[b] = (out_axis, f)
    return out_map


def _operand_maps(node: gs.Node, region: _Region, infos: dict[str, TensorInfo], opset: int) -> None:
    """Rule b (ii), (iv): the map of every data input of `node` from its output's map; an input
    already mapped otherwise, or an axis the node mixes, is added to `region.mixed`."""
    out_shape = infos[node.outputs[0].name].shape
    out_map = region.maps[node.outputs[0].name]
    for index, tensor in enumerate(node.inputs):
        if not _data_input(node, index):
            continue
        shape = _shape(tensor, infos)
        in_map: AxisMap = {}
        for b, entry in out_map.items():
            if entry is None:
                in_map[b] = None
                continue
            axis, f = entry
            if node.op == "Transpose":
                in_map[b] = (_perm(node, len(out_shape))[axis], f)
            elif node.op == "Reshape":
                kept = _keep(out_shape, shape, axis, region.dims[b])
                if kept is None:
                    region.mixed.add(b)
                else:
                    in_map[b] = kept
            elif node.op == "MatMul":
                in_map[b] = _matmul_operand(index, axis, f, shape, len(out_shape))
            else:
                if _normalises(node, axis, len(out_shape), opset):
                    region.mixed.add(b)
                at = axis - (len(out_shape) - len(shape))
                in_map[b] = None if at < 0 or shape[at] == 1 else (at, f)
        known = region.maps.get(tensor.name)
        if known is not None:
            region.mixed.update(b for b in in_map if known.get(b) != in_map[b])
        else:
            region.maps[tensor.name] = in_map


def _matmul_operand(index: int, axis: int, f: int, shape: tuple[int, ...], out_rank: int) -> Entry:
    rank = len(shape)
    if axis < out_rank - 2:
        at = axis - (out_rank - rank)
        return None if at < 0 or shape[at] == 1 else (at, f)
    if axis == out_rank - 2:  # the rows: the left operand's
        return (rank - 2, f) if index == 0 else None
    return (rank - 1, f) if index == 1 else None  # the columns: the right operand's


def _shape(tensor: gs.Tensor, infos: dict[str, TensorInfo]) -> tuple[int, ...]:
    if tensor.name in infos:
        return tuple(infos[tensor.name].shape)
    return tuple(constant_value(tensor).shape)


def _perm(node: gs.Node, rank: int) -> list[int]:
    return [int(p) % rank for p in node.attrs.get("perm", range(rank - 1, -1, -1))]


def _normalises(node: gs.Node, axis: int, rank: int, opset: int) -> bool:
    """Rule b (iii): whether a softmax-family node normalises over `axis` of its output."""
    if node.op not in CHUNK_SOFTMAX_OPS:
        return False
    default = -1 if opset >= 13 else 1
    over = int(node.attrs.get("axis", default)) % rank
    return axis == over if opset >= 13 else axis >= over


def _keep(src: tuple[int, ...], dst: tuple[int, ...], axis: int, length: int) -> Entry:
    """Rule b (ii): where a Reshape from `src` to `dst` keeps the batch axis of `length` that is
    the outermost part of `src[axis]`; None when it does not."""
    outer = math.prod(src[:axis])
    for j in range(len(dst)):
        if math.prod(dst[:j]) == outer and dst[j] > 1:
            return (j, dst[j] // length) if dst[j] % length == 0 else None
        if math.prod(dst[:j]) > outer:
            break
    return None


def _choose_chunks(region: _Region, infos: dict[str, TensorInfo], budget: int, act_bytes: int | None) -> bool:
    """Rule c: S, A and t, the fewest chunks whose every piece fits; False when none fits."""
    axes = [b for b in region.dims if b not in region.mixed]
    if not axes:
        return False
    pieces = [(region.maps[out.name], _bytes(infos[out.name], act_bytes), False) for node in region.nodes
              for out in node.outputs]
    pieces += [(region.maps[t.name], _bytes(infos[t.name], act_bytes), True) for t in region.inputs()]
    end_bytes = _bytes(infos[region.end.name], act_bytes)
    best = None
    for axis in reversed(axes):
        others = [b for b in axes if b != axis]
        for size in range(len(others) + 1):
            for singles in itertools.combinations(others, size):
                t = _most_indices(region, pieces, end_bytes, singles, axis, budget)
                if t < 1:
                    continue
                count = math.prod(region.dims[s] for s in singles) * math.ceil(region.dims[axis] / t)
                if best is None or count < best[0]:
                    best = (count, singles, axis, t)
    if best is None:
        return False
    count, region.singles, region.axis, t = best
    per_axis = math.ceil(region.dims[region.axis] / t)
    region.chunk = math.ceil(region.dims[region.axis] / per_axis)  # as even as that count allows
    region.chunks = count
    return True


def _most_indices(region: _Region, pieces: list[tuple[AxisMap, int, bool]], end_bytes: int,
                  singles: tuple[int, ...], axis: int, budget: int) -> int:
    """The most indices t of `axis` for which every piece fits (0: not even one). A region
    input sliced along none of the chunk's axes is read as it is: no piece."""
    def piece(entries: AxisMap, total: int) -> float:
        share = 1.0
        for b in (*singles, axis):
            if entries.get(b) is not None:
                share /= region.dims[b]
        return total * share  # the bytes of one index of `axis` (times t, when it is sliced)

    worst = 0.0
    for entries, total, is_input in pieces:
        if is_input and all(entries.get(b) is None for b in (*singles, axis)):
            continue
        size = piece(entries, total)
        sliced = entries.get(axis) is not None
        if not sliced and size > budget:
            return 0
        if sliced:
            worst = max(worst, size)
    # the partial Concats: along A for each index of S, then along each axis of S but the outermost
    partial = [end_bytes / math.prod(region.dims[s] for s in singles[:k]) for k in range(1, len(singles) + 1)]
    if any(p > budget for p in partial):
        return 0
    if worst <= 0:
        return region.dims[axis]
    return min(region.dims[axis], int(budget // worst))


def _rewrite(region: _Region, namer: Namer, opset: int) -> list[gs.Node]:
    """Rule c: per chunk the Slices of the region inputs and the region's nodes; the Concats
    writing the end. The region's nodes are detached."""
    base = region.anchor.name or region.anchor.outputs[0].name
    inputs = region.inputs()
    made = {id(out) for node in region.nodes for out in node.outputs}
    emitted: list[gs.Node] = []
    ranges = [range(region.dims[s]) for s in region.singles]
    steps = range(0, region.dims[region.axis], region.chunk)
    pieces: dict[tuple[int, ...], gs.Tensor] = {}  # S indices, then A's start -> the end's piece
    for i, (picked, start) in enumerate(itertools.product(itertools.product(*ranges), steps)):
        box = {s: (p, p + 1) for s, p in zip(region.singles, picked, strict=True)}
        box[region.axis] = (start, min(start + region.chunk, region.dims[region.axis]))
        name = f"{base}/chunk{i}"
        current: dict[int, gs.Tensor] = {}
        for tensor in inputs:
            current[id(tensor)] = _slice_input(tensor, region.maps[tensor.name], box, name, namer, emitted, opset)
        for node in region.nodes:
            new_inputs = []
            for index, tensor in enumerate(node.inputs):
                if node.op == "Reshape" and index == 1:
                    out_shape = _chunk_shape(region, node.outputs[0].name, box)
                    new_inputs.append(gs.Constant(namer(f"fmc/{name}/{node.name or 'reshape'}/shape"),
                                                  np.array(out_shape, np.int64)))
                elif id(tensor) in current:
                    new_inputs.append(current[id(tensor)])
                elif id(tensor) in made or not tensor.name:
                    new_inputs.append(tensor)  # made by the region: mapped above; '' stays as it is
                else:
                    new_inputs.append(_slice_constant(tensor, region.maps.get(tensor.name, {}), box, name, namer))
            out = gs.Variable(namer(f"{node.outputs[0].name}/chunk{i}"))
            emitted.append(gs.Node(node.op, name=namer(f"{node.name or base}/chunk{i}"), attrs=dict(node.attrs),
                                   inputs=new_inputs, outputs=[out], domain=node.domain))
            current[id(node.outputs[0])] = out
        pieces[(*picked, start)] = current[id(region.end)]
    detach(region.nodes)  # so that the Concat can write the end
    emitted += _concats(region, pieces, namer)
    return emitted


def _slice_input(tensor: gs.Tensor, entries: AxisMap, box: dict[int, tuple[int, int]], name: str,
                 namer: Namer, emitted: list[gs.Node], opset: int) -> gs.Tensor:
    """A Slice of a region input to the chunk `box`; the input itself where it varies along no
    axis of the box."""
    cut = [(entries[b][0], lo * entries[b][1], hi * entries[b][1]) for b, (lo, hi) in box.items()
           if entries.get(b) is not None]
    if not cut:
        return tensor
    out = gs.Variable(namer(f"{tensor.name}/{name.rsplit('/', 1)[-1]}"))
    node_name = namer(f"{name}/slice")
    axes, starts, ends = ([c[k] for c in cut] for k in range(3))
    if opset < 10:
        emitted.append(gs.Node("Slice", name=node_name, attrs={"axes": axes, "starts": starts, "ends": ends},
                               inputs=[tensor], outputs=[out]))
    else:
        consts = [gs.Constant(namer(f"{node_name}/{key}"), np.array(values, dtype=np.int64))
                  for key, values in (("starts", starts), ("ends", ends), ("axes", axes))]
        emitted.append(gs.Node("Slice", name=node_name, inputs=[tensor, *consts], outputs=[out]))
    return out


def _slice_constant(tensor: gs.Tensor, entries: AxisMap, box: dict[int, tuple[int, int]], name: str,
                    namer: Namer) -> gs.Tensor:
    """A constant's block of the chunk `box` (rule b (iv)); the constant itself where it does
    not vary along the box's axes."""
    value = constant_value(tensor)
    cut = [(entries[b][0], lo * entries[b][1], hi * entries[b][1]) for b, (lo, hi) in box.items()
           if entries.get(b) is not None]
    if value is None or not cut:
        return tensor
    index = [slice(None)] * value.ndim
    for axis, lo, hi in cut:
        index[axis] = slice(lo, hi)
    return gs.Constant(namer(f"fmc/{name}/{tensor.name}"), np.ascontiguousarray(value[tuple(index)]))


def _chunk_shape(region: _Region, name: str, box: dict[int, tuple[int, int]]) -> list[int]:
    """A Reshape's output shape for the chunk `box` (its dims along the box's axes scaled)."""
    shape = list(region.shapes[name])
    for b, (lo, hi) in box.items():
        axis, f = region.maps[name][b]
        shape[axis] = (hi - lo) * f
    return shape


def _concats(region: _Region, pieces: dict[tuple[int, ...], gs.Tensor], namer: Namer) -> list[gs.Node]:
    """Rule c: Concats along A for each index of S, then along each axis of S from the
    innermost; the last writes the end."""
    end = region.end
    order = [*region.singles, region.axis]
    nodes: list[gs.Node] = []
    level = pieces
    for depth in range(len(order) - 1, -1, -1):
        groups: dict[tuple[int, ...], list[gs.Tensor]] = {}
        for key in sorted(level):
            groups.setdefault(key[:depth], []).append(level[key])
        axis = region.maps[end.name][order[depth]][0]
        merged: dict[tuple[int, ...], gs.Tensor] = {}
        for key, parts in groups.items():
            last = depth == 0
            out = end if last else gs.Variable(namer(f"{end.name}/concat{''.join(f'_{k}' for k in key)}"))
            if len(parts) == 1 and not last:
                merged[key] = parts[0]
                continue
            nodes.append(gs.Node("Concat" if len(parts) > 1 else "Identity",
                                 name=namer(f"{end.name}/concat{''.join(f'_{k}' for k in key)}"),
                                 attrs={"axis": axis} if len(parts) > 1 else {}, inputs=parts, outputs=[out]))
            merged[key] = out
        level = merged
    return nodes
