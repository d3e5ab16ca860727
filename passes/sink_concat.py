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
   float rounding (the tests check against onnxruntime). The rewrite edits `model.graph`
   in place, all or nothing per candidate (passes/sink_rewrite.py); shapes and known
   values are analyses of `model.proto()`.

Which ops each rule covers: the `SINK_*_OPS` tables of passes/ops.py.

Entry point: `SinkConcatPass(ceiling_bytes).run(model, ctx)`; `result.data` lists each
sunk Concat: its output, axis, piece sizes, the ops sunk through and where it was
materialised.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

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
from .graph import Model
from .ops import UNFOLDABLE_OPS
from .sink_rewrite import Refused, Sinker, SinkResult, Sunk

__all__ = ["MAX_SINKS", "SinkConcatPass", "SinkResult", "Sunk"]

MAX_SINKS = 64


class SinkConcatPass(Pass):
    """Sinks every Concat above the ceiling below the ops that act per position of its axis."""

    name = "sink-concat"
    provides = ("sunk",)

    def __init__(self, ceiling_bytes: int | None = None):
        self.ceiling_bytes = ceiling_bytes  # None: the plan's

    @property
    def requires(self) -> tuple[str, ...]:
        return ("plan",) if self.ceiling_bytes is None else ()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        ceiling = self.ceiling_bytes if self.ceiling_bytes is not None else ctx.plan.ceiling_bytes
        ctx.sunk = _sink_all(model, ctx, ceiling)
        if ctx.sunk:
            ctx.log(f"plan: {len(ctx.sunk)} Concat(s) above the ceiling sunk below their "
                    f"per-position readers (exact)")
        return PassResult(model, modified=bool(ctx.sunk), data=ctx.sunk)


def _sink_all(model: Model, ctx: PassContext, ceiling_bytes: int) -> list[SinkResult]:
    """Sink the Concats above `ceiling_bytes`, last first, until none can be sunk (rule a)."""
    shapes = resolve_input_shapes(model.proto(), ctx.input_shapes)
    values = _KnownValues(model.proto(), shapes)
    facts: list[SinkResult] = []
    refused: set[str] = set()
    joins: set[str] = set()  # the Concats this pass wrote (rule d): never sunk into again
    for _ in range(MAX_SINKS):
        infos = infer_tensor_infos(model.proto(), shapes)
        fact = _sink_one(model, ctx, infos, values, ceiling_bytes, refused, joins)
        if fact is None:
            break
        onnx.checker.check_model(model.proto())
        facts.append(fact)
        refused.clear()
        ctx.log(f"sink-concat: {fact.concat} sunk along axis {fact.axis} in {len(fact.sizes)} "
                f"pieces through {len(fact.ops)} op(s), concatenated at "
                f"{', '.join(fact.materialized) or 'nothing'}")
    return facts


def _sink_one(model: Model, ctx: PassContext, infos: dict[str, TensorInfo], values: _KnownValues,
              ceiling_bytes: int, refused: set[str], joins: set[str]) -> SinkResult | None:
    """The last candidate that sinks, sunk in `model.graph`; None when every one is refused."""
    outputs = {t.name for t in model.graph.outputs}
    read = {t.name for node in model.graph.nodes for t in node.inputs}

    def fits(name: str) -> bool:
        return _bytes(infos, name, ctx.act_bytes) <= ceiling_bytes

    candidates = [n for n in model.graph.nodes if n.op == "Concat" and n.outputs[0].name in read
                  and n.outputs[0].name not in outputs and n.outputs[0].name not in refused
                  and not fits(n.outputs[0].name)]
    for node in reversed(candidates):
        try:
            return Sinker(model, infos, values, fits, joins).sink(node)
        except Refused as exc:
            ctx.log(f"sink-concat: {node.outputs[0].name} stays: {exc}")
            refused.add(node.outputs[0].name)
    return None


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
            if node.op_type == "Constant" or node.op_type in UNFOLDABLE_OPS or node.domain not in ("", "ai.onnx"):
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
