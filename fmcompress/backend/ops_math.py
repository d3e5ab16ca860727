"""Element-wise, comparison, reduction and matrix ops."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .registry import NodeCtx, aligned, aligned_all, axis_list, normalize_axes, op

# ---------------------------------------------------------------- unary


def _unary(fn):
    return lambda ctx, x: fn(x)


for _name, _fn in {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf,
    "Sqrt": torch.sqrt, "Exp": torch.exp, "Log": torch.log, "Abs": torch.abs, "Neg": torch.neg,
    "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sign": torch.sign,
    "Reciprocal": torch.reciprocal, "Sin": torch.sin, "Cos": torch.cos, "Not": torch.logical_not,
    "HardSwish": F.hardswish, "Softplus": F.softplus, "Softsign": F.softsign, "Mish": F.mish,
    "Identity": lambda x: x,
}.items():
    op(_name)(_unary(_fn))


@op("LeakyRelu")
def leaky_relu(ctx: NodeCtx, x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, ctx.attr("alpha", 0.01))


@op("Elu")
def elu(ctx: NodeCtx, x: torch.Tensor) -> torch.Tensor:
    return F.elu(x, ctx.attr("alpha", 1.0))


@op("Selu")
def selu(ctx: NodeCtx, x: torch.Tensor) -> torch.Tensor:
    alpha, gamma = ctx.attr("alpha", 1.67326319217681884765625), ctx.attr("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


@op("HardSigmoid")
def hard_sigmoid(ctx: NodeCtx, x: torch.Tensor) -> torch.Tensor:
    # mul then in-place add on the fresh product is autograd-safe and saves a temporary
    return torch.clamp(x.mul(ctx.attr("alpha", 0.2)).add_(ctx.attr("beta", 0.5)), 0.0, 1.0)


@op("Gelu")
def gelu(ctx: NodeCtx, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate=ctx.attr("approximate", "none"))


@op("PRelu")
def prelu(ctx: NodeCtx, x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    x, slope = aligned(x, slope)
    per_channel = x.dim() >= 2 and slope.numel() == x.shape[1] and slope.dim() == x.dim() - 1
    if slope.numel() == 1 or (per_channel and all(s == 1 for s in slope.shape[1:])):
        return F.prelu(x, slope.reshape(-1).to(x.dtype))
    return torch.where(x >= 0, x, x * slope)


def _clip_bound(ctx: NodeCtx, index: int, value: torch.Tensor | None, attr: str) -> float | torch.Tensor | None:
    if ctx.opset < 11:
        return ctx.attr(attr)
    if index in ctx.consts:  # constant bounds as Python floats: no device traffic, no sync
        return float(ctx.consts[index].reshape(-1)[0])
    return value


@op("Clip")
def clip(ctx: NodeCtx, x: torch.Tensor, low: torch.Tensor | None = None,
         high: torch.Tensor | None = None) -> torch.Tensor:
    low_value = _clip_bound(ctx, 1, low, "min")
    high_value = _clip_bound(ctx, 2, high, "max")
    if isinstance(low_value, torch.Tensor):
        low_value = low_value.to(x.device)
    if isinstance(high_value, torch.Tensor):
        high_value = high_value.to(x.device)
    if low_value is None and high_value is None:
        return x
    if not x.is_floating_point():
        low_value = None if low_value is None else int(low_value)
        high_value = None if high_value is None else int(high_value)
    return torch.clamp(x, low_value, high_value)


@op("Dropout")
def dropout(ctx: NodeCtx, x: torch.Tensor, *unused: torch.Tensor | None):
    if ctx.n_outputs == 1:
        return x
    return x, torch.ones_like(x, dtype=torch.bool)


# ---------------------------------------------------------------- binary


def _binary(fn):
    def handler(ctx: NodeCtx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return fn(*aligned(a, b))

    return handler


for _name, _fn in {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul,
    "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}.items():
    op(_name)(_binary(_fn))


@op("Div")
def div(ctx: NodeCtx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = aligned(a, b)
    if a.is_floating_point() or b.is_floating_point():
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer division truncates


@op("Mod")
def mod(ctx: NodeCtx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = aligned(a, b)
    return torch.fmod(a, b) if ctx.attr("fmod", 0) else torch.remainder(a, b)


@op("Pow")
def power(ctx: NodeCtx, base: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    if 1 in ctx.consts and ctx.consts[1].size == 1:
        value = float(ctx.consts[1].reshape(-1)[0])
        if value == 2.0:
            result = base * base  # exact, and cheaper in backward than pow
        else:
            result = torch.pow(base, int(value) if value.is_integer() else value)
    else:
        result = torch.pow(*aligned(base, exponent))
    # ONNX: the result has the base's type
    return result if base.is_floating_point() else result.to(base.dtype)


def _variadic(fn):
    def handler(ctx: NodeCtx, *xs: torch.Tensor) -> torch.Tensor:
        xs = aligned_all(xs)
        return functools.reduce(fn, xs)

    return handler


op("Min")(_variadic(torch.minimum))
op("Max")(_variadic(torch.maximum))
op("Sum")(_variadic(torch.add))


@op("Mean")
def mean(ctx: NodeCtx, *xs: torch.Tensor) -> torch.Tensor:
    return functools.reduce(torch.add, aligned_all(xs)) / len(xs)


@op("Where")
def where(ctx: NodeCtx, cond: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cond, a, b = aligned_all([cond, a, b])
    return torch.where(cond.bool(), a, b)


# ---------------------------------------------------------------- matrix


@op("MatMul")
def matmul(ctx: NodeCtx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.matmul(*aligned(a, b))


@op("Gemm")
def gemm(ctx: NodeCtx, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    a, b = aligned(a, b)
    a = a.t() if ctx.attr("transA", 0) else a
    b = b.t() if ctx.attr("transB", 0) else b
    alpha, beta = ctx.attr("alpha", 1.0), ctx.attr("beta", 1.0)
    if c is None or beta == 0:
        product = a @ b
        return product if alpha == 1.0 else product * alpha
    c = c.to(a.device)
    if c.dtype == a.dtype and torch.is_floating_point(a):
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)
    return alpha * (a @ b) + beta * c


@op("Einsum")
def einsum(ctx: NodeCtx, *xs: torch.Tensor) -> torch.Tensor:
    return torch.einsum(ctx.attr("equation").replace(" ", ""), *aligned_all(xs))


# ---------------------------------------------------------------- softmax


def _softmax_like(fn):
    def handler(ctx: NodeCtx, x: torch.Tensor) -> torch.Tensor:
        if ctx.opset >= 13:
            return fn(x, dim=ctx.attr("axis", -1))
        # before opset 13: coerce to 2-D at `axis` and normalise over the trailing block
        axis = normalize_axes([ctx.attr("axis", 1)], x.dim())[0]
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return fn(flat, dim=1).reshape(x.shape)

    return handler


op("Softmax")(_softmax_like(torch.softmax))
op("LogSoftmax")(_softmax_like(torch.log_softmax))


# ---------------------------------------------------------------- reductions

_REDUCE_AXES_INPUT_SINCE = {"ReduceSum": 13}


def _reduce(fn):
    def handler(ctx: NodeCtx, x: torch.Tensor, axes_input: torch.Tensor | None = None) -> torch.Tensor:
        axes = axis_list(ctx, axes_input, _REDUCE_AXES_INPUT_SINCE.get(ctx.op_type, 18))
        if not axes:
            if ctx.attr("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, normalize_axes(axes, x.dim()), bool(ctx.attr("keepdims", 1)))

    return handler


def _sum_square(x, dims, keep):
    return torch.sum(x * x, dim=dims, keepdim=keep)


def _l2(x, dims, keep):
    return torch.sqrt(_sum_square(x, dims, keep))


for _name, _fn in {
    "ReduceMean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
    "ReduceSum": lambda x, d, k: torch.sum(x, dim=d, keepdim=k, dtype=x.dtype),
    "ReduceMax": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "ReduceProd": lambda x, d, k: _prod(x, d, k),
    "ReduceL1": lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k),
    "ReduceL2": _l2,
    "ReduceSumSquare": _sum_square,
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)),
}.items():
    op(_name)(_reduce(_fn))


def _prod(x: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
    for dim in sorted(dims, reverse=True):
        x = torch.prod(x, dim=dim, keepdim=keep)
    return x


def _arg(fn):
    def handler(ctx: NodeCtx, x: torch.Tensor) -> torch.Tensor:
        axis = normalize_axes([ctx.attr("axis", 0)], x.dim())[0]
        keep = bool(ctx.attr("keepdims", 1))
        if ctx.attr("select_last_index", 0):
            flipped = fn(torch.flip(x, [axis]), dim=axis, keepdim=keep)
            return x.shape[axis] - 1 - flipped
        return fn(x, dim=axis, keepdim=keep)

    return handler


op("ArgMax")(_arg(torch.argmax))
op("ArgMin")(_arg(torch.argmin))


@op("TopK")
def topk(ctx: NodeCtx, x: torch.Tensor, k: torch.Tensor | None = None):
    count = int(ctx.attr("k")) if ctx.opset < 10 else int(k.reshape(-1)[0])
    values, indices = torch.topk(x, count, dim=ctx.attr("axis", -1),
                                 largest=bool(ctx.attr("largest", 1)), sorted=True)
    return values, indices


@op("CumSum")
def cumsum(ctx: NodeCtx, x: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    dim = int(axis.reshape(-1)[0])
    if ctx.attr("reverse", 0):
        x = torch.flip(x, [dim])
    out = torch.cumsum(x, dim)
    if ctx.attr("exclusive", 0):
        out = out - x
    return torch.flip(out, [dim]) if ctx.attr("reverse", 0) else out


@op("IsNaN")
def is_nan(ctx: NodeCtx, x: torch.Tensor) -> torch.Tensor:
    return torch.isnan(x)

