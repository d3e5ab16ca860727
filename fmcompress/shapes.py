"""Input-shape pinning and exact tensor shapes for every tensor of a model.

Shapes come from ONNX shape inference with data propagation; where it leaves any
tensor unknown (custom ops, exporters that confuse it), one onnxruntime run on
zeros with every intermediate tensor exposed as an output gives the exact shapes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .errors import InputError, onnxruntime_errors

Dim = int | str | None  # an int when static, the symbolic name (or None) otherwise

_DIMS_RE = re.compile(r"^\s*\d+(\s*[,x]\s*\d+)*\s*$")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def initializer_info(init: onnx.TensorProto) -> TensorInfo:
    """Shape and dtype from the initializer's header (never its data: ByteSize() walks the data,
    0.6 s over VGG-19's weights)."""
    return TensorInfo(tuple(init.dims), np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)))


def parse_dims(text: str) -> tuple[int, ...]:
    """`1,3,224,224` (or `1x3x224x224`) -> (1, 3, 224, 224); every dim at least 1."""
    if not _DIMS_RE.match(str(text)):
        raise InputError(f"invalid shape {text!r}: expected comma-separated positive integers, e.g. 1,3,224,224")
    dims = tuple(int(d) for d in re.split(r"[,x]", text.replace(" ", "")))
    if any(d < 1 for d in dims):
        raise InputError(f"invalid shape {text!r}: every dimension must be at least 1")
    return dims


def initializer_names(graph: onnx.GraphProto) -> set[str]:
    return {init.name for init in graph.initializer}


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs: graph inputs that are not initializers (old exporters list both)."""
    inits = initializer_names(model.graph)
    return [inp for inp in model.graph.input if inp.name not in inits]


def declared_dims(value: onnx.ValueInfoProto) -> list[Dim]:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return []
    dims: list[Dim] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or None)
    return dims


def parse_input_shapes(specs: Sequence[str] | dict[str, Sequence[int]] | None,
                       model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """`NAME=1,3,224,224` (or bare dims for a single-input model) -> {name: dims}, checked."""
    inputs = {inp.name: inp for inp in graph_inputs(model)}
    if not specs:
        return {}
    if isinstance(specs, dict):
        pairs = [(name, tuple(int(d) for d in dims)) for name, dims in specs.items()]
    else:
        pairs = [_split_spec(spec, inputs) for spec in specs]
    result: dict[str, tuple[int, ...]] = {}
    for name, dims in pairs:
        if name not in inputs:
            raise InputError(f"--input-shape names {name!r}, which is not an input; inputs: {', '.join(inputs)}")
        declared = declared_dims(inputs[name])
        if declared and len(declared) != len(dims):
            raise InputError(
                f"--input-shape {name}: rank {len(dims)} given, but the input has rank {len(declared)} {_fmt(declared)}")
        for axis, (want, have) in enumerate(zip(dims, declared, strict=False)):
            if isinstance(have, int) and have != want:
                raise InputError(f"--input-shape {name}: dim {axis} is fixed to {have} in the model, got {want}")
        result[name] = dims
    return result


def _split_spec(spec: str, inputs: dict[str, onnx.ValueInfoProto]) -> tuple[str, tuple[int, ...]]:
    if "=" in spec:
        name, _, dims = spec.rpartition("=")
        return name.strip(), parse_dims(dims)
    if len(inputs) != 1:
        raise InputError(f"--input-shape {spec}: the model has {len(inputs)} inputs ({', '.join(inputs)}); use NAME=DIMS")
    return next(iter(inputs)), parse_dims(spec)


def _fmt(dims: Iterable[Dim]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def resolve_input_shapes(model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Every input's static shape; unresolved symbolic dims are an InputError naming them.

    A symbolic leading dim is the batch and is taken as 1; every other one must be pinned.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    unresolved: list[str] = []
    for inp in graph_inputs(model):
        if inp.name in overrides:
            shapes[inp.name] = overrides[inp.name]
            continue
        dims = declared_dims(inp)
        if dims and not isinstance(dims[0], int):
            dims[0] = 1  # a symbolic leading (batch) dim: memory is planned per sample
        if not inp.type.tensor_type.HasField("shape") or any(not isinstance(d, int) for d in dims):
            unresolved.append(f"{inp.name} {_fmt(dims) if dims else '(no shape)'}")
        else:
            shapes[inp.name] = tuple(int(d) for d in dims)  # type: ignore[arg-type]
    if unresolved:
        example = graph_inputs(model)[0].name
        raise InputError(
            f"unresolved input dims: {'; '.join(unresolved)}; pin them with --input-shape "
            f"{example}=1,3,224,224 (NAME=DIMS, once per input)")
    return shapes


def with_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of `model` whose inputs have the given static shapes and no stale value_info."""
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    for inp in graph_inputs(pinned):
        if inp.name in shapes:
            elem_type = inp.type.tensor_type.elem_type
            inp.CopyFrom(helper.make_tensor_value_info(inp.name, elem_type, list(shapes[inp.name])))
    del pinned.graph.value_info[:]
    return pinned


