"""Rules b, c, d, f and h of the fold pass (specified in passes/fold.py's docstring): U folded
into a consumer conv, pushed through ops that commute with channel mixing (Concat aside:
fold_concat.py), dropped by a channel Split, corrected for Shape/Size, else made explicit.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .fold_state import FoldState, Pending, node_label
from .graphutil import (
    constant_value,
    conv1x1,
    group_one_conv_weight,
    new_variable,
    optional_constant,
    optional_input,
    set_conv_params,
)
from .ops import FOLD_SIMPLE_PUSH_OPS, STORED_BINARY_OPS, STORED_UNARY_OPS


def fold_u_into_conv(state: FoldState, conv: gs.Node, pend: Pending) -> bool:
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
    state.record(pend.origins, node_label(conv), "folded")
    return True


def push_through(state: FoldState, node: gs.Node, pend: Pending) -> bool:
    """Rules c and d: the op commutes with U; its outputs carry U (or row blocks of U)."""
    row_blocks = _split_channel_blocks(node, pend)
    if row_blocks is not None:  # rule d: the Split disappears
        for out, (start, stop) in zip(node.outputs, row_blocks, strict=True):
            state.pending[out.name] = Pending(pend.stored, pend.U[start:stop], pend.origins, pend.rank)
        state.record(pend.origins, node_label(node), "dropped (channel split)")
        node.inputs.clear()
        node.outputs.clear()
        return True
    if not _commutes_with_channel_mixing(state, node, pend):
        return False
    k = pend.U.shape[1]
    state.record(pend.origins, node_label(node), "pushed")
    while node.op == "Dropout" and len(node.outputs) > 1:
        node.outputs.pop()  # the unused mask would have the wrong channel count
    node.inputs[0] = pend.stored
    for i, out in enumerate(list(node.outputs)):
        renamed = new_variable(state.namer, f"{out.name}/fmc_k{k}")
        node.outputs[i] = renamed
        state.pending[out.name] = Pending(renamed, pend.U, pend.origins, pend.rank)
    return True


def _commutes_with_channel_mixing(state: FoldState, node: gs.Node, pend: Pending) -> bool:
    """Rule c's conditions; may rewrite a Resize `sizes` input to k channels."""
    if node.op in FOLD_SIMPLE_PUSH_OPS:
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


def _resize_spares_channels(state: FoldState, node: gs.Node, pend: Pending) -> bool:
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
    node.inputs[3] = gs.Constant(state.namer(f"fmc/{node_label(node)}/sizes"), new_sizes)
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


def rewrite_shape(state: FoldState, node: gs.Node, pend: Pending) -> None:
    """Rule f: Shape/Size of the narrow tensor, corrected back to C channels."""
    channels, k = pend.U.shape
    state.record(pend.origins, node_label(node), "shape")
    result = node.outputs[0]
    narrow = new_variable(state.namer, f"{result.name}/fmc_narrow")
    node.inputs[0] = pend.stored
    node.outputs[0] = narrow
    base = f"fmc/shape/{node_label(node)}"
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


def explicit_u(state: FoldState, node: gs.Node) -> None:
    """Rule h: one 1x1 U conv right before this consumer for each pending input; rule h':
    one for all the readers of a pending tensor that converge as one activation (HardSwish
    or x * sigmoid(x) built from primitives, reading a map projected before it)."""
    expanded: dict[str, gs.Variable] = {}
    for i, tensor in enumerate(list(node.inputs)):
        pend = state.pending.get(tensor.name)
        if pend is None:
            continue
        if tensor.name not in expanded:
            shared = state.shared_u.get(tensor.name)
            if shared is None:
                shared = new_variable(state.namer, f"{tensor.name}/fmc_u")
                conv1x1(state.graph, state.namer, f"fmc/U/{tensor.name}", pend.stored, pend.U, shared, pend.rank)
                if converging_readers(tensor, exclude=pend.stored):
                    state.shared_u[tensor.name] = shared
            expanded[tensor.name] = shared
            state.record(pend.origins, node_label(node), "explicit")
        node.inputs[i] = expanded[tensor.name]


def converging_readers(tensor: gs.Tensor, exclude: gs.Tensor | None = None, max_nodes: int = 6) -> bool:
    """Several elementwise readers of `tensor` (the node writing `exclude` aside: an explicit P)
    that, with nodes fed only by them and constants, end in one tensor that is all the region
    passes on (the stored view's converging region)."""
    readers = [r for r in tensor.outputs if exclude is None or not any(o is exclude for o in r.outputs)]
    if len(readers) < 2:
        return False
    region: list[gs.Node] = []
    inside, queue = {tensor.name}, readers
    while queue and len(region) < max_nodes:
        ready = [n for n in queue if all(t.name in inside for t in _data_inputs(n))]
        if not ready or any(n.op not in STORED_UNARY_OPS | STORED_BINARY_OPS for n in ready):
            return False
        node = ready[0]
        queue = [n for n in queue if n is not node]
        region.append(node)
        inside.update(out.name for out in node.outputs)
        members = {id(n) for n in region}
        leaving = [out for n in region for out in n.outputs if any(id(r) not in members for r in out.outputs)]
        if not queue and [out.name for out in leaving] == [node.outputs[0].name]:
            return True
        queued = {id(n) for n in queue}
        queue += [r for r in node.outputs[0].outputs if id(r) not in members and id(r) not in queued]
    return False


def _data_inputs(node: gs.Node) -> list[gs.Tensor]:
    return [t for t in node.inputs if not isinstance(t, gs.Constant)
            and not (t.inputs and t.inputs[0].op == "Constant")]


def _append(state: FoldState, op: str, name: str, inputs: list[gs.Tensor], output: gs.Variable) -> None:
    state.graph.nodes.append(gs.Node(op, name=state.namer(name), inputs=inputs, outputs=[output]))


def _int64(state: FoldState, name: str, value: int) -> gs.Constant:
    return gs.Constant(state.namer(name), np.array(value, dtype=np.int64))

