"""FoldProjectionsPass: store only Z = P X for each projected map; fuse P and U into convs.

Reference semantics (InsertProjectionsPass): every consumer of X, graph outputs
included, reads U P X. X is NCHW (rank 4) or NCL (rank 3, e.g. a detection head's
[N, C, anchors]); the channel axis is 1 (-3 resp. -2) and the rules below hold for
both ranks, with 1x1 Conv2d resp. Conv1d (weight [k, C, 1]) for explicit P and U.
The graph is walked once in topological order; a tensor that stands for U T (T
the stored, narrower tensor, of the same rank) is "pending". Rules:

a. P into the producer: X = Conv/ConvTranspose(group=1, constant weight)(...)
   -> W'[j] = sum_c P[j,c] W[c] (ConvTranspose: axis 1), b' = P b; the conv now
   outputs Z = X/fmc_k<k>. Otherwise an explicit 1x1 Conv fmc/P/<X> after X. If X
   itself stands for U1 T1 (rules c-e), Z = (P U1) T1 by one 1x1 conv.
a'. P through per-channel affine ops: X = a * Conv(...) + b by Mul/Add/Sub/Div with
   constants that broadcast along channels only (PP-LCNet's scalar affine blocks; a map
   projected before its activation ends so), every tensor of the chain read only by the
   next op -> W' = P diag(a) W, b' = P (a * bias + b); the chain goes.
b. U into a consumer Conv with group=1 reading it as input 0 (any kernel, stride,
   pad, dilation): W'[o,j] = sum_c W[o,c] U[c,j] per tap, bias unchanged;
   ConvTranspose group=1 likewise on its input-channel axis 0.
c. U pushed through spatially linear per-channel ops (they commute with it):
   GlobalAveragePool, AveragePool, Pad (constant 0, channel axis not padded),
   Resize/Upsample (channel axis not resized; a `sizes` input gets k at dim 1; not
   tf_crop_and_resize with a non-zero extrapolation_value, which is not linear),
   Identity, Dropout (inference, mask unused), Slice and Split along non-channel
   axes, Concat along a non-channel axis of inputs that all carry the same U
   (Concat(U T_i) = U Concat(T_i)). The op reads T; its outputs (renamed
   <Y>/fmc_k<k>) carry U onwards.
d. Split along the channel axis: output i stands for U_i T (U_i: the rows of U of
   chunk i); the Split is dropped.
e. Concat along the channel axis with pending inputs: if every consumer of the
   result folds U (a group=1 conv, rule b) or the result is itself projected,
   Concat the T's and the untouched inputs and carry U' = diag(U_a, I, ...);
   otherwise explicit U convs on the pending inputs.
e'. Concat along a non-channel axis (e.g. the anchor axis of a detection head)
   whose result Y is projected with P, some inputs pending (U_i T_i) and not all
   with the same U (that is rule c): P Y = Concat((P U_i) T_i, P a_j), one 1x1 conv
   per input, so Y is never full width; Y stands for U (P Y).
f. Shape(X) -> Shape(T) * [1,0,1,1] + [0,C,0,0] (rank 3: [1,0,1] + [0,C,0]; sliced
   like Shape's start/end);
   Size(X) -> Size(T) / k * C: the consumers see the original C channels.
g. Linear residual stream: Y = Add(a, b) projected with P_out, each input either
   pending (U_in T_in) or a group=1 conv used only here: P_out Y = (P_out U_in) T_in
   (a k_out x k_in 1x1 conv) + conv with P_out folded in; Y is never full width.
h. Anything else (depthwise/grouped conv, MaxPool, nonlinear ops, Add/Mul with
   other tensors, MatMul, graph outputs, ...): an explicit 1x1 Conv fmc/U/<X>[/n]
   (weight U) right before that consumer, one per consumer;
h'. except readers of X that are the elementwise nodes of one converging region (an
   activation built from primitives reading X twice, as when X is the map before its
   activation, passes/before_activation.py): one explicit U for all of them, so the
   stored view computes U and the activation on the fly in their reader.

New nodes and initializers are named fmc/...; tensors whose channel count changes
get new names and no value_info. Dead nodes and initializers are removed; opset,
ir_version, graph inputs and outputs are kept. result.data maps each projected
tensor to {"stored", "producer", "consumers": {node or output: action}}, as does ctx.folds.

Here: the pass, the walk, rules a and g and rule h for graph outputs; rules b, c, d, f, h in
fold_push.py; rules e, e' and c for Concat in fold_concat.py; the walk's state in fold_state.py.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fmcompress.errors import UnsupportedOpError
from fmcompress.featuremaps import Projection

from .base import PassContext, PassResult
from .fold_concat import merge_concat, push_concat, try_projected_concat
from .fold_push import explicit_u, fold_u_into_conv, push_through, rewrite_shape
from .fold_state import FoldState, Pending, node_label
from .graph import Model
from .graphutil import (
    Namer,
    constant_value,
    conv1x1,
    conv_bias,
    group_one_conv_weight,
    new_variable,
    optional_input,
    set_conv_params,
)
from .insert import MapInfo, ProjectionPass
from .ops import FOLD_AFFINE_OPS


class FoldProjectionsPass(ProjectionPass):
    name = "fold-projections"
    provides = ("folds",)

    def _result(self, model: Model, ctx: PassContext, data: dict[str, dict]) -> PassResult:
        ctx.folds = data
        return PassResult(model, modified=bool(data), data=data)

    def _rewrite(self, graph: gs.Graph, projections: dict[str, Projection],
                 infos: dict[str, MapInfo]) -> dict[str, dict]:
        graph.toposort()
        state = FoldState(graph, Namer(graph), projections, infos)
        for node in list(graph.nodes):
            _visit(state, node)
        _expand_graph_outputs(state)
        _refuse_subgraph_reads(state)
        return state.data


# ---------------------------------------------------------------- the walk

def _visit(state: FoldState, node: gs.Node) -> None:
    output_names = [out.name for out in node.outputs]
    if _try_residual(state, node) or try_projected_concat(state, node):
        return
    if any(t.name in state.pending for t in node.inputs):
        _rewrite_consumer(state, node)
    for name in output_names:
        if name in state.projections:
            _start_projection(state, name, node)


def _rewrite_consumer(state: FoldState, node: gs.Node) -> None:
    """Apply the first of rules b-f that fits `node`, else h."""
    pending_slots = [i for i, t in enumerate(node.inputs) if t.name in state.pending]
    only_first = pending_slots == [0]
    first = state.pending.get(node.inputs[0].name) if node.inputs else None
    if only_first and fold_u_into_conv(state, node, first):
        return
    if only_first and push_through(state, node, first):
        return
    if only_first and node.op in ("Shape", "Size"):
        rewrite_shape(state, node, first)
        return
    if node.op == "Concat" and (merge_concat(state, node) or push_concat(state, node)):
        return
    explicit_u(state, node)


def _start_projection(state: FoldState, name: str, producer: gs.Node) -> None:
    """Rule a: make the producer emit Z = P X (k channels) and mark X pending."""
    projection = state.projections[name]
    dtype, rank = state.infos[name].dtype, state.infos[name].rank
    stored = new_variable(state.namer, f"{name}/fmc_k{projection.k}")
    upstream = state.pending.get(name)
    x = state.graph.tensors()[name] if upstream is None else None
    if upstream is not None:
        matrix = projection.P.astype(np.float64) @ upstream.U.astype(np.float64)
        conv1x1(state.graph, state.namer, f"fmc/P/{name}", upstream.stored, matrix.astype(dtype), stored, rank)
        how = "explicit"
    elif (_fold_p_into_conv(state, producer, projection.P, stored)
          or _fold_p_through_affine(state, producer, projection.P, stored, state.infos[name].rank)):
        how = "folded"
    else:
        source = x
        if x in state.graph.outputs:  # the graph output must later be U Z, so X moves aside
            source = new_variable(state.namer, f"{name}/fmc_src")
            producer.outputs[producer.outputs.index(x)] = source
        conv1x1(state.graph, state.namer, f"fmc/P/{name}", source, projection.P.astype(dtype), stored, rank)
        how = "explicit"
    state.pending[name] = Pending(stored, projection.U.astype(dtype), [name], rank)
    state.data[name] = {"stored": stored.name, "producer": how, "consumers": {}}


def _fold_p_into_conv(state: FoldState, conv: gs.Node, p: np.ndarray, stored: gs.Variable,
                      shift: np.ndarray | None = None) -> bool:
    """Rules a and a': W' = P W, b' = P bias (+ `shift`, already in Z's k channels)."""
    weight = group_one_conv_weight(conv)
    bias = conv_bias(conv)
    if weight is None or (bias is None and optional_input(conv, 2) is not None):
        return False
    axis = 0 if conv.op == "Conv" else 1
    p64 = p.astype(np.float64)
    new_weight = np.moveaxis(np.tensordot(p64, weight.astype(np.float64), axes=([1], [axis])), 0, axis)
    new_bias = None if bias is None else p64 @ bias.astype(np.float64)
    if shift is not None:
        new_bias = shift if new_bias is None else new_bias + shift
    set_conv_params(conv, state.namer, new_weight.astype(weight.dtype),
                    None if new_bias is None else new_bias.astype(weight.dtype))
    conv.outputs[0] = stored
    return True


def _fold_p_through_affine(state: FoldState, last: gs.Node, p: np.ndarray, stored: gs.Variable, rank: int) -> bool:
    """Rule a': X = a * Conv(...) + b through per-channel Mul/Add/Sub/Div by constants, each
    tensor of the chain read only by the next op: W' = P diag(a) W, b' = P (a * bias + b)."""
    chain, node = [], last
    while node is not None and node.op in FOLD_AFFINE_OPS:
        data = [t for t in node.inputs if constant_value(t) is None]
        if len(data) != 1 or len(node.inputs) != 2 or node.op in ("Sub", "Div") and node.inputs[0] is not data[0]:
            return False
        factor = _per_channel(constant_value(node.inputs[1 - node.inputs.index(data[0])]), rank)
        if factor is None or len(data[0].outputs) != 1 or len(data[0].inputs) != 1:
            return False
        chain.append((node, factor))
        node = data[0].inputs[0]
    channels = p.shape[1]
    if not chain or node.op != "Conv" or any(factor.size not in (1, channels) for _, factor in chain):
        return False
    scale, shift = np.ones(channels), np.zeros(channels)
    for op_node, factor in reversed(chain):  # compose from the conv outwards
        if op_node.op == "Mul":
            scale, shift = scale * factor, shift * factor
        elif op_node.op == "Div":
            scale, shift = scale / factor, shift / factor
        else:
            shift = shift + factor if op_node.op == "Add" else shift - factor
    p64 = p.astype(np.float64)
    if not _fold_p_into_conv(state, node, p64 * scale, stored, shift=p64 @ shift):
        return False
    for op_node, _ in chain:  # dead now: cleanup removes them
        op_node.inputs.clear()
        op_node.outputs.clear()
    return True


def _per_channel(value: np.ndarray | None, rank: int) -> np.ndarray | None:
    """A constant that broadcasts along the channel axis only (a scalar, [C], [1, C, 1, 1], ...)
    as a flat float64 vector; None for any other shape."""
    if value is None or value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if value.ndim == 1 and value.size > 1:
        return None  # [C] broadcasts along the last axis, not the channels
    if any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    return value.astype(np.float64).reshape(-1)


# ---------------------------------------------------------------- rule h for graph outputs, subgraphs

def _expand_graph_outputs(state: FoldState) -> None:
    """Rule h for graph outputs: an explicit U conv writes the original output tensor."""
    for out in state.graph.outputs:
        pend = state.pending.get(out.name)
        if pend is None:
            continue
        conv1x1(state.graph, state.namer, f"fmc/U/{out.name}", pend.stored, pend.U, out, pend.rank)
        state.record(pend.origins, f"output:{out.name}", "explicit")


def _refuse_subgraph_reads(state: FoldState) -> None:
    """Nested graphs (If/Loop/Scan bodies) are not rewritten: they must not read a changed tensor."""
    for name in _names_read_by_subgraphs(state.graph.nodes) & set(state.pending):
        raise UnsupportedOpError(f"cannot fold projections: {name!r} is read inside an If/Loop/Scan body")


def _names_read_by_subgraphs(nodes: list[gs.Node]) -> set[str]:
    names: set[str] = set()
    for node in nodes:
        for value in node.attrs.values():
            for sub in value if isinstance(value, list) else [value]:
                if isinstance(sub, gs.Graph):
                    names |= {t.name for n in sub.nodes for t in n.inputs} | _names_read_by_subgraphs(sub.nodes)
    return names



# ---------------------------------------------------------------- rule g

def _try_residual(state: FoldState, add: gs.Node) -> bool:
    """Rule g: P_out (a + b) with a, b pending or single-use group=1 convs; True if applied."""
    if add.op != "Add" or len(add.inputs) != 2 or add.outputs[0].name not in state.projections:
        return False
    name = add.outputs[0].name
    projection = state.projections[name]
    dtype, rank = state.infos[name].dtype, state.infos[name].rank
    kinds = [_residual_kind(state, add, t, projection.C, rank) for t in add.inputs]
    if None in kinds or "pending" not in kinds:
        return False
    stored = new_variable(state.namer, f"{name}/fmc_k{projection.k}")
    for i, (tensor, kind) in enumerate(zip(list(add.inputs), kinds, strict=True)):
        part = new_variable(state.namer, f"{name}/fmc_part{i}")
        if kind == "pending":
            pend = state.pending[tensor.name]
            matrix = projection.P.astype(np.float64) @ pend.U.astype(np.float64)
            conv1x1(state.graph, state.namer, f"fmc/P/{name}/skip", pend.stored, matrix.astype(dtype), part, rank)
            state.record(pend.origins, node_label(add), "residual")
        else:
            _fold_p_into_conv(state, tensor.inputs[0], projection.P, part)
        add.inputs[i] = part
    add.outputs[0] = stored
    state.pending[name] = Pending(stored, projection.U.astype(dtype), [name], rank)
    state.data[name] = {"stored": stored.name, "producer": "residual", "consumers": {}}
    return True


def _residual_kind(state: FoldState, add: gs.Node, tensor: gs.Tensor, channels: int, rank: int) -> str | None:
    pend = state.pending.get(tensor.name)
    if pend is not None:
        return "pending" if pend.U.shape[0] == channels and pend.rank == rank else None
    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    single_use = len(tensor.outputs) == 1 and tensor.outputs[0] is add
    if producer is None or not single_use or tensor in state.graph.outputs:
        return None
    weight = group_one_conv_weight(producer)
    if weight is None or (conv_bias(producer) is None and optional_input(producer, 2) is not None):
        return None
    out_channels = weight.shape[0] if producer.op == "Conv" else weight.shape[1]
    return "conv" if out_channels == channels and weight.ndim == rank else None

