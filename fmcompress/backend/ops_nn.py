"""Convolution, pooling and normalisation ops (1-D to 3-D spatial).

LRN follows the ONNX definition, not torch's `local_response_norm`: channel c sums the
squares over [c - floor((size-1)/2), c + ceil((size-1)/2)] (torch centres an even window
one channel lower), and y = x / (bias + alpha/size * sum)^beta.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .registry import NodeCtx, op

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _same_pads(ctx: NodeCtx, sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
               dilations: Sequence[int]) -> list[int]:
    """Explicit [begin..., end...] pads, resolving auto_pad against the runtime input size."""
    mode = ctx.attr("auto_pad", "NOTSET")
    n = len(kernel)
    if mode in ("NOTSET", b"NOTSET"):
        return list(ctx.attr("pads", [0] * (2 * n)))
    if mode == "VALID":
        return [0] * (2 * n)
    begin, end = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations, strict=False):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begin.append(small if mode == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return begin + end


def _torch_pads(pads: Sequence[int]) -> list[int]:
    """ONNX [b1, b2, e1, e2] -> F.pad's [b_last, e_last, ..., b1, e1]."""
    n = len(pads) // 2
    out: list[int] = []
    for i in range(n - 1, -1, -1):
        out += [pads[i], pads[i + n]]
    return out


def _geometry(ctx: NodeCtx, x: torch.Tensor, kernel: Sequence[int]):
    n = len(kernel)
    strides = list(ctx.attr("strides", [1] * n))
    dilations = list(ctx.attr("dilations", [1] * n))
    pads = _same_pads(ctx, x.shape[2:], kernel, strides, dilations)
    return strides, dilations, pads


