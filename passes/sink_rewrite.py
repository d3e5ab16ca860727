"""Concat sinking, the rewrite: one Concat sunk through `model.graph` in place
(passes/sink_concat.py rules c-e; the lettered rules are there).

Rules this module keeps:

c. `Sinker._rewrite` is rule c, reader by reader: the sunk tensors are tracked by name
   (`Sunk`: axis, piece tensors, sizes); a reader no rule covers refuses the candidate.
d. A computed tensor is materialised (Concat of its pieces, Identity for one) under its
   own name where it fits under the ceiling or is a graph output; those Concats are
   recorded in `joins` and never sunk into.
e. Transactional: every node is built before the graph changes; a refusal unlinks what
   was built and leaves `model.graph` as it was. On success the rewritten nodes take
   their place in the node list, the replaced ones are detached, and `model.touched()`
   removes whatever only they read (shape arithmetic, constants). Names come from one
   `Namer`: pieces are `<tensor>/sink<i>`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx_graphsurgeon as gs

from fmcompress.shapes import TensorInfo

from .graph import Model
from .graphutil import Namer, detach, node_index
from .ops import SINK_NARY_OPS, SINK_SOFTMAX_OPS, SINK_UNARY_OPS, SINK_VIEW_OPS


@dataclass
class Sunk:
    """A tensor that stands for Concat(pieces, axis)."""

    axis: int
    pieces: list[str]
    sizes: list[int]

    @property
    def bounds(self) -> list[int]:
        return [int(b) for b in np.cumsum([0, *self.sizes])]


@dataclass
class SinkResult:
    """What one sunk Concat became (rule e)."""

    concat: str  # the Concat's output
    axis: int
    sizes: list[int]
    ops: list[str] = field(default_factory=list)  # nodes computed per piece
    materialized: list[str] = field(default_factory=list)  # tensors concatenated again (rule d)


class Refused(Exception):
    """A reader of the sunk tensor needs it whole (rule d): the candidate stays."""


class KnownValues(Protocol):
    """Rule b's values by tensor name (passes/sink_concat.py)."""

    def __contains__(self, name: str) -> bool: ...

    def get(self, name: str) -> np.ndarray | None: ...


Rewrite = tuple[list[gs.Node], dict[str, Sunk]] | None  # nodes per piece, {output: Sunk}


