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
   (weight U) right before that consumer, one per consumer.

New nodes and initializers are named fmc/...; tensors whose channel count changes
get new names and no value_info. Dead nodes and initializers are removed; opset,
ir_version, graph inputs and outputs are kept. result.data maps each projected
tensor to {"stored", "producer", "consumers": {node or output: action}}.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from fmcompress.errors import UnsupportedOpError
from fmcompress.featuremaps import Projection

from .graphutil import (
    Namer,
    constant_value,
    conv1x1,
    conv_bias,
    group_one_conv_weight,
    new_variable,
    optional_constant,
    optional_input,
    set_conv_params,
)
from .insert import MapInfo, ProjectionPass

SIMPLE_PUSH_OPS = ("GlobalAveragePool", "AveragePool", "Identity")


@dataclass
class Pending:
    """A tensor of the original graph that now stands for U @ stored (channel mixing per pixel)."""

    stored: gs.Tensor
    U: np.ndarray
    origins: list[str]  # the projected maps it comes from (for the report)
    rank: int = 4  # of both the original and the stored tensor

    @property
    def channel_axes(self) -> tuple[int, int]:
        return channel_axes(self.rank)


def channel_axes(rank: int) -> tuple[int, int]:
    """The channel axis of an N, C, spatial... tensor, positive and negative."""
    return 1, 1 - rank


@dataclass
class _State:
    graph: gs.Graph
    namer: Namer
    projections: dict[str, Projection]
    infos: dict[str, MapInfo]
    pending: dict[str, Pending] = field(default_factory=dict)
    data: dict[str, dict] = field(default_factory=dict)

    def record(self, origins: list[str], where: str, action: str) -> None:
        for origin in origins:
            self.data[origin]["consumers"][where] = action


class FoldProjectionsPass(ProjectionPass):
    name = "fold-projections"

    def _rewrite(self, graph: gs.Graph, projections: dict[str, Projection],
                 infos: dict[str, MapInfo]) -> dict[str, dict]:
        graph.toposort()
        state = _State(graph, Namer(graph), projections, infos)
        for node in list(graph.nodes):
            _visit(state, node)
        _expand_graph_outputs(state)
        _refuse_subgraph_reads(state)
        return state.data


# ---------------------------------------------------------------- the walk

def _visit(state: _State, node: gs.Node) -> None:
    output_names = [out.name for out in node.outputs]
    if _try_residual(state, node) or _try_projected_concat(state, node):
        return
    if any(t.name in state.pending for t in node.inputs):
        _rewrite_consumer(state, node)
    for name in output_names:
        if name in state.projections:
            _start_projection(state, name, node)


def _rewrite_consumer(state: _State, node: gs.Node) -> None:
    """Apply the first of rules b-f that fits `node`, else h."""
    pending_slots = [i for i, t in enumerate(node.inputs) if t.name in state.pending]
    only_first = pending_slots == [0]
    first = state.pending.get(node.inputs[0].name) if node.inputs else None
    if only_first and _fold_u_into_conv(state, node, first):
        return
    if only_first and _push_through(state, node, first):
        return
    if only_first and node.op in ("Shape", "Size"):
        _rewrite_shape(state, node, first)
        return
    if node.op == "Concat" and (_merge_concat(state, node) or _push_concat(state, node)):
        return
    _explicit_u(state, node)


def _start_projection(state: _State, name: str, producer: gs.Node) -> None:
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
    elif _fold_p_into_conv(state, producer, projection.P, stored):
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


def _fold_p_into_conv(state: _State, conv: gs.Node, p: np.ndarray, stored: gs.Variable) -> bool:
    weight = group_one_conv_weight(conv)
    bias = conv_bias(conv)
    if weight is None or (bias is None and optional_input(conv, 2) is not None):
        return False
    axis = 0 if conv.op == "Conv" else 1
    p64 = p.astype(np.float64)
    new_weight = np.moveaxis(np.tensordot(p64, weight.astype(np.float64), axes=([1], [axis])), 0, axis)
    new_bias = None if bias is None else p64 @ bias.astype(np.float64)
    set_conv_params(conv, state.namer, new_weight.astype(weight.dtype),
                    None if new_bias is None else new_bias.astype(weight.dtype))
    conv.outputs[0] = stored
    return True


