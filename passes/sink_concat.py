"""SinkConcatPass: run the ops after a Concat once per concatenated piece (exact).

A detection head concatenates its levels along the anchor axis ([1, 82, 1600 + 400 +
100]) and then decodes every anchor on its own (Split into box and class channels,
Reshape, Transpose, Softmax over the box bins, a 1x1 Conv, elementwise arithmetic with
the anchor grid). The concatenated tensors are larger than any level, and no row band
(passes/tile.py) can cross the Reshape. Sinking the Concat below the ops that act on
every position of its axis independently computes them per piece (per level), and
concatenates only where the result fits. Rules:

a. Candidates: every Concat whose output is above the ceiling (bytes of the pinned
   static shape, or `ctx.act_bytes` per element), is read by a node and is not a graph
   output, the last
   in graph order first. After each sink the shapes are re-inferred and the search
   starts again; a refused candidate is not tried again until another one sinks.
b. Known values: initializers, Constant outputs, and shape arithmetic (what is
   computed from Shape/Size outputs and known values only: an anchor grid built from
   Range and Expand) evaluated by onnxruntime on zeros at the pinned input shapes. A
   value that differs when a symbolic batch dim is one larger depends on the batch and
   is not known.
c. A sunk tensor, standing for Concat(pieces, axis a), is read per piece by:
   - elementwise ops (unary, and n-ary with numpy broadcasting: Add, Mul, Where, ...):
     every other operand is sunk with the same piece sizes on the same output axis, or
     has size 1 along it (read whole), or is a known value, sliced per piece into an
     initializer, or else is cut by a Slice per piece;
   - Softmax, LogSoftmax, Hardmax over another axis (before opset 13 they flatten the
     axes from theirs on, so only a < axis);
   - Transpose (the axis moves to perm.index(a));
   - Reshape, Flatten, Squeeze, Unsqueeze (static shapes) that keep the batch dim 0
     and the elements before the axis: the product of the dims before a equals that
     of the dims before some output axis a', and every piece boundary times the
     elements after a is a multiple of the elements after a'; piece i gets the
     target [0, out[1:a'], m_i, out[a'+1:]] (0 keeps the batch free);
   - Conv with constant weights along a = 0, or a spatial axis where kernel and
     stride are 1 and the pads 0;
   - Split, Slice (known axes) and Concat along another axis (Concat operands as in
     the elementwise rule, sized alike along a);
   - Split along a where every split boundary is a piece boundary: output j is the
     pieces in its range (the Concat and the Split cancel, nothing is computed);
     Concat along a: the pieces of all its inputs, in order;
   - Shape / Size: Shape(piece 0) * mask + offset (the axis entry set to its full
     length), Size(piece 0) * n / n_0.
d. A tensor so computed is materialised (a Concat of its pieces along its axis under
   its own name, an Identity for one piece) where it fits under the ceiling or is a
   graph output; there the sinking stops. A reader of a sunk tensor that no rule of c
   covers (a Softmax or ReduceSum over the axis, a 3x3 Conv, MatMul, ...) needs the
   whole tensor: the candidate is refused and the graph is left as it was for it.
   The Concats this pass writes are readers of that kind: they are never sunk into
   (a piece above the ceiling that reaches one stays, instead of moving the Concat
   back and forth).
e. Piece tensors are named <tensor>/sink<i>, constants sliced per piece become
   initializers; the rewritten nodes and whatever only they read (shape arithmetic)
   are removed; opset, ir_version, graph inputs, outputs and metadata are kept. Every
   op is the original op on a part of its operands, so outputs are unchanged up to
   float rounding (the tests check against onnxruntime).

Entry point: `SinkConcatPass(ceiling_bytes).run(model, ctx)`; `result.data` lists each
sunk Concat: its output, axis, piece sizes, the ops sunk through and where it was
materialised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fmcompress.errors import InputError
from fmcompress.onnxutil import constant_attr_value, node_attrs
from fmcompress.shapes import (
    TensorInfo,
    declared_dims,
    graph_inputs,
    infer_tensor_infos,
    onnxruntime_values,
    resolve_input_shapes,
)

from .base import Pass, PassContext, PassResult
from .graphutil import Namer

UNARY_OPS = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Softplus",
    "Softsign", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Gelu", "Mish", "ThresholdedRelu",
    "Identity", "Cast", "Floor", "Ceil", "Round", "Sign", "Not", "Sin", "Cos", "IsNaN", "IsInf",
})
NARY_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Clip", "Mod",
    "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor",
})
SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax", "Hardmax"})
VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
NOT_FOLDABLE = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                          "Bernoulli", "If", "Loop", "Scan"})
MAX_SINKS = 64


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


class _Refused(Exception):
    pass


class SinkConcatPass(Pass):
    """Sinks every Concat above the ceiling below the ops that act per position of its axis."""

    name = "sink-concat"

    def __init__(self, ceiling_bytes: int):
        self.ceiling_bytes = ceiling_bytes

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        shapes = resolve_input_shapes(model, ctx.input_shapes)
        values = _KnownValues(model, shapes)
        facts: list[SinkResult] = []
        refused: set[str] = set()
        joins: set[str] = set()  # the Concats this pass wrote (rule d): never sunk into again
        current = model
        for _ in range(MAX_SINKS):
            infos = infer_tensor_infos(current, shapes)
            outputs = {o.name for o in current.graph.output}
            read = {name for node in current.graph.node for name in node.input}
            candidates = [n for n in current.graph.node if n.op_type == "Concat" and n.output[0] in read
                          and n.output[0] not in outputs
                          and n.output[0] not in refused and _bytes(infos, n.output[0], ctx.act_bytes)
                          > self.ceiling_bytes]
            sunk = None
            for node in reversed(candidates):
                try:
                    sunk = _Sinker(current, infos, values, self.ceiling_bytes, ctx.act_bytes, joins).sink(node)
                    break
                except _Refused as exc:
                    ctx.log(f"sink-concat: {node.output[0]} stays: {exc}")
                    refused.add(node.output[0])
            if sunk is None:
                break
            current, fact = sunk
            onnx.checker.check_model(current)
            facts.append(fact)
            refused.clear()
            ctx.log(f"sink-concat: {fact.concat} sunk along axis {fact.axis} in {len(fact.sizes)} pieces "
                    f"through {len(fact.ops)} op(s), concatenated at {', '.join(fact.materialized) or 'nothing'}")
        return PassResult(current, modified=bool(facts), data=facts)


def _bytes(infos: dict[str, TensorInfo], name: str, act_bytes: int | None) -> int:
    info = infos.get(name)
    if info is None:
        return 0
    return info.numel * (act_bytes or np.dtype(info.dtype).itemsize)


class _KnownValues:
    """Rule b: constants and shape arithmetic at the pinned input shapes, evaluated once on demand."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]):
        self.model = model
        self.shapes = shapes
        graph = model.graph
        overridable = {inp.name for inp in graph.input}
        self.constants: dict[str, object] = {i.name: i for i in graph.initializer if i.name not in overridable}
        self.constants.update({n.output[0]: n for n in graph.node if n.op_type == "Constant"})
        static = set(self.constants)
        self.derived: list[str] = []
        for node in graph.node:
            if node.op_type == "Constant" or node.op_type in NOT_FOLDABLE or node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type in ("Shape", "Size") or all(not name or name in static for name in node.input):
                static.update(o for o in node.output if o)
                self.derived.extend(o for o in node.output if o)
        self._values: dict[str, np.ndarray] | None = None
        self._cache: dict[str, np.ndarray | None] = {}

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def get(self, name: str) -> np.ndarray | None:
        if name in self._cache:
            return self._cache[name]
        source = self.constants.get(name)
        if isinstance(source, onnx.TensorProto):
            value = numpy_helper.to_array(source)
        elif source is not None:
            value = constant_attr_value(node_attrs(source))
        else:
            value = self._evaluated().get(name)
        self._cache[name] = value
        return value

    def _evaluated(self) -> dict[str, np.ndarray]:
        if self._values is None:
            self._values = {}
            if self.derived:
                pinned = _run(self.model, self.shapes, self.derived)
                symbolic = {inp.name for inp in graph_inputs(self.model)
                            if not isinstance((declared_dims(inp) or [1])[0], int)}
                batch = {name: ((shape[0] + 1, *shape[1:]) if name in symbolic and shape else shape)
                         for name, shape in self.shapes.items()}
                other = _run(self.model, batch, self.derived) if symbolic and pinned else None
                for name, value in (pinned or {}).items():
                    if other is None or (name in other and np.array_equal(other[name], value)
                                         and other[name].shape == value.shape):
                        self._values[name] = value
        return self._values


