"""SplitConvPass: split a conv's filters so that onnxruntime never expands its whole input.

onnxruntime's CPU convolution (MLAS) expands the whole input (im2col) when a group's
filter count exceeds the output positions: ResNet-18's 3x3 convs on 14x14 maps take
1.8 MB of scratch for a 200 KB output, and a row band of a tiled region, with fewer
positions, takes it more often. With at most as many filters as positions it works in
small per-thread segments instead. Rules:

a. A candidate is a Conv (2-D, constant weight and bias, any group) whose scratch under
   rule e of passes/runtime.py (`conv_workspace_elements`) exceeds `budget_bytes`.
a'. Planned for integer kernels (one byte per element: `--int8`, `--act-bytes 1`;
   passes/tile_bands.py `integer_kernels`), a conv (not depthwise) is also a candidate when
   a whole-map buffer of its QLinearConv (passes/runtime.py rule e', channels last,
   symmetric int8 weights) exceeds `budget_bytes`: the 3-channel stem's int32 GEMM output.
b. It becomes ceil(M / positions) convs over the same input, each with at most
   `positions` filters (rows of W and b, in order), and a Concat along the channel
   axis that writes the original output name; the rest of the graph is untouched.
b'. A grouped conv (group g: AlexNet's) expands each group's input: it becomes, per group,
   a Slice of that group's input channels and ceil((M / g) / positions) group-1 convs over
   it (that group's rows of W and b, in order), all joined by one Concat in group order,
   which is the original channel order.
b''. Planned for integer kernels, the parts' filter counts are multiples of 8 (what
   rule a needs of them, and MLAS's symmetric int8 kernel, rule e' `mlas_symmetric`: no
   int32 output, an indirection buffer instead of an im2col): the fewest parts, the
   filters shared out in blocks of 8 as evenly as possible (256 filters on 98 positions:
   88/88/80, not 86/85/85), whose every rule e' buffer fits `budget_bytes`; where no part
   count fits, the one with the smallest largest buffer, and none when splitting does not
   lower it (an im2col is the same for every part). A remainder of M % 8 filters is a part
   of its own; under 8 positions (rule a allows fewer than 8 filters a part) rule b holds.
c. The outputs are bitwise what one conv computes per filter, so the model's
   outputs are unchanged up to float rounding (tests check against onnxruntime).
d. The rewrite edits `model.graph` in place: the parts and the Concat take the conv's
   place in the node list, named `<conv>/split<i>`, `<conv>/concat` (unique, by `Namer`);
   shapes come from ONNX shape inference of `model.proto()`.

Entry point: `SplitConvPass(budget_bytes).run(model, ctx)`; `result.data` lists each split
conv with its filter count and number of parts; `integer_split` is rule b'' for one group.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from fmcompress.shapes import TensorInfo, infer_tensor_infos, resolve_input_shapes

from .base import Pass, PassContext, PassResult
from .graph import Model
from .graphutil import Namer, constant_value, detach, optional_input
from .runtime import conv_workspace_elements, integer_conv_workspaces
from .tile_bands import integer_kernels

ALIGN = 8  # rule b'': MLAS's symmetric int8 conv wants output channels % 8 (passes/align_ranks.py rule b)


class SplitConvPass(Pass):
    """Splits every conv whose input expansion, or planned at one byte whose QLinearConv
    buffers, would exceed `budget_bytes` (rules a-d)."""

    name = "split-conv"

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        proto = model.proto()
        infos = infer_tensor_infos(proto, resolve_input_shapes(proto, ctx.input_shapes))
        namer = Namer(model.graph)
        split: list[dict] = []
        nodes: list[gs.Node] = []
        for node in model.graph.nodes:
            sizes = self._sizes(node, infos, ctx.act_bytes)
            if sizes is None:
                nodes.append(node)
                continue
            filters = int(node.inputs[1].shape[0])
            group = int(node.attrs.get("group", 1))
            split.append({"node": node.name, "filters": filters, "parts": group * len(sizes)})
            nodes += _split(node, sizes, namer)
        if split:
            model.graph.nodes = nodes
            model.touched(sort=False)
        return PassResult(model, modified=bool(split), data=split)

    def _sizes(self, node: gs.Node, infos: dict[str, TensorInfo], act_bytes: int | None) -> list[int] | None:
        """Rules a, a', b, b'': the filter counts of one group's parts (None: leave the conv)."""
        if node.op != "Conv" or node.domain not in (None, "", "ai.onnx") or len(node.inputs) < 2:
            return None
        weight = node.inputs[1]
        bias = optional_input(node, 2)
        info = infos.get(node.outputs[0].name)
        constant_bias = bias is None or isinstance(bias, gs.Constant)
        if not isinstance(weight, gs.Constant) or not constant_bias or info is None or len(info.shape) != 4:
            return None
        group = int(node.attrs.get("group", 1))
        strides, pads = list(node.attrs.get("strides", [])), list(node.attrs.get("pads", []))
        elements = conv_workspace_elements(tuple(weight.shape), info.shape, group, strides, pads)
        expands = elements * (act_bytes or np.dtype(info.dtype).itemsize) > self.budget_bytes  # rule a
        per_group, positions = weight.shape[0] // group, math.prod(info.shape[2:])
        if integer_kernels(act_bytes) and not (group > 1 and weight.shape[1] == 1):  # rules a', b''
            plain = (all(k == 1 for k in weight.shape[2:]) and all(s == 1 for s in strides) and not any(pads))
            whole = integer_buffer_bytes(tuple(weight.shape), positions, group, plain)
            if not expands and whole <= self.budget_bytes:
                return None
            sizes = integer_split(per_group, int(weight.shape[1]), math.prod(weight.shape[2:]), positions, plain,
                                  self.budget_bytes, cap=positions if expands else None)
            if sizes is not None:
                parted = max(integer_buffer_bytes((size, weight.shape[1], *weight.shape[2:]), positions, 1, plain)
                             for size in sizes)
                lowers = whole > self.budget_bytes and parted < whole
                if (expands or lowers) and (group > 1 or len(sizes) > 1):
                    return sizes
                if not expands:
                    return None
        if not expands:
            return None
        return _even(per_group, math.ceil(per_group / positions))  # rule b


def integer_buffer_bytes(weight_shape: tuple[int, ...], positions: int, group: int, plain: bool) -> int:
    """The largest rule e' buffer of a QLinearConv (channels last, symmetric int8 weights)."""
    parts = integer_conv_workspaces(tuple(int(d) for d in weight_shape), 0, positions, group, plain,
                                    channels_last=True)
    return max((elements * dtype.itemsize for elements, dtype in parts.values()), default=0)