def _static(value: onnx.ValueInfoProto) -> TensorInfo | None:
    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tensor_type.HasField("shape") or not tensor_type.elem_type:
        return None
    dims = declared_dims(value)
    if any(not isinstance(d, int) for d in dims):
        # dim_value 0 is a legal static zero-size dim, which declared_dims reports as unknown
        if all(d.HasField("dim_value") for d in tensor_type.shape.dim):
            dims = [int(d.dim_value) for d in tensor_type.shape.dim]
        else:
            return None
    return TensorInfo(tuple(int(d) for d in dims), helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))


def infer_tensor_infos(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorInfo]:
    """Static shape and dtype of every node output and graph input, for pinned input shapes."""
    pinned = with_input_shapes(model, shapes)
    infos = _from_shape_inference(pinned)
    wanted = [out for node in pinned.graph.node for out in node.output if out]
    if any(name not in infos for name in wanted):
        try:
            infos.update(onnxruntime_tensor_infos(pinned, shapes, [n for n in wanted if n not in infos]))
        except InputError as exc:
            raise InputError(f"cannot determine tensor shapes: shape inference is incomplete and {exc}") from exc
    return infos


# what ONNX shape inference raises on a graph it gives up on (some exporters' graphs)
INFERENCE_ERRORS = (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, onnx.defs.SchemaError,
                    RuntimeError)


def best_effort_inference(model: onnx.ModelProto, **options: bool) -> onnx.ModelProto:
    """ONNX shape inference on `weightless(model)`, or that as it is where inference gives up:
    read shapes and types from the result, never weights."""
    light = weightless(model)
    try:
        return onnx.shape_inference.infer_shapes(light, **options)
    except INFERENCE_ERRORS:
        return light


WEIGHTLESS_ABOVE = 1 << 16  # bytes; a shape or index constant that inference reads is far smaller


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its initializers over WEIGHTLESS_ABOVE bytes declared as external data that
    is never read (name, dims and type kept), for shape inference. infer_shapes serialises the
    model it is given and parses it back: on VGG-19 (548 MB) that was 3 s a call."""
    light = onnx.ModelProto()
    light.ir_version, light.producer_name = model.ir_version, model.producer_name
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph, source = light.graph, model.graph
    graph.name = source.name
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(graph, field).extend(getattr(source, field))
    for init in source.initializer:
        if init.data_type == onnx.TensorProto.STRING or initializer_info(init).nbytes <= WEIGHTLESS_ABOVE:
            graph.initializer.append(init)
            continue
        stub = graph.initializer.add(name=init.name, dims=init.dims, data_type=init.data_type,
                                     data_location=onnx.TensorProto.EXTERNAL)
        stub.external_data.add(key="location", value="never-read")
    return light

def _from_shape_inference(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    # where inference stops short, onnxruntime fills in (infer_tensor_infos)
    inferred = best_effort_inference(model, check_type=False, strict_mode=False, data_prop=True)
    infos: dict[str, TensorInfo] = {}
    graph = inferred.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        info = _static(value)
        if info is not None:
            infos[value.name] = info
    for init in graph.initializer:
        infos[init.name] = initializer_info(init)
    return infos


def onnxruntime_values(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                       names: list[str]) -> dict[str, np.ndarray]:
    """Run once on zeros, optimisations off, with `names` exposed as outputs: the values of
    every graph output and of `names` (custom-domain kernels included); InputError if
    onnxruntime cannot run the model."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {out.name for out in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in dict.fromkeys(names) if name not in present)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # fatal only: a refusal is said in our own one line
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feeds = {inp.name: np.zeros(shapes[inp.name], helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type))
                 for inp in graph_inputs(probe)}
        values = session.run(None, feeds)
    except onnxruntime_errors() as exc:  # free text; keep the first line
        custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
        hint = f" (custom-domain ops: {', '.join(custom)})" if custom else ""
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"onnxruntime cannot run the model{hint}: {first_line[:300]}") from exc
    outputs = [out.name for out in session.get_outputs()]
    return dict(zip(outputs, values, strict=True))


def onnxruntime_tensor_infos(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                             names: list[str]) -> dict[str, TensorInfo]:
    """The real shapes and dtypes of `names` (and the graph outputs) from one onnxruntime
    run on zeros (`onnxruntime_values`)."""
    values = onnxruntime_values(model, shapes, names)
    return {name: TensorInfo(tuple(np.shape(v)), np.asarray(v).dtype) for name, v in values.items()}


@dataclass(frozen=True)
class InferredType:
    """What ONNX shape inference says of a tensor; None where it cannot tell."""

    rank: int | None
    channels: int | None  # dim 1
    dtype: np.dtype | None


def inferred_types(model: onnx.ModelProto) -> dict[str, InferredType]:
    """Rank, dim 1 and element dtype of every tensor that ONNX shape inference can type."""
    inferred = best_effort_inference(model)  # where it gives up, callers fall back on conv weights
    graph = inferred.graph
    found: dict[str, InferredType] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = value.type.tensor_type
        dtype = (np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
                 if tensor_type.elem_type else None)
        if not tensor_type.HasField("shape"):
            found[value.name] = InferredType(None, None, dtype)
            continue
        dims = tensor_type.shape.dim
        channels = dims[1].dim_value if len(dims) > 1 and dims[1].HasField("dim_value") else None
        found[value.name] = InferredType(len(dims), channels, dtype)
    return found
