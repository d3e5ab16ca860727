"""The op table: one small handler per ONNX op type, plus what handlers share.

A handler is `handler(ctx, *inputs) -> Tensor | tuple[Tensor, ...]`, called once per
node per forward. `ctx` is the node's `NodeCtx`, built once in `OnnxModule.__init__`
with its attributes already parsed, so handlers do no protobuf work at run time.
Missing optional inputs arrive as None. An op may also register `check(ctx)`, which
returns a reason when an attribute variant is not supported (reported before any work).
A handler that rejects a value on purpose raises InputError with a one-line reason; any
other exception from a handler is treated as a bug in it (the executor's InternalError).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch

Handler = Callable[..., Any]
Check = Callable[["NodeCtx"], "str | None"]


@dataclass
class RunState:
    """Per-module state handlers read at run time (set by the executor each forward)."""

    float_dtype: torch.dtype = torch.float32  # what ONNX FLOAT means: follows module.double()/.half()


@dataclass
class NodeCtx:
    """Everything static about one node, precomputed at init."""

    name: str
    op_type: str
    opset: int
    attrs: dict[str, Any]
    n_inputs: int
    n_outputs: int
    consts: dict[int, np.ndarray]  # input index -> value, for inputs that are model constants
    state: RunState
    cache: dict[str, Any] = field(default_factory=dict)  # filled by an op's prepare step

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)


OPS: dict[str, Handler] = {}
CHECKS: dict[str, Check] = {}


def op(*op_types: str, check: Check | None = None) -> Callable[[Handler], Handler]:
    """Register a handler for one or more op types."""

    def register(fn: Handler) -> Handler:
        for op_type in op_types:
            OPS[op_type] = fn
            if check is not None:
                CHECKS[op_type] = check
        return fn

    return register


ONNX_TO_TORCH: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


def torch_dtype(ctx: NodeCtx, onnx_type: int) -> torch.dtype:
    """ONNX FLOAT maps to the module's working float dtype (float64 after .double())."""
    if onnx_type == onnx.TensorProto.FLOAT:
        return ctx.state.float_dtype
    return ONNX_TO_TORCH[onnx_type]


def ints(value: torch.Tensor | Sequence[int] | None) -> list[int]:
    """A shape-like input as Python ints (shape tensors live on the CPU, so this is cheap)."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value]


def floats(value: torch.Tensor | None) -> list[float]:
    return [] if value is None else [float(v) for v in value.reshape(-1).tolist()]


def aligned(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two operands to one device: host-side shape/constant data joins the data's device."""
    if a.device == b.device:
        return a, b
    if a.device.type == "cpu":
        return a.to(b.device), b
    return a, b.to(a.device)


def aligned_all(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    device = next((t.device for t in tensors if t.device.type != "cpu"), tensors[0].device)
    return [t if t.device == device else t.to(device) for t in tensors]


def axis_list(ctx: NodeCtx, axes_input: torch.Tensor | None, since: int) -> list[int] | None:
    """Axes that moved from an attribute to an input at opset `since`; None when absent."""
    if ctx.opset >= since:
        return None if axes_input is None else ints(axes_input)
    value = ctx.attr("axes")
    return None if value is None else [int(a) for a in value]


def normalize_axes(axes: Sequence[int], rank: int) -> list[int]:
    return [a + rank if a < 0 else a for a in axes]
