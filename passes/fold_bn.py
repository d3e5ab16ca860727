"""FoldBatchNormPass: fold inference-form BatchNormalization into the conv before it.

Rewrite rule:
    y = BN(conv(x; W, b); scale, B, mean, var, eps)
      -> y = conv(x; W * s, (b - mean) * s + B),  s = scale / sqrt(var + eps)
    per output channel of the conv: axis 0 of a Conv weight [C_out, C_in/g, k...];
    for a ConvTranspose weight [C_in, C_out/g, k...] the output channel of group gi,
    column oc is gi * C_out/g + oc.

Applies when the BN input is the only use of a Conv/ConvTranspose output (not a
graph output either), BN runs in inference form (no extra outputs used, no
training_mode), and every weight, bias and BN parameter is constant: an
initializer or a Constant node's output. The conv then produces the BN output
tensor (its name is kept); the BN node and any weights left unused are removed.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Pass, PassContext, PassResult
from .graph import Model
from .graphutil import Namer, batchnorm_affine, constant_value, conv_bias, set_conv_params
from .ops import CONV_OPS


class FoldBatchNormPass(Pass):
    name = "fold-bn"
    provides = ("bn_folded",)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        namer = Namer(graph)
        ctx.bn_folded = [bn.name for bn in list(graph.nodes) if _fold(graph, namer, bn)]
        if ctx.bn_folded:
            model.touched()
        return PassResult(model, modified=bool(ctx.bn_folded), data={"folded": ctx.bn_folded})


def _fold(graph: gs.Graph, namer: Namer, bn: gs.Node) -> bool:
    """Fold `bn` into its producing conv if the rule applies; True if it did."""
    conv = _foldable_conv(graph, bn)
    if conv is None:
        return False
    affine = batchnorm_affine(bn)
    weight = constant_value(conv.inputs[1])
    if weight is None or affine is None:
        return False
    scale, shift = affine
    bias = conv_bias(conv)
    if bias is None and len(conv.inputs) > 2 and conv.inputs[2].name:
        return False  # a computed bias cannot be rewritten
    bias = np.zeros_like(scale) if bias is None else bias.astype(np.float64)
    new_weight = _scale_output_channels(conv, weight.astype(np.float64), scale)
    new_bias = bias * scale + shift
    set_conv_params(conv, namer, new_weight.astype(weight.dtype), new_bias.astype(weight.dtype))
    bn_output = bn.outputs[0]
    bn.inputs.clear()
    bn.outputs.clear()
    conv.outputs[0] = bn_output
    return True


def _foldable_conv(graph: gs.Graph, bn: gs.Node) -> gs.Node | None:
    if bn.op != "BatchNormalization" or len(bn.inputs) != 5:
        return None
    if int(bn.attrs.get("training_mode", 0)) or int(bn.attrs.get("spatial", 1)) != 1:
        return None
    if any(out.outputs or out in graph.outputs for out in bn.outputs[1:]):
        return None
    x = bn.inputs[0]
    if len(x.inputs) != 1 or x.inputs[0].op not in CONV_OPS or len(x.outputs) != 1 or x in graph.outputs:
        return None
    return x.inputs[0]


def _scale_output_channels(conv: gs.Node, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    if conv.op == "Conv":
        return weight * scale.reshape(-1, *[1] * (weight.ndim - 1))
    group = int(conv.attrs.get("group", 1))
    grouped = weight.reshape(group, weight.shape[0] // group, *weight.shape[1:])
    per_group = scale.reshape(group, 1, weight.shape[1], *[1] * (weight.ndim - 2))
    return (grouped * per_group).reshape(weight.shape)
