"""TilePass: compute a chain of spatially local ops band by band (exact row tiling).

onnxruntime materialises every node's full output. Where an early, high-resolution
stage of a CNN sets the memory peak, computing a chain of spatially local ops in
horizontal bands of rows (patch-based inference, MCUNetV2) keeps only one band's
tensors alive at a time; only the halo rows that neighbouring bands share are
computed twice, and the result equals the untiled model up to float rounding.
A region is given by two tensors, `start` (a 4-D NCHW map or graph input) and `end`.
Rules:

a. Region: the nodes that compute `end` from `start`, found by walking back from
   `end`; every other input they read is a constant (initializer not listed as a
   graph input, or a Constant node's output). Supported ops: Conv (2-D, any kernel,
   stride, dilation, group, pads, auto_pad; constant weight and bias); MaxPool,
   AveragePool (ceil_mode, pads, dilations, count_include_pad) and LpPool
   (ceil_mode 0); ConvTranspose (rule d''); BatchNormalization (inference); elementwise unary ops (UNARY_OPS);
   elementwise Add/Sub/Mul/Div/Max/Min/Sum/Mean/PRelu whose operands are region
   tensors of the output's exact shape or constants that do not vary along H
   (broadcast H dim 1); Split and Concat along the channel axis (every Split output
   may be used); nearest Resize by integer factors (rule d'). Extra outputs (MaxPool
   Indices, Dropout mask) must be unused.
a'. Side inputs: `start` may be several tensors; the first is the main one, the others
   are full tensors computed before the region (a finer pyramid level that a Concat
   joins, an earlier map a residual Add reads). Each is sliced per band like `start`,
   and each must be read by the region. A side input of one value per channel
   ([N, C, 1, 1], a squeeze-excitation gate) is read whole by every band, like a
   constant.
b. Rejected (InputError, one line): any other op (linear Resize, global pooling, Reshape,
   Transpose, Softmax, ...), a non-4-D map, a non-constant weight or operand from
   outside the region, an intermediate that is a graph output or has a consumer
   outside the region (the full tensor would still be needed), a band whose rows
   would lie wholly in padding, and pooling cases a band cannot reproduce exactly
   (rule e).
c. Bands: the H_out rows of `end` are split into `bands` contiguous bands like
   numpy.array_split: every band has floor(H_out / bands) rows and the first
   H_out mod bands bands one more. 1 <= bands <= H_out.
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
e. Pools: ceil_mode=1 becomes ceil_mode=0 with the extra bottom rows (and right
   columns) as explicit bottom (right) pad. That is exact for MaxPool (pads are -inf), LpPool (pads are 0) and
   AveragePool with count_include_pad=0 (pads are not counted); AveragePool with
   count_include_pad=1 counts padding only up to the original bottom (right) pad, so a
   band (a region) that would need more is rejected. onnxruntime needs pool pads smaller than the
   kernel; a band that would need more is rejected.
f. Emitted per band i (names <node or tensor>_band<i>, unique): one Slice of `start`'s
   rows (axis 2), a copy of every region node with its band pads (auto_pad removed,
   ceil_mode 0, extra outputs dropped), and a Slice wherever a consumer reads fewer
   rows than its producer computed (e.g. the two operands of a residual Add, aligned
   to the Add's rows). A final Concat (axis 2) of the band outputs produces `end`
   under its own name, so the rest of the graph is untouched.
g. Order: the nodes go where the producer of `end` was, band 0 entirely, then band
   1, ..., then the Concat; no toposort. onnxruntime 1.32 does not keep graph order:
   its DEFAULT execution order is a reverse DFS from the graph outputs (the unchained
   bands of a ResNet stem ran 13, 12, ..., 0 unoptimized and in a scrambled band order
   after ORT_ENABLE_ALL fused nodes), and PRIORITY_BASED (Kahn, lowest node index
   first) interleaved the bands once fused nodes got new indices, keeping every band
   alive. So (chain=True, the default) band i+1's Slice of `start` takes its starts as
   starts + ReduceSum(Cast<int64>(empty Slice of band i's output)): a zero that costs
   four nodes on an empty tensor but is a data dependency no optimizer folds, so every
   topological order runs band i to its end before band i+1 (checked from the
   profiler trace by the tests).
h. Region nodes and the value_info of their outputs are removed; constants are shared
   by the bands; opset, ir_version and metadata are kept. result.data (and
   `TileResult`) per region: bands, rows per band, halo rows recomputed per node,
   MACs tiled vs untiled, largest band tensor in bytes.
i. Squeeze-excitation: `pool_in_bands` computes a GlobalAveragePool from bands of its
   input (recomputed from a region start, each band summed over H and W, the sums added
   and scaled), so the pool never needs the whole map; the gate it leads to is then a
   per-channel side input (rule a') of the region that multiplies the map by it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fmcompress.errors import InputError
from fmcompress.onnxutil import constant_attr_value, node_attrs
from fmcompress.shapes import TensorInfo, infer_tensor_infos, resolve_input_shapes

from .base import Pass, PassContext, PassResult
from .graphutil import Namer

Rows = tuple[int, int]  # [lo, hi) along axis 2

WINDOW_OPS = ("Conv", "MaxPool", "AveragePool", "LpPool")
UNARY_OPS = (
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
    "Celu", "Softplus", "Softsign", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Erf",
    "Gelu", "Mish", "ThresholdedRelu", "Identity", "Dropout", "BatchNormalization", "Cast",
)
BINARY_OPS = ("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "PRelu")


# ---------------------------------------------------------------- the region

@dataclass(frozen=True)
class Window:
    """How a node's output rows map to input rows: [a*s - pad_top, (b-1)*s - pad_top + extent)."""

    extent: int = 1  # d*(k-1) + 1
    stride: int = 1
    pad_top: int = 0
    pad_bottom: int = 0  # explicit (auto_pad resolved), as in the original node
    kernel: int = 1  # undilated, for onnxruntime's pool pad < kernel check
    w_pads: Rows = (0, 0)  # left, right (auto_pad resolved); bands keep them
    macs_per_output: int = 0  # Conv: prod(weight.shape[1:]); pools and elementwise: 0
    upsample: int = 1  # nearest Resize by an integer factor along H: out row r reads row r // upsample
    transposed: bool = False  # ConvTranspose: input row i feeds output rows i*stride - pad_top + [0, extent)
    w_output_padding: int = 0  # ConvTranspose, kept by every band


