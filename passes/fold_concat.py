"""The Concat rules of the fold pass (specified in passes/fold.py's docstring): e (channel
axis, a block-diagonal U), e' (a projected Concat along another axis) and rule c for a
Concat along another axis whose inputs all carry the same U.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .fold_state import FoldState, Pending, channel_axes, node_label
from .graphutil import constant_value, conv1x1, group_one_conv_weight, new_variable


def merge_concat(state: FoldState, node: gs.Node) -> bool:
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
    state.record(origins, node_label(node), "concat")
    return True


def push_concat(state: FoldState, node: gs.Node) -> bool:
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
    state.record(origins, node_label(node), "pushed")
    return True


def _same_u_spatial_concat(state: FoldState, node: gs.Node) -> list[Pending] | None:
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


def try_projected_concat(state: FoldState, node: gs.Node) -> bool:
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
            state.record(pend.origins, node_label(node), "concat")
        node.inputs[i] = part
    stored = new_variable(state.namer, f"{name}/fmc_k{projection.k}")
    node.outputs[0] = stored
    state.pending[name] = Pending(stored, projection.U.astype(info.dtype), [name], info.rank)
    state.data[name] = {"stored": stored.name, "producer": "concat", "consumers": {}}
    return True


def _projected_concat_applies(state: FoldState, node: gs.Node) -> bool:
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

