"""Tiling, part 1: the region a band rewrite may cover, validated (passes/tile.py rules a, a',
a'', b); how each of its nodes maps output rows to input rows is passes/tile_windows.py's.

Rules (the full list, lettered, is passes/tile.py's; these are the ones this module checks):

a. Region: the nodes that compute `end` from its starts, walking back from `end` (never into a
   Reshape's shape operand, a Resize's roi, scales and sizes: `SHAPE_OPERANDS`); every other
   input they read is a constant: an initializer, a Constant's output, or the output of a
   constant-only node of `CONSTANT_FOLDABLE_OPS` (an old model's scale Unsqueezed for a Mul,
   evaluated by onnx.reference when read).
   Which ops: `TILE_*_OPS` of passes/ops.py, ConvTranspose, nearest Resize by integer
   factors, Slice with constant parameters.
a'. Side inputs: the starts after the first; one value per channel ([N, C, 1, 1]) is read
   whole by every band, like a constant.
a''. Row axes: each region tensor carries one (`Region.axes`), found walking forward from
   those of the starts. A start's is the one the graph's layout gives it (`row_axes`: 2 for
   a 4-D map, moved by Transposes and merging Reshapes); where the region does not validate
   so, every start takes axis 2 (what tiling did before rule a''). Each op checks its own
   condition on the rows it reads (`_validate_node`), and the region inputs of one node have
   their rows on one axis.
b. Anything else is an InputError of one line, raised here (never half-way through a rewrite).
d. A node's `Window` (passes/tile_windows.py: rules d, d', d'', d''', e, a'') comes with it.

The analysis reads ONNX protos (it runs shape inference): `tileable_region(model.proto(), ...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fmcompress.errors import InputError
from fmcompress.onnxutil import constant_attr_value, node_attrs
from fmcompress.shapes import TensorInfo, infer_tensor_infos, resolve_input_shapes

from .ops import (
    CONSTANT_FOLDABLE_OPS,
    SHAPE_OPS,
    TILE_CHANNEL_OPS,
    TILE_LAYOUT_OPS,
    TILE_ROW_LOCAL_OPS,
    TILE_SAME_SHAPE_OPS,
    TILE_SINGLE_MAP_OPS,
    TILE_WINDOW_OPS,
)
from .tile_windows import (
    IDENTITY_WINDOW,
    Window,
    kernel_window,
    reshape_scale,
    reshape_window,
    resize_window,
    slice_window,
    transposed_axis,
    transposed_window,
)

NCHW_OPS = TILE_WINDOW_OPS | {"ConvTranspose", "Resize", "LRN"}  # need the rows on axis 2 of an NCHW map
PATCH_OPS = TILE_WINDOW_OPS | {"LRN"}  # ... or on axis 3, the columns of 2-D patches (tile rule c')
# input indices that carry a shape, not values: never walked into (a Resize's sizes computed
# from Shape ops, as `F.interpolate(size=x.shape[-2:])` exports them, are static once shapes are)
SHAPE_OPERANDS = {"Reshape": {1}, "Resize": {1, 2, 3}}


@dataclass
class Region:
    """The validated nodes (graph order) computing `end` from its starts, with their shapes."""

    starts: tuple[str, ...]  # the first is the main one; the others are side inputs (rule a')
    end: str
    nodes: list[onnx.NodeProto]
    infos: dict[str, TensorInfo]  # every region tensor, the starts (gates too) and `end` included
    windows: dict[str, Window]  # by node key (first output name)
    region_inputs: dict[str, list[int]]  # node key -> indices of inputs that are region tensors
    axes: dict[str, int]  # every region tensor's row axis (rule a'')
    gates: frozenset[str] = frozenset()  # per-channel side inputs, read whole (rule a')
    inputs: frozenset[str] = frozenset()  # starts that are graph inputs: their band rows stay float (tile rule f'')

    @property
    def start(self) -> str:
        return self.starts[0]

    @property
    def node_names(self) -> list[str]:
        return [node.name for node in self.nodes]

    def height(self, tensor: str) -> int:
        """Rows of `tensor`: its size along its row axis."""
        return self.infos[tensor].shape[self.axes[tensor]]


Starts = str | Sequence[str]


def tileable_region(model: onnx.ModelProto, start: Starts, end: str,
                    input_shapes: Mapping[str, Sequence[int]] | None = None, *,
                    infos: Mapping[str, TensorInfo] | None = None,
                    consumers_checked: bool = True, layout: Mapping[str, int] | None = None,
                    axis: int | None = None) -> Region:
    """The nodes computing `end` from `start` (a tensor, or several: rule a'), validated
    for tiling (rules a-b).

    `infos` (every tensor's shape, from `infer_tensor_infos`) and `layout` (`row_axes` of
    the graph) save their analyses when a planner tries many regions of one model. `axis`:
    every start's band axis, with no fallback (3: the columns of 2-D patches, tile rule c');
    None: the graph's layout (rule a'')."""
    graph = model.graph
    starts = (start,) if isinstance(start, str) else tuple(start)
    producers = {out: node for node in graph.node for out in node.output if out}
    constants = _Constants(model)
    nodes = _ancestors(graph, producers, constants, starts, end)
    if infos is None:
        shapes = resolve_input_shapes(model, {k: tuple(v) for k, v in (input_shapes or {}).items()})
        infos = infer_tensor_infos(model, shapes)
    # a side input of one value per channel (a squeeze-excitation gate) is read whole by every
    # band, like a constant that does not vary along H (rule a')
    gates = {name for name in starts[1:] if name in infos and len(infos[name].shape) == 4
             and infos[name].shape[2:] == (1, 1)}
    for name in gates:
        constants.pin(name, np.zeros(infos[name].shape, np.float32))
    members = {id(node) for node in nodes}
    tensors = (set(starts) - gates) | {name for node in nodes for name in node.output[:used_outputs(node)]
                                       if name}
    if consumers_checked:  # a recomputing copy (pool_in_bands) leaves the original nodes in place
        _check_consumers(graph, nodes, members, end)
    for name in sorted(tensors):
        if name not in infos:
            raise InputError(f"tile: tensor {name!r} has no static shape")
    mains = [name for name in starts if name not in gates]
    if axis is None:
        axes = _start_axes(mains, infos, row_axes(graph, infos) if layout is None else layout)
        windows, region_inputs, axes = _validated(nodes, tensors, constants, infos, axes)
    else:
        windows, region_inputs, axes = _validate(nodes, tensors, constants, infos, dict.fromkeys(mains, axis))
    return Region(starts, end, nodes, {t: infos[t] for t in tensors | gates}, windows, region_inputs, axes,
                  frozenset(gates), frozenset(starts) & {inp.name for inp in graph.input})