@op("Conv")
def conv(ctx: NodeCtx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    n = w.dim() - 2
    strides, dilations, pads = _geometry(ctx, x, w.shape[2:])
    padding: Sequence[int] = pads[:n]
    if pads[:n] != pads[n:]:  # asymmetric: pad explicitly, then an unpadded conv
        x, padding = F.pad(x, _torch_pads(pads)), [0] * n
    return _CONV[n](x, w, b, strides, padding, dilations, ctx.attr("group", 1))


@op("ConvTranspose")
def conv_transpose(ctx: NodeCtx, x: torch.Tensor, w: torch.Tensor,
                   b: torch.Tensor | None = None) -> torch.Tensor:
    n = w.dim() - 2
    kernel = w.shape[2:]
    strides = list(ctx.attr("strides", [1] * n))
    dilations = list(ctx.attr("dilations", [1] * n))
    extra = list(ctx.attr("output_padding", [0] * n))
    pads = _transpose_pads(ctx, x.shape[2:], kernel, strides, dilations, extra)
    group = ctx.attr("group", 1)
    direct = pads[:n] == pads[n:] and all(e < max(s, d) for e, s, d in zip(extra, strides, dilations, strict=False))
    if direct:
        return _CONV_T[n](x, w, b, strides, pads[:n], extra, group, dilations)
    full = _CONV_T[n](x, w, None, strides, 0, 0, group, dilations)
    # crop the pads (negative F.pad) and grow by output_padding at the end
    crop = [-p for p in pads[:n]] + [e - p for e, p in zip(extra, pads[n:], strict=False)]
    y = F.pad(full, _torch_pads(crop))
    return y if b is None else y + b.reshape(1, -1, *[1] * n)


def _transpose_pads(ctx: NodeCtx, sizes, kernel, strides, dilations, extra) -> list[int]:
    n = len(kernel)
    target = ctx.attr("output_shape")
    mode = ctx.attr("auto_pad", "NOTSET")
    if target is None and mode in ("SAME_UPPER", "SAME_LOWER"):
        target = [s * st for s, st in zip(sizes, strides, strict=False)]
    if target is None:
        return [0] * (2 * n) if mode == "VALID" else list(ctx.attr("pads", [0] * (2 * n)))
    target = list(target)[-n:]
    begin, end = [], []
    for size, k, s, d, e, out in zip(sizes, kernel, strides, dilations, extra, target, strict=False):
        total = s * (size - 1) + e + (k - 1) * d + 1 - out
        half = total // 2
        begin.append(half if mode == "SAME_UPPER" else total - half)
        end.append(total - begin[-1])
    return begin + end


# ---------------------------------------------------------------- pooling


def _pool_check(ctx: NodeCtx) -> str | None:
    if ctx.attr("storage_order", 0) or ctx.n_outputs > 1:
        return f"{ctx.op_type}(with indices output)"
    if ctx.op_type == "AveragePool" and any(d != 1 for d in ctx.attr("dilations", [])):
        return "AveragePool(dilations)"
    return None


def _torch_pool_pads_ok(pads: list[int], kernel: list[int]) -> bool:
    """torch pooling pads itself only symmetrically and by at most half the kernel."""
    n = len(kernel)
    return pads[:n] == pads[n:] and all(2 * p <= k for p, k in zip(pads[:n], kernel, strict=False))


@op("MaxPool", check=_pool_check)
def max_pool(ctx: NodeCtx, x: torch.Tensor) -> torch.Tensor:
    kernel = list(ctx.attr("kernel_shape"))
    n = len(kernel)
    strides, dilations, pads = _geometry(ctx, x, kernel)
    ceil = bool(ctx.attr("ceil_mode", 0))
    if _torch_pool_pads_ok(pads, kernel):
        return _MAX_POOL[n](x, kernel, strides, pads[:n], dilations, ceil_mode=ceil)
    padded = F.pad(x, _torch_pads(pads), value=-math.inf)
    return _MAX_POOL[n](padded, kernel, strides, 0, dilations, ceil_mode=ceil)


@op("AveragePool", check=_pool_check)
def average_pool(ctx: NodeCtx, x: torch.Tensor) -> torch.Tensor:
    kernel = list(ctx.attr("kernel_shape"))
    n = len(kernel)
    strides, _, pads = _geometry(ctx, x, kernel)
    ceil = bool(ctx.attr("ceil_mode", 0))
    include = bool(ctx.attr("count_include_pad", 0))
    pool = _AVG_POOL[n]
    if _torch_pool_pads_ok(pads, kernel):
        return pool(x, kernel, strides, pads[:n], ceil_mode=ceil, count_include_pad=include)
    padded = F.pad(x, _torch_pads(pads))
    mean = pool(padded, kernel, strides, 0, ceil_mode=ceil)
    if include:
        return mean
    # average over real elements only: divide by the share of each window that is not padding
    ones = F.pad(torch.ones_like(x[:1, :1]), _torch_pads(pads))
    return mean / pool(ones, kernel, strides, 0, ceil_mode=ceil)


@op("GlobalAveragePool")
def global_average_pool(ctx: NodeCtx, x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@op("GlobalMaxPool")
def global_max_pool(ctx: NodeCtx, x: torch.Tensor) -> torch.Tensor:
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


# ---------------------------------------------------------------- normalisation


def _matching(x: torch.Tensor, *params: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Autocast leaves norms' parameters in float32 while data may be half: match them."""
    return [p if p is None or p.dtype == x.dtype else p.to(x.dtype) for p in params]


@op("BatchNormalization",
    check=lambda ctx: "BatchNormalization(training_mode=1)" if ctx.attr("training_mode", 0) else None)
def batch_norm(ctx: NodeCtx, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
               mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    scale, bias, mean, var = _matching(x, scale, bias, mean, var)
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, ctx.attr("epsilon", 1e-5))


@op("InstanceNormalization")
def instance_norm(ctx: NodeCtx, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    scale, bias = _matching(x, scale, bias)
    return F.instance_norm(x, weight=scale, bias=bias, eps=ctx.attr("epsilon", 1e-5))


@op("LRN")
def lrn(ctx: NodeCtx, x: torch.Tensor) -> torch.Tensor:
    size = int(ctx.attr("size"))
    alpha, beta, bias = ctx.attr("alpha", 1e-4), ctx.attr("beta", 0.75), ctx.attr("bias", 1.0)
    squares = (x * x).reshape(x.shape[0], 1, x.shape[1], -1)  # channels as the pooled axis
    front = (size - 1) // 2
    padded = F.pad(squares, (0, 0, front, size - 1 - front))
    mean = F.avg_pool2d(padded, (size, 1), stride=1).reshape(x.shape)  # sum / size
    return x / (bias + alpha * mean).pow(beta)


@op("LayerNormalization")
def layer_norm(ctx: NodeCtx, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
    axis = ctx.attr("axis", -1) % x.dim()
    eps = ctx.attr("epsilon", 1e-5)
    shape = x.shape[axis:]
    scale, bias = _matching(x, scale, bias)
    y = F.layer_norm(x, shape, scale.expand(shape), None if bias is None else bias.expand(shape), eps)
    if ctx.n_outputs == 1:
        return y
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(x.var(dim=dims, unbiased=False, keepdim=True) + eps)
    return (y, mean, inv_std)[: ctx.n_outputs]
