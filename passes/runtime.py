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
f. The peak is the largest sum of bytes alive at one step, counted over rule g's buffers and
   rule e's workspaces; bytes are numel * dtype size (or `ctx.act_bytes`). The tensors stay listed
   one by one with their own sizes and lifetimes (what a ceiling is held against); the measured
   figure (`fmcompress.memprobe`; examples/runtime_peak.py compares both) is the truth.
g. Buffers: onnxruntime's sequential allocation planner (allocation_planner.cc,
   ComputeSingleStreamReusePlan; memory patterns and the arena off change nothing of it) walks
   the nodes in order and gives each output, in turn: its own buffer if it is a graph output;
   its input's buffer for a view op (rule c); its input's buffer in place for a kernel that
   declares it (MayInplace: Relu, Clip, Sigmoid, HardSigmoid, Tanh, LeakyRelu, Softmax, ...;
   the Sum input of FusedConv and of `all`'s NCHWc conv; not Add, Mul, Div, Sum) when this node
   is the last reader of that buffer and both have the same element size and shape; else the
   most recently freed buffer whose first tensor has the same element size and static shape
   (rank > 0; `reuse=False`, a session's enable_mem_reuse off, skips this); else a new buffer.
   A buffer is freed after the last reader of any of its tensors, so it is alive from its first
   tensor's birth to its last tensor's death, sized by its largest tensor. Graph inputs and
   initializers are never freed nor reused. Shapes are the run's (rule b): the planner's are
   the same wherever onnxruntime infers them statically, which pinned inputs make the rule.
g'. Only shapes onnxruntime knows are compared: a tensor whose shape ONNX's shape inference
   (run when the model loads) leaves unknown, such as a band's rows after a Slice whose
   steps are computed (passes/tile_emit.py rule g), neither reuses a freed buffer nor
   runs in place. Tensors the optimiser creates take the run's shapes (onnxruntime infers
   them from its own schemas). ResNet-18-224 tiled at 256KB: 1.1 MiB computed with rule
   g', 2.8 MiB without, 1.0 MiB measured.
   Measured (examples/runtime_peak.py): YOLOv8n-320 5.2 / 5.7 MiB computed at extended / all
   against 5.2 / 5.6 MiB measured, where per-tensor lifetimes gave 3.1 MiB.

Entry point: `RuntimeMemoryPass(level="extended").run(model, ctx)`; the model is not
changed; `result.data` is a `RuntimeView`, whose tensors are `FeatureMap`s (group = "").
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fmcompress.errors import InputError, onnxruntime_errors
from fmcompress.featuremaps import FeatureMap
from fmcompress.ortrun import ort_level
from fmcompress.reports.analysis import DEFAULT_ORT_LEVEL, ORT_LEVELS, RuntimeView, live_curve
from fmcompress.shapes import (
    TensorInfo,
    graph_inputs,
    onnxruntime_tensor_infos,
    resolve_input_shapes,
    weightless,
    with_input_shapes,
)

from .base import Pass, PassContext, PassResult
from .graph import Model
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
                    ceiling_bytes: int | None = None, *, reuse: bool = True) -> RuntimeView:
    """onnxruntime's allocations of `model` and their live peak (what the pass provides);
    `reuse=False` models a session with `enable_mem_reuse` off (rule g: in place, no freed buffers)."""
    shapes = resolve_input_shapes(model, ctx.input_shapes)
    pinned = with_input_shapes(model, shapes)
    optimized = optimized_model(pinned, level)
    infos = _tensor_infos(optimized, shapes)
    tensors = runtime_tensors(optimized, shapes, infos, ctx.act_bytes)
    tensors += conv_workspaces(optimized, infos, ctx.act_bytes)
    buffers = runtime_buffers(optimized, shapes, infos, tensors, reuse=reuse, unknown=shapes_unknown(pinned, optimized))
    workspaces = [t for t in tensors if t.role == "workspace" and t.bytes > 0]
    labels = [node.name or node.op_type for node in optimized.graph.node]
    live = live_curve([b.as_map() for b in buffers] + workspaces, labels)
    for tensor in tensors:
        tensor.over_ceiling = ceiling_bytes is not None and tensor.role in CEILED_ROLES and tensor.bytes > ceiling_bytes
    by_name = {t.name: t for t in tensors}
    allocations = [holder for b in buffers for holder in b.holders(by_name)] + workspaces
    return RuntimeView.build(level=level, tensors=tensors, live=live, ceiling_bytes=ceiling_bytes,
                             allocations=allocations)


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
        if node.op_type in RUNTIME_ALIAS_OPS and node.input and node.input[0] in {*owner, *infos, *shapes} \
                and node.output[0] not in outputs:  # a graph output is the caller's: copied
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
                      producer_op=op_name(node) if node is not None else "", group="",
                      consumers=[n.name or n.op_type for _, n in readers.get(name, [])],
                      step=step, last_use=last_use)


