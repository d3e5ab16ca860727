"""Runtime memory pass: the tensors onnxruntime really allocates, alive at once in its order.

The stored view counts what an accelerator with on-chip fusion keeps between kernel
groups. onnxruntime materialises more: every fused kernel's full-width output (Conv+Relu
is one FusedConv, but its output exists; the conv before a projection is still full
width), and the stem. This pass asks onnxruntime itself.

Rules:

a. onnxruntime optimises the model (input shapes pinned, value_info dropped) at `level`
   (default `extended`: its portable fusions, what it does on every machine; `all`,
   onnxruntime's own default and compile's report level, adds the x86-only NCHWc layout:
   com.microsoft.nchwc convs on channel-blocked tensors, padded to the block, and their
   ReorderInput/ReorderOutput, sized like any tensor by rule b; `basic` and `none`
   less) and saves the optimised graph. Its node order is onnxruntime's execution order
   (checked against the profiler's trace in the tests).
b. One run of the optimised graph on zeros, optimisations off, every node output exposed,
   gives each tensor's exact shape and dtype (custom-domain fused kernels included).
c. View ops (Reshape, Flatten, Squeeze, Unsqueeze, Identity, Dropout) alias their input in
   onnxruntime: their output allocates nothing and extends its source buffer's life.
d. A tensor is alive from the step of its producer to the step of its last reader (graph
   outputs to the end). Graph inputs belong to the caller: listed with role "input",
   never counted in the peak. Graph outputs count in the peak but, like the inputs, are
   never held to a ceiling: the caller receives them whole. Initializers and constants
   never are tensors of the view.
e. Convolution scratch: onnxruntime's CPU convolutions (MLAS) expand the whole input
   (im2col, output positions x C/group*kh*kw elements) when a group's filter count
   exceeds the output positions (late, low-resolution layers: 256 filters on 14x14),
   unless the conv is a plain 1x1 GEMM; elsewhere they work in small per-thread segments.
   That expansion is listed with role "workspace", alive at its conv's step only: it
   counts in the peak, and against the ceiling like any other allocation.
e'. Integer convolutions (QLinearConv, ONNX's and com.microsoft's channels-last one that
   level `all` makes; onnxruntime's qlinearconv.cc on x86 MLAS) allocate whole-map scratch
   per image, each buffer listed as its own workspace (`<conv>:<part>`, its own dtype, never
   `ctx.act_bytes`): `gemm_output` (int32, M x output positions) unless MLAS's symmetric
   kernel runs (weight zero points 0, uint8 input, and group 1 with M >= 16, C % 4 == 0,
   M % 8 == 0, or a depthwise conv of a multiple of 16 channels); `indirection` (8-byte
   pointers, kernel taps x output positions) for a depthwise conv, or a symmetric one that
   is not a plain 1x1 GEMM; otherwise `im2col` (C/group x taps x output positions bytes)
   unless plain; and without channels_last (below `all`) `transpose_input` (the input map
   again) and `transpose_output` (the output map again). Measured on single convs
   (tests/test_int8.py) within the probe's resolution. ARM's MLAS differs (pointwise convs
   and fewer than 64 input channels run as GEMMs): not modelled.
f. The peak is the largest sum of bytes alive at one step; bytes are numel * dtype size
   (or `ctx.act_bytes`). Not modelled: onnxruntime's planner running some ops in place
   (Relu, Add; at `all` an NCHWc conv summing into its residual input), which lowers the
   measured peak, and its reuse of a freed buffer for a later tensor of the same
   planned shape, which without an arena keeps the buffer alive in between and raises
   it (YOLOv8n at 320x320: 3.1 MiB computed, 5.1 MiB measured). The measured figure
   (`fmcompress.memprobe`; examples/runtime_peak.py compares both) is the truth; at
   `extended` the two agree within a few percent on most CNNs, at `all` less well.

Entry point: `RuntimeMemoryPass(level="extended").run(model, ctx)`; the model is not
changed; `result.data` is a `RuntimeView`, whose tensors are `FeatureMap`s (group = "").
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fmcompress.errors import InputError, onnxruntime_errors
from fmcompress.featuremaps import FeatureMap
from fmcompress.ortrun import ort_level
from fmcompress.reports.analysis import DEFAULT_ORT_LEVEL, ORT_LEVELS, RuntimeView
from fmcompress.shapes import (
    TensorInfo,
    graph_inputs,
    onnxruntime_tensor_infos,
    resolve_input_shapes,
    with_input_shapes,
)

from .base import Pass, PassContext, PassResult
from .graph import Model
from .memory import _live_curve
from .ops import RUNTIME_ALIAS_OPS

LEVELS = ORT_LEVELS
DEFAULT_LEVEL = DEFAULT_ORT_LEVEL
CEILED_ROLES = ("map", "workspace")  # graph inputs and outputs are the caller's (rule d)



def optimized_model(model: onnx.ModelProto, level: str = DEFAULT_LEVEL) -> onnx.ModelProto:
    """The graph onnxruntime runs for `model` at `level`, nodes in its execution order (rule a)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort_level(level)
    options.log_severity_level = 4  # fatal only: a refusal is said in our own one line
    with tempfile.TemporaryDirectory(prefix="fmcompress-ort-") as folder:
        path = os.path.join(folder, "optimized.onnx")
        options.optimized_model_filepath = path
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except onnxruntime_errors() as exc:  # free text; keep the first line
            raise InputError(f"onnxruntime cannot load the model: {str(exc).strip().splitlines()[0][:300]}") from exc
        return onnx.load(path)


