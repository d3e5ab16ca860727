"""Tiling, part 2: band plans, the rows every tensor of a region holds in each band
(passes/tile.py rules c, d, d', d'', e, a''), and the band count that fits a budget.

Rules (the lettered list is passes/tile.py's; these are the ones this module computes):

c. Bands split the rows of `end` like numpy.array_split (`band_rows`); where an upsampling
   node makes `end`, whole input rows when there are enough (`end_bands`).
d. Walking the region backwards, a tensor's rows are the hull of what its readers read;
   a window reads [a*s - p, (b-1)*s - p + extent), clipped, the clipped part becoming the
   band's own top and bottom pad. d' (upsampling) reads whole input rows; d'' (transposed)
   finds pads and output padding that give exactly the band's rows; d''' (a Slice along H:
   extent 1, stride its step, top pad -start) reads [start + a s, start + (b-1) s + 1).
a''. Rows are counted along each tensor's own row axis (`Region.axes`); a Reshape merging the
   rows with the axes after them reads like d' (whole input rows, s positions each).
e. Pool bands whose pads reach the kernel, or that count padding AveragePool would not,
   are rejected (InputError).

c'. 2-D patches: a band's rows times a column plan's columns (`patches_for_budget`); the
   column plan is the untiled region's along axis 3, as each band's copy keeps its columns.

Sizes: a band's largest allocation (`peak_band_bytes`) counts the Slice of each start, every
node output and every narrowing Slice; `bands_for_budget` is the fewest bands under a budget.
Planned at one byte per element (`--int8`, `--act-bytes 1`: `integer_kernels`), each band Conv
also counts the whole-band buffers its onnxruntime QLinearConv allocates
(passes/runtime.py rule e', channels last, symmetric int8 weights): an int32 GEMM output
where MLAS's symmetric kernel does not run, an im2col or an indirection buffer (8 B a tap
and output position). A band's size is the largest of its maps and those buffers; an int32
output left above the budget is SplitConvPass's (passes/split_conv.py rules a', b'': parts of
multiples of 8 filters, after tiling).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from fmcompress.errors import InputError
from fmcompress.onnxutil import node_attrs
from fmcompress.shapes import TensorInfo

from .ops import TILE_WINDOW_OPS
from .runtime import integer_conv_workspaces
from .tile_region import Region, Starts, tileable_region, used_outputs
from .tile_windows import Rows, Window


@dataclass
class BandPlan:
    """What one band computes: rows of every tensor, rows each input read, pads per node."""

    rows: Rows  # of `end`
    produced: dict[str, Rows] = field(default_factory=dict)  # tensor -> rows computed/sliced
    reads: dict[tuple[str, int], Rows] = field(default_factory=dict)  # (node key, input) -> rows
    pads: dict[str, Rows] = field(default_factory=dict)  # node key -> (top, bottom) band pads
    output_padding: dict[str, int] = field(default_factory=dict)  # ConvTranspose key -> rows added below


def band_rows(height: int, bands: int) -> list[Rows]:
    """numpy.array_split's bands: the first height % bands get one extra row (rule c)."""
    if not 1 <= bands <= height:
        raise InputError(f"tile: bands must be between 1 and the output height {height}, got {bands}")
    base, extra = divmod(height, bands)
    edges = np.cumsum([0] + [base + (i < extra) for i in range(bands)])
    return [(int(edges[i]), int(edges[i + 1])) for i in range(bands)]


def plan_bands(region: Region, bands: int) -> list[BandPlan]:
    return [_plan_band(region, rows) for rows in end_bands(region, bands)]


