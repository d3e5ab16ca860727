"""SplitConvPass: split a conv's filters so that onnxruntime never expands its whole input.

onnxruntime's CPU convolution (MLAS) expands the whole input (im2col) when a group's
filter count exceeds the output positions: ResNet-18's 3x3 convs on 14x14 maps take
1.8 MB of scratch for a 200 KB output, and a row band of a tiled region, with fewer
positions, takes it more often. With at most as many filters as positions it works in
small per-thread segments instead. Rules:

a. A candidate is a Conv (2-D, constant weight and bias, any group) whose scratch under
   rule e of passes/runtime.py (`conv_workspace_elements`) exceeds `budget_bytes`.
b. It becomes ceil(M / positions) convs over the same input, each with at most
   `positions` filters (rows of W and b, in order), and a Concat along the channel
   axis that writes the original output name; the rest of the graph is untouched.
b'. A grouped conv (group g: AlexNet's) expands each group's input: it becomes, per group,
   a Slice of that group's input channels and ceil((M / g) / positions) group-1 convs over
   it (that group's rows of W and b, in order), all joined by one Concat in group order,
   which is the original channel order.
c. The outputs are bitwise what one conv computes per filter, so the model's
   outputs are unchanged up to float rounding (tests check against onnxruntime).
d. The rewrite edits `model.graph` in place: the parts and the Concat take the conv's
   place in the node list, named `<conv>/split<i>`, `<conv>/concat` (unique, by `Namer`);
   shapes come from ONNX shape inference of `model.proto()`.

Entry point: `SplitConvPass(budget_bytes).run(model, ctx)`; `result.data` lists each split
conv with its filter count and number of parts.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from fmcompress.shapes import TensorInfo, infer_tensor_infos, resolve_input_shapes

from .base import Pass, PassContext, PassResult
from .graph import Model
from .graphutil import Namer, constant_value, detach, optional_input
from .runtime import conv_workspace_elements


class SplitConvPass(Pass):
    """Splits every conv whose input expansion would exceed `budget_bytes` (rules a-d)."""

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
            parts = self._parts(node, infos, ctx.act_bytes)
            if parts <= 1:
                nodes.append(node)
                continue
            filters = int(node.inputs[1].shape[0])
            split.append({"node": node.name, "filters": filters, "parts": parts})
            nodes += _split(node, parts, namer)
        if split:
            model.graph.nodes = nodes
            model.touched(sort=False)
        return PassResult(model, modified=bool(split), data=split)

    def _parts(self, node: gs.Node, infos: dict[str, TensorInfo], act_bytes: int | None) -> int:
        """Rule a; the number of convs of rule b (1: leave it)."""
        if node.op != "Conv" or node.domain not in (None, "", "ai.onnx") or len(node.inputs) < 2:
            return 1
        weight = node.inputs[1]
        bias = optional_input(node, 2)
        info = infos.get(node.outputs[0].name)
        constant_bias = bias is None or isinstance(bias, gs.Constant)
        if not isinstance(weight, gs.Constant) or not constant_bias or info is None or len(info.shape) != 4:
            return 1
        group = int(node.attrs.get("group", 1))
        elements = conv_workspace_elements(tuple(weight.shape), info.shape, group,
                                           list(node.attrs.get("strides", [])),
                                           list(node.attrs.get("pads", [])))
        if elements * (act_bytes or np.dtype(info.dtype).itemsize) <= self.budget_bytes:
            return 1
        return group * math.ceil(weight.shape[0] // group / math.prod(info.shape[2:]))


def _split(node: gs.Node, parts: int, namer: Namer) -> list[gs.Node]:
    """Rules b and b': the parts and their Concat, which takes over the conv's output."""
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
    for g in range(group):
        reads = source if group == 1 else _group_slice(source, g, weight.shape[1], namer, base, emitted)
        for rows in np.array_split(np.arange(g * per_group, (g + 1) * per_group), parts // group):
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
