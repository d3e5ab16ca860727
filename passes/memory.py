"""Memory analysis pass: which feature maps a model stores, and how big they are.

Rules (docs/design.md, "Memory accounting"), applied to a model with static shapes:

* Feature maps are tensors computed from the model's inputs. Weights (initializers,
  Constant outputs), anything computed from constants alone, and shape arithmetic
  (Shape/Size and what is computed from their outputs with constants) never are.
* **strict**: every feature-map tensor is materialised.
* **stored**: nodes form kernel groups: a compute node (Conv, Gemm, pooling, Resize,
  Concat, ...) plus the chain of elementwise nodes after it, extended while the tip
  tensor has a single consumer, or several elementwise consumers that converge on
  one node (x*sigmoid(x), HardSwish patterns). A binary elementwise node whose other
  operand is another group's stored map (a residual Add, an SE gate Mul) joins the
  chain; two chains competing for one Add give it to the chain that is not a
  candidate for expand-on-read. Pure view ops (Reshape, Flatten, Squeeze,
  Unsqueeze) chain like elementwise ops. A pooling node right after an activation
  and a *projection conv* join the chain. The chain stops after QuantizeLinear (its
  integer output is what is stored).
  *Expand on read*: a group that is a 1x1 Conv (any stride, group=1) followed only
  by per-channel affine ops, whose output has a single consumer that is an
  elementwise node of another group, is computed inside that group from its own
  stored input (ResNet's downsample conv); so is an *expansion conv* that reads a
  stored map, whatever its consumer, and a
  DequantizeLinear (its consumer reads the integer tensor). An expansion conv keeps
  that when elementwise nodes that read only it and constants chain after it (U, then
  the activation of a map projected before it): the reader computes them per position
  as it computes U. Their outputs are not stored.
  Projection and expansion convs (the P and U that compile inserts) are recognised by
  structure, never by node name, so renaming tools (onnxslim, re-saving) change nothing.
  Both are a *channel mix*: a group=1 1x1 Conv, stride 1, no padding, a constant
  weight and no bias or an all-zero one. A projection conv narrows (C -> k < C), is
  the only consumer of a chain's tip, and feeds no elementwise op but Identity/Dropout
  (compile folds BatchNorm first and reads Z through an expansion conv elsewhere). An
  expansion conv widens (k -> C > k), writes no graph output, and either has one
  reader that could not have folded it (not a group=1 Conv reading it as its data
  input) or reads a projection conv's output C -> k -> C. Genuine layers differ:
  BatchNorm folding leaves a bias, and an activation or BatchNorm follows.
  The stored maps are the graph inputs and the tensors that leave a group.
* **live**: along the graph's node order, the peak of the summed bytes of stored
  maps alive at once (from the producing node to the last consumer; graph inputs
  from the start, graph outputs to the end).

Bytes are numel * bytes per element of the stored dtype, or `ctx.act_bytes`.

Ceilings: a map is over the ceiling when its bytes exceed it. A relative ceiling
(`4x`) divides the largest *compressible* stored map (FeatureMap.compressible, the one
definition the plan and compile's projections share: a floating-point 4-D NCHW or 3-D
NCL map between groups with at least 2 channels); graph inputs, graph outputs, integer
maps and maps no projection applies to (2-D, 5-D, one channel, channel-last [N, H, W, C]
4-D maps: `channels_last`) are reported against
the ceiling with their reason (FeatureMap.not_compressible_reason) but never set it
and are never compressed.
The report carries the parsed ceiling and a key of the graph's wiring (`graph_key`),
so that a later pass reuses it only for the same graph, ceiling, shapes and act_bytes.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx

from fmcompress.featuremaps import channels_last
from fmcompress.model_checks import initializer_array
from fmcompress.onnxutil import constant_node_value, node_attrs
from fmcompress.reports.analysis import AnalysisReport, FeatureMap, live_curve
from fmcompress.shapes import TensorInfo, graph_inputs, infer_tensor_infos, resolve_input_shapes
from fmcompress.units import Ceiling

from .base import Pass, PassContext, PassResult
from .graph import Model
from .ops import (
    ACTIVATIONS,
    AFFINE_PER_CHANNEL_OPS,
    CHAINABLE_OPS,
    FOLD_IDENTITY_OPS,
    POOLING_OPS,
    SHAPE_OPS,
    STORED_BINARY_OPS,
    STORED_UNARY_OPS,
)


@dataclass
class Group:
    head: onnx.NodeProto
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    on_the_fly: bool = False
    ends_in_activation: bool = False

    @property
    def tip(self) -> str:
        return self.nodes[-1].output[0]


class GraphIndex:
    """Producers, consumers, node order and which tensors are feature maps."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.nodes = list(graph.node)
        self.order = {id(node): i for i, node in enumerate(self.nodes)}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            if node.op_type in SHAPE_OPS:
                continue  # reads metadata only: never keeps a map alive or splits a chain
            for inp in dict.fromkeys(i for i in node.input if i):
                self.consumers[inp].append(node)
        self.inputs = [inp.name for inp in graph_inputs(model)]
        self.outputs = [out.name for out in graph.output]
        self.constants = {init.name: init for init in graph.initializer}
        self.data = self._data_tensors()

    def _data_tensors(self) -> set[str]:
        data = set(self.inputs)
        for node in self.nodes:  # graph nodes are topologically sorted (ONNX requires it)
            if node.op_type in SHAPE_OPS or node.op_type == "Constant":
                continue
            if any(i in data for i in node.input if i):
                data.update(o for o in node.output if o)
        return data

    def data_inputs(self, node: onnx.NodeProto) -> list[str]:
        return [i for i in node.input if i in self.data]

    def constant_value(self, name: str) -> np.ndarray | None:
        if name in self.constants:
            return initializer_array(self.constants[name])
        node = self.producer.get(name)
        return constant_node_value(node) if node is not None else None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def is_pointwise_conv(node: onnx.NodeProto, index: GraphIndex) -> bool:
    """A group=1 Conv with a 1x1 kernel (any stride)."""
    if node.op_type != "Conv" or _attr(node, "group", 1) != 1 or len(node.input) < 2:
        return False
    kernel = _attr(node, "kernel_shape")
    if kernel is None:
        weight = index.constant_value(node.input[1])
        kernel = list(weight.shape[2:]) if weight is not None else None
    return kernel is not None and all(k == 1 for k in kernel)