def row_axes(graph: onnx.GraphProto, infos: Mapping[str, TensorInfo]) -> dict[str, int]:
    """Rule a'': the row axis the graph's layout gives each tensor, in graph order. A 4-D graph
    input or NCHW op output has 2, a Transpose moves it (batch axis kept), a Reshape merging it
    with the axes after it keeps it, an op whose output has its input's rank keeps it; any
    other 4-D tensor has 2 (Constant outputs have none)."""
    axes = {inp.name: 2 for inp in graph.input if inp.name in infos and len(infos[inp.name].shape) == 4}
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        source = next((name for name in node.input if name in axes), None)
        for out in node.output:
            axis = _layout_axis(node, source, axes, infos, out) if out in infos else None
            if axis is not None:
                axes[out] = axis
    return axes


def _layout_axis(node: onnx.NodeProto, source: str | None, axes: Mapping[str, int],
                 infos: Mapping[str, TensorInfo], out: str) -> int | None:
    rank = len(infos[out].shape)
    default = 2 if rank == 4 else None
    if source is None or node.op_type in NCHW_OPS:
        return default
    rows, in_shape = axes[source], infos[source].shape
    if node.op_type == "Transpose":
        axis = transposed_axis(node_attrs(node).get("perm") or list(range(rank))[::-1], rows)
        return default if axis is None else axis
    if node.op_type == "Reshape":
        return rows if reshape_scale(in_shape, infos[out].shape, rows) is not None else default
    return rows if rank == len(in_shape) else default


def _start_axes(starts: list[str], infos: Mapping[str, TensorInfo], layout: Mapping[str, int]) -> dict[str, int]:
    """Rule a'': each start's row axis, as the graph's layout gives it."""
    axes = {}
    for name in starts:
        axis = layout.get(name, 2 if len(infos[name].shape) == 4 else None)
        if axis is None:
            raise InputError(f"tile: tensor {name!r} is not a 4-D NCHW map, nor one whose rows a Transpose "
                             f"or Reshape moved (rule a''): it has no row axis")
        axes[name] = axis
    return axes


Validated = tuple[dict[str, Window], dict[str, list[int]], dict[str, int]]


