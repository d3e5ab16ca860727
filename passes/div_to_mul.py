"""DivToMulPass: a division by a constant becomes a multiplication by its reciprocal, before int8.

onnxruntime's QDQ transformers give Mul an integer kernel (QLinearMul) and Div none, so a Div
left in a quantized graph dequantizes its input, divides in float and quantizes again: two
float tensors the size of the map. Exporters leave such Divs in activations: HardSwish as
onnxruntime inlines it and as paddle2onnx writes it is `x * Clip(x + 3, 0, 6) / 6`, after every
conv of PP-OCR's detector and recognizer. Rules:

a. `Div(x, c)`, c a float32 constant (initializer or Constant node) with no zero and x
   computed, becomes `Mul(x, 1 / c)`: the same node, name and output, the reciprocal a new
   initializer named under `fmc/`. A division of a constant by a computed tensor is left alone.
b. Nothing else changes. The result differs from the division by float rounding only (one
   rounding of 1 / c), which int8's own rounding dwarfs.

Entry point: `DivToMulPass().run(model, ctx)` (`DivToMulPass()(proto).model` on an ONNX model,
as fmcompress/int8.py rule a runs it).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Pass, PassContext, PassResult
from .graph import Model
from .graphutil import Namer, constant_value


class DivToMulPass(Pass):
    name = "div-to-mul"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        namer = Namer(model.graph)
        rewritten = sum(_reciprocal(node, namer) for node in model.graph.nodes if node.op == "Div")
        if rewritten:
            model.touched()
        return PassResult(model, modified=bool(rewritten), data={"rewritten": rewritten})


def _reciprocal(div: gs.Node, namer: Namer) -> bool:
    """Rule a at one Div; True if it was rewritten."""
    if len(div.inputs) != 2 or constant_value(div.inputs[0]) is not None:
        return False
    value = constant_value(div.inputs[1])
    if value is None or value.dtype != np.float32 or not np.all(value != 0):
        return False
    div.op = "Mul"
    div.inputs[1] = gs.Constant(namer(f"fmc/{div.name}/reciprocal"), np.asarray(1 / value, dtype=np.float32))
    return True
