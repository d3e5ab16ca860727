"""AlignRanksPass: planned ranks onnxruntime's symmetric int8 conv kernels take.

compile --int8 runs it after planning, before the fit. Rules:

a. Every planned rank k is rounded down to a multiple of 8 (`RANK_ALIGN`); ranks under 8
   stay. A map's planned `bytes_after` shrinks with its rank.
b. Why: the folded convs write and read k channels, and onnxruntime's symmetric int8
   kernel needs k % 8 == 0 written and k % 4 == 0 read (passes/runtime.py rule e');
   without it a conv allocates an int32 output and an im2col of its whole band (ResNet-18
   at 64KB: k = 83 gave a 368 KiB im2col).

Entry point: `AlignRanksPass().run(model, ctx)`; `aligned_rank(planned)` is rule a for one map.
"""

from __future__ import annotations

from dataclasses import replace

from .base import Pass, PassContext, PassResult
from .graph import Model
from .plan import PlannedMap

RANK_ALIGN = 8  # rule b: MLAS's symmetric int8 conv wants output channels % 8 (input % 4)


class AlignRanksPass(Pass):
    """Rule a: every planned rank a multiple of 8, for onnxruntime's symmetric int8 convs."""

    name = "align-ranks"
    requires = ("plan",)
    provides = ("plan",)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        maps = [aligned_rank(m) for m in ctx.plan.maps]
        changed = [f"{m.name} {m.k}->{a.k}" for m, a in zip(ctx.plan.maps, maps, strict=True) if a.k != m.k]
        if changed:
            ctx.log(f"int8: {len(changed)} rank(s) rounded down to a multiple of {RANK_ALIGN}: "
                    f"{', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''}")
        ctx.plan = replace(ctx.plan, maps=maps)
        return PassResult(model, modified=False, data=maps)


def aligned_rank(planned: PlannedMap) -> PlannedMap:
    """Rule a for one map: k rounded down to a multiple of 8 (a rank under 8 stays)."""
    if planned.k < RANK_ALIGN or planned.k % RANK_ALIGN == 0:
        return planned
    k = planned.k - planned.k % RANK_ALIGN
    return replace(planned, k=k, bytes_after=planned.bytes_after // planned.k * k)