def channel_mixing(node: onnx.NodeProto, index: GraphIndex) -> tuple[int, int] | None:
    """(C_out, C_in) of a pure per-pixel channel mix: a group=1 1x1 Conv with stride 1, no
    padding and no (or an all-zero) bias, its weight a constant; None for any other node.

    This is the form of the projection (P) and expansion (U) convs that compile inserts.
    """
    if not is_pointwise_conv(node, index):
        return None
    if any(s != 1 for s in _attr(node, "strides", [])) or any(p != 0 for p in _attr(node, "pads", [])):
        return None
    weight = index.constant_value(node.input[1])
    bias_name = node.input[2] if len(node.input) > 2 else ""
    bias = index.constant_value(bias_name) if bias_name else None
    if weight is None or weight.ndim < 3 or (bias_name and bias is None):
        return None  # a computed weight or bias
    if bias is not None and np.any(bias):
        return None
    return int(weight.shape[0]), int(weight.shape[1])


def is_projection_conv(node: onnx.NodeProto, index: GraphIndex) -> bool:
    """A channel mix that narrows (C -> k < C) and whose output feeds no elementwise op.

    Compile folds BatchNorm before projecting and puts an expansion conv before any
    elementwise reader of Z, so a genuine bias-free conv followed by BatchNorm or an
    activation is not taken for one.
    """
    mix = channel_mixing(node, index)
    if mix is None or mix[0] >= mix[1]:
        return False
    readers = index.consumers.get(node.output[0], [])
    return not any(r.op_type in CHAINABLE_OPS - FOLD_IDENTITY_OPS for r in readers)


def is_expansion_conv(node: onnx.NodeProto, index: GraphIndex) -> bool:
    """A channel mix that widens (k -> C > k), does not write a graph output, and is either

    * read by one node that could not have folded it: compile's fold pass puts one
      before each such reader, and folds U into a group=1 Conv reading it as its data input;
    * or read by the elementwise nodes of one converging region only (an activation built
      from primitives, such as HardSwish, reading U T twice): the fold pass puts one U
      before such a region (a map projected before its activation);
    * or the second half of a P -> U pair (C -> k -> C), as the insertion pass writes them.

    A genuine bias-free widening 1x1 conv read by several nodes (PP-OCRv4's FPN inputs) is neither.
    """
    mix = channel_mixing(node, index)
    out = node.output[0]
    if mix is None or mix[0] <= mix[1] or out in index.outputs:
        return False
    readers = index.consumers.get(out, [])
    if len(readers) == 1 and not _folds_into(readers[0], out, index):
        return True
    if len(readers) > 1 and _converging_region(index, out, readers) is not None:
        return True
    producer = index.producer.get(node.input[0])
    return (producer is not None and is_projection_conv(producer, index)
            and channel_mixing(producer, index) == mix[::-1])


