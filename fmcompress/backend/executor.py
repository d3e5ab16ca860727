"""OnnxModule: run an ONNX graph as a differentiable torch module (torch.fx Interpreter style).

Everything static is done once in __init__: op support is checked, attributes parsed,
nodes sorted topologically, dead nodes pruned, and for every value the step after
which nothing reads it, so forward() releases each tensor after its last use and the
peak memory follows the graph's live set.

Placement: float constants that feed the data path are frozen buffers (they follow
.to(device) and .double()); integer constants and everything computed from constants
and tensor shapes alone (Shape -> Gather -> Concat -> Reshape chains) stay on the CPU,
evaluated eagerly each forward, so shapes follow the runtime batch size.

The graph runs with inference semantics whatever module.training says: BatchNorm
uses its running statistics and Dropout is the identity (the base network is frozen).

Activations an exporter wrote as chains of elementwise nodes (HardSwish, SiLU) run as their
one torch function (fusion.py), unless a value inside a chain is asked for by name.

Layout: on the CPU a 4-D float input is laid out channels last (NHWC strides, the same
values), and torch's convolutions keep that layout downstream, where oneDNN's kernels run
faster, depthwise ones most: PP-OCR's recognizer ran a forward pass of 64 lines in 0.63 s
against 0.97 s, and its compile's block stage and map costs 7% and 12% faster (docs/results.md
section 3). The projections keep the layout too (`projection.mix_channels`).

A run can also be split: start() binds the inputs, advance(frontier, stop) runs steps
[position, stop) and trim() keeps only what later steps read, so a caller can pause at a
step, keep that frontier, and resume from it later (the PCA fit resumes from the previous
map instead of re-running the prefix). forward() is start() then advance() to the end.

Errors: an unsupported op or attribute variant is an UnsupportedOpError before any work;
at run time a handler's own InputError passes through, torch's RuntimeError (data its
weights reject) becomes an InputError naming the node, and anything else a handler raises
is an InternalError naming the node, chained to the original (a bug, exit 3 in the CLI).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ..errors import FmcError, InputError, InternalError, UnsupportedOpError
from ..modelio import load_model
from ..onnxutil import DEFAULT_DOMAINS, constant_node_value
from . import ops_math, ops_nn, ops_resize, ops_rnn, ops_tensor  # noqa: F401  (they fill the op table)
from .fusion import find_fusions
from .registry import CHECKS, OPS, NodeCtx, RunState

SHAPE_OPS = ("Shape", "Size")  # their outputs depend on the data's shape only
# inputs read as Python values (constants kept on the CPU even when the node is on the data path)
HOST_INPUTS = {"Resize": (1, 2, 3), "Upsample": (1,), "Pad": (1, 2, 3), "Clip": (1, 2), "Pow": (1,),
               "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Split": (1,),
               "Squeeze": (1,), "Unsqueeze": (1,), "TopK": (1,), "ConstantOfShape": (0,)}
# In-place variants, used when the node is the only reader of its first input and that input is a
# fresh tensor whose producer's backward does not need it (as torchvision's ReLU(inplace=True) and
# `out += identity`): saves an allocation and a pass over memory per activation.
INPLACE = {"Relu": lambda ctx, x: torch.relu_(x), "Add": lambda ctx, a, b: _add_inplace(a, b)}
FRESH_PRODUCERS = {"Conv", "ConvTranspose", "BatchNormalization", "Add", "Sub", "Gemm", "MatMul"}
SMALL_CONST = 64  # constants up to this many elements are also given to handlers as numpy
MISSING, DISCARD = -1, -2  # pseudo slots: absent optional input, unused optional output


@dataclass(frozen=True)
class _Node:
    proto: onnx.NodeProto
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass
class Frontier:
    """A run paused between steps: steps [0, position) have run; `values` is its environment
    (one entry per value slot; None where a value is not computed yet or already released)."""

    values: list[Any]
    position: int


def _add_inplace(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.device == b.device and a.dtype == b.dtype and a.shape == torch.broadcast_shapes(a.shape, b.shape):
        return a.add_(b)
    return OPS["Add"](None, a, b)


class StopForward(Exception):  # noqa: N818 - control flow, not an error
    """Raised by a module installed on a tensor (a recorder) once it has what it needs: the
    run stops there, and the executor lets it through unwrapped."""


def _where(ctx: NodeCtx) -> str:
    return f"node {ctx.name!r} ({ctx.op_type})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 1)


def unsupported_ops(model: onnx.ModelProto) -> dict[str, int]:
    """What the executor cannot run: op (or op variant) -> node count, most frequent first.

    Keys are 'Op' for an unknown default-domain op, 'domain::Op' for another domain, and a
    variant such as 'Resize(antialias=1)' or 'Constant(sparse_value)' where the op is known
    but that attribute is not. Empty when the whole graph is supported.
    """
    opset = _opset(model)
    missing: Counter[str] = Counter()
    for node in model.graph.node:
        if node.domain not in DEFAULT_DOMAINS:
            missing[f"{node.domain}::{node.op_type}"] += 1
        elif node.op_type == "Constant":
            if constant_node_value(node) is None:
                missing[f"Constant({node.attribute[0].name if node.attribute else ''})"] += 1
        elif node.op_type not in OPS:
            missing[node.op_type] += 1
        elif node.op_type in CHECKS:
            reason = CHECKS[node.op_type](_node_ctx(node, opset, {}, RunState()))
            if reason:
                missing[reason] += 1
    return dict(missing.most_common())


def check_supported(model: onnx.ModelProto) -> None:
    """Raise UnsupportedOpError naming every unsupported op (or op variant) and its count."""
    missing = unsupported_ops(model)
    if missing:
        listed = ", ".join(f"{name} x{count}" for name, count in missing.items())
        raise UnsupportedOpError(f"unsupported ops: {listed}")


def _node_ctx(node: onnx.NodeProto, opset: int, consts: dict[int, np.ndarray], state: RunState) -> NodeCtx:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
    return NodeCtx(name=node.name or f"{node.op_type}->{node.output[0]}", op_type=node.op_type,
                   opset=opset, attrs=attrs, n_inputs=len(node.input), n_outputs=len(node.output),
                   consts=consts, state=state)


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    value = constant_node_value(node)
    if value is None:
        raise UnsupportedOpError(f"unsupported ops: Constant({node.attribute[0].name}) x1")
    return value


def _skip(ctx: NodeCtx) -> None:
    return None


def _topological(nodes: list[_Node], available: set[str]) -> list[_Node]:
    """Kahn's algorithm, stable: keeps the file's order wherever it is already valid."""
    ready = set(available) | {""}
    pending, ordered = list(nodes), []
    while pending:
        still: list[_Node] = []
        for node in pending:
            if all(name in ready for name in node.inputs):
                ordered.append(node)
                ready.update(node.outputs)
            else:
                still.append(node)
        if len(still) == len(pending):
            names = sorted({n for node in still for n in node.inputs if n not in ready})
            raise InputError(f"the graph reads undefined tensors (or has a cycle): {', '.join(names[:5])}")
        pending = still
    return ordered


def _live_nodes(nodes: list[_Node], outputs: Sequence[str]) -> list[_Node]:
    needed = set(outputs)
    live: list[_Node] = []
    for node in reversed(nodes):
        if any(name in needed for name in node.outputs):
            live.append(node)
            needed.update(node.inputs)
    return live[::-1]


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True))


class OnnxModule(nn.Module):
    """An ONNX graph as a torch module; forward(*inputs) returns the graph outputs as a tuple."""

    channels_last = True  # the layout rule (module docstring); False runs every input as given

    def __init__(self, model: onnx.ModelProto | str | os.PathLike, fuse: bool = True):
        """`fuse=False` runs every node as its own step (fusion.py's chains unfused)."""
        super().__init__()
        model = load_model(model, normalize=False)  # runs the graph it is given
        check_supported(model)
        graph = model.graph
        self._opset = _opset(model)
        self._state = RunState()
        self.register_buffer("_float_marker", torch.zeros(()), persistent=False)

        constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        nodes: list[_Node] = []
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                constants[node.output[0]] = _constant_value(node)
            else:
                nodes.append(_Node(node, tuple(node.input), tuple(node.output)))
        self.input_names = [i.name for i in graph.input if i.name not in constants]
        self.output_names = [o.name for o in graph.output]
        self._input_ranks = {i.name: self._declared_shape(i) for i in graph.input}
        self._input_types = {i.name: i.type.tensor_type.elem_type for i in graph.input}

        ordered = _topological(nodes, set(self.input_names) | set(constants))
        self._all_names = self._collect_names(ordered, constants)
        self._slot = {name: i for i, name in enumerate(self._all_names)}
        live = _live_nodes(ordered, self.output_names)
        self._place_constants(live, constants)
        self._build_steps(live, constants, fuse)
        self.transforms = nn.ModuleDict()
        self._transform_slots: dict[str, int] = {}
        self._rebuild_plan()

    # ------------------------------------------------------------ construction

    @staticmethod
    def _declared_shape(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            return None
        return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)

    def _collect_names(self, nodes: list[_Node], constants: dict[str, np.ndarray]) -> list[str]:
        names = dict.fromkeys([*self.input_names, *constants])
        for node in nodes:
            names.update(dict.fromkeys(n for n in (*node.inputs, *node.outputs) if n))
        return list(names)

    def _place_constants(self, live: list[_Node], constants: dict[str, np.ndarray]) -> None:
        """Float constants on the data path become buffers; the rest stays on the CPU."""
        dynamic = set(self.input_names)
        device_consts: set[str] = set()
        for node in live:
            on_data_path = node.proto.op_type not in SHAPE_OPS and any(n in dynamic for n in node.inputs)
            if on_data_path:
                dynamic.update(node.outputs)
                host = HOST_INPUTS.get(node.proto.op_type, ())
                device_consts.update(n for i, n in enumerate(node.inputs) if n in constants and i not in host)
        device_consts.update(n for n in self.output_names if n in constants)
        self._buffer_slots: list[tuple[int, str]] = []
        self._host_consts: list[tuple[int, torch.Tensor]] = []
        for name, array in constants.items():
            tensor = _to_tensor(array)
            if name in device_consts and tensor.is_floating_point():
                key = f"c{len(self._buffer_slots)}"
                self.register_buffer(key, tensor)
                self._buffer_slots.append((self._slot[name], key))
            elif name in self._slot:
                self._host_consts.append((self._slot[name], tensor))

    def _build_steps(self, live: list[_Node], constants: dict[str, np.ndarray], fuse: bool) -> None:
        last_use = {name: i for i, node in enumerate(live) for name in node.inputs if name}
        keep = set(self.output_names)
        frees: list[list[int]] = [[] for _ in live]
        for name, step in last_use.items():
            if name not in keep:
                frees[step].append(self._slot[name])
        for i, node in enumerate(live):  # produced but never read: drop at once
            frees[i] += [self._slot[n] for n in node.outputs if n and n not in last_use and n not in keep]
        self._nodes: list[tuple[Any, NodeCtx, tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = []
        self._producer: dict[str, int] = {}
        self._inplace = self._inplace_candidates(live, keep)
        self._fusions = find_fusions([node.proto for node in live], constants, keep) if fuse else []
        self._fusion_of = {name: k for k, fusion in enumerate(self._fusions) for name in fusion.hidden}
        self._unfused: set[int] = set()
        for i, node in enumerate(live):
            small = {j: constants[n] for j, n in enumerate(node.inputs)
                     if n in constants and constants[n].size <= SMALL_CONST}
            ctx = _node_ctx(node.proto, self._opset, small, self._state)
            ins = tuple(self._slot[n] if n else MISSING for n in node.inputs)
            outs = tuple(self._slot[n] if n else DISCARD for n in node.outputs)
            self._nodes.append((OPS[node.proto.op_type], ctx, ins, outs, tuple(frees[i])))
            self._producer.update({n: i for n in node.outputs if n})
        self._output_slots = tuple(self._slot[n] for n in self.output_names)
        # for trim(): the last step reading each slot, and the slots that hold computed values
        self._last_read = [-1] * (len(self._all_names) + 2)
        for name, step in last_use.items():
            self._last_read[self._slot[name]] = step
        constant_slots = {self._slot[n] for n in constants if n in self._slot}
        self._computed_slots = [i for i in range(len(self._all_names)) if i not in constant_slots]

    @staticmethod
    def _inplace_candidates(live: list[_Node], keep: set[str]) -> dict[int, str]:
        """Step -> the input it may overwrite (only reader, fresh producer, not a graph output)."""
        readers = Counter(name for node in live for name in node.inputs)
        producer = {name: node.proto.op_type for node in live for name in node.outputs}
        return {i: node.inputs[0] for i, node in enumerate(live)
                if node.proto.op_type in INPLACE and node.inputs and readers[node.inputs[0]] == 1
                and producer.get(node.inputs[0]) in FRESH_PRODUCERS and node.inputs[0] not in keep}

    def _rebuild_plan(self) -> None:
        """Attach each transform to the step that produces its tensor (or to the feed stage), and
        run each fused chain whose hidden values nobody asked for as one step (fusion.py rule d)."""
        by_step: dict[int, list[tuple[int, nn.Module]]] = {}
        self._early: list[tuple[int, nn.Module]] = []
        for name, slot in self._transform_slots.items():
            module = self.transforms[f"t{slot}"]
            step = self._producer.get(name)
            (self._early if step is None else by_step.setdefault(step, [])).append((slot, module))
        steps = [(self._handler(i, fn, ctx), ctx, ins, outs) for i, (fn, ctx, ins, outs, _) in enumerate(self._nodes)]
        for k, fusion in enumerate(self._fusions):
            if k in self._unfused:
                continue
            first, *rest = fusion.steps
            sources = tuple(self._slot[name] for name in fusion.sources)
            steps[first] = (fusion.fn, steps[first][1], sources, (self._slot[fusion.output],))
            for i in rest:
                steps[i] = (_skip, steps[i][1], (), (DISCARD,))
        self._steps = [(fn, ctx, ins, outs, self._nodes[i][4], tuple(by_step.get(i, ())))
                       for i, (fn, ctx, ins, outs) in enumerate(steps)]

    def _reveal(self, name: str) -> None:
        """Fusion rule d: a hidden value asked for by name is computed from now on."""
        k = self._fusion_of.get(name)
        if k is not None and k not in self._unfused:
            self._unfused.add(k)
            self._rebuild_plan()

    def _handler(self, step: int, fn: Any, ctx: NodeCtx) -> Any:
        # a transform's output may be saved for its backward: never overwrite it
        target = self._inplace.get(step)
        return fn if target is None or target in self._transform_slots else INPLACE[ctx.op_type]

    # ------------------------------------------------------------ public API

    def fused_chains(self) -> list[tuple[str, str]]:
        """(kind, output) of each chain that runs fused now (fusion.py)."""
        return [(f.kind, f.output) for k, f in enumerate(self._fusions) if k not in self._unfused]

    def tensor_names(self) -> list[str]:
        """Every value name of the graph: inputs, constants and node outputs."""
        return list(self._all_names)

    def set_transform(self, tensor_name: str, transform: nn.Module) -> None:
        """Every consumer of `tensor_name` (and the graph output, if it is one) reads transform(tensor)."""
        if tensor_name not in self._slot:
            raise InputError(f"unknown tensor {tensor_name!r}: no value of that name in the graph")
        if not isinstance(transform, nn.Module):
            raise InputError(f"the transform for {tensor_name!r} must be a torch.nn.Module")
        slot = self._slot[tensor_name]
        self._unfused.update(k for k in (self._fusion_of.get(tensor_name),) if k is not None)  # fusion rule d
        self.transforms[f"t{slot}"] = transform
        self._transform_slots[tensor_name] = slot
        self._rebuild_plan()

    def clear_transforms(self) -> None:
        self.transforms = nn.ModuleDict()
        self._transform_slots = {}
        self._rebuild_plan()

    def forward(self, *inputs: Any) -> tuple[torch.Tensor, ...]:
        return self.outputs(self.advance(self.start(*inputs), len(self._steps)))

    # ------------------------------------------------------------ running a range of steps

    @property
    def num_steps(self) -> int:
        return len(self._steps)

    def producer_step(self, tensor_name: str) -> int:
        """The step that computes `tensor_name` (-1 for graph inputs and constants)."""
        if tensor_name not in self._slot:
            raise InputError(f"unknown tensor {tensor_name!r}: no value of that name in the graph")
        self._reveal(tensor_name)
        return self._producer.get(tensor_name, -1)

    def start(self, *inputs: Any) -> Frontier:
        """A run before its first step: constants and the bound inputs (transforms on inputs applied)."""
        self._state.float_dtype = self._float_marker.dtype
        env: list[Any] = [None] * (len(self._all_names) + 2)  # + MISSING and DISCARD pseudo slots
        buffers = self._buffers
        for slot, key in self._buffer_slots:
            env[slot] = buffers[key]
        for slot, tensor in self._host_consts:
            env[slot] = tensor
        for name, tensor in self._bind(inputs).items():
            env[self._slot[name]] = tensor
        for slot, module in self._early:
            env[slot] = module(env[slot])
        return Frontier(env, 0)

    def advance(self, frontier: Frontier, stop: int) -> Frontier:
        """Run steps [frontier.position, stop) in place (transforms included); returns the frontier.

        Exactly what forward() does over that range, so a run split at any step gives the same values.
        """
        if not frontier.position <= stop <= len(self._steps):
            raise InputError(f"cannot run from step {frontier.position} to step {stop} "
                             f"(the graph has {len(self._steps)} steps)")
        self._state.float_dtype = self._float_marker.dtype
        self._run(frontier.values, frontier.position, stop)
        frontier.position = stop
        return frontier

    def value(self, frontier: Frontier, tensor_name: str) -> torch.Tensor | None:
        """The value of `tensor_name` held by the frontier (None: not computed yet, or released)."""
        self._reveal(tensor_name)
        return frontier.values[self._slot[tensor_name]]

    def set_value(self, frontier: Frontier, tensor_name: str, value: torch.Tensor) -> None:
        self._reveal(tensor_name)
        frontier.values[self._slot[tensor_name]] = value

    def outputs(self, frontier: Frontier) -> tuple[torch.Tensor | None, ...]:
        """The graph outputs the frontier holds (None where not computed yet)."""
        return tuple(frontier.values[s] for s in self._output_slots)

    def fork(self, frontier: Frontier) -> Frontier:
        """A copy of the frontier whose computed tensors are cloned: running the copy (whose
        in-place steps write into what they read) leaves the original's values intact."""
        values = list(frontier.values)
        for slot in self._computed_slots:
            if isinstance(values[slot], torch.Tensor):
                values[slot] = values[slot].clone()
        return Frontier(values, frontier.position)

    def trim(self, frontier: Frontier, keep_outputs: bool = True) -> Frontier:
        """Release every computed value no remaining step reads: what is left is the smallest state
        the rest of the run needs (plus the graph outputs already computed, unless keep_outputs=False)."""
        values, last_read, position = frontier.values, self._last_read, frontier.position
        keep = set(self._output_slots) if keep_outputs else ()
        for slot in self._computed_slots:
            if values[slot] is not None and last_read[slot] < position and slot not in keep:
                values[slot] = None
        return frontier

    def frontier_bytes(self, frontier: Frontier) -> int:
        """Bytes of the computed tensors the frontier holds (constants excluded; shared storage once)."""
        seen: dict[int, int] = {}
        for slot in self._computed_slots:
            value = frontier.values[slot]
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())

    # ------------------------------------------------------------ execution

    def _run(self, env: list[Any], start: int, stop: int) -> None:
        step = None
        try:
            for step in self._steps[start:stop]:
                fn, ctx, ins, outs, frees, post = step
                result = fn(ctx, *[env[i] for i in ins])
                if len(outs) == 1:
                    env[outs[0]] = result
                else:
                    for slot, value in zip(outs, result, strict=False):
                        env[slot] = value
                for slot, module in post:
                    env[slot] = module(env[slot])
                for slot in frees:
                    env[slot] = None
                env[DISCARD] = None
        except (torch.OutOfMemoryError, FmcError, StopForward):
            raise  # a handler's own InputError already says what it rejects; a recorder stops
        except RuntimeError as exc:
            # torch's verdict on the data: a shape or dtype the node's weights reject (inputs are
            # only checked for rank and channels before the run), so the input is at fault
            if step is None:
                raise
            raise InputError(f"{_where(step[1])} cannot run on these inputs: {_first_line(exc)}") from exc
        except Exception as exc:  # anything else a handler raises is a bug in that handler
            if step is None:
                raise
            raise InternalError(f"{_where(step[1])} failed: {_first_line(exc)}") from exc

    def _bind(self, inputs: tuple[Any, ...]) -> dict[str, torch.Tensor]:
        """Map the call's arguments to graph inputs, checking names, count and rank."""
        if len(inputs) == 1 and isinstance(inputs[0], dict):
            feeds = dict(inputs[0])
            unknown = sorted(set(feeds) - set(self.input_names))
            if unknown:
                raise InputError(f"unknown input(s) {', '.join(map(repr, unknown))}; "
                                 f"the model's inputs are {', '.join(map(repr, self.input_names))}")
        else:
            if len(inputs) > len(self.input_names):
                raise InputError(f"the model takes {len(self.input_names)} input(s) "
                                 f"({', '.join(map(repr, self.input_names))}), got {len(inputs)}")
            feeds = dict(zip(self.input_names, inputs, strict=False))
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise InputError(f"missing input(s): {', '.join(map(repr, missing))}")
        return {name: self._prepare_input(name, value) for name, value in feeds.items()}

    def _prepare_input(self, name: str, value: Any) -> torch.Tensor:
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        declared = self._input_ranks.get(name)
        if declared is not None and tensor.dim() != len(declared):
            dims = ",".join("?" if d < 0 else str(d) for d in declared)
            raise InputError(f"input {name!r} has rank {tensor.dim()} (shape {list(tensor.shape)}); "
                             f"the model expects rank {len(declared)} ({dims})")
        if declared is not None and len(declared) > 1 and declared[1] > 0 and tensor.shape[1] != declared[1]:
            raise InputError(f"input {name!r} has {tensor.shape[1]} at axis 1; the model expects {declared[1]}")
        if self._input_types.get(name) == onnx.TensorProto.FLOAT and tensor.is_floating_point():
            tensor = tensor.to(self._float_marker.dtype)
        tensor = tensor.to(self._float_marker.device)
        if self.channels_last and tensor.dim() == 4 and tensor.is_floating_point() and tensor.device.type == "cpu":
            tensor = tensor.contiguous(memory_format=torch.channels_last)  # the layout rule (module docstring)
        return tensor