def end_bands(region: Region, bands: int) -> list[Rows]:
    """Rule c: the rows of `end` per band; where an upsampling node (rules d', a'': a nearest
    Resize, a merging Reshape, factor f) makes `end`, whole input rows when there are at
    least `bands` of them, so that no band computes rows its neighbour needs."""
    height = region.height(region.end)
    producer = next(node for node in region.nodes if region.end in node.output)
    unit = region.windows[producer.output[0]].upsample
    if unit > 1 and height % unit == 0 and bands <= height // unit:
        return [(a * unit, b * unit) for a, b in band_rows(height // unit, bands)]
    return band_rows(height, bands)


def _plan_band(region: Region, rows: Rows) -> BandPlan:
    plan = BandPlan(rows, {region.end: rows})
    for node in reversed(region.nodes):
        key = node.output[0]
        made = [plan.produced[name] for name in node.output[:used_outputs(node)] if name in plan.produced]
        out = (min(r[0] for r in made), max(r[1] for r in made))  # every output in use has a reader
        for name in node.output[:used_outputs(node)]:
            plan.produced[name] = out
        window = region.windows[key]
        in_height = region.height(node.input[region.region_inputs[key][0]])  # input 0 may be a constant
        if window.transposed:  # rule d''
            read, plan.pads[key], plan.output_padding[key] = _transposed_rows(window, out, in_height)
            plan.reads[(key, 0)] = read
            have = plan.produced.get(node.input[0], read)
            plan.produced[node.input[0]] = (min(have[0], read[0]), max(have[1], read[1]))
            continue
        if window.upsample > 1:  # rules d', a'': whole input rows, so the band computes a multiple of the factor
            read = (out[0] // window.upsample, -(-out[1] // window.upsample))
            for name in node.output[:1]:
                plan.produced[name] = (read[0] * window.upsample, read[1] * window.upsample)
            plan.reads[(key, 0)] = read
            have = plan.produced.get(node.input[0], read)
            plan.produced[node.input[0]] = (min(have[0], read[0]), max(have[1], read[1]))
            continue
        lo = out[0] * window.stride - window.pad_top
        hi = (out[1] - 1) * window.stride - window.pad_top + window.extent
        read = (max(lo, 0), min(hi, in_height))
        if read[0] >= read[1]:
            raise InputError(f"tile: a band of {node.op_type} node {node.name!r} reads only padding; "
                             f"use fewer bands")
        if node.op_type in TILE_WINDOW_OPS:
            plan.pads[key] = (read[0] - lo, hi - read[1])
            _check_pool_pads(node, window, plan.pads[key], in_height, hi)
        for index in region.region_inputs[key]:
            need = read if node.op_type in TILE_WINDOW_OPS or window.sliced else out
            plan.reads[(key, index)] = need
            name = node.input[index]
            have = plan.produced.get(name, need)
            plan.produced[name] = (min(have[0], need[0]), max(have[1], need[1]))
    return plan



def _transposed_rows(window: Window, out: Rows, in_height: int) -> tuple[Rows, Rows, int]:
    """Rule d'': input rows, band pads and output padding that give exactly output rows `out`."""
    a, b = out
    s, p, e = window.stride, window.pad_top, window.extent
    lo = max(0, -(-(a + p - e + 1) // s))
    lo = min(lo, max(0, (a + p) // s))  # the band's first output row must not lie above row a
    hi = min(in_height, (b - 1 + p) // s + 1)
    top = a + p - lo * s
    while True:
        surplus = (hi - lo - 1) * s + e - top - (b - a)  # rows the band would compute below b
        if surplus >= 0 or hi >= in_height:
            break
        hi += 1
    if surplus >= 0:
        return (lo, hi), (top, surplus), 0
    if -surplus >= max(s, 1):
        raise InputError("tile: a ConvTranspose band would need an output padding not below its stride")
    return (lo, hi), (top, 0), -surplus


def _check_pool_pads(node: onnx.NodeProto, window: Window, pads: Rows, height: int, hi: int) -> None:
    """Pool bands that onnxruntime would refuse or compute differently (rule e)."""
    if node.op_type == "Conv":
        return
    where = f"tile: {node.op_type} node {node.name!r}"
    if max(pads) >= window.kernel:
        raise InputError(f"{where}: a band needs a pad of {max(pads)} rows, not below the kernel "
                         f"({window.kernel}) as onnxruntime requires")
    attrs = node_attrs(node)
    if (node.op_type == "AveragePool" and attrs.get("count_include_pad", 0)
            and hi > height + window.pad_bottom):
        raise InputError(f"{where}: ceil_mode=1 with count_include_pad=1 overhangs the bottom "
                         f"padding, which explicit pads cannot reproduce")


def row_bytes(info: TensorInfo, act_bytes: int | None, axis: int = 2) -> int:
    """Bytes of one row of a tensor whose rows lie on `axis` (rule a'')."""
    return info.numel // info.shape[axis] * (act_bytes or np.dtype(info.dtype).itemsize)


def band_tensor_bytes(region: Region, plan: BandPlan, act_bytes: int | None, workspaces: bool | None = None) -> int:
    """Largest allocation of one band: the Slice of `start`, node outputs, the narrowing Slices
    (and, with `workspaces`, by default when planned for integer kernels, each Conv's
    QLinearConv buffers)."""
    workspaces = integer_kernels(act_bytes) if workspaces is None else workspaces
    sizes = [(hi - lo) * row_bytes(region.infos[name], start_bytes(region, name, (lo, hi), act_bytes),
                                   region.axes[name])
             for name, (lo, hi) in plan.produced.items()]
    for node in region.nodes:
        for index in region.region_inputs[node.output[0]]:
            lo, hi = plan.reads[(node.output[0], index)]
            name = node.input[index]
            sizes.append((hi - lo) * row_bytes(region.infos[name], act_bytes, region.axes[name]))
        if workspaces and node.op_type == "Conv":
            sizes.append(integer_conv_band_bytes(region, node, plan))
    return max(sizes)


def gathers_input(region: Region, name: str, rows: Rows, act_bytes: int | None) -> bool:
    """Tile rule f'': planned for integer kernels, a band takes its rows of graph input `name` by
    Gather (they stay float, and the band quantizes them) when they are smaller in float than the
    whole input at `act_bytes`; otherwise by Slice, from one quantized copy of the whole input."""
    if name not in region.inputs or not integer_kernels(act_bytes):
        return False
    return (rows[1] - rows[0]) * region.infos[name].dtype.itemsize < region.height(name) * act_bytes


def start_bytes(region: Region, name: str, rows: Rows, act_bytes: int | None) -> int | None:
    """Bytes an element of `name`'s band rows is planned at: a graph input's rows taken by Gather
    at its own dtype's (`gathers_input`), anything else at `act_bytes`."""
    return None if gathers_input(region, name, rows, act_bytes) else act_bytes


def integer_kernels(act_bytes: int | None) -> bool:
    """Planning at one byte per element plans for onnxruntime's integer kernels (--int8)."""
    return act_bytes == 1


def integer_conv_band_bytes(region: Region, node: onnx.NodeProto, plan: BandPlan, columns: int | None = None) -> int:
    """The largest whole-band buffer of `node`'s QLinearConv in one band (passes/runtime.py
    rule e', channels last: its NHWC transposes are the band maps, counted already); `columns`:
    of a 2-D patch that many positions wide."""
    key = node.output[0]
    source, output, axis = region.infos[node.input[0]].shape, region.infos[key].shape, region.axes[key]
    if len(output) != 4 or axis not in (2, 3):
        return 0
    window, attrs = region.windows[key], node_attrs(node)
    group = int(attrs.get("group", 1))
    per_group = int(source[1]) // group
    taps = window.macs_per_output // max(per_group, 1)
    plain = (taps == 1 and window.stride == 1 and all(int(s) == 1 for s in attrs.get("strides", [1, 1]))
             and not (window.pad_top or window.pad_bottom or any(window.cross_pads)))
    lo, hi = plan.produced[key]
    across = int(output[5 - axis]) if columns is None else columns
    parts = integer_conv_workspaces((int(output[1]), per_group, taps), 0, (hi - lo) * across, group,
                                    plain, channels_last=True)
    return max((elements * dtype.itemsize for elements, dtype in parts.values()), default=0)


def peak_band_bytes(model: onnx.ModelProto, start: Starts, end: str, bands: int,
                    act_bytes: int | None = None, *, region: Region | None = None,
                    input_shapes: Mapping[str, Sequence[int]] | None = None, workspaces: bool | None = None) -> int:
    """Bytes of the largest allocation any one band holds inside the region."""
    region = region or tileable_region(model, start, end, input_shapes)
    return max(band_tensor_bytes(region, plan, act_bytes, workspaces) for plan in plan_bands(region, bands))


def bands_for_budget(model: onnx.ModelProto, start: Starts, end: str, budget_bytes: int,
                     act_bytes: int | None = None, *,
                     input_shapes: Mapping[str, Sequence[int]] | None = None,
                     region: Region | None = None) -> int:
    """The fewest bands whose largest band allocation fits in `budget_bytes`; planned for
    integer kernels, where no band count brings their buffers under it (a stem conv's int32
    output for 3 input rows a band), of the band counts whose maps fit the one with the
    smallest largest buffer (passes/split_conv.py rules a', b'' then split the filters of a conv
    whose int32 output is left above; passes/quantize.py rule f names what still is)."""
    region = region or tileable_region(model, start, end, input_shapes)
    found = _fewest_bands(model, region, budget_bytes, act_bytes, None)
    if found is None and integer_kernels(act_bytes):
        found = _fewest_bands(model, region, budget_bytes, act_bytes, False)
        found = found and _smallest_buffers(model, region, found, act_bytes)
    if found is None:
        raise InputError(f"tile: even {region.height(end)} one-row bands of {start!r} -> {end!r} do not fit in "
                         f"{budget_bytes} bytes")
    return found


def _fewest_bands(model: onnx.ModelProto, region: Region, budget_bytes: int, act_bytes: int | None,
                  workspaces: bool | None) -> int | None:
    for bands in range(1, region.height(region.end) + 1):
        try:
            peak = peak_band_bytes(model, region.start, region.end, bands, act_bytes, region=region,
                                   workspaces=workspaces)
        except InputError:  # e.g. a band lying wholly in padding: more bands will not help
            break
        if peak <= budget_bytes:
            return bands
    return None


def _smallest_buffers(model: onnx.ModelProto, region: Region, fewest: int, act_bytes: int | None) -> int:
    """From `fewest` bands on, the band count whose largest allocation, integer conv buffers
    included, is smallest (the fewer bands on a tie)."""
    best, best_peak = fewest, None
    for bands in range(fewest, region.height(region.end) + 1):
        try:
            peak = peak_band_bytes(model, region.start, region.end, bands, act_bytes, region=region, workspaces=True)
        except InputError:
            break
        if best_peak is None or peak < best_peak:
            best, best_peak = bands, peak
    return best


MAX_COLUMNS = 8  # patches a band at most: beyond, the halos cost more than a band of fewer rows saves


@dataclass(frozen=True)
class Patches:
    """A region tiled into `bands` row bands of `columns` column patches each (rule c')."""

    bands: int
    columns: int
    peak_bytes: int  # the largest allocation of a patch (or of a band's full-width start or end)
    macs: int  # with the halos each patch recomputes


def patches_for_budget(model: onnx.ModelProto, region: Region, budget_bytes: int, act_bytes: int | None,
                       infos: Mapping[str, TensorInfo]) -> Patches | None:
    """Rule c': of the 2-D patchings whose every allocation fits in `budget_bytes`, the one that
    computes the fewest MACs (for each column count, its fewest bands); None when none fits or the
    region is not one of NCHW maps with its rows on axis 2 (a layout change cannot be cut twice).
    Sizes are a row band's rows times a column patch's columns of each tensor: bands cut the rows
    as `plan_bands` does, and the columns of a band's copy as the untiled region's."""
    if any(axis != 2 for axis in region.axes.values()):
        return None
    try:
        across = tileable_region(model, region.starts, region.end, infos=infos, axis=3)
    except InputError:
        return None
    row_cuts, column_cuts = _Cuts(region), _Cuts(across)
    best = None
    for columns in range(2, min(across.height(region.end), MAX_COLUMNS) + 1):
        across_cut = column_cuts[columns]
        if across_cut is None:
            break
        for bands in range(1, region.height(region.end) + 1):
            down_cut = row_cuts[bands]
            if down_cut is None:
                break
            found = _patches(region, down_cut, across_cut, act_bytes)
            if found.peak_bytes <= budget_bytes:
                if best is None or found.macs < best.macs:
                    best = found
                break
    return best


@dataclass(frozen=True)
class _Cut:
    """A region cut into `parts` along its band axis: per tensor (and per read, keyed like
    `BandPlan.reads`) the largest extent a part holds, per tensor the extent all parts compute
    together, the largest part of `end` and of each start."""

    parts: int
    largest: dict
    computed: dict[str, int]
    end: int
    starts: dict[str, int]


class _Cuts(dict):
    """`_Cut`s of one region by part count, made when first asked for (None: a part would read
    only padding)."""

    def __init__(self, region: Region):
        super().__init__()
        self.region = region

    def __missing__(self, parts: int) -> _Cut | None:
        try:
            plans = plan_bands(self.region, parts)
        except InputError:
            self[parts] = None
            return None
        largest: dict = {}
        computed: dict[str, int] = {}
        for plan in plans:
            for key, (lo, hi) in [*plan.produced.items(), *plan.reads.items()]:
                largest[key] = max(largest.get(key, 0), hi - lo)
            for name, (lo, hi) in plan.produced.items():
                computed[name] = computed.get(name, 0) + hi - lo
        starts = {start: max(p.produced[start][1] - p.produced[start][0] for p in plans)
                  for start in self.region.starts if start not in self.region.gates}
        self[parts] = _Cut(parts, largest, computed, max(p.rows[1] - p.rows[0] for p in plans), starts)
        return self[parts]


def _patches(region: Region, down: _Cut, across: _Cut, act_bytes: int | None) -> Patches:
    """The largest allocation and the MACs of `down.parts` bands of `across.parts` patches (rule c')."""

    def size(name: str, height: int, width: int) -> int:
        info = region.infos[name]
        plane = int(info.shape[2]) * int(info.shape[3])
        return info.numel // plane * height * width * (start_bytes(region, name, (0, height), act_bytes)
                                                       or info.dtype.itemsize)

    nodes = {node.output[0]: node for node in region.nodes}
    sizes = [size(key if isinstance(key, str) else nodes[key[0]].input[key[1]], down.largest[key], across.largest[key])
             for key in down.largest]
    # a band's full-width copies: the Slice of each start, the Concat of its patches
    sizes += [size(start, height, region.infos[start].shape[3]) for start, height in down.starts.items()]
    sizes.append(size(region.end, down.end, region.infos[region.end].shape[3]))
    if integer_kernels(act_bytes):
        for key, node in nodes.items():
            if node.op_type == "Conv":
                plan = BandPlan((0, 0), {key: (0, down.largest[key])})
                sizes.append(integer_conv_band_bytes(region, node, plan, columns=across.largest[key]))
    macs = sum(down.computed[key] * across.computed[key] * region.windows[key].macs_per_output
               * region.infos[key].numel // (region.height(key) * int(region.infos[key].shape[3])) for key in nodes)
    return Patches(down.parts, across.parts, max(sizes), macs)
