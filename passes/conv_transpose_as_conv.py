"""ConvTransposeAsConvPass: a ConvTranspose whose kernel equals its stride as a 1x1 Conv and a
rearrangement, before int8.

onnxruntime's CPU provider has no integer ConvTranspose: in a QDQ model it dequantizes the
input, runs the float kernel and quantizes again, so an upsampling head keeps float maps of
the largest size in the network (PP-OCR's detector at 640x640: 24x320x320, 9.4 MiB each). A
ConvTranspose with kernel = stride and no padding writes each input pixel's own k_h x k_w
block of outputs, with no overlap: exactly a 1x1 Conv to C_out*k_h*k_w channels followed by
a depth-to-space rearrangement, which onnxruntime runs as QLinearConv and uint8 data movement.
Rules:

a. Applies to a 2-D ConvTranspose with constant weight (and bias, if any), group 1,
   `strides` equal to `kernel_shape`, no `pads` above 0, dilations 1, no `output_padding`
   above 0 and no `output_shape`, on an input whose H and W are known (batch may vary; the
   context's `input_shapes` pin symbolic ones, and where none do nothing is rewritten).
b. It becomes a 1x1 Conv (same name) with C_out*k_h*k_w filters: filter (c, i, j), in that
   order, is W[:, c, i, j] and computes output pixel (k_h*y + i, k_w*x + j) of channel c; the
   bias repeats over the k_h*k_w filters of its channel.
c. Channel-wise steps after it, each the only reader of what the one before wrote (and that
   not a graph output), run before the rearrangement: an Add, Sub, Mul or Div by a constant
   scalar or per-channel vector and an inference-form BatchNormalization fold into the 1x1
   conv's filters and bias while they follow it directly; then unary activations (Relu,
   LeakyRelu, Clip with constant bounds, Sigmoid, HardSigmoid, HardSwish, Tanh) run on the
   conv's output as they are. onnxruntime then fuses each into the integer conv or runs it
   on uint8, and the rearrangement moves uint8.
d. The rearrangement is Reshape [N, C_out, k_h, k_w, H, W] -> Transpose [0, 1, 4, 2, 5, 3] ->
   Reshape [N, C_out, k_h*H, k_w*W] (N copied by a 0 in both shapes), and it writes the
   tensor the last step of rule c wrote, under the same name. DepthToSpace would say the
   same in one node; onnxruntime runs it in float in a QDQ model. Tensors between the conv and
   the rearrangement keep their names and lose their declared shapes (they are C_out*k_h*k_w
   channels at the input's size now).
e. The function is unchanged up to float rounding (the same products, summed in another
   order); the multiply-accumulates are the same.

Entry point: `ConvTransposeAsConvPass().run(model, ctx)` (`ConvTransposeAsConvPass()(proto).model`
on an ONNX model, as fmcompress/int8.py rule a'' runs it).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fmcompress.errors import InputError
from fmcompress.shapes import infer_tensor_infos, resolve_input_shapes

from .base import Pass, PassContext, PassResult
from .graph import Model
from .graphutil import Namer, batchnorm_affine, constant_value, conv_bias, new_variable

ACTIVATIONS_BEFORE = frozenset({"Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh"})
AFFINE_OPS = frozenset({"Add", "Sub", "Mul", "Div"})


class ConvTransposeAsConvPass(Pass):
    name = "conv-transpose-as-conv"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        candidates = [node for node in model.graph.nodes if _applies(node)]
        if not candidates:
            return PassResult(model, modified=False, data={"rewritten": []})
        proto = model.proto()
        try:
            infos = infer_tensor_infos(proto, resolve_input_shapes(proto, ctx.input_shapes))
        except InputError:  # rule a: sizes left symbolic (ctx.input_shapes pins them)
            return PassResult(model, modified=False, data={"rewritten": []})
        namer, outputs = Namer(model.graph), {tensor.name for tensor in model.graph.outputs}
        rewritten = []
        for node in candidates:
            info = infos.get(node.inputs[0].name)
            if info is not None and len(info.shape) == 4:
                _rewrite(model.graph, node, info.shape[2:], namer, outputs)
                rewritten.append(node.name)
        if rewritten:
            model.touched()
        return PassResult(model, modified=bool(rewritten), data={"rewritten": rewritten})


def _applies(node: gs.Node) -> bool:
    """Rule a, but for the input's shape."""
    if node.op != "ConvTranspose" or len(node.inputs) < 2:
        return False
    weight = constant_value(node.inputs[1])
    if weight is None or weight.ndim != 4 or (len(node.inputs) > 2 and node.inputs[2].name and conv_bias(node) is None):
        return False
    attrs = node.attrs
    kernel = list(attrs.get("kernel_shape", weight.shape[2:]))
    return (int(attrs.get("group", 1)) == 1 and list(attrs.get("strides", [1, 1])) == kernel == list(weight.shape[2:])
            and not any(int(p) for p in attrs.get("pads", [])) and all(int(d) == 1 for d in attrs.get("dilations", [1, 1]))
            and not any(int(p) for p in attrs.get("output_padding", [])) and "output_shape" not in attrs
            and attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID"))


def _rewrite(graph: gs.Graph, node: gs.Node, size: tuple[int, ...], namer: Namer, outputs: set[str]) -> None:
    weight = constant_value(node.inputs[1]).astype(np.float64)
    c_in, c_out, kh, kw = weight.shape
    bias = conv_bias(node)
    filters = weight.transpose(1, 2, 3, 0).reshape(c_out * kh * kw, c_in)  # rule b: filter (c, i, j)
    shift = np.repeat(np.zeros(c_out) if bias is None else bias.astype(np.float64), kh * kw)
    tail, filters, shift = _fold_affines(node.outputs[0], filters, shift, kh * kw, outputs)
    tail = _activations(tail, outputs)
    dtype = constant_value(node.inputs[1]).dtype
    node.op, node.attrs = "Conv", {"kernel_shape": [1, 1]}
    source = node.inputs[0]
    node.inputs.clear()
    node.inputs.extend([source, gs.Constant(namer(f"fmc/{node.name}/W"), filters.reshape(-1, c_in, 1, 1).astype(dtype)),
                        gs.Constant(namer(f"fmc/{node.name}/B"), shift.astype(dtype))])
    result = tail.outputs[0]
    expanded = new_variable(namer, f"fmc/{node.name}/expanded")
    tail.outputs[0] = expanded
    _rearrange(graph, namer, node.name, expanded, result, c_out, (kh, kw), size)
    tensor = node.outputs[0]
    while tensor is not expanded:  # kept names now hold C_out*k_h*k_w channels at the input's size
        tensor.shape = None  # so no stale value_info contradicts them
        tensor = tensor.outputs[0].outputs[0]


def _fold_affines(tensor: gs.Tensor, filters: np.ndarray, shift: np.ndarray, block: int,
                  outputs: set[str]) -> tuple[gs.Node, np.ndarray, np.ndarray]:
    """Rule c's folds: the node now writing the conv's output, and the folded filters and bias."""
    conv = tensor.inputs[0]
    while (step := _only_reader(tensor, outputs)) is not None:
        affine = _channel_affine(step, tensor, filters.shape[0] // block)
        if affine is None:
            break
        scale, offset = (np.repeat(v, block) for v in affine)
        filters, shift = filters * scale[:, None], shift * scale + offset
        result = step.outputs[0]
        step.inputs.clear()
        step.outputs.clear()
        conv.outputs[0] = result
        tensor = result
    return conv, filters, shift


def _activations(writer: gs.Node, outputs: set[str]) -> gs.Node:
    """Rule c's activations: the last one that runs on the conv's output (or `writer`)."""
    while (step := _only_reader(writer.outputs[0], outputs)) is not None and step.op in ACTIVATIONS_BEFORE:
        if any(constant_value(t) is None for t in step.inputs[1:] if t.name):
            break  # a computed Clip bound
        writer = step
    return writer


def _only_reader(tensor: gs.Tensor, outputs: set[str]) -> gs.Node | None:
    if tensor.name in outputs or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def _channel_affine(step: gs.Node, tensor: gs.Tensor, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, offset) per channel of `step` applied to `tensor`, or None if it is not rule c's."""
    if step.op == "BatchNormalization":
        if int(step.attrs.get("training_mode", 0)) or any(out.outputs for out in step.outputs[1:]):
            return None
        return batchnorm_affine(step)
    if step.op not in AFFINE_OPS or len(step.inputs) != 2 or step.inputs[0] is not tensor:
        return None  # Sub and Div only with the map first; Add and Mul too, which covers exporters
    value = constant_value(step.inputs[1])
    vector = None if value is None else _per_channel(value, channels)
    if vector is None or (step.op == "Div" and not np.all(vector != 0)):
        return None
    ones, zeros = np.ones(channels), np.zeros(channels)
    return {"Add": (ones, vector), "Sub": (ones, -vector), "Mul": (vector, zeros), "Div": (1 / vector, zeros)}[step.op]


def _per_channel(value: np.ndarray, channels: int) -> np.ndarray | None:
    """A scalar, or a [C, 1, 1] or [1, C, 1, 1] constant (what broadcasts along a 4-D map's
    channels), as C float64 values; None for any other shape."""
    if value.size == 1 and value.ndim <= 4:
        return np.full(channels, float(value.reshape(-1)[0]))
    if value.shape in ((channels, 1, 1), (1, channels, 1, 1)):
        return value.reshape(-1).astype(np.float64)
    return None


def _rearrange(graph: gs.Graph, namer: Namer, name: str, source: gs.Tensor, result: gs.Tensor,
               c_out: int, block: tuple[int, int], size: tuple[int, ...]) -> None:
    """Rule d."""
    (kh, kw), (h, w) = block, size
    split = new_variable(namer, f"fmc/{name}/blocks")
    moved = new_variable(namer, f"fmc/{name}/interleaved")
    shapes = [gs.Constant(namer(f"fmc/{name}/blocks_shape"), np.array([0, c_out, kh, kw, h, w], np.int64)),
              gs.Constant(namer(f"fmc/{name}/map_shape"), np.array([0, c_out, kh * h, kw * w], np.int64))]
    graph.nodes += [gs.Node("Reshape", namer(f"fmc/{name}/split_blocks"), inputs=[source, shapes[0]], outputs=[split]),
                    gs.Node("Transpose", namer(f"fmc/{name}/interleave"), attrs={"perm": [0, 1, 4, 2, 5, 3]},
                            inputs=[split], outputs=[moved]),
                    gs.Node("Reshape", namer(f"fmc/{name}/to_map"), inputs=[moved, shapes[1]], outputs=[result])]