def op_name(node: onnx.NodeProto) -> str:
    """`Relu`, or `com.microsoft.FusedConv` outside the default domain."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def runtime_view(model: onnx.ModelProto | str | Path, input_shapes=None, *, level: str = DEFAULT_LEVEL,
                 act_bytes: int | None = None, ceiling_bytes: int | None = None, reuse: bool = True) -> RuntimeView:
    """The runtime view of a model (a path or a ModelProto), for scripts and tests."""
    from fmcompress.modelio import load_model

    proto = load_model(model)
    ctx = PassContext(input_shapes=dict(input_shapes or {}), act_bytes=act_bytes)
    return analyze_runtime(proto, ctx, level, ceiling_bytes, reuse=reuse)


# ---------------------------------------------------------------- rule g: the planner's buffers

# MayInplace(input, 0) of onnxruntime's CPU kernels (core/providers/cpu/activation/activations.cc,
# math/clip.cc, contrib_ops/cpu/fused_conv.cc, contrib_ops/cpu/nchwc_ops.cc; Softmax and LogSoftmax
# measured in place on onnxruntime 1.32, Add, Sub, Mul, Div, Sum, Max, Pow, Sqrt, Abs, Exp not):
# the output may take that input's buffer
INPLACE_INPUTS: dict[tuple[str, str], int] = {
    **{("", op): 0 for op in ("Clip", "Elu", "HardSigmoid", "LeakyRelu", "LogSoftmax", "Relu", "Selu", "Sigmoid",
                              "Softmax", "Softplus", "Softsign", "Tanh", "ThresholdedRelu")},
    ("com.microsoft", "FusedConv"): 3,  # the fused Sum input
    ("com.microsoft", "NhwcFusedConv"): 3,
    ("com.microsoft.nchwc", "Conv"): 3,
}


@dataclass
class Buffer:
    """Rule g: one allocation of onnxruntime's planner, the chain of tensors that share it."""

    root: str  # the tensor it was allocated for
    tensors: list[str]  # the root, then the tensors that reuse it in execution order
    bytes: int  # the largest of its tensors
    step: int  # the root's producer
    last_use: int  # the last reader of any of its tensors
    kinds: dict[str, str] = field(default_factory=dict)  # tensor -> "alias", "inplace" or "reuse" (not the root)

    def holders(self, by_name: dict[str, FeatureMap]) -> list[FeatureMap]:
        """The buffer as the tensors that occupy it in turn: each from its producer to the next
        one's (the last to the buffer's last use), at the buffer's bytes. Alive at a step, exactly
        one of them stands for the buffer there."""
        members = sorted((by_name[m] for m in self.tensors), key=lambda t: t.step)
        ends = [later.step - 1 for later in members[1:]] + [self.last_use]
        return [replace(t, bytes=self.bytes, last_use=max(end, t.step)) for t, end in zip(members, ends, strict=True)
                if end >= t.step or t is members[-1]]

    def as_map(self) -> FeatureMap:
        return FeatureMap(name=self.root, shape=[self.bytes], dtype="uint8", bytes=self.bytes, role="buffer",
                          producer="", producer_op="", group="", consumers=[], step=self.step,
                          last_use=self.last_use)