def _run(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], names: list[str]) -> dict[str, np.ndarray] | None:
    """Values of `names` from one onnxruntime run on zeros; None when it cannot run (then
    nothing computed is known)."""
    try:
        return onnxruntime_values(model, shapes, names)
    except InputError:
        return None


class _Sinker:
    """One candidate Concat, sunk through the graph (rules c-d) into a new model."""

    def __init__(self, model: onnx.ModelProto, infos: dict[str, TensorInfo], values: _KnownValues,
                 ceiling: int, act_bytes: int | None, joins: set[str]):
        self.model = model
        self.joins = joins
        self.infos = infos
        self.values = values
        self.ceiling = ceiling
        self.act_bytes = act_bytes
        self.outputs = {o.name for o in model.graph.output}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.namer = Namer(model.graph)
        self.initializers: list[onnx.TensorProto] = []
        self.sunk: dict[str, Sunk] = {}
        self.pending: list[onnx.NodeProto] = []  # Slices of whole operands, before the node's pieces

    def sink(self, concat: onnx.NodeProto) -> tuple[onnx.ModelProto, SinkResult]:
        graph = self.model.graph
        name = concat.output[0]
        rank = len(self._shape(name))
        axis = _axis(node_attrs(concat).get("axis", 0), rank)
        sizes = [self._shape(i)[axis] for i in concat.input]
        fact = SinkResult(name, axis, sizes)
        self.sunk[name] = Sunk(axis, list(concat.input), sizes)
        new_nodes: list[onnx.NodeProto] = []
        position = list(graph.node).index(concat)
        new_nodes.extend(graph.node[:position])
        for node in graph.node[position + 1:]:
            reads = [i for i, n in enumerate(node.input) if n in self.sunk]
            if not reads:
                new_nodes.append(node)
                continue
            rewrite = self._rewrite(node, reads)
            if rewrite is None:
                held = ", ".join(node.input[i] for i in reads)
                raise _Refused(f"{node.op_type} node {node.name!r} needs the whole of {held}")
            emitted, produced = rewrite
            fact.ops.append(node.name or node.output[0])
            new_nodes.extend(self.pending)
            new_nodes.extend(emitted)
            self.pending.clear()
            for out, value in produced.items():
                if out in self.outputs or _bytes(self.infos, out, self.act_bytes) <= self.ceiling:
                    new_nodes.append(self._materialize(out, value))
                    fact.materialized.append(out)
                else:
                    self.sunk[out] = value
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        model.graph.initializer.extend(self.initializers)
        _remove_dead(model.graph)
        return model, fact

    # ------------------------------------------------------------ rules c

    def _rewrite(self, node: onnx.NodeProto, reads: list[int]):
        """(nodes, {output: Sunk}) computing `node` per piece, or None (rule d)."""
        if node.domain not in ("", "ai.onnx") or node.name in self.joins:
            return None
        op = node.op_type
        if op in ("Shape", "Size"):
            return self._shape_op(node)
        if op in UNARY_OPS or op in NARY_OPS:
            if len([o for o in node.output if o]) != 1:
                return None
            return self._elementwise(node)
        attrs = node_attrs(node)
        if op == "Concat":
            return self._concat(node, attrs)
        first = self.sunk.get(node.input[0])
        if first is None or any(i != 0 for i in reads):
            return None
        rank = len(self._shape(node.input[0]))
        if op in SOFTMAX_OPS:
            axis = _axis(attrs.get("axis", -1 if self.opset >= 13 else 1), rank)
            if axis == first.axis or (self.opset < 13 and first.axis >= axis):
                return None
            return self._per_piece(node, {0: first}, {}, [first.axis])
        if op == "Transpose":
            perm = list(attrs.get("perm", range(rank - 1, -1, -1)))
            return self._per_piece(node, {0: first}, {}, [perm.index(first.axis)])
        if op in VIEW_OPS:
            return self._view(node, first)
        if op == "Conv":
            return self._conv(node, first, attrs)
        if op == "Split":
            return self._split(node, first, attrs, rank)
        if op == "Slice":
            axes = self.values.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            if len(node.input) > 3 and node.input[3] and axes is None:
                return None
            if axes is None:
                starts = self.values.get(node.input[1]) if self.opset >= 10 else attrs.get("starts")
                if starts is None:
                    return None
                axes = range(len(np.ravel(starts))) if self.opset >= 10 else attrs.get("axes", range(len(starts)))
            if self.opset < 10:
                axes = attrs.get("axes", axes)
            if first.axis in {_axis(int(a), rank) for a in np.ravel(list(axes))}:
                return None
            return self._per_piece(node, {0: first}, {}, [first.axis])
        return None

    def _elementwise(self, node: onnx.NodeProto):
        out_rank = len(self._shape(node.output[0]))
        sunk_inputs: dict[int, Sunk] = {}
        axis = None
        for i, name in enumerate(node.input):
            if name in self.sunk:
                value = self.sunk[name]
                shifted = value.axis + out_rank - len(self._shape(name))
                if axis not in (None, shifted):
                    return None
                axis = shifted
                sunk_inputs[i] = value
        return self._alike(node, sunk_inputs, axis, out_rank)

    def _alike(self, node: onnx.NodeProto, sunk_inputs: dict[int, Sunk], axis: int, out_rank: int):
        """`node` once per piece, its sunk inputs cut alike along the output's `axis`, the
        other operands sliced or read whole (`_sliced_operands`); None where they cannot be."""
        sizes = next(iter(sunk_inputs.values())).sizes
        if any(v.sizes != sizes for v in sunk_inputs.values()):
            return None
        sliced = self._sliced_operands(node, sunk_inputs, axis, out_rank, sizes)
        if sliced is None:
            return None
        return self._per_piece(node, sunk_inputs, sliced, [axis])

    def _sliced_operands(self, node: onnx.NodeProto, sunk_inputs: dict[int, Sunk], axis: int, out_rank: int,
                         sizes: list[int]) -> dict[int, list[str]] | None:
        """The other operands: read whole where they do not vary along the axis, known values
        sliced per piece; None when one is a computed tensor that varies along it."""
        sliced: dict[int, list[str]] = {}
        total = sum(sizes)
        for i, name in enumerate(node.input):
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
                params = [self.namer(f"{names[-1]}/{part}") for part in ("starts", "ends", "axes")]
                for param, number in zip(params, (lo, hi, index), strict=True):
                    self.initializers.append(numpy_helper.from_array(np.array([number], np.int64), param))
                self.pending.append(helper.make_node("Slice", [name, *params], [names[-1]], name=node_name))
            else:
                self.pending.append(helper.make_node("Slice", [name], [names[-1]], name=node_name, starts=[int(lo)],
                                                     ends=[int(hi)], axes=[index]))
        return names

    def _constant_pieces(self, name: str, value: np.ndarray, index: int, sizes: list[int]) -> list[str]:
        names = []
        bounds = np.cumsum([0, *sizes])
        for piece, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            part = np.ascontiguousarray(np.take(value, np.arange(lo, hi), axis=index))
            names.append(self.namer(f"{name}/sink{piece}"))
            self.initializers.append(numpy_helper.from_array(part, names[-1]))
        return names

    def _per_piece(self, node: onnx.NodeProto, sunk_inputs: dict[int, Sunk], sliced: dict[int, list[str]],
                   axes: list[int]):
        """A copy of `node` per piece (reading piece i of every sunk or sliced operand); output
        k is sunk along axes[k] (or axes[0])."""
        first = next(iter(sunk_inputs.values()))
        emitted = []
        pieces: list[list[str]] = [[] for _ in node.output]
        for piece in range(len(first.sizes)):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = self.namer(f"{node.name or node.output[0]}/sink{piece}")
            for i, value in sunk_inputs.items():
                copy.input[i] = value.pieces[piece]
            for i, names in sliced.items():
                copy.input[i] = names[piece]
            for k, out in enumerate(node.output):
                if out:
                    copy.output[k] = self.namer(f"{out}/sink{piece}")
                    pieces[k].append(copy.output[k])
            emitted.append(copy)
        produced = {out: Sunk(axes[min(k, len(axes) - 1)], pieces[k], list(first.sizes))
                    for k, out in enumerate(node.output) if out}
        return emitted, produced

    def _view(self, node: onnx.NodeProto, first: Sunk):
        """Reshape-like ops on static shapes (rule c)."""
        before, after = self._shape(node.input[0]), self._shape(node.output[0])
        a = first.axis
        if a < 1 or not after or after[0] != before[0]:
            return None
        prefix, suffix = int(np.prod(before[:a])), int(np.prod(before[a + 1:]))
        for b in range(1, len(after)):
            trailing = int(np.prod(after[b + 1:]))
            if int(np.prod(after[:b])) != prefix or any(bound * suffix % trailing for bound in first.bounds):
                continue
            sizes = [size * suffix // trailing for size in first.sizes]
            emitted, pieces = [], []
            for piece, size in enumerate(sizes):
                target = self.namer(f"{node.output[0]}/sink{piece}/shape")
                self.initializers.append(numpy_helper.from_array(
                    np.array([0, *after[1:b], size, *after[b + 1:]], np.int64), target))
                pieces.append(self.namer(f"{node.output[0]}/sink{piece}"))
                emitted.append(helper.make_node("Reshape", [first.pieces[piece], target], [pieces[-1]],
                                                name=self.namer(f"{node.name or node.output[0]}/sink{piece}")))
            return emitted, {node.output[0]: Sunk(b, pieces, sizes)}
        return None

    def _conv(self, node: onnx.NodeProto, first: Sunk, attrs: dict):
        if any(name and name not in self.values for name in node.input[1:]):
            return None
        a, spatial = first.axis, len(self._shape(node.input[0])) - 2
        if a == 1:
            return None
        if a >= 2:
            kernel = self.values.get(node.input[1]).shape[2:]
            i = a - 2
            pads = list(attrs.get("pads", [0] * 2 * spatial))
            strides = list(attrs.get("strides", [1] * spatial))
            auto_pad = attrs.get("auto_pad", b"NOTSET")
            auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
            if kernel[i] != 1 or strides[i] != 1 or pads[i] or pads[i + spatial] or auto_pad not in ("NOTSET", "VALID"):
                return None
        return self._per_piece(node, {0: first}, {}, [a])

    def _split(self, node: onnx.NodeProto, first: Sunk, attrs: dict, rank: int):
        axis = _axis(attrs.get("axis", 0), rank)
        if axis != first.axis:
            return self._per_piece(node, {0: first}, {}, [first.axis])
        # along the sunk axis: the split cancels the concat where its boundaries are piece boundaries
        bounds = first.bounds
        produced, start = {}, 0
        for out in node.output:
            size = self._shape(out)[axis] if out else None
            if out is None or size is None:
                return None
            end = start + size
            if start not in bounds or end not in bounds:
                return None
            lo, hi = bounds.index(start), bounds.index(end)
            if out:
                produced[out] = Sunk(axis, first.pieces[lo:hi], first.sizes[lo:hi])
            start = end
        return [], produced

    def _concat(self, node: onnx.NodeProto, attrs: dict):
        rank = len(self._shape(node.output[0]))
        axis = _axis(attrs.get("axis", 0), rank)
        sunk_inputs = {i: self.sunk[n] for i, n in enumerate(node.input) if n in self.sunk}
        axes = {v.axis for v in sunk_inputs.values()}
        if len(axes) != 1:
            return None
        a = axes.pop()
        if axis == a:  # along the sunk axis: the pieces of every input, in order
            pieces, sizes = [], []
            for name in node.input:
                value = self.sunk.get(name) or Sunk(a, [name], [self._shape(name)[a]])
                pieces += value.pieces
                sizes += value.sizes
            return [], {node.output[0]: Sunk(a, pieces, sizes)}
        return self._alike(node, sunk_inputs, a, rank)

    def _shape_op(self, node: onnx.NodeProto):
        """Shape / Size of a sunk tensor from its first piece (rule c)."""
        value = self.sunk[node.input[0]]
        full = self._shape(node.input[0])
        part = self.namer(f"{node.output[0]}/sink0")
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = self.namer(f"{node.name or node.output[0]}/sink0")
        copy.input[0] = value.pieces[0]
        copy.output[0] = part
        names = [self.namer(f"{node.output[0]}/sink/{what}") for what in ("a", "b", "scaled")]
        if node.op_type == "Size":
            self.initializers += [numpy_helper.from_array(np.array(sum(value.sizes), np.int64), names[0]),
                                  numpy_helper.from_array(np.array(value.sizes[0], np.int64), names[1])]
            return [copy, helper.make_node("Mul", [part, names[0]], [names[2]], name=self.namer(f"{names[2]}/mul")),
                    helper.make_node("Div", [names[2], names[1]], [node.output[0]],
                                     name=self.namer(f"{names[2]}/div"))], {}
        attrs = node_attrs(node)
        rank = len(full)
        start = _clamp(attrs.get("start", 0), rank)
        end = _clamp(attrs.get("end", rank), rank)
        dims = np.arange(rank)[start:end]
        mask = np.where(dims == value.axis, 0, 1).astype(np.int64)
        offset = np.where(dims == value.axis, sum(value.sizes), 0).astype(np.int64)
        self.initializers += [numpy_helper.from_array(mask, names[0]), numpy_helper.from_array(offset, names[1])]
        return [copy, helper.make_node("Mul", [part, names[0]], [names[2]], name=self.namer(f"{names[2]}/mul")),
                helper.make_node("Add", [names[2], names[1]], [node.output[0]],
                                 name=self.namer(f"{names[2]}/add"))], {}

    # ------------------------------------------------------------ rule d

    def _materialize(self, name: str, value: Sunk) -> onnx.NodeProto:
        node_name = self.namer(f"{name}/sink_concat")
        self.joins.add(node_name)
        if len(value.pieces) == 1:
            return helper.make_node("Identity", value.pieces, [name], name=node_name)
        return helper.make_node("Concat", value.pieces, [name], name=node_name, axis=value.axis)

    def _shape(self, name: str) -> tuple[int, ...]:
        info = self.infos.get(name)
        if info is None:
            raise _Refused(f"no static shape for {name!r}")
        return tuple(info.shape)


def _axis(axis: int, rank: int) -> int:
    return int(axis) + rank if int(axis) < 0 else int(axis)


def _clamp(index: int, rank: int) -> int:
    index = int(index) + rank if int(index) < 0 else int(index)
    return min(max(index, 0), rank)


def _remove_dead(graph: onnx.GraphProto) -> None:
    """Rule e: drop nodes none of whose outputs is read (subgraphs included) or a graph output,
    then the initializers nobody reads."""
    keep_names = {o.name for o in graph.output}
    nodes = list(graph.node)
    while True:
        used = set(keep_names)
        for node in nodes:
            used.update(_reads(node))
        kept = [n for n in nodes if any(o and o in used for o in n.output)]
        if len(kept) == len(nodes):
            break
        nodes = kept
    del graph.node[:]
    graph.node.extend(nodes)
    inputs = {i.name for i in graph.input}
    initializers = [i for i in graph.initializer if i.name in used or i.name in inputs]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    produced = {o for n in nodes for o in n.output}
    infos = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _reads(node: onnx.NodeProto) -> set[str]:
    names = {n for n in node.input if n}
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            for inner in sub.node:
                names |= _reads(inner)
    return names
