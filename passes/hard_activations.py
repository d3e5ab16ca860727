"""HardActivationsPass: HardSigmoid and HardSwish written as Mul, Add and Clip, before int8.

onnxruntime has no integer kernel for HardSigmoid or HardSwish (it runs HardSwish as a
HardSigmoid and a Mul), so a QDQ model dequantizes their input, computes in float and
quantizes again: MobileNetV3-Small at 224x224 keeps 54 float maps, 3.1 MiB, one pair per
activation. Written with the ops they are made of, every step has an integer kernel (QLinearMul,
QLinearAdd, and a Clip that onnxruntime folds into the QuantizeLinear after it). Rules:

a. `HardSigmoid(x; alpha, beta)` (defaults 0.2 and 0.5) becomes `Clip(x * alpha + beta, 0, 1)`.
b. `HardSwish(x)` becomes `x * Clip(x * 1/6 + 1/2, 0, 1)`, rule a's gate with alpha 1/6 and
   beta 1/2 (the operator's definition).
c. The last node writes the activation's output tensor under its name; the constants are new
   float32 initializers under `fmc/`. Float results differ by rounding only.
d. Needs opset 11 or later (Clip's bounds as inputs): fmcompress/int8.py converts a model to
   opset 17 before this pass runs, as per-channel quantization needs it anyway.

Entry point: `HardActivationsPass().run(model, ctx)` (`HardActivationsPass()(proto).model` on an
ONNX model, as fmcompress/int8.py rule a'' runs it).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Pass, PassContext, PassResult
from .graph import Model
from .graphutil import Namer, new_variable


class HardActivationsPass(Pass):
    name = "hard-activations"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        namer = Namer(model.graph)
        rewritten = [node.name for node in list(model.graph.nodes) if _rewrite(model.graph, node, namer)]
        if rewritten:
            model.touched()
        return PassResult(model, modified=bool(rewritten), data={"rewritten": rewritten})


def _rewrite(graph: gs.Graph, node: gs.Node, namer: Namer) -> bool:
    if node.op not in ("HardSigmoid", "HardSwish") or len(node.inputs) != 1 or len(node.outputs) != 1:
        return False
    x, result = node.inputs[0], node.outputs[0]
    base = f"fmc/{node.name or result.name}"
    if node.op == "HardSigmoid":
        alpha, beta = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
    else:
        alpha, beta = 1 / 6, 0.5
    node.inputs.clear()
    node.outputs.clear()
    gate = result if node.op == "HardSigmoid" else new_variable(namer, f"{base}/gate")
    steps = _gate(namer, base, x, alpha, beta, gate)
    if node.op == "HardSwish":
        steps.append(gs.Node("Mul", namer(f"{base}/swish"), inputs=[x, gate], outputs=[result]))
    graph.nodes.extend(steps)
    return True


def _gate(namer: Namer, base: str, x: gs.Tensor, alpha: float, beta: float, out: gs.Tensor) -> list[gs.Node]:
    """Rule a: Clip(x * alpha + beta, 0, 1) into `out`."""
    def const(name: str, value: float) -> gs.Constant:
        return gs.Constant(namer(f"{base}/{name}"), np.asarray(value, dtype=np.float32))

    scaled, shifted = new_variable(namer, f"{base}/scaled"), new_variable(namer, f"{base}/shifted")
    return [gs.Node("Mul", namer(f"{base}/scale"), inputs=[x, const("alpha", alpha)], outputs=[scaled]),
            gs.Node("Add", namer(f"{base}/shift"), inputs=[scaled, const("beta", beta)], outputs=[shifted]),
            gs.Node("Clip", namer(f"{base}/clip"), inputs=[shifted, const("zero", 0.0), const("one", 1.0)],
                    outputs=[out])]