def _validated(nodes: list[onnx.NodeProto], tensors: set[str], constants: Mapping[str, np.ndarray | None],
               infos: Mapping[str, TensorInfo], axes: dict[str, int]) -> Validated:
    """Rule a'': the region validated from the starts' layout axes, else with every start's rows
    on axis 2 (tiling before rule a''); the first attempt's error when neither validates."""
    try:
        return _validate(nodes, tensors, constants, infos, axes)
    except InputError as error:
        nchw = dict.fromkeys(axes, 2)
        if nchw == axes or any(len(infos[name].shape) != 4 for name in axes):
            raise
        try:
            return _validate(nodes, tensors, constants, infos, nchw)
        except InputError:
            raise error from None


def _validate(nodes: list[onnx.NodeProto], tensors: set[str], constants: Mapping[str, np.ndarray | None],
              infos: Mapping[str, TensorInfo], start_axes: dict[str, int]) -> Validated:
    """Every node's window and region inputs, and every region tensor's row axis, walking
    forward from the starts' axes (rules a, a'')."""
    axes = dict(start_axes)
    windows: dict[str, Window] = {}
    region_inputs: dict[str, list[int]] = {}
    for node in nodes:
        key = node.output[0]
        region_inputs[key] = [i for i, name in enumerate(node.input) if name in tensors]
        rows = _input_rows(node, region_inputs[key], axes)
        windows[key], out_rows = _validate_node(node, tensors, constants, infos, rows)
        for name in node.output[:used_outputs(node)]:
            if name:
                axes[name] = out_rows
    return windows, region_inputs, axes


def _input_rows(node: onnx.NodeProto, indices: list[int], axes: Mapping[str, int]) -> int:
    """The row axis of a node's region inputs, which must agree (rule a'')."""
    rows = {axes[node.input[i]] for i in indices}
    if len(rows) != 1:
        what = "reads no region map" if not rows else f"reads maps with their rows on different axes {sorted(rows)}"
        raise InputError(f"tile: {node.op_type} node {node.name!r} {what}")
    return rows.pop()