# ---------------------------------------------------------------- rules b-f, h

def _fold_u_into_conv(state: _State, conv: gs.Node, pend: Pending) -> bool:
    """Rule b: W'[o, j] = sum_c W[o, c] U[c, j] (ConvTranspose: input-channel axis 0)."""
    weight = group_one_conv_weight(conv)
    if weight is None:
        return False
    u64 = pend.U.astype(np.float64)
    axis = 1 if conv.op == "Conv" else 0
    new_weight = np.moveaxis(np.tensordot(weight.astype(np.float64), u64, axes=([axis], [0])), -1, axis)
    bias = constant_value(conv.inputs[2]) if optional_input(conv, 2) is not None else None
    set_conv_params(conv, state.namer, new_weight.astype(weight.dtype), bias)
    conv.inputs[0] = pend.stored
    state.record(pend.origins, _label(conv), "folded")
    return True


def _push_through(state: _State, node: gs.Node, pend: Pending) -> bool:
    """Rules c and d: the op commutes with U; its outputs carry U (or row blocks of U)."""
    row_blocks = _split_channel_blocks(node, pend)
    if row_blocks is not None:  # rule d: the Split disappears
        for out, (start, stop) in zip(node.outputs, row_blocks, strict=True):
            state.pending[out.name] = Pending(pend.stored, pend.U[start:stop], pend.origins, pend.rank)
        state.record(pend.origins, _label(node), "dropped (channel split)")
        node.inputs.clear()
        node.outputs.clear()
        return True
    if not _commutes_with_channel_mixing(state, node, pend):
        return False
    k = pend.U.shape[1]
    state.record(pend.origins, _label(node), "pushed")
    while node.op == "Dropout" and len(node.outputs) > 1:
        node.outputs.pop()  # the unused mask would have the wrong channel count
    node.inputs[0] = pend.stored
    for i, out in enumerate(list(node.outputs)):
        renamed = new_variable(state.namer, f"{out.name}/fmc_k{k}")
        node.outputs[i] = renamed
        state.pending[out.name] = Pending(renamed, pend.U, pend.origins, pend.rank)
    return True


def _commutes_with_channel_mixing(state: _State, node: gs.Node, pend: Pending) -> bool:
    """Rule c's conditions; may rewrite a Resize `sizes` input to k channels."""
    if node.op in SIMPLE_PUSH_OPS:
        return True
    if node.op == "Dropout":
        known, training = optional_constant(node, 2)
        mask = node.outputs[1] if len(node.outputs) > 1 else None
        mask_used = mask is not None and (bool(mask.outputs) or mask in state.graph.outputs)
        return known and (training is None or not bool(training)) and not mask_used
    if node.op == "Pad":
        return _pad_spares_channels(node, pend.rank)
    if node.op in ("Resize", "Upsample"):
        return _resize_spares_channels(state, node, pend)
    if node.op == "Slice":
        axes = _slice_axes(node)
        return axes is not None and not set(axes) & set(pend.channel_axes)
    if node.op == "Split":
        axis = int(node.attrs.get("axis", 0))
        return axis not in pend.channel_axes
    return False


def _pad_spares_channels(node: gs.Node, rank: int) -> bool:
    if node.attrs.get("mode", "constant") != "constant":
        return False
    if "pads" in node.attrs:  # opset < 11
        pads, value, axes = np.asarray(node.attrs["pads"]), node.attrs.get("value", 0.0), None
    else:
        known_pads, pads = optional_constant(node, 1)
        known_value, value = optional_constant(node, 2)
        known_axes, axes = optional_constant(node, 3)
        if not (known_pads and known_value and known_axes) or pads is None:
            return False
    if value is not None and np.any(np.asarray(value) != 0):
        return False
    axes_list = list(range(rank)) if axes is None else [int(a) % rank for a in np.ravel(axes)]
    pads = np.ravel(pads).reshape(2, len(axes_list))
    return all(not np.any(pads[:, i]) for i, axis in enumerate(axes_list) if axis == 1)