def integer_split(filters: int, channels: int, taps: int, positions: int, plain: bool, budget_bytes: int,
                  cap: int | None = None) -> list[int] | None:
    """Rule b'': the filter counts of group-1 parts over `channels` input channels, each a
    multiple of 8 and at most `cap`, the fewest whose every rule e' buffer fits `budget_bytes`
    (else the smallest largest buffer); None where parts of 8 are over `cap`."""
    blocks, rest = divmod(filters, ALIGN)
    limit = filters if cap is None else cap
    if blocks == 0 or limit < ALIGN:
        return None
    best: tuple[int, list[int]] | None = None
    for count in range(1, blocks + 1):
        sizes = [ALIGN * len(part) for part in np.array_split(np.arange(blocks), count)] + ([rest] if rest else [])
        if max(sizes) > limit:
            continue
        largest = max(integer_buffer_bytes((size, channels, taps), positions, 1, plain) for size in sizes)
        if largest <= budget_bytes:
            return sizes
        if best is None or largest < best[0]:
            best = (largest, sizes)
    return None if best is None else best[1]


def _even(filters: int, parts: int) -> list[int]:
    """Rule b: `filters` in `parts` as numpy.array_split shares them (the first get one more)."""
    return [len(part) for part in np.array_split(np.arange(filters), parts)]


def _split(node: gs.Node, sizes: list[int], namer: Namer) -> list[gs.Node]:
    """Rules b and b': the parts (`sizes` filters each, per group) and their Concat, which
    takes over the conv's output."""
    source, output = node.inputs[0], node.outputs[0]
    weight = constant_value(node.inputs[1])
    bias_tensor = optional_input(node, 2)
    bias = None if bias_tensor is None else constant_value(bias_tensor)
    group = int(node.attrs.get("group", 1))
    attrs = {**node.attrs, "group": 1}
    detach([node])  # so that the Concat can produce its output
    base = node.name or output.name
    outputs, emitted = [], []
    per_group = weight.shape[0] // group
    edges = np.cumsum([0, *sizes])
    for g in range(group):
        reads = source if group == 1 else _group_slice(source, g, weight.shape[1], namer, base, emitted)
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            rows = np.arange(g * per_group + lo, g * per_group + hi)
            i = len(outputs)
            inputs = [reads, gs.Constant(namer(f"{base}/split{i}/W"), weight[rows])]
            if bias is not None:
                inputs.append(gs.Constant(namer(f"{base}/split{i}/B"), bias[rows]))
            outputs.append(gs.Variable(namer(f"{output.name}/split{i}")))
            emitted.append(gs.Node("Conv", name=namer(f"{base}/split{i}"), attrs=attrs,
                                   inputs=inputs, outputs=[outputs[-1]]))
    emitted.append(gs.Node("Concat", name=namer(f"{base}/concat"), attrs={"axis": 1},
                           inputs=outputs, outputs=[output]))
    return emitted


def _group_slice(source: gs.Tensor, group: int, channels: int, namer: Namer, base: str,
                 emitted: list[gs.Node]) -> gs.Variable:
    """Rule b': group `group`'s input channels, [group * channels, (group + 1) * channels)."""
    bounds = [np.array([group * channels], np.int64), np.array([(group + 1) * channels], np.int64),
              np.array([1], np.int64)]
    names = ("starts", "ends", "axes")
    constants = [gs.Constant(namer(f"{base}/group{group}/{name}"), value) for name, value in zip(names, bounds,
                                                                                                strict=True)]
    sliced = gs.Variable(namer(f"{base}/group{group}/input"))
    emitted.append(gs.Node("Slice", name=namer(f"{base}/group{group}/slice"), inputs=[source, *constants],
                           outputs=[sliced]))
    return sliced