class Sinker:
    """One candidate Concat, sunk through `model.graph` (rules c-e)."""

    def __init__(self, model: Model, infos: Mapping[str, TensorInfo], values: KnownValues,
                 fits: Callable[[str], bool], joins: set[str]):
        self.model = model
        self.infos = infos
        self.values = values
        self.fits = fits  # tensor name -> under the ceiling
        self.joins = joins
        self.outputs = {t.name for t in model.graph.outputs}
        self.opset = next((o.version for o in model.header.opset_import
                           if o.domain in ("", "ai.onnx")), 1)
        self.namer = Namer(model.graph)
        self.tensors: dict[str, gs.Tensor] = model.graph.tensors()
        self.sunk: dict[str, Sunk] = {}
        self.pending: list[gs.Node] = []  # Slices of whole operands, before the node's pieces
        self.created: list[gs.Node] = []

    def sink(self, concat: gs.Node) -> SinkResult:
        """Rewrite `model.graph` with `concat` sunk, or raise Refused leaving it as it was."""
        try:
            nodes, replaced, fact = self._rewritten(concat)
        except Refused:
            detach(self.created)
            raise
        detach(replaced)
        self.model.graph.nodes = nodes
        self.model.touched(sort=False)
        return fact

    def _rewritten(self, concat: gs.Node) -> tuple[list[gs.Node], list[gs.Node], SinkResult]:
        """The new node list, the nodes it no longer holds, and the facts."""
        name = concat.outputs[0].name
        axis = _axis(concat.attrs.get("axis", 0), len(self._shape(name)))
        pieces = [t.name for t in concat.inputs]
        fact = SinkResult(name, axis, [self._shape(piece)[axis] for piece in pieces])
        self.sunk[name] = Sunk(axis, pieces, fact.sizes)
        graph_nodes = self.model.graph.nodes
        position = node_index(self.model.graph, concat)
        nodes, replaced = list(graph_nodes[:position]), [concat]
        for node in graph_nodes[position + 1:]:
            reads = [i for i, t in enumerate(node.inputs) if t.name in self.sunk]
            if not reads:
                nodes.append(node)
                continue
            rewrite = self._rewrite(node, reads)
            if rewrite is None:
                held = ", ".join(node.inputs[i].name for i in reads)
                raise Refused(f"{node.op} node {node.name!r} needs the whole of {held}")
            replaced.append(node)
            fact.ops.append(node.name or node.outputs[0].name)
            nodes += [*self.pending, *rewrite[0]]
            self.pending.clear()
            for out, value in rewrite[1].items():
                if out in self.outputs or self.fits(out):
                    nodes.append(self._materialize(out, value))
                    fact.materialized.append(out)
                else:
                    self.sunk[out] = value
        return nodes, replaced, fact

    # ------------------------------------------------------------ rule c

    def _rewrite(self, node: gs.Node, reads: list[int]) -> Rewrite:
        """`node` computed per piece, or None (rule d)."""
        if node.domain not in (None, "", "ai.onnx") or node.name in self.joins:
            return None
        op, attrs = node.op, node.attrs
        if op in ("Shape", "Size"):
            return self._shape_op(node)
        if op in SINK_UNARY_OPS or op in SINK_NARY_OPS:
            if len([o for o in node.outputs if o.name]) != 1:
                return None
            return self._elementwise(node)
        if op == "Concat":
            return self._concat(node, attrs)
        first = self.sunk.get(node.inputs[0].name)
        if first is None or any(i != 0 for i in reads):
            return None
        rank = len(self._shape(node.inputs[0].name))
        if op in SINK_SOFTMAX_OPS:
            axis = _axis(attrs.get("axis", -1 if self.opset >= 13 else 1), rank)
            if axis == first.axis or (self.opset < 13 and first.axis >= axis):
                return None
            return self._per_piece(node, {0: first}, {}, [first.axis])
        if op == "Transpose":
            perm = list(attrs.get("perm", range(rank - 1, -1, -1)))
            return self._per_piece(node, {0: first}, {}, [perm.index(first.axis)])
        if op in SINK_VIEW_OPS:
            return self._view(node, first)
        if op == "Conv":
            return self._conv(node, first, attrs)
        if op == "Split":
            return self._split(node, first, attrs, rank)
        if op == "Slice":
            return self._slice(node, first, attrs, rank)
        return None

    def _slice(self, node: gs.Node, first: Sunk, attrs: dict, rank: int) -> Rewrite:
        """A Slice along other axes than the sunk one (known axes)."""
        names = [t.name for t in node.inputs]
        axes = self.values.get(names[3]) if len(names) > 3 and names[3] else None
        if len(names) > 3 and names[3] and axes is None:
            return None
        if axes is None:
            starts = self.values.get(names[1]) if self.opset >= 10 else attrs.get("starts")
            if starts is None:
                return None
            axes = (range(len(np.ravel(starts))) if self.opset >= 10
                    else attrs.get("axes", range(len(starts))))
        if self.opset < 10:
            axes = attrs.get("axes", axes)
        if first.axis in {_axis(int(a), rank) for a in np.ravel(list(axes))}:
            return None
        return self._per_piece(node, {0: first}, {}, [first.axis])

    def _elementwise(self, node: gs.Node) -> Rewrite:
        out_rank = len(self._shape(node.outputs[0].name))
        sunk_inputs: dict[int, Sunk] = {}
        axis = None
        for i, tensor in enumerate(node.inputs):
            if tensor.name in self.sunk:
                value = self.sunk[tensor.name]
                shifted = value.axis + out_rank - len(self._shape(tensor.name))
                if axis not in (None, shifted):
                    return None
                axis = shifted
                sunk_inputs[i] = value
        return self._alike(node, sunk_inputs, axis, out_rank)

    def _alike(self, node: gs.Node, sunk_inputs: dict[int, Sunk], axis: int,
               out_rank: int) -> Rewrite:
        """`node` once per piece, its sunk inputs cut alike along the output's `axis`, the
        other operands sliced or read whole (`_sliced_operands`); None where they cannot be."""
        sizes = next(iter(sunk_inputs.values())).sizes
        if any(v.sizes != sizes for v in sunk_inputs.values()):
            return None
        sliced = self._sliced_operands(node, sunk_inputs, axis, out_rank, sizes)
        if sliced is None:
            return None
        return self._per_piece(node, sunk_inputs, sliced, [axis])

    def _sliced_operands(self, node: gs.Node, sunk_inputs: dict[int, Sunk], axis: int,
                         out_rank: int, sizes: list[int]) -> dict[int, list[str]] | None:
        """The other operands: read whole where they do not vary along the axis, known values
        sliced per piece; None when one is a computed tensor that varies along it."""
        sliced: dict[int, list[str]] = {}
        total = sum(sizes)
        for i, tensor in enumerate(node.inputs):
            name = tensor.name
            if i in sunk_inputs or not name:
                continue
            shape = self._shape(name)
            index = axis - (out_rank - len(shape))
            if index < 0 or shape[index] == 1:
                continue
            if shape[index] != total:
                return None
            value = self.values.get(name)
            sliced[i] = (self._constant_pieces(name, value, index, sizes) if value is not None
                         else self._sliced_pieces(name, index, sizes))
        return sliced

    def _sliced_pieces(self, name: str, index: int, sizes: list[int]) -> list[str]:
        """A computed operand (whole, already materialised) cut into the pieces by Slice nodes."""
        names = []
        bounds = np.cumsum([0, *sizes])
        for piece, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            names.append(self.namer(f"{name}/sink{piece}"))
            node_name = self.namer(f"{names[-1]}/slice")
            if self.opset >= 10:
                params = [self._constant(f"{names[-1]}/{part}", np.array([number], np.int64))
                          for part, number in zip(("starts", "ends", "axes"), (lo, hi, index),
                                                  strict=True)]
                self.pending.append(self._node("Slice", node_name, [name, *params], [names[-1]]))
            else:
                attrs = {"starts": [int(lo)], "ends": [int(hi)], "axes": [index]}
                self.pending.append(self._node("Slice", node_name, [name], [names[-1]], attrs))
        return names

    def _constant_pieces(self, name: str, value: np.ndarray, index: int,
                         sizes: list[int]) -> list[str]:
        names = []
        bounds = np.cumsum([0, *sizes])
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            part = np.ascontiguousarray(np.take(value, np.arange(lo, hi), axis=index))
            names.append(self._constant(f"{name}/sink{len(names)}", part).name)
        return names

    def _per_piece(self, node: gs.Node, sunk_inputs: dict[int, Sunk], sliced: dict[int, list[str]],
                   axes: list[int]) -> Rewrite:
        """A copy of `node` per piece (reading piece i of every sunk or sliced operand); output
        k is sunk along axes[k] (or axes[0])."""
        first = next(iter(sunk_inputs.values()))
        emitted = []
        pieces: list[list[str]] = [[] for _ in node.outputs]
        for piece in range(len(first.sizes)):
            name = self.namer(f"{node.name or node.outputs[0].name}/sink{piece}")
            inputs: list[str | gs.Tensor] = list(node.inputs)
            for i, value in sunk_inputs.items():
                inputs[i] = value.pieces[piece]
            for i, names in sliced.items():
                inputs[i] = names[piece]
            outputs: list[str | gs.Tensor] = []
            for k, out in enumerate(node.outputs):
                outputs.append(self.namer(f"{out.name}/sink{piece}") if out.name
                               else gs.Variable.empty())
                if out.name:
                    pieces[k].append(outputs[-1])
            emitted.append(self._node(node.op, name, inputs, outputs, node.attrs, node.domain))
        produced = {out.name: Sunk(axes[min(k, len(axes) - 1)], pieces[k], list(first.sizes))
                    for k, out in enumerate(node.outputs) if out.name}
        return emitted, produced

    def _view(self, node: gs.Node, first: Sunk) -> Rewrite:
        """Reshape-like ops on static shapes (rule c)."""
        out_name = node.outputs[0].name
        before, after = self._shape(node.inputs[0].name), self._shape(out_name)
        a = first.axis
        if a < 1 or not after or after[0] != before[0]:
            return None
        prefix, suffix = int(np.prod(before[:a])), int(np.prod(before[a + 1:]))
        for b in range(1, len(after)):
            trailing = int(np.prod(after[b + 1:]))
            if (int(np.prod(after[:b])) != prefix
                    or any(bound * suffix % trailing for bound in first.bounds)):
                continue
            sizes = [size * suffix // trailing for size in first.sizes]
            emitted, pieces = [], []
            for piece, size in enumerate(sizes):
                target = self._constant(f"{out_name}/sink{piece}/shape",
                                        np.array([0, *after[1:b], size, *after[b + 1:]], np.int64))
                pieces.append(self.namer(f"{out_name}/sink{piece}"))
                node_name = self.namer(f"{node.name or out_name}/sink{piece}")
                emitted.append(self._node("Reshape", node_name, [first.pieces[piece], target],
                                          [pieces[-1]]))
            return emitted, {out_name: Sunk(b, pieces, sizes)}
        return None

    def _conv(self, node: gs.Node, first: Sunk, attrs: dict) -> Rewrite:
        if any(t.name and t.name not in self.values for t in node.inputs[1:]):
            return None
        a, spatial = first.axis, len(self._shape(node.inputs[0].name)) - 2
        if a == 1:
            return None
        if a >= 2:
            kernel = self.values.get(node.inputs[1].name).shape[2:]
            i = a - 2
            pads = list(attrs.get("pads", [0] * 2 * spatial))
            strides = list(attrs.get("strides", [1] * spatial))
            auto_pad = attrs.get("auto_pad", b"NOTSET")
            auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
            if (kernel[i] != 1 or strides[i] != 1 or pads[i] or pads[i + spatial]
                    or auto_pad not in ("NOTSET", "VALID")):
                return None
        return self._per_piece(node, {0: first}, {}, [a])

    def _split(self, node: gs.Node, first: Sunk, attrs: dict, rank: int) -> Rewrite:
        axis = _axis(attrs.get("axis", 0), rank)
        if axis != first.axis:
            return self._per_piece(node, {0: first}, {}, [first.axis])
        # along the sunk axis: the split cancels the concat where it cuts at piece boundaries
        bounds = first.bounds
        produced, start = {}, 0
        for out in (t.name for t in node.outputs):
            size = self._shape(out)[axis] if out else None
            if size is None:
                return None
            end = start + size
            if start not in bounds or end not in bounds:
                return None
            lo, hi = bounds.index(start), bounds.index(end)
            produced[out] = Sunk(axis, first.pieces[lo:hi], first.sizes[lo:hi])
            start = end
        return [], produced

    def _concat(self, node: gs.Node, attrs: dict) -> Rewrite:
        rank = len(self._shape(node.outputs[0].name))
        axis = _axis(attrs.get("axis", 0), rank)
        names = [t.name for t in node.inputs]
        sunk_inputs = {i: self.sunk[n] for i, n in enumerate(names) if n in self.sunk}
        axes = {v.axis for v in sunk_inputs.values()}
        if len(axes) != 1:
            return None
        a = axes.pop()
        if axis == a:  # along the sunk axis: the pieces of every input, in order
            pieces, sizes = [], []
            for name in names:
                value = self.sunk.get(name) or Sunk(a, [name], [self._shape(name)[a]])
                pieces += value.pieces
                sizes += value.sizes
            return [], {node.outputs[0].name: Sunk(a, pieces, sizes)}
        return self._alike(node, sunk_inputs, a, rank)

    def _shape_op(self, node: gs.Node) -> Rewrite:
        """Shape / Size of a sunk tensor from its first piece (rule c)."""
        out = node.outputs[0].name
        value = self.sunk[node.inputs[0].name]
        full = self._shape(node.inputs[0].name)
        part = self.namer(f"{out}/sink0")
        copy = self._node(node.op, self.namer(f"{node.name or out}/sink0"),
                          [value.pieces[0], *node.inputs[1:]], [part, *node.outputs[1:]],
                          node.attrs, node.domain)
        names = [self.namer(f"{out}/sink/{what}") for what in ("a", "b", "scaled")]
        if node.op == "Size":
            a = self._constant(names[0], np.array(sum(value.sizes), np.int64), named=True)
            b = self._constant(names[1], np.array(value.sizes[0], np.int64), named=True)
            return [copy, self._node("Mul", self.namer(f"{names[2]}/mul"), [part, a], [names[2]]),
                    self._node("Div", self.namer(f"{names[2]}/div"), [names[2], b], [out])], {}
        rank = len(full)
        start = _clamp(node.attrs.get("start", 0), rank)
        end = _clamp(node.attrs.get("end", rank), rank)
        dims = np.arange(rank)[start:end]
        mask = np.where(dims == value.axis, 0, 1).astype(np.int64)
        offset = np.where(dims == value.axis, sum(value.sizes), 0).astype(np.int64)
        a = self._constant(names[0], mask, named=True)
        b = self._constant(names[1], offset, named=True)
        return [copy, self._node("Mul", self.namer(f"{names[2]}/mul"), [part, a], [names[2]]),
                self._node("Add", self.namer(f"{names[2]}/add"), [names[2], b], [out])], {}

    # ------------------------------------------------------------ rule d and the graph

    def _materialize(self, name: str, value: Sunk) -> gs.Node:
        node_name = self.namer(f"{name}/sink_concat")
        self.joins.add(node_name)
        if len(value.pieces) == 1:
            return self._node("Identity", node_name, value.pieces, [name])
        return self._node("Concat", node_name, value.pieces, [name], {"axis": value.axis})

    def _shape(self, name: str) -> tuple[int, ...]:
        info = self.infos.get(name)
        if info is None:
            raise Refused(f"no static shape for {name!r}")
        return tuple(info.shape)

    def _tensor(self, name: str | gs.Tensor) -> gs.Tensor:
        """The graph's tensor `name`, or a new one under a name the namer gave out."""
        if isinstance(name, gs.Tensor):
            return name
        if name not in self.tensors:
            self.tensors[name] = gs.Variable(name)
        return self.tensors[name]

    def _constant(self, base: str, value: np.ndarray, named: bool = False) -> gs.Constant:
        """A new constant; `named`: under a name the namer already gave out."""
        name = base if named else self.namer(base)
        self.tensors[name] = gs.Constant(name, value)
        return self.tensors[name]

    def _node(self, op: str, name: str, inputs: Iterable[str | gs.Tensor],
              outputs: Iterable[str | gs.Tensor], attrs: dict | None = None,
              domain: str | None = None) -> gs.Node:
        node = gs.Node(op, name=name, attrs=dict(attrs or {}),
                       inputs=[self._tensor(t) for t in inputs],
                       outputs=[self._tensor(t) for t in outputs], domain=domain)
        self.created.append(node)
        return node


def _axis(axis: int, rank: int) -> int:
    return int(axis) + rank if int(axis) < 0 else int(axis)


def _clamp(index: int, rank: int) -> int:
    index = int(index) + rank if int(index) < 0 else int(index)
    return min(max(index, 0), rank)