IDENTITY_WINDOW = Window()


@dataclass
class Region:
    """The validated nodes (graph order) computing `end` from its starts, with their shapes."""

    starts: tuple[str, ...]  # the first is the main one; the others are side inputs (rule a')
    end: str
    nodes: list[onnx.NodeProto]
    infos: dict[str, TensorInfo]  # every region tensor, `start` and `end` included
    windows: dict[str, Window]  # by node key (first output name)
    region_inputs: dict[str, list[int]]  # node key -> indices of inputs that are region tensors
    gates: frozenset[str] = frozenset()  # per-channel side inputs, read whole (rule a')

    @property
    def start(self) -> str:
        return self.starts[0]

    @property
    def node_names(self) -> list[str]:
        return [node.name for node in self.nodes]

    def height(self, tensor: str) -> int:
        return self.infos[tensor].shape[2]


Starts = str | Sequence[str]


def tileable_region(model: onnx.ModelProto, start: Starts, end: str,
                    input_shapes: Mapping[str, Sequence[int]] | None = None, *,
                    infos: Mapping[str, TensorInfo] | None = None,
                    consumers_checked: bool = True) -> Region:
    """The nodes computing `end` from `start` (a tensor, or several: rule a'), validated
    for tiling (rules a-b).

    `infos` (every tensor's shape, from `infer_tensor_infos`) saves the shape inference
    when a planner tries many regions of one model."""
    graph = model.graph
    starts = (start,) if isinstance(start, str) else tuple(start)
    producers = {out: node for node in graph.node for out in node.output if out}
    constants = _constant_names(graph)
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
    tensors = (set(starts) - gates) | {name for node in nodes for name in node.output[:_used_outputs(node)]
                                       if name}
    if consumers_checked:  # a recomputing copy (pool_in_bands) leaves the original nodes in place
        _check_consumers(graph, nodes, members, end)
    windows: dict[str, Window] = {}
    region_inputs: dict[str, list[int]] = {}
    for node in nodes:
        key = node.output[0]
        for name in [*node.input, key]:
            if name in tensors and (name not in infos or len(infos[name].shape) != 4):
                raise InputError(f"tile: tensor {name!r} is not a 4-D NCHW map with a static shape")
        region_inputs[key] = [i for i, name in enumerate(node.input) if name in tensors]
        windows[key] = _validate_node(node, tensors, constants, infos)
    return Region(starts, end, nodes, {t: infos[t] for t in tensors}, windows, region_inputs, frozenset(gates))