def _folds_into(reader: onnx.NodeProto, tensor: str, index: GraphIndex) -> bool:
    """`reader` is a group=1 Conv/ConvTranspose with a constant weight that reads `tensor` as its data input only."""
    return (reader.op_type in {"Conv", "ConvTranspose"} and _attr(reader, "group", 1) == 1 and len(reader.input) > 1
            and reader.input[0] == tensor and tensor not in reader.input[1:]
            and index.constant_value(reader.input[1]) is not None)


NORMALIZATION_OPS = frozenset({"BatchNormalization", "InstanceNormalization", "LayerNormalization",
                               "LpNormalization"})


class GroupBuilder:
    """Forms the kernel groups of the stored view, walking nodes in graph order.

    Every operand's producer precedes its consumer, so when a node is reached
    unassigned, no chain can still claim it: it heads a group of its own.
    """

    def __init__(self, index: GraphIndex):
        self.index = index
        self.group_of: dict[int, Group] = {}
        self.groups: list[Group] = []

    def build(self) -> list[Group]:
        for node in self.index.nodes:
            if id(node) not in self.group_of and any(o in self.index.data for o in node.output):
                self._start_group(node)
        self._mark_on_the_fly()
        return self.groups

    def _start_group(self, head: onnx.NodeProto) -> None:
        group = Group(head)
        self._absorb(group, [head])
        self.groups.append(group)
        self._extend(group)

    def _absorb(self, group: Group, nodes: list[onnx.NodeProto]) -> None:
        for node in nodes:
            group.nodes.append(node)
            self.group_of[id(node)] = group
        if {n.op_type for n in nodes} & ACTIVATIONS:
            group.ends_in_activation = True
        elif not (len(nodes) == 1 and nodes[0].op_type in {"Mul", "Div"} and self._one_data_input(nodes[0])):
            group.ends_in_activation = False  # a constant scale after an activation keeps it

    def _one_data_input(self, node: onnx.NodeProto) -> bool:
        return len(self.index.data_inputs(node)) == 1

    def _extend(self, group: Group) -> None:
        while group.tip not in self.index.outputs:
            consumers = self.index.consumers.get(group.tip, [])
            if len(consumers) == 1:
                nxt = consumers[0]
                if id(nxt) in self.group_of or not self._joins(group, nxt):
                    return
                self._absorb(group, [nxt])
                if nxt.op_type == "QuantizeLinear":
                    return  # its integer output is what is stored
            else:
                region = _converging_region(self.index, group.tip, consumers)
                if region is None or any(id(n) in self.group_of for n in region):
                    return
                self._absorb(group, region)

    def _joins(self, group: Group, node: onnx.NodeProto) -> bool:
        if node.op_type in POOLING_OPS:
            return group.ends_in_activation
        if is_projection_conv(node, self.index):
            return True  # Z = P X is computed in the producer's epilogue: X is never stored
        if node.op_type not in CHAINABLE_OPS:
            return False
        external = [i for i in self.index.data_inputs(node) if i != group.tip]
        if not external:
            return True
        return len(external) == 1 and self._wins_operand(group.tip, external[0], node)

    def _wins_operand(self, mine: str, other: str, node: onnx.NodeProto) -> bool:
        """Two chains may reach one Add; the expand-on-read candidate loses it, else the later one wins."""
        index = self.index
        other_open = (other in index.producer and other not in index.outputs
                      and [id(c) for c in index.consumers[other]] == [id(node)])
        if not other_open:
            return True  # the other operand is a stored map of a finished group, or an input
        mine_candidate, other_candidate = self._feeds_expand_on_read(mine), self._feeds_expand_on_read(other)
        if mine_candidate != other_candidate:
            return other_candidate
        return index.order[id(index.producer[mine])] > index.order[id(index.producer[other])]

    def _feeds_expand_on_read(self, tensor: str) -> bool:
        """`tensor` ends a chain of a 1x1 conv and per-channel affine ops with constant operands."""
        node = self.index.producer.get(tensor)
        while node is not None and node.op_type in AFFINE_PER_CHANNEL_OPS and self._one_data_input(node):
            source = self.index.data_inputs(node)[0]
            if len(self.index.consumers[source]) != 1:
                return False
            node = self.index.producer.get(source)
        return node is not None and is_pointwise_conv(node, self.index)

    def _mark_on_the_fly(self) -> None:
        for group in self.groups:  # in graph order: a producer's group is marked before its readers'
            if group.tip not in self.index.outputs and self._expands_on_read(group):
                group.on_the_fly = True

    def _expands_on_read(self, group: Group) -> bool:
        head, out = group.head, group.tip
        if len(group.nodes) == 1 and head.op_type == "DequantizeLinear":
            return True
        if is_expansion_conv(head, self.index) and self._reads_stored(head) and self._positionwise_tail(group):
            return True
        consumers = self.index.consumers.get(out, [])
        return (len(consumers) == 1 and self.group_of.get(id(consumers[0])) is not group
                and consumers[0].op_type in STORED_UNARY_OPS | STORED_BINARY_OPS
                and self._feeds_expand_on_read(out))

    def _positionwise_tail(self, group: Group) -> bool:
        """Every node after the head is elementwise and reads only the group's own tensors
        and constants: the reader can compute the whole group per position, as it computes U.
        No normalization among them: a genuine bias-free 1x1 conv is followed by its
        BatchNorm (compile folds BatchNorm before it projects, so none follows a U)."""
        inside = {group.head.output[0]}
        for node in group.nodes[1:]:
            if node.op_type not in STORED_UNARY_OPS | STORED_BINARY_OPS or node.op_type in NORMALIZATION_OPS:
                return False
            if any(i not in inside for i in self.index.data_inputs(node)):
                return False
            inside.update(o for o in node.output if o)
        return True

    def _reads_stored(self, node: onnx.NodeProto) -> bool:
        """Its data input is a graph input or leaves a group that is stored (not itself computed on read)."""
        producer = self.index.producer.get(node.input[0])
        group = self.group_of.get(id(producer)) if producer is not None else None
        return group is None or not group.on_the_fly


