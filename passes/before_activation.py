"""BeforeActivationPass: project a map before the activation that ends its kernel group.

A stored map X usually ends a group Conv -> per-channel ops -> activation -> per-channel
ops -> X. The plan projects X itself (the paper's placement). Projected before the
activation instead, at T, the output of the group's linear part, the stored map is P T;
U, the activation and the ops after it run on the fly in X's readers. A pointwise conv's
T is a linear image of its input at every position: after a conv that widens C_in channels
to C its rank is at most C_in + 1 (the bias), and where its input is itself a projected
map of rank k read through its U, at most k + 1; X, past the nonlinearity, has full rank.
A depthwise conv's T has no such bound. By default (`--placement pointwise`) compile moves the maps
after a pointwise conv: PP-OCR's recognizer at 4x loses 1.1 points instead of 3.1; with
`before` every map that the rules allow (docs/results.md, "Projecting before the
activation"). Rules, for every planned map X:

a. Walking back from X through elementwise nodes (the stored view's unary and binary
   ops; at most `LIMIT`), every path ends at the *linear tail* of one Conv: the conv's
   output or a tensor computed from it by per-channel ops with constant operands only
   (BatchNormalization, Mul, Add, Sub, Div). No Conv, two convs, or any other op on the
   way: X stays where it is (a residual Add, an SE gate's Mul, a map with no activation).
b. T is the last tensor of that tail that every path passes through. The nodes between
   T and X (the *region*) include an activation, nothing outside the region reads T or
   any tensor of it but X, and T has X's shape: else X stays. So does an X that anything
   but a Conv, a pooling node or a binary elementwise node (an SE gate's Mul) reads: those
   compute U and the region per input position as they read them, and write a map of
   their own (planned, or under the ceiling), where a channel Split, a Concat or a Resize
   would write X's channels whole (YOLOv8's C2f Split did: its halves were stored at full
   width) or carry U past itself (a Resize, fold rule c) where the activation stops it.
c. The planned map's `name` becomes T (its rank, channels and bytes unchanged; the map's
   `stored_map` keeps X): the fit, map-cost and fold passes then project T. The fold
   pass writes one U for the region's readers (passes/fold.py rule h'), and the stored
   view computes U and the region in X's readers (passes/memory.py, expand on read), so
   every stored map stays under the ceiling; verify checks it on the emitted model.
d. The cost: U no longer folds into a consumer conv (the activation lies between), so
   each moved map keeps an explicit 1x1 U conv and onnxruntime allocates X at full width
   (the report's runtime figures show it); in return P folds into the conv before T
   (passes/fold.py rule a'), where after the activation it stays explicit.
e. With `--placement pointwise` (the default) only maps whose conv is a group-1 1x1 conv
   move; the others, after a depthwise or a spatial conv, stay after their activation.
   Projecting T there reconstructs X about as well as projecting X (PCA at the planned
   rank, `examples/placement_errors.py` on both PP-OCR models: within a third either way,
   where after a pointwise conv the error at X falls on 24 of 25 maps, up to 60-fold), and
   costs the fold of U.

Entry point: `BeforeActivationPass().run(model, ctx)`; `result.data` lists the maps moved
as (stored map, tensor projected).
"""

from __future__ import annotations

import onnx

from .base import Pass, PassContext, PassResult
from .graph import Model
from .memory import GraphIndex, is_pointwise_conv
from .ops import (
    ACTIVATIONS,
    AFFINE_PER_CHANNEL_OPS,
    POOLING_OPS,
    STORED_BINARY_OPS,
    STORED_UNARY_OPS,
)

LIMIT = 16  # nodes between T and X: an activation built from primitives and a few affine ops
READERS = frozenset({"Conv"}) | POOLING_OPS | STORED_BINARY_OPS  # what may read X (rule b)
PLACEMENTS = ("pointwise", "before", "after")  # compile's --placement (rule e); the first is the default


class BeforeActivationPass(Pass):
    name = "before-activation"
    requires = ("plan",)
    provides = ("plan",)

    def __init__(self, placement: str = "pointwise"):
        self.pointwise_only = placement == "pointwise"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        proto = model.proto()
        index = GraphIndex(proto)
        shapes = ctx.memory.tensor_shapes if ctx.memory is not None else {}
        moved = []
        for planned in ctx.plan.maps:
            tensor = tensor_before_activation(index, planned.name, pointwise_only=self.pointwise_only)
            if tensor is None or (tensor in shapes and list(shapes[tensor]) != list(planned.shape)):
                continue
            moved.append((planned.name, tensor))
            planned.stored_map, planned.name = planned.name, tensor
            planned.producer = index.producer[tensor].name or tensor
        if moved:
            ctx.log(f"before-activation: {len(moved)} of {len(ctx.plan.maps)} map(s) projected before "
                    "their activation")
        return PassResult(model, modified=False, data=moved)


def tensor_before_activation(index: GraphIndex, name: str, pointwise_only: bool = False) -> str | None:
    """Rules a, b (and e with `pointwise_only`): T for stored map `name`, or None where the map stays."""
    if _linear_tail(index, name):
        return None  # the group ends at its linear part: no activation to move before
    readers = index.consumers.get(name, [])
    if not readers or name in index.outputs or any(reader.op_type not in READERS for reader in readers):
        return None  # rule b: a reader that would write X's channels whole
    region: dict[int, onnx.NodeProto] = {}
    tails, pending = [], [name]
    while pending:
        tensor = pending.pop()
        tail = _linear_tail(index, tensor) if tensor != name else []
        if tail:
            tails.append(tail)
            continue
        node = index.producer.get(tensor)
        if node is None or node.op_type not in STORED_UNARY_OPS | STORED_BINARY_OPS or len(region) >= LIMIT:
            return None
        if id(node) not in region:
            region[id(node)] = node
            pending += index.data_inputs(node)
    common = [t for t in tails[0] if all(t in tail for tail in tails)] if tails else []
    if not common or not any(node.op_type in ACTIVATIONS for node in region.values()):
        return None
    before = common[0]
    if pointwise_only and not is_pointwise_conv(index.producer[common[-1]], index):
        return None  # rule e
    for tail in tails:  # what lies between T and where each path met the tail is the region's too
        for tensor in tail[:tail.index(before)]:
            region[id(index.producer[tensor])] = index.producer[tensor]
    inner = [out for node in region.values() for out in node.output if out and out != name]
    if any(id(reader) not in region for tensor in [before, *inner] for reader in index.consumers.get(tensor, [])):
        return None
    if any(tensor in index.outputs for tensor in [before, *inner]):
        return None
    return before


def _linear_tail(index: GraphIndex, tensor: str) -> list[str]:
    """[tensor, ..., a Conv's output] through per-channel ops with constant operands; [] if not."""
    tail, node = [tensor], index.producer.get(tensor)
    while node is not None and node.op_type in AFFINE_PER_CHANNEL_OPS:
        operands = index.data_inputs(node)
        if len(operands) != 1:
            return []
        tail.append(operands[0])
        node = index.producer.get(operands[0])
    return tail if node is not None and node.op_type == "Conv" else []

