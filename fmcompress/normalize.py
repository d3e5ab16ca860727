"""Normalising the models users bring, at load: old IR versions, old opsets, computed weights.

`modelio.load_model` calls `normalize_model` on every model it hands out, so analyze,
compile, verify, the executor and the runtime view all see one graph, and the emitted
model has a current header. Doing it at load rather than as a first pass of compile's
pipeline means `analyze` and `verify` see the same graph as `compile`, and verification
compares the emitted model with the normalised original (the same function).

Rules:

a. A model that needs none of the steps below is returned as it is: the very object
   passed in, byte for byte (what the existing models and their compiled outputs rely on).
b. Initializers listed as graph inputs are weights, not inputs: IR < 4 required every
   initializer to be an input, and old exporters (`keep_initializers_as_inputs`) list
   them too. They are dropped from the inputs (IR >= 4 semantics); the real inputs,
   those without an initializer, stay in their order.
c. A default-domain opset below `MIN_OPSET` is converted to `TARGET_OPSET` with onnx's
   version converter. Where the converter cannot convert the model, it keeps its opset
   (the passes then meet its ops as they are). Opset `MIN_OPSET` and later are left
   alone, as are function ops: nothing here inlines them.
d. The IR version is raised to at least 4 and to the least the opsets need.
e. Weights computed from constants are folded into initializers: a constant-only node
   (default domain, no subgraph, every input an initializer, a Constant's output or a
   constant-only node's output) is evaluated with `onnx.reference` when it is a
   ConstantOfShape or computed from one (the weights of onnx's backend test models), or
   when its value reaches a weight input (`WEIGHT_INPUTS`: Conv and Gemm weights and
   biases, BatchNormalization parameters) through constant-only nodes, unless a
   DequantizeLinear computes it (a QDQ model's int8 weights stay int8). Its ancestors
   among the constant-only nodes fold with it; values read elsewhere become initializers
   of the same name; initializers no node reads any more are dropped; graph outputs are
   never folded. Other constant arithmetic (a bias reshaped for an Add) stays as it is.
f. Folded weights over the 2 GB protobuf limit are an InputError, raised before they
   are computed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import InputError
from .onnxutil import DEFAULT_DOMAINS

MIN_OPSET = 11  # opset 11 moved Pad/Slice/Resize operands to inputs: the form the passes read
TARGET_OPSET = 17
MIN_PER_CHANNEL_OPSET = 13  # per-channel (axis) QuantizeLinear/DequantizeLinear
MIN_IR_VERSION = 4  # initializers need not be graph inputs from IR 4 on
TWO_GB = 2**31

# op type -> the input indices that hold weights (rule e)
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2),
    "BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2),
}
STORED_WEIGHT_OPS = ("DequantizeLinear",)  # rule e: a quantized model's weights, stored as it means them


def normalize_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with rules b to f applied; `model` itself when none applies (rule a)."""
    weight_nodes = _nodes_to_fold(model.graph)
    if not (_initializer_inputs(model.graph) or _old_opset(model) is not None or weight_nodes
            or model.ir_version < MIN_IR_VERSION):
        return model
    result = onnx.ModelProto()
    result.CopyFrom(model)
    _drop_initializer_inputs(result.graph)
    result.ir_version = max(result.ir_version, MIN_IR_VERSION)  # before converting: rule b holds
    if _old_opset(result) is not None:
        result = _converted(result)
    result.ir_version = max(result.ir_version, helper.find_min_ir_version_for(
        list(result.opset_import), ignore_unknown=True))
    _fold_weights(result, _nodes_to_fold(result.graph))
    return result


def _initializer_inputs(graph: onnx.GraphProto) -> list[str]:
    inits = {init.name for init in graph.initializer}
    return [inp.name for inp in graph.input if inp.name in inits]


def _drop_initializer_inputs(graph: onnx.GraphProto) -> None:
    """Rule b."""
    inits = {init.name for init in graph.initializer}
    real = [inp for inp in graph.input if inp.name not in inits]
    del graph.input[:]
    graph.input.extend(real)


def _old_opset(model: onnx.ModelProto) -> int | None:
    version = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None)
    return version if version is not None and version < MIN_OPSET else None


