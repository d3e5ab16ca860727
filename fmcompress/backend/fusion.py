"""Fused activations: an activation that an exporter wrote as a chain of elementwise nodes
runs as its one torch function.

paddle2onnx writes every HardSwish of PP-OCR's models as `x * Clip(x + 3, 0, 6) / 6`, and
exporters often write SiLU as `x * Sigmoid(x)` (YOLOv8n's 57). Run node by node, each link
of the chain is a kernel and a map-sized tensor, forward and again backward: on PP-OCR's
recognizer the 28 chains took about 40% of a training step. Fused, each is one kernel each
way, and the values inside the chain are never materialised.

Rules (`find_fusions`; the executor applies them, fmcompress/backend/executor.py):

a. HardSwish: `Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)`, or the same ending in `Mul(·, 1/6)`,
   with either operand order of Add and Mul, becomes `F.hardswish(x)`, which computes
   `x * min(max(x + 3, 0), 6) / 6` in that order (equal to the chain to rounding);
   `Mul(x, HardSigmoid(x))` with alpha 1/6 and beta 1/2 too.
b. SiLU: `Mul(x, Sigmoid(x))` (either order) becomes `F.silu(x)`.
b'. Scale and shift by scalars: `Add(Mul(x, a), b)` with a and b one-element constants
   of at most one axis (either operand order; PP-LCNetV3's learnable affine blocks, 56 in
   PP-OCR's recognizer) becomes `torch.add(b, x, alpha=a)`: one kernel forward, one backward (a fused
   multiply-add: equal to the chain to rounding).
b''. Where that x is a Conv's output read by nothing else (28 of the recognizer's 56), the
   scale and shift go into the convolution instead: `Conv(x, a W, a B + b)`, no elementwise
   kernel at all (equal to the chain to rounding; the weights are frozen, and scaling them
   each run costs a weight-sized product, not a map-sized one). Under autocast the shift is
   added after the Conv, in float32, as the chain's Add promotes it.
b'''. Inference batch normalization of a Conv's output read by nothing else,
   `BatchNormalization(Conv(x, W, B), scale, bias, mean, var)` with its four parameters
   constants and one output, goes into the convolution: `Conv(x, s W, s (B - mean) + bias)`,
   s = scale / sqrt(var + epsilon) per output channel (equal to the pair to rounding; the
   compile folds the ONNX graph's BatchNormalizations only after training). Models
   exported from a framework's training graph keep them (PP-OCR's direction classifier:
   30); fused, each costs neither a kernel of its own nor a backward. Under autocast the
   scale and shift follow the Conv in its half precision, as the unfused pair computes them.
c. A chain fuses only where every value inside it (the hidden values) has the chain's next
   node as its one reader and is not a graph output, and its constants are floating-point
   scalars (so x is floating-point by ONNX's typing). Nodes of other domains never match.
d. A fusion is a set of the executor's steps, first to last. The first step computes the
   chain's output from x; the others do nothing. Step numbers, the output's producer step
   and the lifetimes of x and of the output are unchanged, so a run paused at any step
   resumes as before. A hidden value is never computed: the executor undoes the fusion of a
   chain whose hidden value is asked for by name (a transform on it, its producer step,
   its value).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F  # noqa: N812 - torch's convention

from ..onnxutil import DEFAULT_DOMAINS, node_attrs
from .ops_nn import conv
from .registry import NodeCtx


@dataclass(frozen=True)
class Fusion:
    steps: tuple[int, ...]  # the chain's positions among the nodes given, first to last
    sources: tuple[str, ...]  # what fn reads: x first, then any constant it takes as a tensor
    output: str  # the chain's last output
    hidden: tuple[str, ...]  # the values computed inside the chain
    fn: Callable[..., torch.Tensor]  # fn(ctx of the first step, *sources)
    kind: str  # "HardSwish", "SiLU", "ScaleShift", "ConvScaleShift", "ConvBatchNorm"


def find_fusions(nodes: Sequence[onnx.NodeProto], constants: Mapping[str, np.ndarray],
                 graph_outputs: set[str]) -> list[Fusion]:
    """Rules a-c over `nodes` (in run order); no node belongs to two fusions."""
    readers = Counter(name for node in nodes for name in node.input if name)
    producer = {name: i for i, node in enumerate(nodes) for name in node.output if name}
    chains = _Chains(nodes, constants, producer, readers, graph_outputs)
    found: list[Fusion] = []
    taken: set[int] = set()
    for last, node in enumerate(nodes):
        if node.domain not in DEFAULT_DOMAINS:
            continue
        fusion = chains.hard_swish(last) or chains.gated(last) or chains.scale_shift(last) \
            or chains.conv_batch_norm(last)
        if fusion is None or taken.intersection(fusion.steps):
            continue
        if all(readers[name] == 1 and name not in graph_outputs for name in fusion.hidden):
            found.append(fusion)
            taken.update(fusion.steps)
    return found


class _Chains:
    """The patterns of rules a and b, each ending at a given node."""

    def __init__(self, nodes: Sequence[onnx.NodeProto], constants: Mapping[str, np.ndarray],
                 producer: dict[str, int], readers: Counter, graph_outputs: set[str]):
        self.nodes, self.constants, self.producer = nodes, constants, producer
        self.readers, self.graph_outputs = readers, graph_outputs

    def _made_by(self, name: str, op_type: str) -> int | None:
        i = self.producer.get(name)
        node = None if i is None else self.nodes[i]
        return i if node is not None and node.op_type == op_type and node.domain in DEFAULT_DOMAINS else None

    def _scalar(self, name: str, value: float) -> bool:
        """A one-element float constant equal to `value`."""
        return self._one_float(name) and \
            abs(float(self.constants[name].reshape(-1)[0]) - value) <= 1e-6 * max(1.0, abs(value))

    def _other(self, node: onnx.NodeProto, value: float) -> str | None:
        """The operand of a binary node whose other operand is the scalar `value`."""
        a, b = node.input
        return a if self._scalar(b, value) else b if self._scalar(a, value) else None

    def _clips_to(self, i: int, low: float, high: float) -> bool:
        node = self.nodes[i]
        if len(node.input) > 1:  # opset 11+: bounds are inputs
            bounds = list(node.input[1:]) + [""] * (3 - len(node.input))
            return self._scalar(bounds[0], low) and self._scalar(bounds[1], high)
        attrs = node_attrs(node)
        return attrs.get("min") == low and attrs.get("max") == high

    def hard_swish(self, last: int) -> Fusion | None:
        """Rule a's chain: (Div by 6 | Mul by 1/6) of Mul(x, Clip(Add(x, 3), 0, 6))."""
        node = self.nodes[last]
        if node.op_type not in ("Div", "Mul") or len(node.input) != 2:
            return None
        if node.op_type == "Div":
            product_name = node.input[0] if self._scalar(node.input[1], 6.0) else None
        else:
            product_name = self._other(node, 1 / 6)
        product = None if product_name is None else self._made_by(product_name, "Mul")
        if product is None:
            return None
        for x, clipped in self._orders(product, "Mul"):
            clip = self._made_by(clipped, "Clip")
            if clip is None or not self._clips_to(clip, 0.0, 6.0):
                continue
            add = self._made_by(self.nodes[clip].input[0], "Add")
            if add is not None and self._other(self.nodes[add], 3.0) == x:
                hidden = (self.nodes[add].output[0], clipped, product_name)
                return Fusion((add, clip, product, last), (x,), node.output[0], hidden, _plain(F.hardswish),
                              "HardSwish")
        return None

    def gated(self, last: int) -> Fusion | None:
        """Rule a's `x * HardSigmoid(x)` and rule b's `x * Sigmoid(x)`."""
        output = self.nodes[last].output[0]
        for x, gate_name in self._orders(last, "Mul"):
            sigmoid = self._made_by(gate_name, "Sigmoid")
            if sigmoid is not None and self.nodes[sigmoid].input[0] == x:
                return Fusion((sigmoid, last), (x,), output, (gate_name,), _plain(F.silu), "SiLU")
            hard = self._made_by(gate_name, "HardSigmoid")
            if hard is not None and self.nodes[hard].input[0] == x and self._hard_swish_gate(hard):
                return Fusion((hard, last), (x,), output, (gate_name,), _plain(F.hardswish), "HardSwish")
        return None

    def scale_shift(self, last: int) -> Fusion | None:
        """Rule b': Add(Mul(x, a), b) with one-element a and b; rule b'' where a Conv's x."""
        output = self.nodes[last].output[0]
        for scaled, shift in self._orders(last, "Add"):
            mul = self._made_by(scaled, "Mul")
            if mul is None or not self._one_float(shift):
                continue
            for x, scale in self._orders(mul, "Mul"):
                if self._one_float(scale) and self.constants[scale].ndim <= 1 and not self._one_float(x):
                    alpha = float(self.constants[scale].reshape(-1)[0])
                    conv = self._made_by(x, "Conv")
                    if conv is not None and self._private(x) and self.constants[shift].ndim <= 1:
                        inputs = tuple(name for name in self.nodes[conv].input if name)
                        return Fusion((conv, mul, last), (*inputs, shift), output, (x, scaled),
                                      _conv_scale_shift(alpha), "ConvScaleShift")
                    return Fusion((mul, last), (x, shift), output, (scaled,), _scale_shift(alpha), "ScaleShift")
        return None

    def conv_batch_norm(self, last: int) -> Fusion | None:
        """Rule b''': an inference BatchNormalization of a Conv's private output."""
        node = self.nodes[last]
        if node.op_type != "BatchNormalization" or len(node.input) != 5 or len([o for o in node.output if o]) != 1:
            return None
        x, *parameters = node.input
        conv = self._made_by(x, "Conv")
        attrs = node_attrs(node)
        if conv is None or attrs.get("training_mode", 0) or not self._private(x) or \
                not all(name in self.constants and self.constants[name].ndim == 1 for name in parameters):
            return None
        inputs = tuple(name for name in self.nodes[conv].input if name)
        return Fusion((conv, last), (*inputs, *parameters), node.output[0], (x,),
                      _conv_batch_norm(float(attrs.get("epsilon", 1e-5)), len(inputs) == 3), "ConvBatchNorm")

    def _private(self, name: str) -> bool:
        """Read by one node and not a graph output: a value a chain may hide (rule c)."""
        return self.readers[name] == 1 and name not in self.graph_outputs

    def _orders(self, i: int, op_type: str) -> list[tuple[str, str]]:
        """Both orders of node i's two operands; none when it is not a binary `op_type`."""
        node = self.nodes[i]
        if node.op_type != op_type or len(node.input) != 2:
            return []
        a, b = node.input
        return [(a, b), (b, a)]

    def _one_float(self, name: str) -> bool:
        array = self.constants.get(name)
        return array is not None and array.size == 1 and np.issubdtype(array.dtype, np.floating)

    def _hard_swish_gate(self, i: int) -> bool:
        attrs = node_attrs(self.nodes[i])
        return abs(attrs.get("alpha", 0.2) - 1 / 6) <= 1e-6 and abs(attrs.get("beta", 0.5) - 0.5) <= 1e-6