class _Constants(Mapping):
    """Tensors with a fixed value (initializers that are not graph inputs, Constant outputs, and
    the outputs of small constant-only nodes: an old model's scale Unsqueezed for a Mul),
    converted to arrays only when read: a planner validates many regions of one graph."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        overridable = {inp.name for inp in graph.input}
        self._sources: dict[str, object] = {
            init.name: init for init in graph.initializer if init.name not in overridable}
        self._sources.update({node.output[0]: node for node in graph.node if node.op_type == "Constant"})
        for node in graph.node:  # graph order is topological: a chain of them is found whole
            if (node.op_type in CONSTANT_FOLDABLE_OPS and node.domain in ("", "ai.onnx") and node.input
                    and all(not name or name in self._sources for name in node.input)):
                self._sources.update({out: node for out in node.output if out})
        self._opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self._values: dict[str, np.ndarray | None] = {}

    def __getitem__(self, name: str) -> np.ndarray | None:
        if name not in self._values:
            source = self._sources[name]
            if isinstance(source, onnx.TensorProto):
                self._values[name] = numpy_helper.to_array(source)
            elif source.op_type == "Constant":
                self._values[name] = constant_attr_value(node_attrs(source))
            else:
                self._values.update(self._evaluated(source))
        return self._values[name]

    def _evaluated(self, node: onnx.NodeProto) -> dict[str, np.ndarray]:
        """A constant-only node's outputs, by onnx's reference implementation."""
        from onnx.reference import ReferenceEvaluator

        feeds = {name: self[name] for name in node.input if name}
        inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
                  for name, value in feeds.items()]
        outputs = [helper.make_tensor_value_info(out, onnx.TensorProto.UNDEFINED, None) for out in node.output if out]
        graph = helper.make_graph([node], "constant", inputs, outputs)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self._opset)])
        results = ReferenceEvaluator(model).run(None, feeds)
        return dict(zip([out for out in node.output if out], results, strict=True))

    def __contains__(self, name: object) -> bool:
        return name in self._sources

    def pin(self, name: str, value: np.ndarray) -> None:
        """Treat `name` as a constant with this value (a per-channel gate: rule a')."""
        self._sources[name] = value
        self._values[name] = value

    def __iter__(self):
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def walk_back(end: str, producers: Mapping[str, onnx.NodeProto], constants: Mapping[str, object] | set[str],
              stop: Callable[[str], bool]) -> tuple[set[int], list[tuple[str, onnx.NodeProto]]]:
    """The nodes that compute `end` (as ids), walking back through producers, and where the
    walk stopped: every (tensor, a node reading it) that `stop` accepts or no node
    produces, in the order met. Constants and shape operands (`SHAPE_OPERANDS`: the shape
    arithmetic of an exporter's Reshape, which tiling replaces by the static shape) are
    skipped."""
    seen: set[int] = set()
    boundary: list[tuple[str, onnx.NodeProto]] = []
    met: set[str] = set()
    stack = [producers[end]]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for index, name in enumerate(node.input):
            if not name or name in constants or name in met or index in SHAPE_OPERANDS.get(node.op_type, ()):
                continue
            if stop(name) or name not in producers:
                met.add(name)
                boundary.append((name, node))
            else:
                stack.append(producers[name])
    return seen, boundary


def _ancestors(graph: onnx.GraphProto, producers: dict[str, onnx.NodeProto],
               constants: Mapping[str, object], starts: tuple[str, ...], end: str) -> list[onnx.NodeProto]:
    """Region nodes in graph order: everything between the starts and `end`, constants excluded."""
    if end not in producers:
        raise InputError(f"tile: tensor {end!r} is not produced by a node")
    if not starts:
        raise InputError(f"tile: {end!r} reads no tensor computed at run time that a region could start from")
    graph_inputs = {inp.name for inp in graph.input}
    for start in starts:
        if start not in producers and start not in graph_inputs:
            raise InputError(f"tile: tensor {start!r} is neither a node output nor a graph input")
    start = starts[0]
    seen, boundary = walk_back(end, producers, constants, lambda name: name in starts)
    for name, reader in boundary:
        if name not in starts:
            raise InputError(f"tile: {reader.op_type} node {reader.name!r} reads {name!r}, which is "
                             f"neither computed from {start!r} nor a constant")
    reached = {name for name, _ in boundary}
    if start not in reached:
        raise InputError(f"tile: {end!r} is not computed from {start!r}")
    if set(starts) - reached:
        raise InputError(f"tile: side input(s) {', '.join(sorted(set(starts) - reached))} are not read by "
                         f"the region")
    nodes = [node for node in graph.node if id(node) in seen]
    from_start = set(starts)
    for node in nodes:
        if any(name in from_start for name in node.input):
            from_start.update(node.output)
    for node in nodes:
        if node.output[0] not in from_start:  # e.g. a weight computed at run time
            raise InputError(f"tile: {node.op_type} node {node.name!r} computes {node.output[0]!r} "
                             f"without reading {start!r}; weights and operands must be constants")
    return nodes


def used_outputs(node: onnx.NodeProto) -> int:
    """How many outputs a region node may have in use: every Split output, else only the first."""
    return len(node.output) if node.op_type == "Split" else 1


def _check_consumers(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], members: set[int],
                     end: str) -> None:
    """Every intermediate is read only inside the region, or by a Shape or Size node outside it
    (its shape is static: rule h'); extra outputs are unused (rule b)."""
    outside = {out.name for out in graph.output}
    shaped: set[str] = set()
    for node in graph.node:
        if id(node) not in members:
            (shaped if node.op_type in SHAPE_OPS else outside).update(node.input)
    for node in nodes:
        for index, name in enumerate(node.output):
            if not name or name == end:
                continue
            inside = any(name in other.input for other in nodes)
            if index >= used_outputs(node) and (inside or name in outside or name in shaped):
                raise InputError(f"tile: output {index} ({name!r}) of {node.op_type} node "
                                 f"{node.name!r} is used; only single-output nodes can be tiled")
            if index < used_outputs(node) and name in outside:
                raise InputError(f"tile: intermediate {name!r} is used outside the region (or is a "
                                 f"graph output), so the full tensor would still be needed")


