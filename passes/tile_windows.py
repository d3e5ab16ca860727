"""Tiling, part 1b: how one region node maps output rows to input rows (passes/tile.py rules
d, d', d'', d''', e, a''), as a `Window`; passes/tile_region.py validates the region and asks here.

Rules (the lettered list is passes/tile.py's):

d. Conv and pools: kernel extent, stride and pads along the band axis, H or (for the columns
   of 2-D patches) W (auto_pad SAME_* resolved as the ONNX spec splits them), the other
   axis' pads kept (`kernel_window`).
d'. Nearest Resize by integer factors with floor-equivalent coordinates (`resize_window`).
d''. ConvTranspose with explicit pads (`transposed_window`).
d'''. Slice with constant parameters: off the row axis row-local, along it a stride and an
   offset (`slice_window`).
e. Pools: ceil_mode=1 becomes explicit end pads (bottom, right); what explicit pads cannot reproduce is an
   InputError.
a''. Layout changes: a Transpose moves the row axis to perm.index(axis), the batch axis kept
   (`transposed_axis`); a Reshape that merges the row axis with the axes after it turns row r
   into positions [r s, (r+1) s) (`reshape_scale`, `reshape_window`: a window like the
   upsampling of d' by s).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from fmcompress.errors import InputError
from fmcompress.shapes import TensorInfo

Rows = tuple[int, int]  # [lo, hi) along a tensor's row axis (axis 2 of an NCHW map)

# ---------------------------------------------------------------- the region

@dataclass(frozen=True)
class Window:
    """How a node's output rows map to input rows: [a*s - pad_top, (b-1)*s - pad_top + extent)."""

    extent: int = 1  # d*(k-1) + 1
    stride: int = 1
    pad_top: int = 0
    pad_bottom: int = 0  # explicit (auto_pad resolved), as in the original node
    kernel: int = 1  # undilated, for onnxruntime's pool pad < kernel check
    cross_pads: Rows = (0, 0)  # the other spatial axis' (auto_pad resolved; ceil_mode's): bands keep them
    macs_per_output: int = 0  # Conv: prod(weight.shape[1:]); pools and elementwise: 0
    # nearest Resize by an integer factor along H, or a Reshape merging the rows with the axes
    # after them (rule a''): out row r reads row r // upsample
    upsample: int = 1
    transposed: bool = False  # ConvTranspose: input row i feeds output rows i*stride - pad_top + [0, extent)
    w_output_padding: int = 0  # ConvTranspose, kept by every band
    slice_index: int = -1  # Slice along the rows (out row r is row start + r*stride): their place in axes
    axis: int = 2  # the NCHW axis a Conv or pool's bands cut: 2 (rows), 3 (columns: rule d)

    @property
    def sliced(self) -> bool:
        return self.slice_index >= 0


IDENTITY_WINDOW = Window()


NEAREST_MODES = {"asymmetric": ("floor",), "half_pixel": ("round_prefer_floor", "round_prefer_ceil"),
                 "pytorch_half_pixel": ("round_prefer_floor", "round_prefer_ceil")}


def resize_window(node: onnx.NodeProto, attrs: Mapping, tensors: set[str],
                   constants: Mapping[str, np.ndarray | None], infos: Mapping[str, TensorInfo]) -> Window:
    """Rule d': nearest Resize by integer factors (N and C kept, from the static shapes: scales or
    sizes may be computed at run time): output row r is input row r // f."""
    where = f"tile: Resize node {node.name!r}"
    mode = _text(attrs.get("mode", "nearest"))
    transform = _text(attrs.get("coordinate_transformation_mode", "half_pixel"))
    nearest = _text(attrs.get("nearest_mode", "round_prefer_floor"))
    if mode != "nearest" or nearest not in NEAREST_MODES.get(transform, ()):
        raise InputError(f"{where}: only nearest resizing with floor-equivalent coordinates is tiled "
                         f"(got {mode}, {transform}, {nearest})")
    if node.input[0] not in tensors:
        raise InputError(f"{where}: only input 0 may come from the region")
    # the factors come from the static shapes, so scales or sizes computed at run time (from
    # Shape ops) do too; each band's copy takes them as constant scales (passes/tile_emit.py)
    in_shape, out_shape = infos[node.input[0]].shape, infos[node.output[0]].shape
    factors = [o / i for o, i in zip(out_shape, in_shape, strict=True)]
    if list(factors[:2]) != [1, 1] or any(f != int(f) or f < 1 for f in factors[2:]):
        raise InputError(f"{where}: only integer upsampling of H and W is tiled (factors {factors})")
    return Window(upsample=int(factors[2]))