class _Constants(Mapping):
    """Tensors with a fixed value (initializers that are not graph inputs, Constant outputs),
    converted to arrays only when read: a planner validates many regions of one graph."""

    def __init__(self, graph: onnx.GraphProto):
        overridable = {inp.name for inp in graph.input}
        self._sources: dict[str, object] = {
            init.name: init for init in graph.initializer if init.name not in overridable}
        self._sources.update({node.output[0]: node for node in graph.node if node.op_type == "Constant"})
        self._values: dict[str, np.ndarray | None] = {}

    def __getitem__(self, name: str) -> np.ndarray | None:
        if name not in self._values:
            source = self._sources[name]
            self._values[name] = (numpy_helper.to_array(source) if isinstance(source, onnx.TensorProto)
                                  else constant_attr_value(node_attrs(source)))
        return self._values[name]

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


def _constant_names(graph: onnx.GraphProto) -> _Constants:
    return _Constants(graph)


def walk_back(end: str, producers: Mapping[str, onnx.NodeProto], constants: Mapping[str, object] | set[str],
              stop: Callable[[str], bool]) -> tuple[set[int], list[tuple[str, onnx.NodeProto]]]:
    """The nodes that compute `end` (as ids), walking back through producers, and where the
    walk stopped: every (tensor, a node reading it) that `stop` accepts or no node
    produces, in the order met. Constants are skipped."""
    seen: set[int] = set()
    boundary: list[tuple[str, onnx.NodeProto]] = []
    met: set[str] = set()
    stack = [producers[end]]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for name in node.input:
            if not name or name in constants or name in met:
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


CHANNEL_OPS = ("Concat", "Split")  # along the channel axis: rows map to the same rows


def _used_outputs(node: onnx.NodeProto) -> int:
    """How many outputs a region node may have in use: every Split output, else only the first."""
    return len(node.output) if node.op_type == "Split" else 1


def _check_consumers(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], members: set[int],
                     end: str) -> None:
    """Every intermediate is read only inside the region; extra outputs are unused (rule b)."""
    outside = {name for node in graph.node if id(node) not in members for name in node.input}
    outside |= {out.name for out in graph.output}
    for node in nodes:
        for index, name in enumerate(node.output):
            if not name or name == end:
                continue
            inside = any(name in other.input for other in nodes)
            if index >= _used_outputs(node) and (inside or name in outside):
                raise InputError(f"tile: output {index} ({name!r}) of {node.op_type} node "
                                 f"{node.name!r} is used; only single-output nodes can be tiled")
            if index < _used_outputs(node) and name in outside:
                raise InputError(f"tile: intermediate {name!r} is used outside the region (or is a "
                                 f"graph output), so the full tensor would still be needed")


