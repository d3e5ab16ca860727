"""SplitConvPass: split a conv's filters so that onnxruntime never expands its whole input.

onnxruntime's CPU convolution (MLAS) expands the whole input (im2col) when a group's
filter count exceeds the output positions: ResNet-18's 3x3 convs on 14x14 maps take
1.8 MB of scratch for a 200 KB output, and a row band of a tiled region, with fewer
positions, takes it more often. With at most as many filters as positions it works in
small per-thread segments instead. Rules:

a. A candidate is a Conv (group=1, 2-D, constant weight and bias) whose scratch under
   rule e of passes/runtime.py (`conv_workspace_elements`) exceeds `budget_bytes`.
b. It becomes ceil(M / positions) convs over the same input, each with at most
   `positions` filters (rows of W and b, in order), and a Concat along the channel
   axis that writes the original output name; the rest of the graph is untouched.
c. The outputs are bitwise what one conv computes per filter, so the model's
   outputs are unchanged up to float rounding (tests check against onnxruntime).

Entry point: `SplitConvPass(budget_bytes).run(model, ctx)`; `result.data` lists each split
conv with its filter count and number of parts.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fmcompress.shapes import infer_tensor_infos, resolve_input_shapes

from .base import Pass, PassContext, PassResult
from .runtime import conv_workspace_elements


class SplitConvPass(Pass):
    """Splits every conv whose input expansion would exceed `budget_bytes` (rules a-c)."""

    name = "split-conv"

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        infos = infer_tensor_infos(model, resolve_input_shapes(model, ctx.input_shapes))
        weights = {init.name: init for init in model.graph.initializer}
        split: list[dict] = []
        nodes: list[onnx.NodeProto] = []
        new_weights: list[onnx.TensorProto] = []
        for node in model.graph.node:
            parts = self._parts(node, weights, infos, ctx.act_bytes)
            if parts <= 1:
                nodes.append(node)
                continue
            nodes += _split(node, weights, parts, new_weights)
            split.append({"node": node.name, "filters": int(weights[node.input[1]].dims[0]), "parts": parts})
        if not split:
            return PassResult(model, modified=False, data=[])
        rewritten = onnx.ModelProto()
        rewritten.CopyFrom(model)
        del rewritten.graph.node[:]
        rewritten.graph.node.extend(nodes)
        used = {name for node in nodes for name in node.input}
        kept = [init for init in [*rewritten.graph.initializer, *new_weights] if init.name in used]
        del rewritten.graph.initializer[:]
        rewritten.graph.initializer.extend(kept)
        return PassResult(rewritten, modified=True, data=split)

    def _parts(self, node: onnx.NodeProto, weights: dict[str, onnx.TensorProto], infos, act_bytes) -> int:
        """Rule a; the number of convs of rule b (1: leave it)."""
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            return 1
        weight = weights.get(node.input[1])
        bias_ok = len(node.input) < 3 or not node.input[2] or node.input[2] in weights
        info = infos.get(node.output[0])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if weight is None or not bias_ok or info is None or len(info.shape) != 4 or attrs.get("group", 1) != 1:
            return 1
        elements = conv_workspace_elements(tuple(weight.dims), info.shape, 1, list(attrs.get("strides", [])),
                                           list(attrs.get("pads", [])))
        if elements * (act_bytes or np.dtype(info.dtype).itemsize) <= self.budget_bytes:
            return 1
        return math.ceil(weight.dims[0] / math.prod(info.shape[2:]))


def _split(node: onnx.NodeProto, weights: dict[str, onnx.TensorProto], parts: int,
           new_weights: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    """Rule b; the parts' weights go to `new_weights`."""
    weight = numpy_helper.to_array(weights[node.input[1]])
    bias = numpy_helper.to_array(weights[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
    base = node.name or node.output[0]
    outputs, emitted = [], []
    for i, rows in enumerate(np.array_split(np.arange(weight.shape[0]), parts)):
        w_name = f"{base}/split{i}/W"
        new_weights.append(numpy_helper.from_array(weight[rows], w_name))
        inputs = [node.input[0], w_name]
        if bias is not None:
            inputs.append(f"{base}/split{i}/B")
            new_weights.append(numpy_helper.from_array(bias[rows], inputs[-1]))
        outputs.append(f"{node.output[0]}/split{i}")
        part = helper.make_node("Conv", inputs, [outputs[-1]], name=f"{base}/split{i}")
        part.attribute.extend(node.attribute)
        emitted.append(part)
    emitted.append(helper.make_node("Concat", outputs, [node.output[0]], name=f"{base}/concat", axis=1))
    return emitted