def _converted(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rule c: the converted model, or `model` where the converter gives up."""
    return converted_to(model, TARGET_OPSET)


def converted_to(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """`model` converted to `opset` by onnx's version converter, or `model` where it gives up."""
    try:
        converted = onnx.version_converter.convert_version(model, opset)
    except (onnx.version_converter.ConvertError, RuntimeError, ValueError, IndexError):
        return model
    return converted


def _constant_only(graph: onnx.GraphProto) -> tuple[dict[str, int], set[str]]:
    """Constant-only nodes (output name -> node index) and the names of constant values."""
    known = {init.name for init in graph.initializer}
    produced: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        if node.domain not in DEFAULT_DOMAINS or any(a.type in (onnx.AttributeProto.GRAPH,
                                                                 onnx.AttributeProto.GRAPHS)
                                                     for a in node.attribute):
            continue
        if node.op_type == "Constant":
            known.update(node.output)
        elif node.input and all(not name or name in known for name in node.input):
            known.update(node.output)
            produced.update({name: index for name in node.output if name})
    return produced, known


def _nodes_to_fold(graph: onnx.GraphProto) -> list[int]:
    """Rule e: indices of the constant-only nodes to evaluate, in graph order."""
    produced, _ = _constant_only(graph)
    chosen: set[int] = set()
    computed = set(produced.values())
    for index, node in enumerate(graph.node):  # ConstantOfShape and what is computed from it
        if index in computed and (
                node.op_type == "ConstantOfShape" or any(produced.get(n) in chosen for n in node.input)):
            chosen.add(index)
    for node in graph.node:  # what reaches a weight input
        for slot in WEIGHT_INPUTS.get(node.op_type, ()) if node.domain in DEFAULT_DOMAINS else ():
            if slot < len(node.input) and node.input[slot] in produced \
                    and graph.node[produced[node.input[slot]]].op_type not in STORED_WEIGHT_OPS:
                chosen.add(produced[node.input[slot]])
    outputs = {out.name for out in graph.output}
    return sorted(i for i in _with_ancestors(graph, produced, chosen)
                  if not outputs.intersection(graph.node[i].output))


def _with_ancestors(graph: onnx.GraphProto, produced: dict[str, int], chosen: set[int]) -> set[int]:
    stack, seen = list(chosen), set(chosen)
    while stack:
        for name in graph.node[stack.pop()].input:
            parent = produced.get(name)
            if parent is not None and parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _fold_weights(model: onnx.ModelProto, indices: list[int]) -> None:
    """Rule e (and f): evaluate the chosen nodes once, replace them with initializers."""
    if not indices:
        return
    graph = model.graph
    folded = [graph.node[i] for i in indices]
    inside = {name for node in folded for name in node.output}
    read_outside = _names_read(graph, skip=set(indices))
    wanted = [name for name in dict.fromkeys(n for node in folded for n in node.output)
              if name and name in read_outside]
    values = _evaluate(model, folded, wanted)
    kept = [node for i, node in enumerate(graph.node) if i not in set(indices)]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(values[name], name) for name in wanted)
    stale = [v for v in graph.value_info if v.name not in inside]
    del graph.value_info[:]
    graph.value_info.extend(stale)
    used = _names_read(graph, skip=set())
    weights = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(weights)


def _names_read(graph: onnx.GraphProto, skip: set[int]) -> set[str]:
    """Every name a node (outside `skip`, subgraphs included) or a graph output reads."""
    names = {out.name for out in graph.output}
    for index, node in enumerate(graph.node):
        if index not in skip:
            names.update(node.input)
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    names.update(_names_read(sub, skip=set()))
    return names


def _evaluate(model: onnx.ModelProto, folded: list[onnx.NodeProto],
              wanted: list[str]) -> dict[str, np.ndarray]:
    """The values of `wanted`, from a model of the folded nodes and what they read."""
    from onnx.reference import ReferenceEvaluator

    sub = _sub_model(model, folded, wanted)
    _check_size(sub)
    try:
        values = ReferenceEvaluator(sub).run(None, {})
    except Exception as exc:  # onnx.reference raises whatever its numpy kernels raise
        raise InputError(f"cannot compute the model's constant weights "
                         f"({type(exc).__name__}: {str(exc).strip()[:200]})") from exc
    return dict(zip(wanted, values, strict=True))


def _sub_model(model: onnx.ModelProto, folded: list[onnx.NodeProto],
               wanted: list[str]) -> onnx.ModelProto:
    graph = model.graph
    needed = {name for node in folded for name in node.input}
    constants = [node for node in graph.node if node.op_type == "Constant" and needed.intersection(node.output)]
    inits = [init for init in graph.initializer if init.name in needed]
    outputs = [helper.make_empty_tensor_value_info(name) for name in wanted]
    sub_graph = helper.make_graph([*constants, *folded], "fmc_weights", [], outputs, inits)
    opsets = [o for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    return helper.make_model(sub_graph, opset_imports=opsets, ir_version=model.ir_version)


def _check_size(sub: onnx.ModelProto) -> None:
    """Rule f: the folded weights' bytes, from shape inference, before computing them."""
    try:
        inferred = onnx.shape_inference.infer_shapes(sub, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError):
        return  # sizes unknown: the evaluation itself runs into whatever limit there is
    total = 0
    for value in inferred.graph.output:
        tensor_type = value.type.tensor_type
        dims = [d.dim_value for d in tensor_type.shape.dim] if tensor_type.HasField("shape") else []
        if tensor_type.elem_type and all(d > 0 for d in dims):
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).itemsize
            total += int(np.prod(dims, dtype=np.int64)) * itemsize
    if total >= TWO_GB:
        raise InputError(f"the weights the model computes from constants take {total / 2**30:.1f} GiB, "
                         "over the 2 GB protobuf limit; not supported")