def _validate_node(node: onnx.NodeProto, tensors: set[str], constants: Mapping[str, np.ndarray | None],
                   infos: Mapping[str, TensorInfo]) -> Window:
    op, attrs = node.op_type, node_attrs(node)
    where = f"tile: {op} node {node.name!r}"
    if node.domain not in ("", "ai.onnx"):
        raise InputError(f"{where}: custom-domain op {node.domain}::{op} is not supported")
    if op in WINDOW_OPS or op == "ConvTranspose":
        if node.input[0] not in tensors or any(name in tensors for name in node.input[1:]):
            raise InputError(f"{where}: weights and bias must be constants")
        if op == "ConvTranspose":
            return _transposed_window(node, attrs, constants, infos)
        return _window(node, attrs, constants, infos)
    if op in UNARY_OPS:
        if node.input[0] not in tensors or any(name in tensors for name in node.input[1:]):
            raise InputError(f"{where}: only input 0 may come from the region")
        if op == "BatchNormalization" and attrs.get("training_mode", 0):
            raise InputError(f"{where}: training_mode=1 is not supported")
        return IDENTITY_WINDOW
    if op == "Resize":
        return _resize_window(node, attrs, tensors, constants, infos)
    if op in CHANNEL_OPS:
        rank = len(infos[node.output[0]].shape)
        if int(attrs.get("axis", 0)) % rank != 1:
            raise InputError(f"{where}: only the channel axis can be concatenated or split")
        if any(name and name not in tensors for name in node.input[:1 if op == "Split" else None]):
            raise InputError(f"{where}: every input must come from the region")
        return IDENTITY_WINDOW
    if op in BINARY_OPS:
        out_shape = infos[node.output[0]].shape
        for name in node.input:
            if name in tensors and infos[name].shape != out_shape:
                raise InputError(f"{where}: operand {name!r} {infos[name].shape} is broadcast to "
                                 f"{out_shape}; only same-shape region operands are supported")
            if name not in tensors and _varies_along_h(constants[name]):
                raise InputError(f"{where}: constant operand {name!r} varies along H")
        return IDENTITY_WINDOW
    raise InputError(f"{where}: {op} is not spatially local or not supported by tiling")


NEAREST_MODES = {"asymmetric": ("floor",), "half_pixel": ("round_prefer_floor", "round_prefer_ceil"),
                 "pytorch_half_pixel": ("round_prefer_floor", "round_prefer_ceil")}


def _resize_window(node: onnx.NodeProto, attrs: Mapping, tensors: set[str],
                   constants: Mapping[str, np.ndarray | None], infos: Mapping[str, TensorInfo]) -> Window:
    """Rule d': nearest Resize by integer factors (N and C kept): output row r is input row r // f."""
    where = f"tile: Resize node {node.name!r}"
    mode = _text(attrs.get("mode", "nearest"))
    transform = _text(attrs.get("coordinate_transformation_mode", "half_pixel"))
    nearest = _text(attrs.get("nearest_mode", "round_prefer_floor"))
    if mode != "nearest" or nearest not in NEAREST_MODES.get(transform, ()):
        raise InputError(f"{where}: only nearest resizing with floor-equivalent coordinates is tiled "
                         f"(got {mode}, {transform}, {nearest})")
    if node.input[0] not in tensors or any(name in tensors for name in node.input[1:]):
        raise InputError(f"{where}: only input 0 may come from the region")
    if len(node.input) < 3 or not node.input[2] or (len(node.input) > 3 and node.input[3]):
        raise InputError(f"{where}: needs constant scales (not sizes)")
    scales = constants.get(node.input[2])
    in_shape, out_shape = infos[node.input[0]].shape, infos[node.output[0]].shape
    factors = [o / i for o, i in zip(out_shape, in_shape, strict=True)]
    if scales is None or list(factors[:2]) != [1, 1] or any(f != int(f) or f < 1 for f in factors[2:]):
        raise InputError(f"{where}: only integer upsampling of H and W is tiled (factors {factors})")
    return Window(upsample=int(factors[2]))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _varies_along_h(value: np.ndarray | None) -> bool:
    return value is None or (value.ndim >= 2 and value.shape[-2] != 1)


def _window(node: onnx.NodeProto, attrs: Mapping, constants: Mapping[str, np.ndarray | None],
            infos: Mapping[str, TensorInfo]) -> Window:
    """The row mapping of a Conv or pool, auto_pad resolved into explicit pads (rule d)."""
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
    top, bottom = _resolved_pads(attrs, 0, in_shape[2], out_shape[2], strides[0], extents[0])
    left, right = _resolved_pads(attrs, 1, in_shape[3], out_shape[3], strides[1], extents[1])
    right = _ceil_columns(node, attrs, (left, right), int(kernel[1]), in_shape[3], out_shape[3],
                          strides[1], extents[1])
    return Window(extents[0], strides[0], top, bottom, int(kernel[0]), (left, right), macs)


def _transposed_window(node: onnx.NodeProto, attrs: Mapping, constants: Mapping[str, np.ndarray | None],
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
                  pad_bottom=pads[2], kernel=int(kernel[0]), w_pads=(pads[1], pads[3]), macs_per_output=macs,
                  transposed=True, w_output_padding=output_padding[1])


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


