"""Resize (opsets 10 to 19) and Upsample, with ONNX's coordinate and rounding rules.

The general path is separable: for each resized axis, compute source coordinates
in float64 exactly as the ONNX spec does, then gather neighbour taps and blend them
(nearest: 1 tap, linear: 2, cubic: 4, taps clamped to the edge). Common cases that
torch's F.interpolate computes identically take that single fused kernel instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .registry import NodeCtx, floats, ints, normalize_axes, op

_COORD_MODES = {"half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel", "half_pixel_symmetric"}
_NEAREST_MODES = {"round_prefer_floor", "round_prefer_ceil", "floor", "ceil"}
_SIZES_POLICIES = {"stretch", "not_larger", "not_smaller"}


def _resize_check(ctx: NodeCtx) -> str | None:
    mode = ctx.attr("mode", "nearest")
    coord = ctx.attr("coordinate_transformation_mode", "half_pixel")
    if mode not in ("nearest", "linear", "cubic"):
        return f"Resize(mode={mode})"
    if coord not in _COORD_MODES:
        return f"Resize(coordinate_transformation_mode={coord})"
    if ctx.attr("nearest_mode", "round_prefer_floor") not in _NEAREST_MODES:
        return f"Resize(nearest_mode={ctx.attr('nearest_mode')})"
    if ctx.attr("antialias", 0):
        return "Resize(antialias=1)"
    if ctx.attr("keep_aspect_ratio_policy", "stretch") not in _SIZES_POLICIES:
        return f"Resize(keep_aspect_ratio_policy={ctx.attr('keep_aspect_ratio_policy')})"
    return None


@op("Resize", check=_resize_check)
def resize(ctx: NodeCtx, x: torch.Tensor, roi: torch.Tensor | None = None,
           scales: torch.Tensor | None = None, sizes: torch.Tensor | None = None) -> torch.Tensor:
    if ctx.opset < 11:  # Resize-10: (X, scales), asymmetric coordinates
        scales, sizes = roi, None
    axes = normalize_axes(ctx.attr("axes", list(range(x.dim()))), x.dim())
    in_sizes = [x.shape[a] for a in axes]
    factors, out_sizes = _plan(ctx, in_sizes, floats(scales) if scales is not None and scales.numel() else None,
                               ints(sizes) if sizes is not None and sizes.numel() else None)
    mode = ctx.attr("mode", "nearest")
    coord = "asymmetric" if ctx.opset < 11 else ctx.attr("coordinate_transformation_mode", "half_pixel")
    return _resize(x, dict(zip(axes, zip(factors, out_sizes, strict=False), strict=False)), mode, coord,
                   ctx.attr("nearest_mode", "round_prefer_floor"), ctx.attr("cubic_coeff_a", -0.75),
                   bool(ctx.attr("exclude_outside", 0)))


def _plan(ctx: NodeCtx, in_sizes: list[int], scales: list[float] | None,
          sizes: list[int] | None) -> tuple[list[float], list[int]]:
    """Per-axis (scale, output size) from either scales or sizes."""
    if sizes is None:
        assert scales is not None
        return scales, [int(math.floor(s * f)) for s, f in zip(in_sizes, scales, strict=False)]
    policy = ctx.attr("keep_aspect_ratio_policy", "stretch")
    if policy == "stretch":
        return [o / s for o, s in zip(sizes, in_sizes, strict=False)], sizes
    pick = min if policy == "not_larger" else max
    scale = pick(o / s for o, s in zip(sizes, in_sizes, strict=False))
    return [scale] * len(sizes), [int(math.floor(s * scale + 0.5)) for s in in_sizes]


@op("Upsample")
def upsample(ctx: NodeCtx, x: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    factors = floats(scales) if scales is not None else list(ctx.attr("scales"))
    out_sizes = [int(math.floor(s * f)) for s, f in zip(x.shape, factors, strict=False)]
    mode = "linear" if ctx.attr("mode", "nearest") in ("linear", "bilinear") else "nearest"
    plan = dict(enumerate(zip(factors, out_sizes, strict=False)))
    return _resize(x, plan, mode, "asymmetric", "floor", -0.75, False)


def _resize(x: torch.Tensor, plan: dict[int, tuple[float, int]], mode: str, coord: str,
            nearest_mode: str, cubic_a: float, exclude_outside: bool) -> torch.Tensor:
    plan = {a: (f, o) for a, (f, o) in plan.items() if not (o == x.shape[a] and f == 1.0)}
    if not plan:
        return x
    fast = _interpolate_fast(x, plan, mode, coord, nearest_mode)
    if fast is not None:
        return fast
    for axis, (factor, out_size) in plan.items():
        x = _resize_axis(x, axis, factor, out_size, mode, coord, nearest_mode, cubic_a, exclude_outside)
    return x


def _interpolate_fast(x: torch.Tensor, plan: dict[int, tuple[float, int]], mode: str, coord: str,
                      nearest_mode: str) -> torch.Tensor | None:
    """F.interpolate for the cases it computes exactly as ONNX does; None otherwise."""
    spatial = list(range(2, x.dim()))
    if not 1 <= len(spatial) <= 3 or any(a < 2 for a in plan):
        return None
    factors = [plan.get(a, (1.0, x.shape[a]))[0] for a in spatial]
    sizes = [plan.get(a, (1.0, x.shape[a]))[1] for a in spatial]
    # torch's nearest index is floor(dst * in / out) in float: exact for power-of-two factors;
    # round_prefer_floor agrees with floor only up to a factor of 2
    allowed = (1.0, 2.0, 4.0, 8.0) if nearest_mode == "floor" else (1.0, 2.0)
    power_of_two_up = all(f in allowed and s == x.shape[a] * int(f) for f, s, a in zip(factors, sizes, spatial, strict=False))
    if mode == "nearest" and coord == "asymmetric" and nearest_mode in ("floor", "round_prefer_floor") \
            and power_of_two_up:
        return F.interpolate(x, size=sizes, mode="nearest")
    if mode == "linear" and len(spatial) <= 3 and (coord == "align_corners" or (
            coord in ("half_pixel", "pytorch_half_pixel") and all(s > 1 for s in sizes))):
        torch_mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)]
        exact = all(math.floor(x.shape[a] * f) == s for a, f, s in zip(spatial, factors, sizes, strict=False))
        if exact and coord != "align_corners":
            return F.interpolate(x, scale_factor=factors, mode=torch_mode, align_corners=False)
        if coord == "align_corners":
            return None if any(s == 1 for s in sizes) else F.interpolate(
                x, size=sizes, mode=torch_mode, align_corners=True)
    return None


def _source_coords(coord: str, out_size: int, in_size: int, factor: float) -> torch.Tensor:
    out = torch.arange(out_size, dtype=torch.float64)
    if coord == "align_corners":
        span = factor * in_size - 1  # the spec uses the unrounded output length here
        return torch.zeros_like(out) if span == 0 else out * (in_size - 1) / span
    if coord == "asymmetric":
        return out / factor
    if coord == "pytorch_half_pixel" and out_size == 1:
        return torch.full_like(out, -0.5)
    if coord == "half_pixel_symmetric":
        offset = in_size / 2 * (1 - out_size / (factor * in_size))
        return offset + (out + 0.5) / factor - 0.5
    return (out + 0.5) / factor - 0.5


def _nearest_index(src: torch.Tensor, nearest_mode: str) -> torch.Tensor:
    base = torch.floor(src)
    frac = src - base
    if nearest_mode == "floor":
        return base
    if nearest_mode == "ceil":
        return torch.ceil(src)
    if nearest_mode == "round_prefer_ceil":
        return torch.where(frac >= 0.5, base + 1, base)
    return torch.where(frac > 0.5, base + 1, base)


def _cubic_weights(frac: torch.Tensor, a: float) -> list[torch.Tensor]:
    def near(t):  # |t| <= 1
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def far(t):  # 1 < |t| < 2
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    return [far(frac + 1), near(frac), near(1 - frac), far(2 - frac)]


def _resize_axis(x: torch.Tensor, axis: int, factor: float, out_size: int, mode: str, coord: str,
                 nearest_mode: str, cubic_a: float, exclude_outside: bool) -> torch.Tensor:
    in_size = x.shape[axis]
    src = _source_coords(coord, out_size, in_size, factor)
    if mode == "nearest":
        index = _nearest_index(src, nearest_mode).long().clamp(0, in_size - 1)
        return x.index_select(axis, index.to(x.device))
    base = torch.floor(src)
    frac = src - base
    if mode == "linear":
        offsets, weights = [0, 1], [1 - frac, frac]
    else:
        offsets, weights = [-1, 0, 1, 2], _cubic_weights(frac, cubic_a)
    taps = [base.long() + o for o in offsets]
    if exclude_outside:
        weights = [w * ((t >= 0) & (t < in_size)) for w, t in zip(weights, taps, strict=False)]
        total = sum(weights)
        weights = [w / total for w in weights]
    view = [1] * x.dim()
    view[axis] = out_size
    out = None
    for tap, weight in zip(taps, weights, strict=False):
        picked = x.index_select(axis, tap.clamp(0, in_size - 1).to(x.device))
        term = picked * weight.to(device=x.device, dtype=x.dtype).reshape(view)
        out = term if out is None else out + term
    return out