def _validate_node(node: onnx.NodeProto, tensors: set[str], constants: Mapping[str, np.ndarray | None],
                   infos: Mapping[str, TensorInfo], rows: int) -> tuple[Window, int]:
    """The node's window and the row axis of its outputs, given that of its region inputs."""
    op, attrs = node.op_type, node_attrs(node)
    where = f"tile: {op} node {node.name!r}"
    if node.domain not in ("", "ai.onnx"):
        raise InputError(f"{where}: custom-domain op {node.domain}::{op} is not supported")
    allowed = (2, 3) if op in PATCH_OPS else (2,)
    if op in NCHW_OPS and (rows not in allowed or len(infos[node.input[0]].shape) != 4):
        raise InputError(f"{where}: needs a 4-D NCHW map with its rows on axis {' or '.join(map(str, allowed))}, "
                         f"not on axis {rows} of {list(infos[node.input[0]].shape)}")
    if op in TILE_WINDOW_OPS or op == "ConvTranspose":
        if node.input[0] not in tensors or any(name in tensors for name in node.input[1:]):
            raise InputError(f"{where}: weights and bias must be constants")
        if op == "ConvTranspose":
            return transposed_window(node, attrs, constants, infos), 2
        return kernel_window(node, attrs, constants, infos, rows), rows
    if op == "Resize":
        return resize_window(node, attrs, tensors, constants, infos), 2
    if op in TILE_SINGLE_MAP_OPS:
        _only_input_0(node, tensors, where)
        if op == "BatchNormalization" and attrs.get("training_mode", 0):
            raise InputError(f"{where}: training_mode=1 is not supported")
        if op == "BatchNormalization" and rows == 1:
            raise InputError(f"{where}: normalises per index of axis 1, which holds the rows")
        return IDENTITY_WINDOW, rows
    if op == "Slice":
        return slice_window(node, tensors, constants, infos, rows), rows
    if op in TILE_CHANNEL_OPS:
        rank = len(infos[node.output[0]].shape)
        if int(attrs.get("axis", 0)) % rank in (0, rows):
            raise InputError(f"{where}: only a channel axis can be concatenated or split, not the batch "
                             f"axis or the rows (axis {rows})")
        if any(name and name not in tensors for name in node.input[:1 if op == "Split" else None]):
            raise InputError(f"{where}: every input must come from the region")
        return IDENTITY_WINDOW, rows
    if op in TILE_SAME_SHAPE_OPS:
        _check_operands(node, tensors, constants, infos, rows, where)
        return IDENTITY_WINDOW, rows
    if op in TILE_ROW_LOCAL_OPS or op in TILE_LAYOUT_OPS:
        _only_input_0(node, tensors, where)
        return _layout_node(node, attrs, constants, infos, rows, where)
    raise InputError(f"{where}: {op} is not spatially local or not supported by tiling")


def _only_input_0(node: onnx.NodeProto, tensors: set[str], where: str) -> None:
    if node.input[0] not in tensors or any(name in tensors for name in node.input[1:]):
        raise InputError(f"{where}: only input 0 may come from the region")


def _check_operands(node: onnx.NodeProto, tensors: set[str], constants: Mapping[str, np.ndarray | None],
                    infos: Mapping[str, TensorInfo], rows: int, where: str) -> None:
    """Same-shape ops: region operands of the output's shape, constants that do not vary along
    the rows."""
    out_shape = infos[node.output[0]].shape
    for name in node.input:
        if name in tensors and infos[name].shape != out_shape:
            raise InputError(f"{where}: operand {name!r} {infos[name].shape} is broadcast to "
                             f"{out_shape}; only same-shape region operands are supported")
        if name not in tensors and _varies_along(constants[name], rows, len(out_shape)):
            raise InputError(f"{where}: constant operand {name!r} varies along the rows (axis {rows})")


def _layout_node(node: onnx.NodeProto, attrs: Mapping, constants: Mapping[str, np.ndarray | None],
                 infos: Mapping[str, TensorInfo], rows: int, where: str) -> tuple[Window, int]:
    """Rule a'': Transpose, Reshape, LayerNormalization and MatMul on a region tensor."""
    op, rank = node.op_type, len(infos[node.input[0]].shape)
    if op == "Transpose":
        axis = transposed_axis(attrs.get("perm") or list(range(rank))[::-1], rows)
        if axis is None:
            raise InputError(f"{where}: moves the batch axis 0")
        return IDENTITY_WINDOW, axis
    if op == "Reshape":
        return reshape_window(node, infos, rows), rows
    if op == "LayerNormalization":
        first = int(attrs.get("axis", -1)) % rank
        if rows >= first:
            raise InputError(f"{where}: normalises axes {first}..{rank - 1}, which hold the rows (axis {rows})")
        return IDENTITY_WINDOW, rows
    weight = constants.get(node.input[1])
    if weight is None or weight.ndim != 2:
        raise InputError(f"{where}: only a product by a constant 2-D matrix [K, M] is tiled")
    if rows == rank - 1:
        raise InputError(f"{where}: contracts the last axis, which holds the rows")
    return Window(macs_per_output=int(weight.shape[0])), rows


def _varies_along(value: np.ndarray | None, rows: int, rank: int) -> bool:
    """Whether a constant, broadcast against a tensor of `rank` axes, varies along axis `rows`."""
    if value is None:
        return True
    index = rows - (rank - value.ndim)  # numpy broadcasting aligns the last axes
    return 0 <= index < value.ndim and value.shape[index] != 1