def _ceil_columns(node: onnx.NodeProto, attrs: Mapping, pads: Rows, kernel: int, size: int,
                  out_size: int, stride: int, extent: int) -> int:
    """The right pad that makes ceil_mode=0 give the original columns (rule e)."""
    right = pads[1]
    overhang = (out_size - 1) * stride - pads[0] + extent - size - right  # ceil_mode's extra columns
    if overhang > 0:
        if node.op_type == "AveragePool" and attrs.get("count_include_pad", 0):
            raise InputError(f"tile: AveragePool node {node.name!r}: ceil_mode=1 with "
                             f"count_include_pad=1 overhangs the right padding, which explicit "
                             f"pads cannot reproduce")
        right += overhang
    if node.op_type != "Conv" and max(pads[0], right) >= kernel:
        raise InputError(f"tile: {node.op_type} node {node.name!r}: ceil_mode=1 needs a right pad "
                         f"of {right}, not below the kernel ({kernel}) as onnxruntime requires")
    return right


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


# ---------------------------------------------------------------- band plans

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
    return [_plan_band(region, rows) for rows in band_rows(region.height(region.end), bands)]


def _plan_band(region: Region, rows: Rows) -> BandPlan:
    plan = BandPlan(rows, {region.end: rows})
    for node in reversed(region.nodes):
        key = node.output[0]
        made = [plan.produced[name] for name in node.output[:_used_outputs(node)] if name in plan.produced]
        out = (min(r[0] for r in made), max(r[1] for r in made))  # every output in use has a reader
        for name in node.output[:_used_outputs(node)]:
            plan.produced[name] = out
        window = region.windows[key]
        in_height = region.height(node.input[region.region_inputs[key][0]])  # input 0 may be a constant
        if window.transposed:  # rule d''
            read, plan.pads[key], plan.output_padding[key] = _transposed_rows(window, out, in_height)
            plan.reads[(key, 0)] = read
            have = plan.produced.get(node.input[0], read)
            plan.produced[node.input[0]] = (min(have[0], read[0]), max(have[1], read[1]))
            continue
        if window.upsample > 1:  # rule d': whole input rows, so the band computes a multiple of the factor
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
        if node.op_type in WINDOW_OPS:
            plan.pads[key] = (read[0] - lo, hi - read[1])
            _check_pool_pads(node, window, plan.pads[key], in_height, hi)
        for index in region.region_inputs[key]:
            need = read if node.op_type in WINDOW_OPS else out
            plan.reads[(key, index)] = need
            name = node.input[index]
            have = plan.produced.get(name, need)
            plan.produced[name] = (min(have[0], need[0]), max(have[1], need[1]))
    return plan


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


def _row_bytes(info: TensorInfo, act_bytes: int | None) -> int:
    n, c, _, w = info.shape
    return n * c * w * (act_bytes or np.dtype(info.dtype).itemsize)


def _band_tensor_bytes(region: Region, plan: BandPlan, act_bytes: int | None) -> int:
    """Largest tensor of one band: the Slice of `start`, node outputs, the narrowing Slices."""
    sizes = [(hi - lo) * _row_bytes(region.infos[name], act_bytes)
             for name, (lo, hi) in plan.produced.items()]
    for node in region.nodes:
        for index in region.region_inputs[node.output[0]]:
            lo, hi = plan.reads[(node.output[0], index)]
            sizes.append((hi - lo) * _row_bytes(region.infos[node.input[index]], act_bytes))
    return max(sizes)


def peak_band_bytes(model: onnx.ModelProto, start: Starts, end: str, bands: int,
                    act_bytes: int | None = None, *, region: Region | None = None,
                    input_shapes: Mapping[str, Sequence[int]] | None = None) -> int:
    """Bytes of the largest tensor any one band holds inside the region."""
    region = region or tileable_region(model, start, end, input_shapes)
    return max(_band_tensor_bytes(region, plan, act_bytes) for plan in plan_bands(region, bands))