def slice_params(node: onnx.NodeProto, constants: Mapping[str, np.ndarray | None],
                 rank: int = 4) -> list[np.ndarray] | None:
    """A Slice's starts, ends, axes (of a tensor of `rank` axes) and steps, defaults filled in;
    None where one is not a constant."""
    names = [*node.input[1:5], *[""] * (5 - len(node.input))]
    values = [constants.get(name) if name in constants else None for name in names]
    if len(node.input) < 3 or any(name and value is None for name, value in zip(names, values, strict=True)):
        return None
    starts, ends = (np.asarray(v, np.int64).reshape(-1) for v in values[:2])
    axes = np.arange(len(starts)) if values[2] is None else np.asarray(values[2], np.int64).reshape(-1)
    steps = np.ones(len(starts), np.int64) if values[3] is None else np.asarray(values[3], np.int64).reshape(-1)
    return [starts, ends, axes % rank, steps]


def slice_window(node: onnx.NodeProto, tensors: set[str], constants: Mapping[str, np.ndarray | None],
                  infos: Mapping[str, TensorInfo], rows: int = 2) -> Window:
    """Rule d''': a Slice off the row axis `rows` (any step) is row-local; along it with a step
    s > 0 and start p (clamped as ONNX does), output row r is input row p + r s."""
    where = f"tile: Slice node {node.name!r}"
    if node.input[0] not in tensors or any(name in tensors for name in node.input[1:]):
        raise InputError(f"{where}: only input 0 may come from the region")
    params = slice_params(node, constants, len(infos[node.input[0]].shape))
    if params is None:
        raise InputError(f"{where}: needs constant starts, ends, axes and steps (opset 10 or later)")
    starts, _, axes, steps = params
    if 0 in axes.tolist():
        raise InputError(f"{where}: slicing the batch axis is not tiled")
    if rows not in axes.tolist():
        return IDENTITY_WINDOW
    index = axes.tolist().index(rows)
    step, height = int(steps[index]), infos[node.input[0]].shape[rows]
    if step <= 0:
        raise InputError(f"{where}: only a positive step along the rows is tiled")
    start = int(starts[index])
    start = min(max(start + height if start < 0 else start, 0), height)
    return Window(stride=step, pad_top=-start, slice_index=index)


def transposed_axis(perm: list[int] | None, rows: int) -> int | None:
    """Rule a'': where a Transpose puts the row axis; None when it moves the batch axis 0
    (a perm left out reverses the axes, so it does too)."""
    if not perm or int(perm[0]) != 0:
        return None
    return [int(p) for p in perm].index(rows)


def reshape_scale(in_shape: tuple[int, ...], out_shape: tuple[int, ...], rows: int) -> int | None:
    """Rule a'': s when a Reshape keeps the axes before `rows` and merges the row axis with those
    after it, so that input row r is output positions [r s, (r+1) s) along axis `rows`; None
    otherwise (a row's trailing elements must make whole output positions)."""
    if rows < 1 or len(out_shape) <= rows or tuple(out_shape[:rows]) != tuple(in_shape[:rows]):
        return None
    trailing_in, trailing_out = int(np.prod(in_shape[rows + 1:])), int(np.prod(out_shape[rows + 1:]))
    if trailing_out == 0 or trailing_in % trailing_out:
        return None
    scale = trailing_in // trailing_out
    return scale if out_shape[rows] == in_shape[rows] * scale else None


def reshape_window(node: onnx.NodeProto, infos: Mapping[str, TensorInfo], rows: int) -> Window:
    """Rule a'': a Reshape merging the row axis with the axes after it, as a window that turns
    input row r into output positions [r s, (r+1) s) (the upsampling of rule d' by s)."""
    in_shape, out_shape = infos[node.input[0]].shape, infos[node.output[0]].shape
    scale = reshape_scale(in_shape, out_shape, rows)
    if scale is None:
        raise InputError(f"tile: Reshape node {node.name!r}: {list(in_shape)} -> {list(out_shape)} does not "
                         f"merge the row axis {rows} with the axes after it into whole positions")
    return Window(upsample=scale)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def kernel_window(node: onnx.NodeProto, attrs: Mapping, constants: Mapping[str, np.ndarray | None],
                  infos: Mapping[str, TensorInfo], axis: int = 2) -> Window:
    """The mapping of a Conv or pool along NCHW `axis` (2: rows, 3: columns), auto_pad resolved
    into explicit pads, ceil_mode into the other axis' end pad (rules d, e)."""
    where = f"tile: {node.op_type} node {node.name!r}"
    macs = 0
    if node.op_type == "Conv":
        weight = constants.get(node.input[1])
        if weight is None or weight.ndim != 4:
            raise InputError(f"{where}: only 2-D convs with a constant weight can be tiled")
        kernel = list(attrs.get("kernel_shape", weight.shape[2:]))
        macs = int(np.prod(weight.shape[1:]))
    else:
        kernel = list(attrs["kernel_shape"])
        if node.op_type == "LpPool" and attrs.get("ceil_mode", 0):
            raise InputError(f"{where}: LpPool with ceil_mode=1 is not supported")
    if len(kernel) != 2:
        raise InputError(f"{where}: only 2-D windows can be tiled")
    strides = [int(s) for s in attrs.get("strides", [1, 1])]
    extents = [int(d) * (int(k) - 1) + 1 for d, k in zip(attrs.get("dilations", [1, 1]), kernel, strict=True)]
    in_shape, out_shape = infos[node.input[0]].shape, infos[node.output[0]].shape
    along, cross = axis - 2, 3 - axis  # spatial indices of the band axis and the other one
    begin, end = _resolved_pads(attrs, along, in_shape[axis], out_shape[axis], strides[along], extents[along])
    kept = _resolved_pads(attrs, cross, in_shape[5 - axis], out_shape[5 - axis], strides[cross], extents[cross])
    kept = (kept[0], _ceil_end(node, attrs, kept, int(kernel[cross]), in_shape[5 - axis], out_shape[5 - axis],
                               strides[cross], extents[cross]))
    return Window(extents[along], strides[along], begin, end, int(kernel[along]), kept, macs, axis=axis)