def _tensor_infos(optimized: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorInfo]:
    """Rule b: every node output of the optimised graph, sized by one run on zeros."""
    names = [out for node in optimized.graph.node for out in node.output if out]
    try:
        return onnxruntime_tensor_infos(optimized, shapes, names)
    except InputError as exc:
        raise InputError(f"sizing the optimised graph's tensors: {exc}") from exc


class RuntimeMemoryPass(Pass):
    """Reports onnxruntime's allocations and their live peak; does not modify the model."""

    name = "runtime"
    provides = ("runtime", "runtime_before")

    def __init__(self, level: str = DEFAULT_LEVEL, ceiling_bytes: int | None = None, *,
                 plan_ceiling: bool = False):
        ort_level(level)  # fail early on a bad level
        self.level = level
        self.ceiling_bytes = ceiling_bytes
        self.plan_ceiling = plan_ceiling  # the ceiling is the plan's (compile --runtime ort)

    @property
    def requires(self) -> tuple[str, ...]:
        return ("plan",) if self.plan_ceiling else ()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        ceiling = ctx.plan.ceiling_bytes if self.plan_ceiling else self.ceiling_bytes
        key = ("runtime", self.level, ceiling, ctx.act_bytes, tuple(sorted(ctx.input_shapes.items())))
        if key not in model.cache:  # re-run on an unchanged graph (nothing sunk): one optimisation
            model.cache[key] = analyze_runtime(model.proto(), ctx, self.level, ceiling)
        ctx.runtime = model.cache[key]
        ctx.runtime_before = ctx.runtime_before or ctx.runtime
        return PassResult(model, modified=False, data=ctx.runtime)


def analyze_runtime(model: onnx.ModelProto, ctx: PassContext, level: str = DEFAULT_LEVEL,
                    ceiling_bytes: int | None = None) -> RuntimeView:
    """onnxruntime's allocations of `model` and their live peak (what the pass provides)."""
    shapes = resolve_input_shapes(model, ctx.input_shapes)
    optimized = optimized_model(with_input_shapes(model, shapes), level)
    infos = _tensor_infos(optimized, shapes)
    tensors = runtime_tensors(optimized, shapes, infos, ctx.act_bytes)
    tensors += conv_workspaces(optimized, infos, ctx.act_bytes)
    counted = [t for t in tensors if t.role != "input" and t.bytes > 0]
    labels = [node.name or node.op_type for node in optimized.graph.node]
    live = _live_curve(counted, labels)
    ceiling = ceiling_bytes
    for tensor in tensors:
        tensor.over_ceiling = ceiling is not None and tensor.role in CEILED_ROLES and tensor.bytes > ceiling
    view = RuntimeView.build(level=level, tensors=tensors, live=live, ceiling_bytes=ceiling)
    return view


