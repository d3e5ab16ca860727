"""Tiling, part 3: the band rewrite of a validated region, in place on `model.graph`
(passes/tile.py rules c', f, f', f'', g, h, h', i).

Rules (the lettered list is passes/tile.py's; these are the ones this module writes):

c'. 2-D patches: the bands emitted, each band's copy is tiled again along axis 3 (`tile_model`
   with `columns`), from the static shapes the band tensors were emitted with.

f. Per band i: a Slice of each start's rows (along its row axis, rule a''), a copy of every
   region node with its band pads (auto_pad removed, ceil_mode 0, extra outputs dropped; a
   Slice along the rows with its band's start and end; a Reshape with its band's static
   shape, the axes before the rows copied (0)), a Slice wherever a reader needs fewer rows
   than its producer computed; a final Concat along `end`'s row axis writes `end` under its
   own name. New names come from one `Namer` of the graph (`<name>_band<i>`).
f'. Splice: when `end` is not a graph output and its one reader is a Concat along its row
   axis, the band outputs take its place among that Concat's inputs; no `end` is written.
f''. Planned for integer kernels (`--int8`), a band's rows of a graph input are taken by
   Gather (its row indices, plus rule g's zero) rather than Slice where they are smaller in
   float than the whole input at one byte (`gathers_input`): the int8 flow leaves that Gather
   float, so the band quantizes its own rows (fmcompress/int8.py rule a').
g. The band nodes take the place of `end`'s producer in the node list, band 0 first; with
   `chain`, band i+1's first Slices wait for band i's result through a zero computed from
   it (an empty Slice, Cast, ReduceSum, Add), so every topological order runs the bands
   one after the other. The zero goes into the Slice's steps (1 + 0; a Gather's indices,
   rule f''), never its starts or ends: shape inference that cannot evaluate it
   (onnxruntime's symbolic shape inference, run by its quantization tools'
   `quant_pre_process`) still finds the band's static rows.
h. The region's nodes are detached and dropped; `model.touched()` then removes what only
   they used. Constants are shared by the bands. `TileResult` holds the facts.
h'. A Shape or Size node outside the region that reads an intermediate becomes its static
   value, the batch dim read from the main start's Shape (every region tensor keeps it on
   axis 0), in the node's place.
i. `pool_in_bands`: a GlobalAveragePool computed from bands of its input, recomputed from a
   region start: per band a GlobalAveragePool, weighted by the band's rows / all rows (a
   Mul by a constant; skipped for a band of weight 1), the bands added by a chain of Adds.
   Ops with integer kernels, so that a QDQ int8 model runs it in QLinearGlobalAveragePool,
   QLinearMul and QLinearAdd (no float band left); exact in float up to summation order.
   The input itself stays for its readers.

The region is found on `model.proto()` (analysis); only `model.graph` is rewritten.
`tile_region`, `tile_region_with_facts` and `pool_in_bands` take and return protos: thin
edges for tests and tools over `tile_model` and `pool_model`, which the passes use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from fmcompress.errors import InputError
from fmcompress.shapes import TensorInfo

from .graph import Model
from .graphutil import Namer, detach, node_index
from .ops import SHAPE_OPS
from .tile_bands import BandPlan, band_tensor_bytes, gathers_input, plan_bands, row_bytes
from .tile_region import Region, Starts, tileable_region, used_outputs
from .tile_windows import Rows, Window

InputShapes = Mapping[str, Sequence[int]] | None


@dataclass
class TileResult:
    """Facts about one tiled region (rule h)."""

    start: str
    end: str
    bands: int
    rows_per_band: list[int]
    halo_rows: dict[str, int]  # node name -> output rows computed more than once
    macs_untiled: int
    macs_tiled: int
    peak_band_bytes: int
    nodes: list[str]
    columns: int = 1  # column patches per band (rule c')

    @property
    def macs_ratio(self) -> float:
        return self.macs_tiled / self.macs_untiled if self.macs_untiled else 1.0


# ---------------------------------------------------------------- entry points

def tile_model(model: Model, region: Region, bands: int, act_bytes: int | None = None,
               chain: bool = True, columns: int = 1) -> TileResult:
    """Rewrite `region` (found on `model.proto()`) of `model.graph` into `bands` bands, each
    of them, with `columns` > 1, into that many column patches (rule c')."""
    plans = plan_bands(region, bands)
    emitter = _Emitter(model.graph, region, chain, act_bytes=act_bytes)
    ends = emitter.emit(plans)
    by_key = emitter.nodes
    end_node = by_key[region.end]
    position = node_index(model.graph, end_node)
    end_tensor = end_node.outputs[0]
    splice = _splice_reader(model.graph, region, end_tensor)
    detach(by_key.values())
    if splice is not None:  # rule f'
        inputs = [part for tensor in splice.inputs for part in (ends if tensor is end_tensor else [tensor])]
        splice.inputs.clear()
        splice.inputs.extend(inputs)
    else:
        concat_name = emitter.namer(f"{region.end}_concat")
        emitter.emitted.append(gs.Node("Concat", name=concat_name, attrs={"axis": region.axes[region.end]},
                                       inputs=ends, outputs=[end_tensor]))
    members = {id(node) for node in by_key.values()}
    kept = [node for node in model.graph.nodes[:position] if id(node) not in members]
    kept += emitter.emitted
    kept += [node for node in model.graph.nodes[position + 1:] if id(node) not in members]
    model.graph.nodes = [new for node in kept for new in emitter.static_shape(node)]  # rule h'
    model.touched(sort=False)
    facts = _facts(region, plans, act_bytes)
    if columns > 1:
        facts = _cut_columns(model, emitter, facts, columns, act_bytes, chain)
    return facts


def _cut_columns(model: Model, emitter: _Emitter, rows: TileResult, columns: int, act_bytes: int | None,
                 chain: bool) -> TileResult:
    """Rule c': each row band, already emitted, tiled again into `columns` column patches. The
    bands are found on one proto of the row-tiled graph: cutting one band leaves the others'
    nodes as they were."""
    infos = {**emitter.region.infos, **emitter.band_infos}
    proto = model.proto()
    patched = []
    for starts, end in emitter.band_io:
        band = tileable_region(proto, starts, end, infos=infos, axis=3)
        patched.append(tile_model(model, band, columns, act_bytes, chain))
    return replace(rows, columns=columns, macs_tiled=sum(p.macs_tiled for p in patched),
                   peak_band_bytes=max(p.peak_band_bytes for p in patched))


def _splice_reader(graph: gs.Graph, region: Region, end: gs.Tensor) -> gs.Node | None:
    """Rule f': the Concat along `end`'s row axis that is its one reader, if `end` is not a
    graph output."""
    readers = list(end.outputs)
    if any(out is end for out in graph.outputs) or len(readers) != 1 or readers[0].op != "Concat":
        return None
    rank = len(region.infos[region.end].shape)
    concat = readers[0]
    return concat if int(concat.attrs.get("axis", 0)) % rank == region.axes[region.end] else None


def pool_model(model: Model, start: Starts, pool: str, bands: int,
               input_shapes: InputShapes = None) -> None:
    """Rule i on `model.graph`: the GlobalAveragePool node `pool` computed from bands of its input.

    Its input x is recomputed band by band from `start` (as `tile_model` would compute it),
    each band summed over H and W, the sums added and scaled by 1 / (H W); the pool's output
    keeps its name, x stays for its other readers. Exact up to float summation order.
    """
    node = next((n for n in model.graph.nodes if n.name == pool), None)
    if node is None or node.op != "GlobalAveragePool":
        raise InputError(f"tile: no GlobalAveragePool node named {pool!r}")
    region = tileable_region(model.proto(), start, node.inputs[0].name, input_shapes,
                             consumers_checked=False)
    if region.axes[region.end] not in (2, 3):  # the band sums run over H and W
        raise InputError(f"tile: the input of {pool!r} has its rows on axis {region.axes[region.end]}, "
                         f"not on H or W")
    emitter = _Emitter(model.graph, region, True, opset=model.opset)
    partials = emitter.emit(plan_bands(region, bands), band_sum=True)
    pooled = node.outputs[0]
    position = node_index(model.graph, node)
    detach([node])
    total = partials[0]
    for index, partial in enumerate(partials[1:], start=1):
        last = index == len(partials) - 1
        result = pooled if last else gs.Variable(emitter.namer(f"{pooled.name}/sum{index}"))
        emitter.emitted.append(gs.Node("Add", name=emitter.namer(f"{pool}/add{index}"), inputs=[total, partial],
                                       outputs=[result]))
        total = result
    if len(partials) == 1:
        emitter.emitted.append(gs.Node("Identity", name=emitter.namer(f"{pool}/mean"), inputs=[total],
                                       outputs=[pooled]))
    model.graph.nodes[position:position + 1] = emitter.emitted
    model.touched(sort=False)


def tile_region(model: onnx.ModelProto, start: Starts, end: str, bands: int,
                input_shapes: InputShapes = None, chain: bool = True) -> onnx.ModelProto:
    """A copy of `model` computing `end` from `start` in `bands` row bands (rules c-h)."""
    return tile_region_with_facts(model, start, end, bands, input_shapes, chain=chain)[0]


def tile_region_with_facts(model: onnx.ModelProto, start: Starts, end: str, bands: int,
                           input_shapes: InputShapes = None, act_bytes: int | None = None,
                           chain: bool = True) -> tuple[onnx.ModelProto, TileResult]:
    """`tile_region` and the facts about the tiled region (an edge: proto in, proto out)."""
    region = tileable_region(model, start, end, input_shapes)
    tiled = Model.from_proto(model)
    result = tile_model(tiled, region, bands, act_bytes, chain)
    return tiled.proto(), result


def pool_in_bands(model: onnx.ModelProto, start: Starts, pool: str, bands: int,
                  input_shapes: InputShapes = None) -> onnx.ModelProto:
    """`pool_model` on a copy of a proto (an edge: proto in, proto out)."""
    pooled = Model.from_proto(model)
    pool_model(pooled, start, pool, bands, input_shapes)
    return pooled.proto()


# ---------------------------------------------------------------- emission

class _Emitter:
    """The nodes of every band of one region (rules f-g), not yet placed in the graph."""

    def __init__(self, graph: gs.Graph, region: Region, chain: bool, opset: int = 13,
                 act_bytes: int | None = None):
        self.region = region
        self.act_bytes = act_bytes
        self.chain = chain
        self.opset = opset
        self.namer = Namer(graph)
        self.tensors: dict[str, gs.Tensor] = graph.tensors()
        self.nodes = _region_nodes(graph, region)
        self.emitted: list[gs.Node] = []
        self.intermediates = {name for node in region.nodes for name in node.output[:used_outputs(node)]
                              if name and name != region.end}
        self.band_infos: dict[str, TensorInfo] = {}  # every band tensor's static shape
        self.band_io: list[tuple[list[str], str]] = []  # per band: its starts (gates too), its end

    def emit(self, plans: list[BandPlan], band_sum: bool = False) -> list[gs.Tensor]:
        """Every band's last tensor (or its mean over H and W weighted by its share of the
        rows: rule i), band 0 first."""
        results: list[gs.Tensor] = []
        height = self.region.height(self.region.end)
        for index, plan in enumerate(plans):
            after = results[-1] if self.chain and results else None
            band = self._band(plan, index, after)
            results.append(self._band_mean(band, (plan.rows[1] - plan.rows[0]) / height) if band_sum else band)
        return results

    def _band(self, plan: BandPlan, index: int, after: gs.Tensor | None) -> gs.Tensor:
        """Append band `index`'s nodes (rule f); returns the tensor of its `end` rows."""
        region = self.region
        have: dict[str, tuple[gs.Tensor, Rows]] = {}  # region tensor -> (band tensor, its rows)
        for start in region.starts:  # each waits for the previous band (rule g)
            if start in region.gates:
                continue
            rows = plan.produced[start]
            whole = (0, region.height(start))
            take = self._gather if gathers_input(region, start, rows, self.act_bytes) else self._slice
            have[start] = (take(self.tensors[start], whole, rows, index, region.axes[start], after), rows)
        for node in self.nodes.values():
            key = node.outputs[0].name
            inputs = list(node.inputs)
            for i in region.region_inputs[key]:
                band_tensor, rows = have[inputs[i].name]
                inputs[i] = self._slice(band_tensor, rows, plan.reads[(key, i)], index,
                                        region.axes[inputs[i].name])
            name = self.namer(f"{node.name or key}_band{index}")
            outputs = []
            for tensor in node.outputs[:_used_outputs(node)]:
                outputs.append(gs.Variable(self.namer(f"{tensor.name}_band{index}")))
                have[tensor.name] = (outputs[-1], plan.produced[key])
                self._record(outputs[-1].name, tensor.name, plan.produced[key])
            attrs = dict(node.attrs)
            if key in plan.pads:
                _set_band_pads(attrs, region.windows[key], plan.pads[key])
            if region.windows[key].sliced:
                inputs[1:3] = self._band_slice(inputs, region.windows[key], plan.reads[(key, 0)])
            if node.op == "Resize":  # rule d': the factors as constant scales (no sizes, no roi)
                inputs[1:] = self._resize_scales(region, node)
            if node.op == "Reshape":
                inputs[1] = self._band_shape(key, plan.produced[key], index)
                attrs.pop("allowzero", None)  # its 0s copy the axes before the rows
            if key in plan.output_padding:
                attrs.pop("output_padding", None)
                attrs["output_padding"] = [plan.output_padding[key],
                                           region.windows[key].w_output_padding]
            self.emitted.append(gs.Node(node.op, name=name, attrs=attrs, inputs=inputs,
                                        outputs=outputs, domain=node.domain))
        band_end, rows = have[region.end]  # an upsampling end may hold more rows than the band's
        result = self._slice(band_end, rows, plan.rows, index, region.axes[region.end])
        starts = [have[name][0].name if name in have else name for name in region.starts]
        self.band_io.append((starts, result.name))
        return result

    def _resize_scales(self, region: Region, node: gs.Node) -> list[gs.Constant]:
        """An empty roi (opset 11 needs one) and the factors of the static shapes as scales."""
        source, result = region.infos[node.inputs[0].name].shape, region.infos[node.outputs[0].name].shape
        scales = np.array([o / i for o, i in zip(result, source, strict=True)], np.float32)
        base = node.name or node.outputs[0].name
        return [gs.Constant(self.namer(f"{base}_roi"), np.zeros(0, np.float32)),
                gs.Constant(self.namer(f"{base}_scales"), scales)]

    def _band_slice(self, inputs: list[gs.Tensor], window: Window, read: Rows) -> list[gs.Tensor]:
        """Rule d''': a band's Slice along H starts at row 0 of the rows sliced for it and
        ends after its last, (b-1) s + 1 rows on; its other axes keep their starts and ends."""
        starts, ends = (_constant_values(tensor).copy() for tensor in inputs[1:3])
        starts[window.slice_index] = 0
        ends[window.slice_index] = read[1] - read[0]
        return [gs.Constant(self.namer(f"{tensor.name}_band"), values)  # Tind kept: int32 or int64
                for tensor, values in zip(inputs[1:3], (starts, ends), strict=True)]

    def _band_shape(self, key: str, rows: Rows, index: int) -> gs.Constant:
        """Rule a'': a band's Reshape target: 0 (copy) for the axes before the rows, the band's
        positions along them, the static sizes after."""
        axis, shape = self.region.axes[key], self.region.infos[key].shape
        values = [0] * axis + [rows[1] - rows[0]] + list(shape[axis + 1:])
        return self._ints(f"{key}_band{index}/shape", values)

    def _slice(self, tensor: gs.Tensor, have: Rows, want: Rows, index: int, axis: int,
               after: gs.Tensor | None = None) -> gs.Tensor:
        """`tensor` (holding rows `have` along `axis`) narrowed to rows `want`; itself when
        they agree.

        `after`: a tensor this Slice must wait for (rule g), through a zero added to its steps:
        a computed start or end would leave the band's rows unknown to symbolic shape
        inference (it takes unknown steps as 1, which they are).
        """
        if have == want and after is None:
            return tensor
        band = "" if f"_band{index}" in tensor.name else f"_band{index}"
        output = self.namer(f"{tensor.name}{band}_rows{want[0]}_{want[1]}")
        values = (want[0] - have[0], want[1] - have[0], axis)
        params: list[gs.Tensor] = [self._ints(f"{output}/{part}", [value]) for part, value in
                                   zip(("starts", "ends", "axes"), values, strict=True)]
        if after is not None:
            params.append(self._after(self._ints(f"{output}/steps", [1]), after))
        result = gs.Variable(output)
        self.emitted.append(gs.Node("Slice", name=self.namer(f"{output}/slice"),
                                    inputs=[tensor, *params], outputs=[result]))
        self._record(output, tensor.name, want, axis)
        return result

    def _gather(self, tensor: gs.Tensor, have: Rows, want: Rows, index: int, axis: int,
                after: gs.Tensor | None = None) -> gs.Tensor:
        """Rule f'': a band's rows of a graph input, taken by Gather of their indices (plus the
        zero of rule g): left float by the int8 flow (fmcompress/int8.py rule a'), each band
        then quantizes its own rows, where a Slice would let onnxruntime quantize the whole
        input first and slice its uint8 copy."""
        if have == want and after is None:
            return tensor
        output = self.namer(f"{tensor.name}_band{index}_rows{want[0]}_{want[1]}")
        indices: gs.Tensor = self._ints(f"{output}/indices", list(range(want[0] - have[0], want[1] - have[0])))
        if after is not None:
            indices = self._after(indices, after)
        result = gs.Variable(output)
        self._node("Gather", f"{output}/gather", [tensor, indices], result, axis=axis)
        self._record(output, tensor.name, want, axis)
        return result

    def _record(self, name: str, source: str, rows: Rows, axis: int | None = None) -> None:
        """The static shape of band tensor `name`: `source`'s (a region or band tensor), with
        `rows` along its row axis (rule c' tiles the bands again, from these shapes)."""
        info = self.band_infos.get(source) or self.region.infos[source]
        axis = self.region.axes[source] if axis is None else axis
        shape = list(info.shape)
        shape[axis] = rows[1] - rows[0]
        self.band_infos[name] = TensorInfo(tuple(shape), info.dtype)

    def _after(self, steps: gs.Tensor, tensor: gs.Tensor) -> gs.Tensor:
        """`steps` + 0, where the 0 is computed from `tensor`: a real data dependency (rule g).

        The zero is the sum of an empty Slice of `tensor` along axis 0 (no element is read, so
        NaN or inf cannot leak in; axis 0 exists whatever the rank of the previous band's end);
        onnxruntime cannot constant-fold it as it folds Shape of static shapes.
        """
        base = self.namer(f"{steps.name}/after")
        parts = ("zero", "empty_ends", "axes", "empty", "as_int", "sum")
        names = [self.namer(f"{base}/{part}") for part in parts]
        zero, empty_ends, axes = (gs.Constant(name, np.zeros(1, np.int64)) for name in names[:3])
        empty, as_int, total = (gs.Variable(name) for name in names[3:])
        self._node("Slice", f"{base}/slice", [tensor, zero, empty_ends, axes], empty)
        self._node("Cast", f"{base}/cast", [empty], as_int, to=onnx.TensorProto.INT64)
        self._node("ReduceSum", f"{base}/sum", [as_int], total, keepdims=0)
        result = gs.Variable(self.namer(f"{steps.name}/dep"))
        self._node("Add", f"{base}/add", [steps, total], result)
        return result

    def _band_mean(self, tensor: gs.Tensor, weight: float) -> gs.Tensor:
        """Rule i: `tensor`'s GlobalAveragePool, times `weight` (its share of the rows)."""
        mean = gs.Variable(self.namer(f"{tensor.name}/mean"))
        self._node("GlobalAveragePool", f"{mean.name}/op", [tensor], mean)
        if weight == 1:
            return mean
        dtype = np.dtype(self.region.infos[self.region.end].dtype)
        scale = gs.Constant(self.namer(f"{mean.name}/weight"), np.array(weight, dtype))
        weighted = gs.Variable(self.namer(f"{tensor.name}/weighted"))
        self._node("Mul", f"{weighted.name}/op", [mean, scale], weighted)
        return weighted

    def static_shape(self, node: gs.Node) -> list[gs.Node]:
        """Rule h': `node` itself, or, for a Shape or Size of a region intermediate, the nodes
        that compute its value: the static sizes, the batch dim from the main start's Shape."""
        if node.op not in SHAPE_OPS or not node.inputs or node.inputs[0].name not in self.intermediates:
            return [node]
        shape = self.region.infos[node.inputs[0].name].shape
        output, base = node.outputs[0], f"{node.name or node.outputs[0].name}/static"
        detach([node])
        mark = len(self.emitted)  # the band nodes are placed already: what follows is this node's
        batch = gs.Variable(self.namer(f"{base}/start_dims"))
        self._node("Shape", f"{base}/start_shape", [self.tensors[self.region.start]], batch)
        if node.op == "Size":
            count = gs.Variable(self.namer(f"{base}/batch_dim"))
            index = gs.Constant(self.namer(f"{base}/index"), np.array(0, np.int64))
            self._node("Gather", f"{base}/batch", [batch, index], count)
            per_item = gs.Constant(self.namer(f"{base}/per_item"), np.array(int(np.prod(shape[1:])), np.int64))
            self._node("Mul", f"{base}/size", [count, per_item], output)
            return self.emitted[mark:]
        dims = list(range(len(shape)))[slice(node.attrs.get("start", 0), node.attrs.get("end"))]
        sizes = self._ints(f"{base}/sizes", [shape[d] for d in dims if d != 0])
        if 0 not in dims:
            self._node("Identity", f"{base}/value", [sizes], output)
            return self.emitted[mark:]
        first = gs.Variable(self.namer(f"{base}/first_dim"))
        bounds = [self._ints(f"{base}/{part}", [value]) for part, value in (("s", 0), ("e", 1), ("a", 0))]
        self._node("Slice", f"{base}/first", [batch, *bounds], first)
        self._node("Concat", f"{base}/value", [first, sizes], output, axis=0)
        return self.emitted[mark:]

    def _ints(self, base: str, values: list[int]) -> gs.Constant:
        return gs.Constant(self.namer(base), np.array(values, np.int64))

    def _node(self, op: str, base: str, inputs: list[gs.Tensor], output: gs.Tensor,
              **attrs: object) -> None:
        self.emitted.append(gs.Node(op, name=self.namer(base), attrs=attrs, inputs=inputs,
                                    outputs=[output]))


def _used_outputs(node: gs.Node) -> int:
    """`used_outputs` of a graphsurgeon node: every Split output, else only the first."""
    return len(node.outputs) if node.op == "Split" else 1


def _constant_values(tensor: gs.Tensor) -> np.ndarray:
    """The value of a constant input: an initializer or a Constant node's output."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values).reshape(-1)
    return np.asarray(tensor.inputs[0].attrs["value"].values).reshape(-1)


def _set_band_pads(attrs: dict, window: Window, pads: Rows) -> None:
    """Explicit band pads along the band axis, the other axis' resolved pads; no auto_pad,
    ceil_mode 0 (rules d-e). ONNX orders them [top, left, bottom, right]."""
    for name in ("pads", "auto_pad", "ceil_mode"):
        attrs.pop(name, None)
    kept = window.cross_pads
    attrs["pads"] = ([pads[0], kept[0], pads[1], kept[1]] if window.axis == 2
                     else [kept[0], pads[0], kept[1], pads[1]])


def _region_nodes(graph: gs.Graph, region: Region) -> dict[str, gs.Node]:
    """The graph's nodes of `region` (found on its proto), by first output name, in region order."""
    by_output = {node.outputs[0].name: node for node in graph.nodes if node.outputs}
    return {node.output[0]: by_output[node.output[0]] for node in region.nodes}



def _facts(region: Region, plans: list[BandPlan], act_bytes: int | None) -> TileResult:
    halo: dict[str, int] = {}
    macs_untiled = macs_tiled = 0
    for node in region.nodes:
        key = node.output[0]
        height = region.height(key)
        computed = sum(plan.produced[key][1] - plan.produced[key][0] for plan in plans)
        halo[node.name or key] = computed - height
        per_row = row_bytes(region.infos[key], 1, region.axes[key]) * region.windows[key].macs_per_output
        macs_untiled += per_row * height
        macs_tiled += per_row * computed
    return TileResult(region.start, region.end, len(plans), [p.rows[1] - p.rows[0] for p in plans],
                      halo, macs_untiled, macs_tiled,
                      max(band_tensor_bytes(region, plan, act_bytes) for plan in plans),
                      region.node_names)