def _converging_region(index: GraphIndex, tip: str, consumers: list[onnx.NodeProto],
                       max_nodes: int = 6) -> list[onnx.NodeProto] | None:
    """Elementwise nodes fed by `tip` and each other that converge on one sink (x*sigmoid(x))."""
    elementwise = STORED_UNARY_OPS | STORED_BINARY_OPS
    region: list[onnx.NodeProto] = []
    inside = {tip}
    queue = list(consumers)
    while queue and len(region) < max_nodes:
        ready = [n for n in queue if all(i in inside for i in index.data_inputs(n))]
        if not ready or any(n.op_type not in elementwise for n in ready):
            return None
        node = min(ready, key=lambda n: index.order[id(n)])
        queue = [n for n in queue if n is not node]
        region.append(node)
        inside.update(o for o in node.output if o)
        members = {id(n) for n in region}
        open_tensors = [t for t in inside if t in index.outputs
                        or any(id(c) not in members for c in index.consumers.get(t, []))]
        if not queue and open_tensors == [node.output[0]]:
            return region
        queued = {id(n) for n in queue}
        for consumer in index.consumers.get(node.output[0], []):
            if id(consumer) not in members and id(consumer) not in queued:
                queue.append(consumer)
    return None


class MemoryAnalysisPass(Pass):
    """Reports every feature map in the stored, live and strict views; does not modify the model.

    Entry point: `MemoryAnalysisPass(ceiling).run(model, ctx)` -> PassResult whose data is an
    `AnalysisReport`. Input shapes come from `ctx.input_shapes` (symbolic dims must be pinned).
    """

    name = "memory"
    provides = ("memory", "before")

    def __init__(self, ceiling: Ceiling | None = None, source: str = ""):
        self.ceiling = ceiling
        self.source = source

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        ctx.memory = analyze_stored(model.proto(), ctx, self.ceiling, self.source)
        ctx.before = ctx.before or ctx.memory
        return PassResult(model, modified=False, data=ctx.memory)


