"""Shape, layout and indexing ops. Shape data stays on the CPU as int64 tensors."""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from ..errors import InputError
from .registry import (
    NodeCtx,
    aligned,
    aligned_all,
    axis_list,
    ints,
    normalize_axes,
    op,
    torch_dtype,
)


@op("Shape")
def shape(ctx: NodeCtx, x: torch.Tensor) -> torch.Tensor:
    dims = list(x.shape)
    start, end = ctx.attr("start", 0), ctx.attr("end")
    return torch.tensor(dims[start:end] if end is not None else dims[start:], dtype=torch.int64)


@op("Size")
def size(ctx: NodeCtx, x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(x.numel(), dtype=torch.int64)


@op("Cast")
def cast(ctx: NodeCtx, x: torch.Tensor) -> torch.Tensor:
    target = torch_dtype(ctx, ctx.attr("to"))
    if not target.is_floating_point and x.is_floating_point() and target != torch.bool:
        x = torch.trunc(x)  # ONNX float -> int truncates toward zero, like C
    return x.to(target)


def _cast_check(ctx: NodeCtx) -> str | None:
    return None if ctx.attr("to") in _CASTABLE else "Cast(to a non-numeric type)"


_CASTABLE = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
             onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.INT16,
             onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT8,
             onnx.TensorProto.BOOL}
op("Cast", check=_cast_check)(cast)


