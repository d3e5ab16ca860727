"""Plan pass: which stored feature maps to compress, and to what rank.

Rules (DESIGN.md, Price & Tanner's ceiling compression), on the stored view:

* every compressible map (a 4-D or 3-D map between kernel groups) above the ceiling gets
  rank k = floor(ceiling_bytes / (H * W (or L) * bytes_per_element)), 1 <= k < C, and is
  stored as Z = P X with k channels;
* k < 1 (one channel of the map alone is above the ceiling), or an over-ceiling map
  that cannot be projected (not 3-D or 4-D), makes the plan infeasible: InputError naming
  the map and the smallest feasible ceiling;
* graph inputs and outputs above the ceiling are reported, never compressed;
* a relative ceiling (`4x`) is resolved once, on the original model.

Entry point: `PlanPass(ceiling).run(model, ctx)`; reuses `ctx.results["memory"]`
when an analysis of the same model is already there. `result.data` is a `Plan`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

from fmcompress.errors import InputError
from fmcompress.report import AnalysisReport, FeatureMap
from fmcompress.units import Ceiling, format_bytes

from .base import Pass, PassContext, PassResult
from .memory import MemoryAnalysisPass


@dataclass
class PlannedMap:
    name: str
    shape: list[int]
    k: int
    bytes_before: int
    bytes_after: int
    producer: str
    step: int

    @property
    def channels(self) -> int:
        return self.shape[1]


@dataclass
class Plan:
    ceiling: str
    ceiling_bytes: int
    act_bytes: int | None
    maps: list[PlannedMap]
    not_compressible: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for entry in data["maps"]:
            entry["C"] = entry["shape"][1]
        return data


def bytes_per_element(fmap: FeatureMap) -> int:
    return fmap.bytes // max(1, math.prod(fmap.shape))


class PlanPass(Pass):
    """Chooses a rank for every compressible stored map above the ceiling."""

    name = "plan"

    def __init__(self, ceiling: Ceiling):
        self.ceiling = ceiling

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        report = ctx.results.get("memory")
        if not isinstance(report, AnalysisReport) or report.ceiling_bytes is None:
            report = MemoryAnalysisPass(self.ceiling).run(model, ctx).data
            ctx.results["memory"] = report
        return PassResult(model, modified=False, data=plan_from_report(report))


def plan_from_report(report: AnalysisReport) -> Plan:
    assert report.ceiling_bytes is not None and report.ceiling is not None
    ceiling = report.ceiling_bytes
    planned: list[PlannedMap] = []
    infeasible: list[tuple[FeatureMap, int]] = []  # (map, the ceiling it needs)
    skipped = []
    for fmap in report.stored:
        if not fmap.over_ceiling:
            continue
        if fmap.role != "map":
            skipped.append({"name": fmap.name, "role": fmap.role, "shape": fmap.shape, "bytes": fmap.bytes})
            continue
        if not fmap.compressible:
            infeasible.append((fmap, fmap.bytes))
            continue
        plane = math.prod(fmap.shape[2:]) * fmap.shape[0] * bytes_per_element(fmap)
        k = ceiling // plane
        if k < 1:
            infeasible.append((fmap, plane))
            continue
        planned.append(PlannedMap(name=fmap.name, shape=list(fmap.shape), k=int(k), bytes_before=fmap.bytes,
                                  bytes_after=int(k * plane), producer=fmap.producer, step=fmap.step))
    if infeasible:
        raise InputError(_infeasible_message(infeasible, report))
    planned.sort(key=lambda m: m.step)
    return Plan(ceiling=report.ceiling, ceiling_bytes=ceiling, act_bytes=report.act_bytes, maps=planned,
                not_compressible=skipped)


def _infeasible_message(infeasible: list[tuple[FeatureMap, int]], report: AnalysisReport) -> str:
    worst, needed = max(infeasible, key=lambda pair: pair[1])
    feasible = max(need for _, need in infeasible)
    names = ", ".join(f"{m.name} {'x'.join(map(str, m.shape))}" for m, _ in infeasible[:3])
    more = f" and {len(infeasible) - 3} more" if len(infeasible) > 3 else ""
    return (f"ceiling {report.ceiling} ({report.ceiling_bytes} B) is infeasible: {names}{more} cannot fit even at "
            f"rank 1 or cannot be projected; the smallest feasible ceiling is {feasible} B ({format_bytes(feasible)})")