def analyze_stored(model: onnx.ModelProto, ctx: PassContext, ceiling: Ceiling | None = None,
                   source: str = "") -> AnalysisReport:
    """The stored, live and strict views of `model` (what the pass provides)."""
    shapes = resolve_input_shapes(model, ctx.input_shapes)
    infos = infer_tensor_infos(model, shapes)
    index = GraphIndex(model)
    builder = GroupBuilder(index)
    groups = builder.build()
    stored_steps = _stored_steps(index, groups, builder.group_of)
    strict_steps = _strict_steps(index)
    stored = _stored_maps(index, groups, infos, ctx.act_bytes, stored_steps)
    strict = [_feature_map(index, name, infos, ctx.act_bytes, None, strict_steps)
              for name in index.inputs + [o for n in index.nodes for o in n.output if o in index.data]]
    return AnalysisReport.build(
        source=source, input_shapes=shapes, act_bytes=ctx.act_bytes, ceiling=ceiling,
        stored=stored, strict=strict,
        live=live_curve(stored, stored_steps.labels), strict_live=live_curve(strict, strict_steps.labels),
        tensor_shapes={name: info.shape for name, info in infos.items()}, graph_key=graph_key(model),
    )


def graph_key(model: onnx.ModelProto) -> str:
    """A digest of the graph's wiring: nodes, tensor names, interface and weight shapes (not values)."""
    digest = hashlib.blake2b(digest_size=16)
    graph = model.graph
    for node in graph.node:
        digest.update(f"{node.op_type}({','.join(node.input)})->{','.join(node.output)};".encode())
    for init in graph.initializer:
        digest.update(f"{init.name}{list(init.dims)};".encode())
    for value in [*graph.input, *graph.output]:
        digest.update(value.name.encode() + b";")
    return digest.hexdigest()


@dataclass
class Steps:
    """Execution steps of a view: the step of each node, and a label per step."""

    of_node: dict[int, int]
    labels: list[str]


def _stored_steps(index: GraphIndex, groups: list[Group], group_of: dict[int, Group]) -> Steps:
    """One step per stored group; an expand-on-read group runs inside the group that reads it."""
    executed = [g for g in groups if not g.on_the_fly]
    step_of_group = {id(g): i for i, g in enumerate(executed)}
    of_node: dict[int, int] = {}
    for group in reversed(groups):  # consumers of an on-the-fly group come after it
        if group.on_the_fly:
            readers = [group_of.get(id(c)) for c in index.consumers.get(group.tip, [])]
            step = max((of_node.get(id(r.head), 0) for r in readers if r is not None), default=0)
        else:
            step = step_of_group[id(group)]
        for node in group.nodes:
            of_node[id(node)] = step
    return Steps(of_node, [g.head.name or g.head.op_type for g in executed])


def _strict_steps(index: GraphIndex) -> Steps:
    data_nodes = [n for n in index.nodes if any(o in index.data for o in n.output)]
    return Steps({id(n): i for i, n in enumerate(data_nodes)}, [n.name or n.op_type for n in data_nodes])


def _stored_maps(index: GraphIndex, groups: list[Group], infos: dict[str, TensorInfo],
                 act_bytes: int | None, steps: Steps) -> list[FeatureMap]:
    maps = [_feature_map(index, name, infos, act_bytes, None, steps) for name in index.inputs]
    for group in groups:
        if group.on_the_fly:
            continue
        members = {id(n) for n in group.nodes}
        for node in group.nodes:
            for out in node.output:
                if out in index.data and (out in index.outputs or any(
                        id(c) not in members for c in index.consumers.get(out, []))):
                    maps.append(_feature_map(index, out, infos, act_bytes, group, steps))
    return maps


def _feature_map(index: GraphIndex, name: str, infos: dict[str, TensorInfo], act_bytes: int | None,
                 group: Group | None, steps: Steps) -> FeatureMap:
    info = infos[name]
    producer = index.producer.get(name)
    role = "input" if name in index.inputs else "output" if name in index.outputs else "map"
    consumers = index.consumers.get(name, [])
    last_use = max((steps.of_node.get(id(c), -1) for c in consumers), default=-1)
    return FeatureMap(
        name=name, shape=list(info.shape), dtype=str(info.dtype),
        bytes=info.numel * (act_bytes or info.dtype.itemsize), role=role,
        producer=producer.name if producer is not None else "",
        producer_op=producer.op_type if producer is not None else "",
        group=group.head.name if group is not None else "",
        consumers=[c.name or c.op_type for c in consumers],
        step=steps.of_node[id(producer)] if producer is not None else 0,
        last_use=len(steps.labels) - 1 if role == "output" else last_use,
        channels_last=len(info.shape) == 4 and channels_last(
            (producer.op_type, node_attrs(producer)) if producer is not None else None,
            [(c.op_type, node_attrs(c), list(c.input).index(name)) for c in consumers]),
    )