@op("CastLike")
def cast_like(ctx: NodeCtx, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.to(like.dtype)


@op("ConstantOfShape")
def constant_of_shape(ctx: NodeCtx, dims: torch.Tensor) -> torch.Tensor:
    value = ctx.cache.get("value")
    if value is None:
        proto = ctx.attr("value")
        array = onnx.numpy_helper.to_array(proto) if proto is not None else np.zeros(1, np.float32)
        value = ctx.cache["value"] = (array.reshape(-1)[0].item(), proto.data_type if proto else 1)
    fill, onnx_type = value
    return torch.full(ints(dims), fill, dtype=torch_dtype(ctx, onnx_type), device=dims.device)


@op("Reshape")
def reshape(ctx: NodeCtx, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    dims = ints(target)
    if not ctx.attr("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    if -1 not in dims and math.prod(dims) != x.numel():
        _raise_pinned(ctx, x, dims)
    return x.reshape(dims)


def _raise_pinned(ctx: NodeCtx, x: torch.Tensor, dims: list[int]) -> None:
    batch = x.shape[0] if x.dim() else 1
    if dims and dims[0] == 1 and batch > 1 and x.numel() == batch * math.prod(dims):
        raise InputError(f"the model's constant shape {dims} pins batch size to 1 at node "
                         f"{ctx.name!r} (Reshape); got batch {batch}")
    raise InputError(f"node {ctx.name!r} (Reshape) cannot reshape {list(x.shape)} to {dims}")


@op("Flatten")
def flatten(ctx: NodeCtx, x: torch.Tensor) -> torch.Tensor:
    axis = normalize_axes([ctx.attr("axis", 1)], x.dim())[0]
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@op("Transpose")
def transpose(ctx: NodeCtx, x: torch.Tensor) -> torch.Tensor:
    perm = ctx.attr("perm")
    return x.permute(perm if perm is not None else list(range(x.dim() - 1, -1, -1)))


@op("Squeeze")
def squeeze(ctx: NodeCtx, x: torch.Tensor, axes_input: torch.Tensor | None = None) -> torch.Tensor:
    axes = axis_list(ctx, axes_input, 13)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(normalize_axes(axes, x.dim()))) if axes else x


@op("Unsqueeze")
def unsqueeze(ctx: NodeCtx, x: torch.Tensor, axes_input: torch.Tensor | None = None) -> torch.Tensor:
    axes = axis_list(ctx, axes_input, 13) or []
    for axis in sorted(normalize_axes(axes, x.dim() + len(axes))):
        x = x.unsqueeze(axis)
    return x


@op("Concat")
def concat(ctx: NodeCtx, *xs: torch.Tensor) -> torch.Tensor:
    xs = [x for x in xs if x is not None]
    return torch.cat(aligned_all(xs), dim=ctx.attr("axis"))


@op("Split")
def split(ctx: NodeCtx, x: torch.Tensor, sizes_input: torch.Tensor | None = None):
    axis = ctx.attr("axis", 0)
    sizes = ints(sizes_input) if ctx.opset >= 13 else [int(s) for s in ctx.attr("split", [])]
    if not sizes:
        parts = ctx.attr("num_outputs", ctx.n_outputs)
        sizes = -(-x.shape[axis] // parts)  # equal chunks, the last one smaller (opset 18)
    return tuple(torch.split(x, sizes, dim=axis))


@op("Slice")
def slice_(ctx: NodeCtx, x: torch.Tensor, starts: torch.Tensor | None = None,
           ends: torch.Tensor | None = None, axes: torch.Tensor | None = None,
           steps: torch.Tensor | None = None) -> torch.Tensor:
    if ctx.opset < 10:
        begin, end, dims, step = ctx.attr("starts"), ctx.attr("ends"), ctx.attr("axes"), None
    else:
        begin, end, dims, step = ints(starts), ints(ends), ints(axes) or None, ints(steps) or None
    dims = normalize_axes(dims if dims is not None else range(len(begin)), x.dim())
    step = step or [1] * len(begin)
    index: list[slice] = [slice(None)] * x.dim()
    for axis, b, e, s in zip(dims, begin, end, step, strict=False):
        if s < 0:  # torch has no negative steps: gather the indices Python's slice rules give
            picked = range(*slice(b, e, s).indices(x.shape[axis]))
            x = x.index_select(axis, torch.tensor(picked, dtype=torch.long, device=x.device))
        else:
            index[axis] = slice(*slice(b, e, s).indices(x.shape[axis]))
    return x[tuple(index)]


def _fix_negative(indices: torch.Tensor, size: int) -> torch.Tensor:
    return torch.where(indices < 0, indices + size, indices)


@op("Gather")
def gather(ctx: NodeCtx, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    axis = normalize_axes([ctx.attr("axis", 0)], x.dim())[0]
    x, indices = aligned(x, indices)
    flat = _fix_negative(indices.reshape(-1).long(), x.shape[axis])
    picked = x.index_select(axis, flat)
    return picked.reshape((*x.shape[:axis], *indices.shape, *x.shape[axis + 1:]))


@op("GatherElements")
def gather_elements(ctx: NodeCtx, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    axis = normalize_axes([ctx.attr("axis", 0)], x.dim())[0]
    x, indices = aligned(x, indices)
    return torch.gather(x, axis, _fix_negative(indices.long(), x.shape[axis]))


@op("Expand")
def expand(ctx: NodeCtx, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(ints(target))))


@op("Tile")
def tile(ctx: NodeCtx, x: torch.Tensor, repeats: torch.Tensor) -> torch.Tensor:
    return x.repeat(ints(repeats))


@op("Range")
def range_(ctx: NodeCtx, start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    dtype = start.dtype
    values = [v.item() for v in (start, limit, delta)]
    return torch.arange(*values, dtype=dtype, device=start.device)


@op("Pad", check=lambda ctx: None if ctx.attr("mode", "constant") in _PAD_MODES
    else f"Pad(mode={ctx.attr('mode')})")
def pad(ctx: NodeCtx, x: torch.Tensor, pads: torch.Tensor | None = None,
        value: torch.Tensor | None = None, axes: torch.Tensor | None = None) -> torch.Tensor:
    if ctx.opset < 11:
        amounts, fill = list(ctx.attr("pads")), ctx.attr("value", 0.0)
    else:
        amounts = ints(pads)
        fill = value.reshape(-1)[0].item() if value is not None and value.numel() else 0
    dims = normalize_axes(ints(axes), x.dim()) if axes is not None else list(range(x.dim()))
    begin, end = amounts[: len(dims)], amounts[len(dims):]
    per_axis = dict(zip(dims, zip(begin, end, strict=False), strict=False))
    torch_pads: list[int] = []
    for axis in range(x.dim() - 1, -1, -1):  # F.pad lists the last axis first
        torch_pads += list(per_axis.get(axis, (0, 0)))
    while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:
        torch_pads = torch_pads[:-2]
    mode = _PAD_MODES[ctx.attr("mode", "constant")]
    if mode == "constant":
        return F.pad(x, torch_pads, value=fill)
    return _pad_replicating(x, torch_pads, mode)


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}


def _pad_replicating(x: torch.Tensor, torch_pads: list[int], mode: str) -> torch.Tensor:
    """torch pads k trailing axes in reflect/edge mode only on a (k+1)- or (k+2)-D tensor."""
    k = len(torch_pads) // 2
    if k > 3:
        raise InputError(f"Pad in {mode} mode over {k} axes is not supported (at most 3)")
    lead = x.shape[: x.dim() - k]
    body = x.reshape(-1, *x.shape[x.dim() - k:])  # fold leading axes into one
    if not body.is_floating_point():
        return F.pad(body.double(), torch_pads, mode=mode).to(x.dtype).reshape(*lead, *_padded(x, torch_pads, k))
    return F.pad(body, torch_pads, mode=mode).reshape(*lead, *_padded(x, torch_pads, k))


def _padded(x: torch.Tensor, torch_pads: list[int], k: int) -> list[int]:
    tail = x.shape[x.dim() - k:]
    return [s + torch_pads[2 * (k - 1 - i)] + torch_pads[2 * (k - 1 - i) + 1] for i, s in enumerate(tail)]


@op("DepthToSpace")
def depth_to_space(ctx: NodeCtx, x: torch.Tensor) -> torch.Tensor:
    block = ctx.attr("blocksize")
    n, c, h, w = x.shape
    if ctx.attr("mode", "DCR") == "CRD":
        return F.pixel_shuffle(x, block)
    y = x.reshape(n, block, block, c // (block * block), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (block * block), h * block, w * block)


@op("SpaceToDepth")
def space_to_depth(ctx: NodeCtx, x: torch.Tensor) -> torch.Tensor:
    block = ctx.attr("blocksize")
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // block, block, w // block, block).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * block * block, h // block, w // block)
