"""Plan pass: which stored feature maps to compress, and to what rank.

Rules (Price & Tanner's ceiling compression; docs/design.md section 2), on the stored view:

* every compressible map (FeatureMap.compressible: a floating-point 4-D or 3-D map
  between kernel groups) above the ceiling gets rank
  k = floor(ceiling_bytes / (N * H * W (or N * L) * bytes_per_element)), 1 <= k < C,
  and is stored as Z = P X with k channels; the maps are listed in execution order;
* k < 1 (one channel of the map alone is above the ceiling) makes the plan
  infeasible: InputError naming the maps and the smallest feasible ceiling
  (the largest of what each needs: one channel's bytes);
* graph inputs, graph outputs, integer (quantized) maps and maps no projection
  applies to (not 4-D NCHW or 3-D NCL, one channel) above the ceiling are never
  compressed: `not_compressible` lists them, each with its `reason`
  (FeatureMap.not_compressible_reason: "graph input", "integer dtype", "5-D map, ..."),
  in execution order;
* a relative ceiling (`4x`) is resolved by the analysis, on the largest compressible map;
* the fold pass carries U through a Resize (or Upsample, Identity, Dropout) and the
  op then runs on the k channels: the narrow, upsampled tensor is stored too, so a map
  read by a Resize takes the largest plane it is carried to, k = floor(ceiling /
  max(plane of X, planes of its resized copies)) (with the model; `carried_planes`).

Entry point: `PlanPass(ceiling).run(model, ctx)`; reuses `ctx.memory` only
when it is an analysis of the same graph (`graph_key`) at the same ceiling, resolved
input shapes and act_bytes, else runs the analysis again and stores it there.
`result.data` is a `Plan`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

from fmcompress.errors import InputError
from fmcompress.featuremaps import FeatureMap
from fmcompress.reports.analysis import AnalysisReport
from fmcompress.shapes import resolve_input_shapes
from fmcompress.units import Ceiling, format_bytes

from .base import Pass, PassContext, PassResult
from .graph import Model
from .memory import analyze_stored, graph_key
from .ops import CARRYING_OPS


@dataclass
class PlannedMap:
    name: str
    shape: list[int]
    k: int
    bytes_before: int
    bytes_after: int
    producer: str
    step: int
    # where the projection goes when not at the stored map itself: `name` is then the tensor
    # before the activation and this the stored map it stands for (passes/before_activation.py)
    stored_map: str | None = None

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def stored(self) -> str:
        """The stored map this projection fits under the ceiling (`name` itself unless moved)."""
        return self.stored_map or self.name


@dataclass
class Plan:
    ceiling: str
    ceiling_bytes: int
    act_bytes: int | None
    maps: list[PlannedMap]
    not_compressible: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = {"schema_version": PLAN_SCHEMA_VERSION, **asdict(self)}
        for entry in data["maps"]:
            entry["C"] = entry["shape"][1]
        return data


PLAN_SCHEMA_VERSION = 1  # of Plan.to_dict(), the `compile --plan-only --json` file


def bytes_per_element(fmap: FeatureMap) -> int:
    return fmap.bytes // max(1, math.prod(fmap.shape))


class PlanPass(Pass):
    """Chooses a rank for every compressible stored map above the ceiling."""

    name = "plan"
    provides = ("plan", "memory", "before")

    def __init__(self, ceiling: Ceiling | None = None, *, refuse_infeasible: bool = True):
        self.ceiling = ceiling  # None: the current plan's, in bytes (re-planning a rewritten graph)
        self.refuse_infeasible = refuse_infeasible  # False: left to the runtime plan (--runtime ort)

    @property
    def requires(self) -> tuple[str, ...]:
        return ("plan",) if self.ceiling is None else ()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        proto = model.proto()
        ceiling = self.ceiling or Ceiling(bytes=ctx.plan.ceiling_bytes, text=ctx.plan.ceiling)
        report = ctx.memory
        if not (isinstance(report, AnalysisReport) and self._matches(report, proto, ctx, ceiling)):
            ctx.memory = report = analyze_stored(proto, ctx, ceiling, getattr(report, "source", ""))
            ctx.before = ctx.before or report
            ctx.plan = self._plan(proto, report)
        elif self.ceiling is not None or ctx.plan is None:
            ctx.plan = self._plan(proto, report)
        return PassResult(model, modified=False, data=ctx.plan)

    def _plan(self, model: onnx.ModelProto, report: AnalysisReport) -> Plan:
        return plan_from_report(report, carried_planes(model, report), refuse_infeasible=self.refuse_infeasible)

    def _matches(self, report: AnalysisReport, model: onnx.ModelProto, ctx: PassContext,
                 ceiling: Ceiling) -> bool:
        """The earlier analysis was of this graph, at this ceiling, input shapes and act_bytes
        (re-planning: at the current plan's ceiling bytes)."""
        spec = report.ceiling_spec
        same_ceiling = (spec is not None and (spec.bytes, spec.ratio) == (ceiling.bytes, ceiling.ratio)
                        or self.ceiling is None and report.ceiling_bytes == ceiling.bytes)
        return (same_ceiling
                and report.act_bytes == ctx.act_bytes and report.graph_key == graph_key(model)
                and report.input_shapes == {name: list(dims) for name, dims in
                                            resolve_input_shapes(model, ctx.input_shapes).items()})


def carried_planes(model: onnx.ModelProto, report: AnalysisReport) -> dict[str, int]:
    """Per tensor, the most elements per channel (N * H * W) of what a projection's U is
    carried to through Resize-like ops (their input 0), when that exceeds its own."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.input:
            readers.setdefault(node.input[0], []).append(node)

    def largest(name: str, seen: frozenset[str]) -> int:
        best = 0
        for node in readers.get(name, []):
            out = node.output[0] if node.op_type in CARRYING_OPS else ""
            shape = report.tensor_shapes.get(out)
            if out and out not in seen and shape is not None and len(shape) >= 3:
                best = max(best, shape[0] * math.prod(shape[2:]), largest(out, seen | {out}))
        return best

    carried = {}
    for fmap in report.stored:
        if fmap.compressible:
            planes = largest(fmap.name, frozenset({fmap.name}))
            if planes > fmap.shape[0] * math.prod(fmap.shape[2:]):
                carried[fmap.name] = planes
    return carried


def plan_from_report(report: AnalysisReport, carried: dict[str, int] | None = None, *,
                     refuse_infeasible: bool = True) -> Plan:
    """Rules above, on an analysis made with a ceiling; maps in execution order.

    `carried` (from `carried_planes`) gives, per map, the elements per channel of the
    largest tensor its U is carried to; without it each map's own plane sets k. With
    `refuse_infeasible` False (compile --runtime ort, where row bands may split a map
    whose single channel is above the ceiling), such maps are listed as not compressible
    and left to the runtime plan, which refuses what no band covers."""
    if report.ceiling_bytes is None or report.ceiling is None:
        raise ValueError("plan_from_report needs an analysis made with a ceiling")
    planned: list[PlannedMap] = []
    infeasible: list[tuple[FeatureMap, int]] = []  # (map, the ceiling it needs)
    skipped: list[dict[str, Any]] = []
    for fmap in report.stored:
        if not fmap.over_ceiling:
            continue
        reason = fmap.not_compressible_reason
        if reason is not None:
            skipped.append({"name": fmap.name, "role": fmap.role, "shape": list(fmap.shape), "dtype": fmap.dtype,
                            "bytes": fmap.bytes, "reason": reason, "step": fmap.step})
        else:
            plane = ranked_plane_bytes(fmap, carried)
            if plane > report.ceiling_bytes:
                infeasible.append((fmap, plane))
                if not refuse_infeasible:
                    skipped.append({"name": fmap.name, "role": fmap.role, "shape": list(fmap.shape),
                                    "dtype": fmap.dtype, "bytes": fmap.bytes, "step": fmap.step,
                                    "reason": f"one channel ({plane} B) is above the ceiling: left to "
                                              "tiling"})
                continue
            planned.append(planned_map(fmap, report.ceiling_bytes, carried))
    if infeasible and refuse_infeasible:
        raise InputError(_infeasible_message(infeasible, report))
    planned.sort(key=lambda m: m.step)
    skipped.sort(key=lambda entry: entry["step"])
    return Plan(ceiling=report.ceiling, ceiling_bytes=report.ceiling_bytes, act_bytes=report.act_bytes,
                maps=planned, not_compressible=skipped)


def ranked_plane_bytes(fmap: FeatureMap, carried: dict[str, int] | None = None) -> int:
    """The bytes of one channel that the rank must fit: the map's own, or the largest copy
    its U is carried to (`carried_planes`)."""
    return max(plane_bytes(fmap), (carried or {}).get(fmap.name, 0) * bytes_per_element(fmap))


def planned_map(fmap: FeatureMap, ceiling_bytes: int, carried: dict[str, int] | None = None) -> PlannedMap:
    """The rank rule: k = floor(ceiling / ranked plane), for a map whose ranked plane fits."""
    plane = ranked_plane_bytes(fmap, carried)
    k = ceiling_bytes // plane
    return PlannedMap(name=fmap.name, shape=list(fmap.shape), k=int(k), bytes_before=fmap.bytes,
                      bytes_after=int(k * plane), producer=fmap.producer, step=fmap.step)


def plane_bytes(fmap: FeatureMap) -> int:
    """Bytes of one channel: N * H * W (or N * L) elements."""
    return math.prod(fmap.shape[2:]) * fmap.shape[0] * bytes_per_element(fmap)


def _infeasible_message(infeasible: list[tuple[FeatureMap, int]], report: AnalysisReport) -> str:
    feasible = max(need for _, need in infeasible)
    names = ", ".join(f"{m.name} {'x'.join(map(str, m.shape))}" for m, _ in infeasible[:3])
    more = f" and {len(infeasible) - 3} more" if len(infeasible) > 3 else ""
    return (f"ceiling {report.ceiling} ({report.ceiling_bytes} B) is infeasible: {names}{more} cannot fit even at "
            f"rank 1 or cannot be projected; the smallest feasible ceiling is {feasible} B ({format_bytes(feasible)})")