def bands_for_budget(model: onnx.ModelProto, start: Starts, end: str, budget_bytes: int,
                     act_bytes: int | None = None, *,
                     input_shapes: Mapping[str, Sequence[int]] | None = None,
                     region: Region | None = None) -> int:
    """The fewest bands whose largest band tensor fits in `budget_bytes`."""
    region = region or tileable_region(model, start, end, input_shapes)
    height = region.height(end)
    for bands in range(1, height + 1):
        try:
            peak = peak_band_bytes(model, start, end, bands, act_bytes, region=region)
        except InputError:  # e.g. a band lying wholly in padding: more bands will not help
            break
        if peak <= budget_bytes:
            return bands
    raise InputError(f"tile: even {height} one-row bands of {start!r} -> {end!r} do not fit in "
                     f"{budget_bytes} bytes")


# ---------------------------------------------------------------- emission

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

    @property
    def macs_ratio(self) -> float:
        return self.macs_tiled / self.macs_untiled if self.macs_untiled else 1.0


def tile_region(model: onnx.ModelProto, start: Starts, end: str, bands: int,
                input_shapes: Mapping[str, Sequence[int]] | None = None,
                chain: bool = True) -> onnx.ModelProto:
    """A copy of `model` computing `end` from `start` in `bands` row bands (rules c-h)."""
    return tile_region_with_facts(model, start, end, bands, input_shapes, chain=chain)[0]


def tile_region_with_facts(model: onnx.ModelProto, start: Starts, end: str, bands: int,
                           input_shapes: Mapping[str, Sequence[int]] | None = None,
                           act_bytes: int | None = None,
                           chain: bool = True) -> tuple[onnx.ModelProto, TileResult]:
    """`tile_region` and the facts about the tiled region."""
    region = tileable_region(model, start, end, input_shapes)
    plans = plan_bands(region, bands)
    tiled, namer, emitted, outputs = _emit_bands(model, region, plans, chain)
    emitted.append(helper.make_node("Concat", outputs, [end], name=namer(f"{end}_concat"), axis=2))
    _replace_region(tiled.graph, region, emitted)
    return tiled, _facts(region, plans, act_bytes)


def pool_in_bands(model: onnx.ModelProto, start: Starts, pool: str, bands: int,
                  input_shapes: Mapping[str, Sequence[int]] | None = None) -> onnx.ModelProto:
    """Rule i: the GlobalAveragePool node `pool` computed from bands of its input.

    The pool's input x is recomputed band by band from `start` (the region start -> x, as
    `tile_region` would compute it), each band's rows summed (ReduceSum over H and W), the
    sums added and scaled by 1 / (H W); the pool's output keeps its name. x itself is left
    in the graph for its other readers (which a later region can tile, reading the pool's
    result as a per-channel side input). Exact up to float summation order.
    """
    graph = model.graph
    node = next((n for n in graph.node if n.name == pool), None)
    if node is None or node.op_type != "GlobalAveragePool":
        raise InputError(f"tile: no GlobalAveragePool node named {pool!r}")
    region = tileable_region(model, start, node.input[0], input_shapes, consumers_checked=False)
    opset = _opset(model)
    rewritten, namer, emitted, partials = _emit_bands(
        model, region, plan_bands(region, bands), True,
        lambda band, namer, graph, emitted: _band_sum(band, namer, graph, emitted, opset))
    graph = rewritten.graph
    _, _, height, width = region.infos[region.end].shape
    total = namer(f"{node.output[0]}/sum")
    emitted.append(helper.make_node("Sum", partials, [total], name=namer(f"{pool}/sum")))
    scale = namer(f"{node.output[0]}/scale")
    dtype = np.dtype(region.infos[region.end].dtype)
    graph.initializer.append(numpy_helper.from_array(np.array(1.0 / (height * width), dtype), scale))
    emitted.append(helper.make_node("Mul", [total, scale], [node.output[0]], name=namer(f"{pool}/mean")))
    kept: list[onnx.NodeProto] = []
    for existing in graph.node:
        if existing.name == pool and existing.op_type == "GlobalAveragePool":
            kept.extend(emitted)
        else:
            kept.append(existing)
    del graph.node[:]
    graph.node.extend(kept)
    return rewritten