def transposed_window(node: onnx.NodeProto, attrs: Mapping, constants: Mapping[str, np.ndarray | None],
                       infos: Mapping[str, TensorInfo]) -> Window:
    """Rule d'': a 2-D ConvTranspose with explicit pads (no auto_pad, no output_shape)."""
    where = f"tile: ConvTranspose node {node.name!r}"
    weight = constants.get(node.input[1])
    if weight is None or weight.ndim != 4:
        raise InputError(f"{where}: only 2-D transposed convs with a constant weight can be tiled")
    if _text(attrs.get("auto_pad", "NOTSET")) != "NOTSET" or "output_shape" in attrs:
        raise InputError(f"{where}: only explicit pads are tiled (no auto_pad, no output_shape)")
    kernel = list(attrs.get("kernel_shape", weight.shape[2:]))
    strides = [int(v) for v in attrs.get("strides", [1, 1])]
    dilations = [int(v) for v in attrs.get("dilations", [1, 1])]
    pads = [int(v) for v in attrs.get("pads", [0, 0, 0, 0])]
    output_padding = [int(v) for v in attrs.get("output_padding", [0, 0])]
    group = int(attrs.get("group", 1))
    macs = weight.shape[0] // group * int(np.prod(kernel)) // max(1, strides[0] * strides[1])
    return Window(extent=dilations[0] * (int(kernel[0]) - 1) + 1, stride=strides[0], pad_top=pads[0],
                  pad_bottom=pads[2], kernel=int(kernel[0]), cross_pads=(pads[1], pads[3]), macs_per_output=macs,
                  transposed=True, w_output_padding=output_padding[1])


def _ceil_end(node: onnx.NodeProto, attrs: Mapping, pads: Rows, kernel: int, size: int,
             out_size: int, stride: int, extent: int) -> int:
    """The end pad of the axis bands do not cut that makes ceil_mode=0 give its original
    positions (rule e)."""
    end = pads[1]
    overhang = (out_size - 1) * stride - pads[0] + extent - size - end  # ceil_mode's extra positions
    if overhang > 0:
        if node.op_type == "AveragePool" and attrs.get("count_include_pad", 0):
            raise InputError(f"tile: AveragePool node {node.name!r}: ceil_mode=1 with "
                             f"count_include_pad=1 overhangs the end padding, which explicit "
                             f"pads cannot reproduce")
        end += overhang
    if node.op_type != "Conv" and max(pads[0], end) >= kernel:
        raise InputError(f"tile: {node.op_type} node {node.name!r}: ceil_mode=1 needs an end pad "
                         f"of {end}, not below the kernel ({kernel}) as onnxruntime requires")
    return end


def _auto_pad(attrs: Mapping) -> str:
    value = attrs.get("auto_pad", b"NOTSET")
    return value.decode() if isinstance(value, bytes) else value


def _resolved_pads(attrs: Mapping, axis: int, size: int, out_size: int, stride: int,
                   extent: int) -> Rows:
    """(begin, end) pads of spatial `axis`; SAME_* split the total pad as the ONNX spec says."""
    auto_pad = _auto_pad(attrs)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        total = max(0, (out_size - 1) * stride + extent - size)
        small = total // 2
        return (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)
    if auto_pad == "VALID":
        return 0, 0
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    return int(pads[axis]), int(pads[axis + 2])