def runtime_tensors(optimized: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                    infos: dict[str, TensorInfo], act_bytes: int | None) -> list[FeatureMap]:
    """Rules c and d: graph inputs, then every node output in execution order."""
    graph = optimized.graph
    outputs = {o.name for o in graph.output}
    last = len(graph.node) - 1
    readers: dict[str, list[tuple[int, onnx.NodeProto]]] = {}
    for step, node in enumerate(graph.node):
        for name in node.input:
            readers.setdefault(name, []).append((step, node))
    owner: dict[str, str] = {}  # alias output -> the tensor whose buffer it shares
    last_use: dict[str, int] = {}
    for step, node in enumerate(graph.node):
        for name in node.input:
            buffer = owner.get(name, name)
            last_use[buffer] = max(last_use.get(buffer, -1), last if name in outputs else step)
        if node.op_type in RUNTIME_ALIAS_OPS and node.input and node.input[0] in {*owner, *infos, *shapes}:
            owner[node.output[0]] = owner.get(node.input[0], node.input[0])
        for name in node.output:
            if name in outputs:
                last_use[owner.get(name, name)] = last
    tensors = []
    for inp in graph_inputs(optimized):
        dtype = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        tensors.append(_tensor(inp.name, shapes[inp.name], dtype, "input", None, 0, last_use.get(inp.name, -1),
                               readers, act_bytes))
    for step, node in enumerate(graph.node):
        for name in node.output:
            if not name or name not in infos:
                continue
            value = infos[name]
            role = "output" if name in outputs else "map"
            aliased = name in owner
            tensor = _tensor(name, value.shape, value.dtype, role, node, step,
                             last if role == "output" else last_use.get(name, -1), readers, act_bytes)
            if aliased:
                tensor.bytes = 0  # rule c: shares its source's buffer
            tensors.append(tensor)
    return tensors


CONV_OPS = frozenset({("", "Conv"), ("ai.onnx", "Conv"), ("com.microsoft", "FusedConv")})


def conv_workspace_elements(weight_shape: tuple[int, ...], output_shape: tuple[int, ...], group: int,
                            strides: list[int], pads: list[int]) -> int:
    """Rule e: elements of MLAS's full input expansion for one conv, 0 when it segments."""
    filters = weight_shape[0] // max(group, 1)
    positions = int(np.prod(output_shape[2:]))
    depth = int(np.prod(weight_shape[1:]))  # K = C/group * kernel taps
    plain_gemm = all(k == 1 for k in weight_shape[2:]) and all(s == 1 for s in strides) and not any(pads)
    return positions * depth if filters > positions and not plain_gemm else 0


def conv_workspaces(optimized: onnx.ModelProto, infos: dict[str, TensorInfo],
                    act_bytes: int | None) -> list[FeatureMap]:
    """Rules e and e', one entry per conv buffer that spans the whole map."""
    constants = {init.name: init for init in optimized.graph.initializer}
    shapes = {**{value.name: tuple(d.dim_value for d in value.type.tensor_type.shape.dim)
                 for value in optimized.graph.input}, **{name: info.shape for name, info in infos.items()}}
    scratch = []
    for step, node in enumerate(optimized.graph.node):
        output = infos.get(node.output[0]) if node.output else None
        if output is None or len(output.shape) < 3:
            continue
        if (node.domain, node.op_type) in QLINEAR_CONV_OPS:
            scratch += _integer_scratch(node, step, constants, shapes, output)
        elif (node.domain, node.op_type) in CONV_OPS and len(node.input) > 1 and node.input[1] in constants:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            elements = conv_workspace_elements(tuple(constants[node.input[1]].dims), output.shape,
                                               int(attrs.get("group", 1)), list(attrs.get("strides", [])),
                                               list(attrs.get("pads", [])))
            if elements:
                scratch.append(_tensor(f"{node.name or node.output[0]}:workspace", [elements], output.dtype,
                                       "workspace", node, step, step, {}, act_bytes))
    return scratch


QLINEAR_CONV_OPS = frozenset({("", "QLinearConv"), ("ai.onnx", "QLinearConv"), ("com.microsoft", "QLinearConv")})
POINTER = np.dtype(np.uint64)  # an indirection entry: one pointer (64-bit builds)