def _emit_bands(model: onnx.ModelProto, region: Region, plans: list[BandPlan], chain: bool,
                per_band=None) -> tuple[onnx.ModelProto, Namer, list[onnx.NodeProto], list[str]]:
    """A copy of `model` and the nodes of every band (rule f), not yet placed in it; each
    band's last tensor, or what `per_band(band, namer, graph, emitted)` makes of it.
    With `chain`, each band waits for the previous one's result (rule g)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    namer = Namer(copy.graph)
    emitted: list[onnx.NodeProto] = []
    results: list[str] = []
    for index, plan in enumerate(plans):
        after = results[-1] if chain and results else None
        band = _emit_band(region, plan, index, namer, copy.graph, emitted, after)
        results.append(per_band(band, namer, copy.graph, emitted) if per_band else band)
    return copy, namer, emitted, results


def _band_sum(tensor: str, namer: Namer, graph: onnx.GraphProto, emitted: list[onnx.NodeProto],
              opset: int) -> str:
    output = namer(f"{tensor}/rowsum")
    if opset >= 13:
        axes = namer(f"{output}/axes")
        graph.initializer.append(numpy_helper.from_array(np.array([2, 3], np.int64), axes))
        emitted.append(helper.make_node("ReduceSum", [tensor, axes], [output], name=namer(f"{output}/op"),
                                        keepdims=1))
    else:
        emitted.append(helper.make_node("ReduceSum", [tensor], [output], name=namer(f"{output}/op"),
                                        axes=[2, 3], keepdims=1))
    return output


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _emit_band(region: Region, plan: BandPlan, index: int, namer: Namer, graph: onnx.GraphProto,
               emitted: list[onnx.NodeProto], after: str | None) -> str:
    """Append band `index`'s nodes (rule f); returns the name of its `end` rows."""
    have: dict[str, tuple[str, Rows]] = {}  # region tensor -> (band tensor, its rows)
    for start in region.starts:  # each waits for the previous band (rule g)
        if start in region.gates:
            continue
        rows = plan.produced[start]
        have[start] = (_slice(start, (0, region.height(start)), rows, index, namer, graph, emitted, after),
                       rows)
    for node in region.nodes:
        key = node.output[0]
        inputs = list(node.input)
        for i in region.region_inputs[key]:
            band_tensor, rows = have[inputs[i]]
            inputs[i] = _slice(band_tensor, rows, plan.reads[(key, i)], index, namer, graph, emitted)
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = namer(f"{node.name or key}_band{index}")
        del copy.input[:]
        copy.input.extend(inputs)
        del copy.output[:]
        for name in node.output[:_used_outputs(node)]:
            copy.output.append(namer(f"{name}_band{index}"))
            have[name] = (copy.output[-1], plan.produced[key])
        if key in plan.pads:
            _set_band_pads(copy, region.windows[key], plan.pads[key])
        if key in plan.output_padding:
            _set_output_padding(copy, region.windows[key], plan.output_padding[key])
        emitted.append(copy)
    return have[region.end][0]


def _slice(tensor: str, have: Rows, want: Rows, index: int, namer: Namer, graph: onnx.GraphProto,
           emitted: list[onnx.NodeProto], after: str | None = None) -> str:
    """`tensor` (holding rows `have`) narrowed to rows `want`; itself when they agree.

    `after`: a tensor this Slice must wait for (rule g), through a zero added to its starts.
    """
    if have == want and after is None:
        return tensor
    band = "" if f"_band{index}" in tensor else f"_band{index}"
    output = namer(f"{tensor}{band}_rows{want[0]}_{want[1]}")
    names = [namer(f"{output}/{part}") for part in ("starts", "ends", "axes")]
    for name, value in zip(names, (want[0] - have[0], want[1] - have[0], 2), strict=True):
        graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name))
    if after is not None:
        names[0] = _after(names[0], names[2], after, namer, graph, emitted)
    emitted.append(helper.make_node("Slice", [tensor, *names], [output], name=namer(f"{output}/slice")))
    return output


