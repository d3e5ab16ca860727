"""TilePass: compute a chain of spatially local ops band by band (exact row tiling).

onnxruntime materialises every node's full output. Where an early, high-resolution
stage of a CNN sets the memory peak, computing a chain of spatially local ops in
horizontal bands of rows (patch-based inference, MCUNetV2) keeps only one band's
tensors alive at a time; only the halo rows that neighbouring bands share are
computed twice, and the result equals the untiled model up to float rounding.
A region is given by two tensors, `start` (a 4-D NCHW map or graph input, or a layout
change of one: rule a'') and `end`.
Rules:

a. Region: the nodes that compute `end` from `start`, found by walking back from
   `end` (never into a Reshape's shape operand, rule a'', nor a Resize's roi, scales and
   sizes, rule d'); every other input they read is a constant (an initializer not listed
   as a graph input, a Constant node's output, or a small constant-only node's output:
   CONSTANT_FOLDABLE_OPS of passes/ops.py). Supported ops: Conv (2-D, any kernel,
   stride, dilation, group, pads, auto_pad; constant weight and bias); MaxPool,
   AveragePool (ceil_mode, pads, dilations, count_include_pad) and LpPool
   (ceil_mode 0); ConvTranspose (rule d''); Slice (rule d'''); BatchNormalization (inference);
   LRN (across channels only: row-local, rows on axis 2); elementwise unary ops (TILE_SINGLE_MAP_OPS of passes/ops.py); elementwise
   Add/Sub/Mul/Div/Max/Min/Sum/Mean/PRelu whose operands are region tensors of the
   output's exact shape or constants that do not vary along the rows (numpy broadcasting
   gives them size 1, or no axis, at the row axis); Split and Concat along a channel axis
   (neither the batch axis nor the rows; every Split output may be used); nearest Resize
   by integer factors (rule d'); Transpose, Reshape, LayerNormalization and MatMul (rule
   a''). Extra outputs (MaxPool Indices, Dropout mask, LayerNormalization Mean) must be
   unused.
a'. Side inputs: `start` may be several tensors; the first is the main one, the others
   are full tensors computed before the region (a finer pyramid level that a Concat
   joins, an earlier map a residual Add reads). Each is sliced per band like `start`,
   and each must be read by the region. A side input of one value per channel
   ([N, C, 1, 1], a squeeze-excitation gate) is read whole by every band, like a
   constant.
a''. Row axes: every region tensor carries its row axis, the axis the bands cut
   (`Region.axes`; 2 for a 4-D NCHW map). A start takes the one the graph's layout gives it
   (`row_axes`, walking the graph from its inputs: a 4-D input or NCHW op output has 2, the
   ops below move it, an op keeping its input's rank keeps it; a start with none is
   rejected); where the region does not validate so, every start takes axis 2 (the tiling
   before this rule). Walking the region forward, the region inputs of a node must have
   their rows on one axis r, and:
   - Conv, pools, ConvTranspose and Resize need r = 2 of a 4-D map (NCHW);
   - Transpose (perm[0] = 0: the batch axis stays axis 0) puts the rows at perm.index(r);
   - LayerNormalization (constant scale and bias) needs r below its first normalised axis
     (it normalises axis..last);
   - MatMul needs a constant 2-D right operand [K, M] and r not the last axis: it contracts
     the last axis, and every other axis of its left operand maps to the same axis of its
     output, so rows to rows;
   - Reshape (its target is the output's static shape, whatever computes the shape operand:
     the walk of rule a never enters it) must keep the axes before r and merge r with the
     axes after it: s = prod(input dims after r) / prod(output dims after r) a whole number
     and output dim r = s * input dim r (NHWC [N, H, W, C] to [N, H W C / D, D]: s = W C / D),
     so input rows [a, b) are output positions [a s, b s), a window like d' with factor s;
     where s is not a whole number the region is rejected;
   - BatchNormalization needs r != 1 (its per-channel axis); Slice and the elementwise ops
     treat r as they treat H (rules a, d'''); the other ops keep r.
   These ops are row-local: their windows are the identity (no halo); band tensors are
   sliced and concatenated along each tensor's own row axis (rules d, f).
b. Rejected (InputError, one line): any other op (linear Resize, global pooling, Softmax,
   ...), a start with no row axis, an op whose condition of rule a'' fails, a tensor
   without a static shape, a non-constant weight or operand from outside the region, an intermediate that is a graph output or has a consumer
   outside the region (the full tensor would still be needed), a band whose rows
   would lie wholly in padding, and pooling cases a band cannot reproduce exactly
   (rule e).
c. Bands: the H_out rows of `end` are split into `bands` contiguous bands like
   numpy.array_split: every band has floor(H_out / bands) rows and the first
   H_out mod bands bands one more. 1 <= bands <= H_out. Where an upsampling node of factor f
   (rules d', a'') makes `end` and bands <= H_out / f, its H_out / f input rows are so split
   instead (times f), so that no two bands compute the same input row.
c'. 2-D patches (`columns` > 1): after the row bands are emitted, each band's copy is tiled
   again along the columns (axis 3): its starts are the band's Slices of the region's starts
   (gates as they are), its end the band's result, and the same rules hold with columns for
   rows (Conv, pools and LRN take axis 3, their pads along H kept as the band set them; a
   region with a ConvTranspose, a Resize or a layout change is not patched). A band then
   holds one patch at a time, with its full-width start Slices and the Concat of its patches.
   Patches are planned (`patches_for_budget`) only where no row band count fits the budget:
   a region ending at a low-resolution map computes at least one of its rows a band, which
   at the high-resolution maps inside it is many rows of the full width (MobileNetV2's first
   stages, as MCUNetV2 found); of the patchings that fit, at most 8 columns a band, the one
   with the fewest MACs (halos included) wins.
d. Row ranges, per band, walking the region backwards from `end`: a tensor's rows are
   the hull of what its region consumers read; an elementwise node reads its output
   rows; a Conv/pool with kernel k, stride s, dilation d and top pad p (auto_pad SAME_*
   turned into explicit pads first) producing rows [a, b) reads
   [a*s - p, (b-1)*s - p + d*(k-1) + 1). That range is clipped to the input's [0, H);
   what falls above becomes the band node's top pad, what falls below its bottom pad,
   so an inner band edge gets no pad and the image border keeps the original one.
   Columns are untouched: W pads as in the original (SAME_* resolved).
d'. A nearest Resize by an integer factor f whose coordinates floor (asymmetric with
   floor; half_pixel or pytorch_half_pixel with round_prefer_floor/ceil: output row r
   reads input row r // f) reads rows [a // f, ceil(b / f)) for output rows [a, b); the
   band computes f times as many rows, and its readers slice what they need.
d''. A ConvTranspose (stride s, extent e = d(k-1)+1, top pad p; explicit pads only) feeds
   output row r from input rows i with r = i s - p + j d: output rows [a, b) read input
   rows [ceil((a + p - e + 1) / s), floor((b - 1 + p) / s) + 1), clipped; the band's top
   pad is a + p - (first row) s, and its bottom pad (or, where the band ends short, its
   output_padding, below the stride) makes it compute exactly rows [a, b).
d'''. Slice (constant starts, ends, axes, steps; not the batch axis): along W or C, with any
   step, it is row-local (rows map to the same rows); along H with a step s > 0 and start p
   (negative or out-of-range starts clamped as ONNX does) output rows [a, b) come from input
   rows [p + a s, p + (b-1) s + 1), so each band's copy takes H start 0 and end (b-1) s + 1
   on the rows sliced for it (a YOLOv5/YOLOX Focus stem: space to depth by strided Slices).
e. Pools: ceil_mode=1 becomes ceil_mode=0 with the extra bottom rows (and right
   columns) as explicit bottom (right) pad. That is exact for MaxPool (pads are -inf), LpPool (pads are 0) and
   AveragePool with count_include_pad=0 (pads are not counted); AveragePool with
   count_include_pad=1 counts padding only up to the original bottom (right) pad, so a
   band (a region) that would need more is rejected. onnxruntime needs pool pads smaller than the
   kernel; a band that would need more is rejected.
f. Emitted per band i (names <node or tensor>_band<i>, unique): one Slice of `start`'s
   rows (along its row axis), a copy of every region node with its band pads (auto_pad
   removed, ceil_mode 0, extra outputs dropped; a Reshape gets its band's static target,
   0 (copy) for the axes before the rows, so a free batch dim stays free), and a Slice
   wherever a consumer reads fewer rows than its producer computed (e.g. the two operands
   of a residual Add, aligned to the Add's rows; a band's `end` holding more rows than the
   band). A final Concat (along `end`'s row axis) of the band outputs produces `end` under
   its own name, so the rest of the graph is untouched.
f'. Splice: where `end` is not a graph output and its one reader is a Concat along its row
   axis (a YOLOv5 head: each level's Conv -> Transpose -> Reshape [N, -1, 85], joined
   along axis 1 into the graph output), the band outputs take `end`'s place among that
   Concat's inputs, in order: no full-size `end` is written.
f''. Planned for integer kernels (`--int8`, one byte a map), a band's rows of a graph input
   are taken by Gather of their indices instead of Slice (rule g's zero added to the
   indices) where they are smaller in float than the whole input at one byte (a band of
   fewer than a quarter of its rows): the int8 flow leaves that Gather float
   (fmcompress/int8.py rule a'), so the band quantizes its own rows of the input, where a
   Slice reads one uint8 copy of the whole input, held across the bands. The band's float
   rows are planned at four bytes an element.
g. Order: the nodes go where the producer of `end` was, band 0 entirely, then band
   1, ..., then the Concat; `model.touched()` then sorts the graph by depth
   (graphsurgeon), which may reorder nodes inside a band but, chained, never puts a node
   of band i+1 before one of band i. onnxruntime 1.32 does not keep graph order:
   its DEFAULT execution order is a reverse DFS from the graph outputs (the unchained
   bands of a ResNet stem ran 13, 12, ..., 0 unoptimized and in a scrambled band order
   after ORT_ENABLE_ALL fused nodes), and PRIORITY_BASED (Kahn, lowest node index
   first) interleaved the bands once fused nodes got new indices, keeping every band
   alive. So (chain=True, the default) band i+1's Slice of `start` takes its starts as
   starts + ReduceSum(Cast<int64>(empty Slice, along axis 0, of band i's output)): a zero that costs
   four nodes on an empty tensor but is a data dependency no optimizer folds, so every
   topological order runs band i to its end before band i+1 (checked from the
   profiler trace by the tests).
h. Region nodes and the value_info of their outputs are removed; constants are shared
   by the bands; opset, ir_version and metadata are kept. result.data (and
   `TileResult`) per region: bands, rows per band, halo rows recomputed per node,
   MACs tiled vs untiled (a MatMul counts K per output element), largest band tensor in
   bytes.
h'. Shape and Size: a region intermediate may be read outside the region by Shape or Size
   nodes (torch's export computes a Reshape target from Shape of the detect conv). Its
   shape is static but for the batch dim, which every region tensor keeps on axis 0, so
   each such node becomes, in its place, its static value with the batch dim taken from
   Shape of the main start (Size: that dim times the static size of one batch item).
i. Squeeze-excitation: `pool_in_bands` computes a GlobalAveragePool from bands of its
   input (recomputed from a region start, each band summed over H and W, the sums added
   and scaled), so the pool never needs the whole map; the gate it leads to is then a
   per-channel side input (rule a') of the region that multiplies the map by it. The
   pool's input must have its rows on H or W (rule a'').

Modules: passes/tile_region.py finds and validates a region (rules a, a', a'', b);
passes/tile_windows.py gives the row windows of its nodes (d, d', d'', d''', e, a'');
passes/tile_bands.py plans the bands and patches (rules c, c', d, d', d'', d''', e, a'');
passes/tile_emit.py rewrites `model.graph` in place (rules c', f, f', g, h, h', i).

Entry point: `TilePass(regions, budget_bytes).run(model, ctx)`; `result.data` lists a
`TileResult` per region. `tile_region`, `tile_region_with_facts` and `pool_in_bands` are
the same rewrites on protos, for tests and tools.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx

from fmcompress.errors import InputError

from .base import Pass, PassContext, PassResult
from .graph import Model
from .tile_bands import (
    BandPlan,
    Patches,
    band_rows,
    bands_for_budget,
    patches_for_budget,
    peak_band_bytes,
    plan_bands,
)
from .tile_emit import (
    TileResult,
    pool_in_bands,
    pool_model,
    tile_model,
    tile_region,
    tile_region_with_facts,
)
from .tile_region import Region, Starts, row_axes, tileable_region, walk_back
from .tile_windows import Window

__all__ = ["BandPlan", "Patches", "Region", "Starts", "TilePass", "TileResult", "Window", "band_rows",
           "bands_for_budget", "patches_for_budget", "peak_band_bytes", "plan_bands", "pool_in_bands", "pool_model", "row_axes",
           "tile_model", "tile_region", "tile_region_with_facts", "tileable_region", "walk_back"]


class TilePass(Pass):
    """Tile each (start, end, bands[, columns]) region; bands None picks `bands_for_budget(budget)`;
    columns > 1 cuts each band into column patches (rule c')."""

    name = "tile"

    def __init__(self, regions: Iterable[tuple[Starts, str, int | None] | tuple[Starts, str, int | None, int]],
                 budget_bytes: int | None = None):
        self.regions = list(regions)
        self.budget_bytes = budget_bytes

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        facts: list[TileResult] = []
        for start, end, bands, *rest in self.regions:
            columns = rest[0] if rest else 1
            # each region is found on the graph as the previous one left it
            region = tileable_region(model.proto(), start, end, ctx.input_shapes)
            if bands is None:
                if self.budget_bytes is None:
                    raise InputError(f"tile: region {start!r} -> {end!r} has no band count and the "
                                     f"pass no budget")
                bands = bands_for_budget(model.proto(), start, end, self.budget_bytes,
                                         ctx.act_bytes, region=region)
            result = tile_model(model, region, bands, ctx.act_bytes, columns=columns)
            onnx.checker.check_model(model.proto())
            facts.append(result)
            shape = f"{bands} bands" + (f" of {columns} column patches" if columns > 1 else "")
            ctx.log(f"tile: {start} -> {end} in {shape}, MACs x{result.macs_ratio:.3f}, "
                    f"largest band tensor {result.peak_band_bytes} B")
        return PassResult(model, modified=bool(facts), data=facts)