def _resize_spares_channels(state: _State, node: gs.Node, pend: Pending) -> bool:
    channels, k = pend.U.shape
    if not _resize_is_linear(node):
        return False
    axes = node.attrs.get("axes")
    axes_list = list(range(pend.rank)) if axes is None else [int(a) % pend.rank for a in axes]
    if 1 not in axes_list:
        return True
    position = axes_list.index(1)
    if node.op == "Upsample" and "scales" in node.attrs:
        return float(node.attrs["scales"][position]) == 1.0
    scales_index = 1 if node.op == "Upsample" or state.graph.opset < 11 else 2  # Resize-10: (X, scales)
    known_scales, scales = optional_constant(node, scales_index)
    known_sizes, sizes = optional_constant(node, 3) if scales_index == 2 else (True, None)
    if not (known_scales and known_sizes):
        return False
    if scales is not None and scales.size:
        return float(np.ravel(scales)[position]) == 1.0
    if sizes is None or int(np.ravel(sizes)[position]) != channels:
        return False
    if node.attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        return False
    new_sizes = np.array(np.ravel(sizes), dtype=np.int64)
    new_sizes[position] = k
    node.inputs[3] = gs.Constant(state.namer(f"fmc/{_label(node)}/sizes"), new_sizes)
    return True


def _resize_is_linear(node: gs.Node) -> bool:
    """Resize is linear in its input except where tf_crop_and_resize writes a non-zero
    extrapolation value outside the crop: Resize(U T) has e there, U Resize(T) has U (e...e)."""
    if node.op != "Resize" or node.attrs.get("coordinate_transformation_mode") != "tf_crop_and_resize":
        return True
    return float(node.attrs.get("extrapolation_value", 0.0)) == 0.0


def _slice_axes(node: gs.Node) -> list[int] | None:
    """The axes a Slice cuts, or None when they are not constant."""
    if "starts" in node.attrs:  # opset < 10
        axes = node.attrs.get("axes")
        return list(axes) if axes is not None else list(range(len(node.attrs["starts"])))
    known_starts, starts = optional_constant(node, 1)
    known_axes, axes = optional_constant(node, 3)
    if not (known_starts and known_axes) or starts is None:
        return None
    return [int(a) for a in np.ravel(axes)] if axes is not None else list(range(np.ravel(starts).size))