def _after(starts: str, axes: str, tensor: str, namer: Namer, graph: onnx.GraphProto,
           emitted: list[onnx.NodeProto]) -> str:
    """`starts` + 0, where the 0 is computed from `tensor`: a real data dependency (rule g).

    The zero is the sum of an empty Slice of `tensor` (no element is read, so NaN or inf
    cannot leak in); onnxruntime cannot constant-fold it as it folds Shape of static shapes.
    """
    base = namer(f"{starts}/after")
    zero = [namer(f"{base}/{part}") for part in ("zero", "empty_ends", "empty", "as_int", "sum")]
    graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.int64), zero[0]))
    graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.int64), zero[1]))
    emitted.append(helper.make_node("Slice", [tensor, zero[0], zero[1], axes],
                                    [zero[2]], name=namer(f"{base}/slice")))
    emitted.append(helper.make_node("Cast", [zero[2]], [zero[3]], name=namer(f"{base}/cast"),
                                    to=onnx.TensorProto.INT64))
    emitted.append(helper.make_node("ReduceSum", [zero[3]], [zero[4]], name=namer(f"{base}/sum"),
                                    keepdims=0))
    result = namer(f"{starts}/dep")
    emitted.append(helper.make_node("Add", [starts, zero[4]], [result], name=namer(f"{base}/add")))
    return result


def _set_band_pads(node: onnx.NodeProto, window: Window, pads: Rows) -> None:
    """Explicit band pads along H, the resolved W pads; no auto_pad, ceil_mode 0 (rules d-e)."""
    keep = [a for a in node.attribute if a.name not in ("pads", "auto_pad", "ceil_mode")]
    del node.attribute[:]
    node.attribute.extend(keep)
    node.attribute.append(helper.make_attribute("pads", [pads[0], window.w_pads[0], pads[1],
                                                         window.w_pads[1]]))


def _set_output_padding(node: onnx.NodeProto, window: Window, rows: int) -> None:
    keep = [a for a in node.attribute if a.name != "output_padding"]
    del node.attribute[:]
    node.attribute.extend(keep)
    node.attribute.append(helper.make_attribute("output_padding", [rows, window.w_output_padding]))


def _replace_region(graph: onnx.GraphProto, region: Region, emitted: list[onnx.NodeProto]) -> None:
    """Put the band nodes where `end`'s producer was; drop region nodes and their value_info."""
    members = {node.output[0] for node in region.nodes}  # this graph is a copy: match by name
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.output and node.output[0] == region.end:
            kept.extend(emitted)
        elif not node.output or node.output[0] not in members:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    dead = {name for node in region.nodes for name in node.output} - {region.end}
    keep_info = [v for v in graph.value_info if v.name not in dead]
    del graph.value_info[:]
    graph.value_info.extend(keep_info)


def _facts(region: Region, plans: list[BandPlan], act_bytes: int | None) -> TileResult:
    halo: dict[str, int] = {}
    macs_untiled = macs_tiled = 0
    for node in region.nodes:
        key = node.output[0]
        height = region.height(key)
        computed = sum(plan.produced[key][1] - plan.produced[key][0] for plan in plans)
        halo[node.name or key] = computed - height
        per_row = _row_bytes(region.infos[key], 1) * region.windows[key].macs_per_output
        macs_untiled += per_row * height
        macs_tiled += per_row * computed
    return TileResult(region.start, region.end, len(plans), [p.rows[1] - p.rows[0] for p in plans],
                      halo, macs_untiled, macs_tiled,
                      max(_band_tensor_bytes(region, plan, act_bytes) for plan in plans),
                      region.node_names)


# ---------------------------------------------------------------- the pass

class TilePass(Pass):
    """Tile each (start, end, bands) region; bands None picks `bands_for_budget(budget)`."""

    name = "tile"

    def __init__(self, regions: Iterable[tuple[str, str, int | None]], budget_bytes: int | None = None):
        self.regions = list(regions)
        self.budget_bytes = budget_bytes

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        facts: list[TileResult] = []
        for start, end, bands in self.regions:
            if bands is None:
                if self.budget_bytes is None:
                    raise InputError(f"tile: region {start!r} -> {end!r} has no band count and the "
                                     f"pass no budget")
                bands = bands_for_budget(model, start, end, self.budget_bytes, ctx.act_bytes,
                                         input_shapes=ctx.input_shapes)
            model, result = tile_region_with_facts(model, start, end, bands, ctx.input_shapes,
                                                   ctx.act_bytes)
            onnx.checker.check_model(model)
            facts.append(result)
            ctx.log(f"tile: {start} -> {end} in {bands} bands, MACs x{result.macs_ratio:.3f}, "
                    f"largest band tensor {result.peak_band_bytes} B")
        return PassResult(model, modified=bool(facts), data=facts)