def integer_conv_workspaces(weight_shape: tuple[int, ...], input_positions: int, output_positions: int,
                            group: int, plain: bool, *, channels_last: bool = False,
                            symmetric: bool = True) -> dict[str, tuple[int, np.dtype]]:
    """Rule e': QLinearConv's whole-map buffers for one image, part -> (elements, dtype).

    `plain`: a 1x1 conv with unit strides and no pads; `symmetric`: weight zero points all 0
    and a uint8 input (MLAS's symmetric kernels may then run)."""
    filters, per_group = weight_shape[0], weight_shape[1]
    taps = int(np.prod(weight_shape[2:]))
    depthwise = group > 1 and per_group == 1 and filters == group
    fused = symmetric and mlas_symmetric(weight_shape, group)
    parts: dict[str, tuple[int, np.dtype]] = {}
    if not fused:
        parts["gemm_output"] = (filters * output_positions, np.dtype(np.int32))
    if depthwise or (fused and not plain):
        parts["indirection"] = (taps * output_positions, POINTER)
    elif not plain:
        parts["im2col"] = (per_group * taps * output_positions, np.dtype(np.uint8))
    if not channels_last:
        parts["transpose_input"] = (per_group * group * input_positions, np.dtype(np.uint8))
        parts["transpose_output"] = (filters * output_positions, np.dtype(np.uint8))
    return parts


def mlas_symmetric(weight_shape: tuple[int, ...], group: int) -> bool:
    """Rule e': whether x86 MLAS packs these weights for its symmetric conv kernel (which
    requantizes in registers: no int32 output buffer)."""
    filters, per_group = weight_shape[0], weight_shape[1]
    if group > 1:
        return per_group == 1 and filters == group and group % 16 == 0
    return filters >= 16 and per_group % 4 == 0 and filters % 8 == 0


def _integer_scratch(node: onnx.NodeProto, step: int, constants: dict[str, onnx.TensorProto],
                     shapes: dict[str, tuple[int, ...]], output: TensorInfo) -> list[FeatureMap]:
    """Rule e' for one QLinearConv of the optimised graph (inputs x, x_scale, x_zp, w, ...)."""
    if len(node.input) < 6 or node.input[3] not in constants or node.input[0] not in shapes:
        return []
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    channels_last = bool(attrs.get("channels_last", 0))
    weight = tuple(constants[node.input[3]].dims)
    spatial = slice(1, -1) if channels_last else slice(2, None)
    strides, pads = list(attrs.get("strides", [])), list(attrs.get("pads", []))
    plain = all(k == 1 for k in weight[2:]) and all(s == 1 for s in strides) and not any(pads)
    zero_point = constants.get(node.input[5])
    symmetric = (node.input[2] in constants and zero_point is not None
                 and not numpy_helper.to_array(zero_point).any()
                 and constants[node.input[2]].data_type == onnx.TensorProto.UINT8)
    parts = integer_conv_workspaces(weight, int(np.prod(shapes[node.input[0]][spatial])),
                                    int(np.prod(output.shape[spatial])), int(attrs.get("group", 1)), plain,
                                    channels_last=channels_last, symmetric=symmetric)
    base = node.name or node.output[0]
    return [_tensor(f"{base}:{part}", [elements], dtype, "workspace", node, step, step, {}, None)
            for part, (elements, dtype) in parts.items()]


def _tensor(name: str, shape, dtype, role: str, node: onnx.NodeProto | None, step: int, last_use: int,
            readers: dict[str, list[tuple[int, onnx.NodeProto]]], act_bytes: int | None) -> FeatureMap:
    dtype = np.dtype(dtype)
    numel = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    return FeatureMap(name=name, shape=[int(d) for d in shape], dtype=str(dtype),
                      bytes=numel * (act_bytes or dtype.itemsize), role=role,
                      producer=node.name if node is not None else "",
                      producer_op=_op_name(node) if node is not None else "", group="",
                      consumers=[n.name or n.op_type for _, n in readers.get(name, [])],
                      step=step, last_use=last_use)


def _op_name(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def runtime_view(model: onnx.ModelProto | str | Path, input_shapes=None, *, level: str = DEFAULT_LEVEL,
                 act_bytes: int | None = None, ceiling_bytes: int | None = None) -> RuntimeView:
    """The runtime view of a model (a path or a ModelProto), for scripts and tests."""
    from fmcompress.modelio import load_model

    proto = load_model(model)
    ctx = PassContext(input_shapes=dict(input_shapes or {}), act_bytes=act_bytes)
    return analyze_runtime(proto, ctx, level, ceiling_bytes)