def _split_channel_blocks(node: gs.Node, pend: Pending) -> list[tuple[int, int]] | None:
    """Row ranges of a Split along the channel axis, or None if it is not one."""
    if node.op != "Split" or int(node.attrs.get("axis", 0)) not in pend.channel_axes:
        return None
    channels = pend.U.shape[0]
    if "split" in node.attrs:
        sizes = [int(s) for s in node.attrs["split"]]
    else:
        known, value = optional_constant(node, 1)
        if not known:
            return None
        count = len(node.outputs)
        if value is not None:
            sizes = [int(s) for s in np.ravel(value)]
        elif channels % count == 0:
            sizes = [channels // count] * count
        else:  # opset 18 uneven split: the last chunk is smaller
            chunk = -(-channels // count)
            sizes = [chunk] * (count - 1) + [channels - chunk * (count - 1)]
    if sum(sizes) != channels or len(sizes) != len(node.outputs):
        return None
    bounds = np.cumsum([0, *sizes])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _rewrite_shape(state: _State, node: gs.Node, pend: Pending) -> None:
    """Rule f: Shape/Size of the narrow tensor, corrected back to C channels."""
    channels, k = pend.U.shape
    state.record(pend.origins, _label(node), "shape")
    result = node.outputs[0]
    narrow = new_variable(state.namer, f"{result.name}/fmc_narrow")
    node.inputs[0] = pend.stored
    node.outputs[0] = narrow
    base = f"fmc/shape/{_label(node)}"
    if node.op == "Size":
        scaled = new_variable(state.namer, f"{base}/div")
        _append(state, "Div", f"{base}/div", [narrow, _int64(state, f"{base}/k", k)], scaled)
        _append(state, "Mul", f"{base}/mul", [scaled, _int64(state, f"{base}/C", channels)], result)
    else:
        start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
        dims = list(range(pend.rank))[slice(start, None if end is None else int(end))]
        keep = np.array([0 if d == 1 else 1 for d in dims], dtype=np.int64)
        fix = np.array([channels if d == 1 else 0 for d in dims], dtype=np.int64)
        masked = new_variable(state.namer, f"{base}/mask")
        _append(state, "Mul", f"{base}/mask", [narrow, gs.Constant(state.namer(f"{base}/keep"), keep)], masked)
        _append(state, "Add", f"{base}/fix", [masked, gs.Constant(state.namer(f"{base}/C"), fix)], result)


def _merge_concat(state: _State, node: gs.Node) -> bool:
    """Rule e: Concat the narrow tensors and carry a block-diagonal U, if it pays."""
    pends = [state.pending.get(t.name) for t in node.inputs]
    first = next(p for p in pends if p is not None)
    if int(node.attrs.get("axis", 0)) not in first.channel_axes:
        return False
    result = node.outputs[0]
    if result.name not in state.projections and not _all_consumers_fold(state.graph, result):
        return False
    dtype = first.U.dtype
    blocks = [np.eye(_channels_of(t, first.rank) or 0, dtype=dtype) if p is None else p.U
              for t, p in zip(node.inputs, pends, strict=True)]
    if any(block.size == 0 for block in blocks):
        return False  # an untouched input of unknown width: leave the concat alone
    origins = list(dict.fromkeys(o for p in pends if p is not None for o in p.origins))
    for i, pend in enumerate(pends):
        if pend is not None:
            node.inputs[i] = pend.stored
    u_merged = _block_diag(blocks)
    merged = new_variable(state.namer, f"{result.name}/fmc_k{u_merged.shape[1]}")
    node.outputs[0] = merged
    state.pending[result.name] = Pending(merged, u_merged, origins, first.rank)
    state.record(origins, _label(node), "concat")
    return True


def _push_concat(state: _State, node: gs.Node) -> bool:
    """Rule c for Concat along a non-channel axis: every input carries the same U."""
    pends = _same_u_spatial_concat(state, node)
    if pends is None:
        return False
    first = pends[0]
    origins = list(dict.fromkeys(o for p in pends for o in p.origins))
    for i, pend in enumerate(pends):
        node.inputs[i] = pend.stored
    result = node.outputs[0]
    renamed = new_variable(state.namer, f"{result.name}/fmc_k{first.U.shape[1]}")
    node.outputs[0] = renamed
    state.pending[result.name] = Pending(renamed, first.U, origins, first.rank)
    state.record(origins, _label(node), "pushed")
    return True


def _same_u_spatial_concat(state: _State, node: gs.Node) -> list[Pending] | None:
    """The pending inputs of a Concat along a non-channel axis if all of them carry one U, else None."""
    pends = [state.pending.get(t.name) for t in node.inputs]
    if node.op != "Concat" or not pends or any(p is None for p in pends):
        return None
    found = [p for p in pends if p is not None]
    first = found[0]
    if int(node.attrs.get("axis", 0)) in first.channel_axes:
        return None
    same = all(p.rank == first.rank and p.U.shape == first.U.shape and np.array_equal(p.U, first.U) for p in found)
    return found if same else None


def _try_projected_concat(state: _State, node: gs.Node) -> bool:
    """Rule e': P Concat(U_i T_i, a_j) = Concat((P U_i) T_i, P a_j) along a non-channel axis."""
    if not _projected_concat_applies(state, node):
        return False
    name = node.outputs[0].name
    info, projection = state.infos[name], state.projections[name]
    pends = [state.pending.get(t.name) for t in node.inputs]
    p64 = projection.P.astype(np.float64)
    for i, (tensor, pend) in enumerate(zip(list(node.inputs), pends, strict=True)):
        part = new_variable(state.namer, f"{name}/fmc_part{i}")
        source, matrix = (tensor, p64) if pend is None else (pend.stored, p64 @ pend.U.astype(np.float64))
        conv1x1(state.graph, state.namer, f"fmc/P/{name}/{i}", source, matrix.astype(info.dtype), part, info.rank)
        if pend is not None:
            state.record(pend.origins, _label(node), "concat")
        node.inputs[i] = part
    stored = new_variable(state.namer, f"{name}/fmc_k{projection.k}")
    node.outputs[0] = stored
    state.pending[name] = Pending(stored, projection.U.astype(info.dtype), [name], info.rank)
    state.data[name] = {"stored": stored.name, "producer": "concat", "consumers": {}}
    return True


def _projected_concat_applies(state: _State, node: gs.Node) -> bool:
    """Rule e' conditions: a projected Concat along a non-channel axis, some (not all same-U) inputs pending."""
    if node.op != "Concat" or not node.outputs or node.outputs[0].name not in state.projections:
        return False
    name = node.outputs[0].name
    rank, channels = state.infos[name].rank, state.projections[name].C
    pends = [p for p in (state.pending.get(t.name) for t in node.inputs) if p is not None]
    if not pends or _same_u_spatial_concat(state, node) is not None:
        return False
    if int(node.attrs.get("axis", 0)) in channel_axes(rank):
        return False
    return all(p.rank == rank and p.U.shape[0] == channels for p in pends)


def _block_diag(blocks: list[np.ndarray]) -> np.ndarray:
    rows, cols = sum(b.shape[0] for b in blocks), sum(b.shape[1] for b in blocks)
    out = np.zeros((rows, cols), dtype=blocks[0].dtype)
    r = c = 0
    for block in blocks:
        out[r:r + block.shape[0], c:c + block.shape[1]] = block
        r, c = r + block.shape[0], c + block.shape[1]
    return out


def _channels_of(tensor: gs.Tensor, rank: int) -> int | None:
    """Channel count of an untouched concat input: declared shape, else its conv's weight."""
    if tensor.shape is not None and len(tensor.shape) == rank and isinstance(tensor.shape[1], int):
        return int(tensor.shape[1])
    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    weight = constant_value(producer.inputs[1]) if producer is not None and producer.op == "Conv" else None
    return int(weight.shape[0]) if weight is not None and weight.ndim == rank else None


def _all_consumers_fold(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    if tensor in graph.outputs or not tensor.outputs:
        return False
    return all(group_one_conv_weight(c) is not None and c.inputs[0] is tensor
               and all(t is not tensor for t in c.inputs[1:]) for c in tensor.outputs)


def _explicit_u(state: _State, node: gs.Node) -> None:
    """Rule h: one 1x1 U conv right before this consumer for each pending input."""
    expanded: dict[str, gs.Variable] = {}
    for i, tensor in enumerate(list(node.inputs)):
        pend = state.pending.get(tensor.name)
        if pend is None:
            continue
        if tensor.name not in expanded:
            full = new_variable(state.namer, f"{tensor.name}/fmc_u")
            conv1x1(state.graph, state.namer, f"fmc/U/{tensor.name}", pend.stored, pend.U, full, pend.rank)
            expanded[tensor.name] = full
            state.record(pend.origins, _label(node), "explicit")
        node.inputs[i] = expanded[tensor.name]


def _expand_graph_outputs(state: _State) -> None:
    """Rule h for graph outputs: an explicit U conv writes the original output tensor."""
    for out in state.graph.outputs:
        pend = state.pending.get(out.name)
        if pend is None:
            continue
        conv1x1(state.graph, state.namer, f"fmc/U/{out.name}", pend.stored, pend.U, out, pend.rank)
        state.record(pend.origins, f"output:{out.name}", "explicit")


def _refuse_subgraph_reads(state: _State) -> None:
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

def _try_residual(state: _State, add: gs.Node) -> bool:
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
            state.record(pend.origins, _label(add), "residual")
        else:
            _fold_p_into_conv(state, tensor.inputs[0], projection.P, part)
        add.inputs[i] = part
    add.outputs[0] = stored
    state.pending[name] = Pending(stored, projection.U.astype(dtype), [name], rank)
    state.data[name] = {"stored": stored.name, "producer": "residual", "consumers": {}}
    return True


def _residual_kind(state: _State, add: gs.Node, tensor: gs.Tensor, channels: int, rank: int) -> str | None:
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


# ---------------------------------------------------------------- small builders

def _label(node: gs.Node) -> str:
    """The node's name for the report; unnamed nodes are named by their first output."""
    return node.name or f"{node.op}->{node.outputs[0].name if node.outputs else '?'}"


def _append(state: _State, op: str, name: str, inputs: list[gs.Tensor], output: gs.Variable) -> None:
    state.graph.nodes.append(gs.Node(op, name=state.namer(name), inputs=inputs, outputs=[output]))


def _int64(state: _State, name: str, value: int) -> gs.Constant:
    return gs.Constant(state.namer(name), np.array(value, dtype=np.int64))