def shapes_unknown(model: onnx.ModelProto, optimized: onnx.ModelProto) -> set[str]:
    """Rule g': the tensors of `optimized` whose shape onnxruntime does not know statically: node
    outputs of `model` (inputs pinned) that ONNX's shape inference, which onnxruntime runs on
    load, leaves not fully static, and what the optimiser computes from them."""
    inferred = onnx.shape_inference.infer_shapes(weightless(model), strict_mode=False, data_prop=True)
    static = {value.name for value in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]
              if value.type.tensor_type.HasField("shape")
              and all(d.HasField("dim_value") for d in value.type.tensor_type.shape.dim)}
    loaded = {out for node in model.graph.node for out in node.output if out}
    unknown = loaded - static
    for node in optimized.graph.node:  # the optimiser's own tensors: unknown when made from the unknown
        if any(name in unknown for name in node.input):
            unknown.update(out for out in node.output if out and out not in loaded)
    return unknown


def _op_key(node: onnx.NodeProto) -> tuple[str, str]:
    return ("" if node.domain == "ai.onnx" else node.domain, node.op_type)


def runtime_buffers(optimized: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                    infos: dict[str, TensorInfo], tensors: list[FeatureMap], *,
                    reuse: bool = True, unknown: set[str] = frozenset()) -> list[Buffer]:
    """Rule g: onnxruntime's sequential allocation plan (allocation_planner.cc,
    ComputeSingleStreamReusePlan), the caller's inputs left out; `unknown` tensors have no
    shape the planner knows (rule g'), so they never share a buffer but by aliasing."""
    graph = optimized.graph
    outputs = {o.name for o in graph.output}
    inputs = {i.name for i in graph.input} | {init.name for init in graph.initializer}
    planned = {**{name: (tuple(dims), np.dtype(np.float32).itemsize) for name, dims in shapes.items()},
               **{name: (tuple(info.shape), np.dtype(info.dtype).itemsize) for name, info in infos.items()
                  if name not in unknown}}
    uses: dict[str, int] = {name: 1 for name in inputs}  # the caller's, or the session's: never freed
    for node in graph.node:
        for name in [*node.input, *node.output]:
            if name:
                uses[name] = uses.get(name, 0) + 1
    for name in outputs:
        uses[name] = uses.get(name, 0) + 1
    root: dict[str, str] = {name: name for name in inputs}
    kinds: dict[str, str] = {}
    free: list[str] = []  # freed roots, the most recently freed first

    def same_size(a: str, b: str) -> bool:  # SameSize: element size and SameShape of the planned shapes
        return a in planned and b in planned and planned[a] == planned[b]

    for node in graph.node:
        key = _op_key(node)
        for index, name in enumerate(node.output):
            if not name:
                continue
            root[name], reused, kind = name, None, ""
            if name in outputs:
                pass  # kAllocateOutput: the caller's, never shared
            elif index == 0 and node.op_type in RUNTIME_ALIAS_OPS and node.input and node.input[0]:
                reused, kind = node.input[0], "alias"  # rule c: must share
            elif index == 0 and key in INPLACE_INPUTS and len(node.input) > INPLACE_INPUTS[key] \
                    and node.input[INPLACE_INPUTS[key]] and uses[root[node.input[INPLACE_INPUTS[key]]]] == 1 \
                    and same_size(node.input[INPLACE_INPUTS[key]], name):
                reused, kind = node.input[INPLACE_INPUTS[key]], "inplace"  # its last use
            elif reuse and name in planned and planned[name][0]:
                match = next((free_root for free_root in free if same_size(free_root, name)), None)
                if match is not None:
                    free.remove(match)
                    reused, kind = match, "reuse"
            if reused is not None:
                origin = root.get(reused, reused)
                root[name], kinds[name] = origin, kind
                uses[origin] = uses.get(origin, 0) + uses[name]
        for name in [*node.input, *node.output]:
            if name:
                origin = root.get(name, name)
                uses[origin] -= 1
                if uses[origin] == 0:
                    free.insert(0, origin)
    by_name = {t.name: t for t in tensors}
    chains: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.output:
            if name in by_name and root.get(name, name) not in inputs:
                chains.setdefault(root.get(name, name), []).append(name)
    buffers = []
    for origin, members in chains.items():
        maps = [by_name[m] for m in members]
        buffers.append(Buffer(root=origin, tensors=members,
                              bytes=max(by_name[m].bytes if kinds.get(m) != "alias" else 0 for m in members),
                              step=min(t.step for t in maps), last_use=max(max(t.last_use, t.step) for t in maps),
                              kinds={m: kinds[m] for m in members if m in kinds}))
    return buffers