def _plain(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(ctx: NodeCtx, x: torch.Tensor) -> torch.Tensor:
        return fn(x)
    return run


def _scale_shift(alpha: float) -> Callable[..., torch.Tensor]:
    def run(ctx: NodeCtx, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return torch.add(shift, x, alpha=alpha)  # shift's shape broadcasts as in the Add
    return run


def _conv_scale_shift(alpha: float) -> Callable[..., torch.Tensor]:
    """Rule b'': the Conv's own handler (ctx: the Conv's) on a W and a B + b."""
    def run(ctx: NodeCtx, x: torch.Tensor, weight: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        *bias, shift = rest
        shift = shift.reshape(1).to(weight.dtype)
        total = bias[0] * alpha + shift if bias else shift.expand(weight.shape[0])
        if torch.is_autocast_enabled(x.device.type):
            # the chain's Add promotes the half-precision conv output back to float32, and what
            # follows runs in float32 until the next autocast op: keep that, or bfloat16 rounds
            # every HardSwish and residual after it too (the recognizer's output: 8.2% off, not 4.3%)
            return conv(ctx, x, weight * alpha, None) + total.reshape(-1, *[1] * (x.dim() - 2))
        return conv(ctx, x, weight * alpha, total)
    return run


def _conv_batch_norm(epsilon: float, has_bias: bool) -> Callable[..., torch.Tensor]:
    """Rule b''': the Conv's own handler (ctx: the Conv's) on s W and s (B - mean) + bias."""
    def run(ctx: NodeCtx, x: torch.Tensor, weight: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        scale, bias, mean, var = (t.to(weight.dtype) for t in rest[-4:])
        factor = scale / torch.sqrt(var + epsilon)
        shift = bias + ((rest[0].to(weight.dtype) if has_bias else 0) - mean) * factor
        if torch.is_autocast_enabled(x.device.type):
            # the normalization after the half-precision conv, in its precision as the unfused pair
            # runs it (ops_nn's batch_norm): in float32 the recognizer's output is 5.6% off, not 2.3%
            y = conv(ctx, x, weight, None)
            view = (-1, *[1] * (x.dim() - 2))
            return y * factor.reshape(view).to(y.dtype) + shift.reshape(view).to(y.dtype)
        return conv(ctx, x, weight * factor.reshape(-1, *[1] * (weight.dim() - 1)), shift)
    return run
