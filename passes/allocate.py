"""AllocatePass: per-map ranks under a budget on the total stored feature-map traffic.

Tai et al.'s greedy dimension reduction, made cheap: instead of measuring every
candidate cut, a per-map proxy is measured once and the greedy runs on it. Rules:

a. Traffic is the sum of the bytes of every stored map with role "map" in the stored
   view (docs/design.md section 3.3), compressible or not: what crosses between kernel
   groups. Graph inputs and outputs belong to the caller and are excluded. A budget
   `Nx` is floor(that total / N); a size (`2MB`) is absolute (fmcompress.units).
b. Candidates are the compressible maps; each starts at its upper bound, C or the rank
   the ceiling plan gives it (`ctx.plan`, when compile has a ceiling too).
   Other maps are fixed traffic. When the fixed traffic plus every candidate at rank 1
   is above the budget, InputError names the smallest feasible budget.
c. Measured, once, on a calibration subset (`probe_samples`, seeded; the held-out part
   stays unseen, as for training), with the original network:
   * the spectrum: one forward pass with a second-moment recorder (fit_pca's kind,
     positions subsampled per batch) on every candidate; its eigenvalues give, for
     every k, the fraction of the map's energy a rank-k PCA loses, e(k);
   * the sensitivity: per candidate, its PCA projection alone at three probe ranks,
     the uniform allocation's rank k_u for this budget, k_u/2 and k_u/4, and the
     relative error r of the network's outputs there (all outputs, as fidelity's
     relative_error);
   * the check: after allocation, the outputs' relative error with every candidate's
     PCA at its allocated rank (one pass), reported beside the estimate.
d. Estimated: a map's cost at rank k is r^2 interpolated piecewise linearly in e(k)
   through (0, 0) and its probes (made non-decreasing; beyond the deepest probe,
   extrapolated with the steeper of the last segment and the chord from 0), so the
   spectrum shapes the curve between probes and the probes catch where a deep cut
   breaks the network. An allocation's squared output error is estimated as the sum
   over maps (errors of separate maps add in power). Not measured per step: maps
   interact, and the check below says by how much.
e. Greedy: from the upper bounds, cut ranks in steps of max(1, C // 16) channels,
   each time the step with the least cost increase per byte saved (ties: earlier
   map), until the traffic is within the budget; then the slack goes back one
   channel at a time to the map whose cost falls most per byte.
f. Objective `traffic+latency`: a projected map's cost adds latency_weight * L, once
   (at its first cut; L is 0 while k = C): the multiply-accumulates of the explicit
   1x1 convs its projection will need, at the uniform allocation's rank, as a fraction
   of the model's (deeper cuts shrink those convs a little; that is not rewarded, so
   latency never buys a deep cut). Predicted from fold.py's rules on the
   graph: P folds into a group=1 Conv producer (BatchNorm between is folded first);
   U folds into a consumer that is a group=1 Conv reading it as input 0 (rule b),
   Shape/Size (f), a residual Add whose output is itself compressible (g, the linear
   stream), or a push-through op whose own readers fold (c, d); any other reader
   (depthwise or grouped conv, MaxPool, nonlinear op, ...) gets an explicit U (h).
g. Strategy `uniform` (for comparison): the same ratio k/C on every candidate,
   k = max(1, round(rho * C)) capped by the upper bound, the largest rho that fits;
   nothing is measured.

Entry point: `AllocatePass(budget, calibration).run(model, ctx)`; reads `ctx.memory`
(an analysis of this model), the calibration part (the constructor's, else
`ctx.calibration`) and, if present, the ceiling plan `ctx.plan`; replaces `ctx.plan`
with the allocated Plan (maps with k < C, in execution order), so fit, fold, verify
and measure run unchanged. `ctx.allocation` and `result.data` are the `Allocation`.

Here: the pass, rules a, b, e and g; the per-map proxy (rules c, d, f) in allocate_proxy.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from fmcompress.data import Dataset
from fmcompress.errors import InputError
from fmcompress.featuremaps import FeatureMap
from fmcompress.metrics import count_flops
from fmcompress.reports.analysis import AnalysisReport
from fmcompress.units import Ceiling, format_bytes, parse_ceiling

from .allocate_proxy import MapProxy, measure_proxies, measured_error, predict_folding
from .base import Pass, PassContext, PassResult
from .graph import Model
from .plan import Plan, PlannedMap, plane_bytes

OBJECTIVES = ("traffic", "traffic+latency")
STRATEGIES = ("greedy", "uniform")


def parse_traffic(text: str) -> Ceiling:
    """A traffic budget: `3x` (the total stored traffic / 3) or a size (`2MB`)."""
    try:
        return parse_ceiling(text)
    except InputError:
        raise InputError(f"invalid traffic budget {text!r}: use a ratio of the total stored traffic (3x) "
                         "or a size (2MB, 512KB, 262144)") from None


def stored_traffic(report: AnalysisReport) -> int:
    """Rule a: bytes of every stored map with role "map" (inputs and outputs excluded)."""
    return sum(m.bytes for m in report.stored if m.role == "map")


@dataclass
class Allocation:
    """The allocated plan and what the report says about it."""

    plan: Plan | None
    budget: str
    budget_bytes: int
    objective: str
    strategy: str
    traffic_before: int
    fixed_bytes: int
    ranks: dict[str, int]
    proxies: list[MapProxy]
    latency_weight: float = 0.0
    model_macs: int = 0
    probe_samples: int = 0
    estimated_rel_error: float | None = None
    measured_rel_error: float | None = None
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def traffic_planned(self) -> int:
        return self.fixed_bytes + sum(self.ranks[p.name] * p.plane_bytes for p in self.proxies)

    def to_dict(self, traffic_after: int | None = None) -> dict[str, Any]:
        after = self.traffic_planned if traffic_after is None else traffic_after
        return {
            "budget": self.budget, "budget_bytes": self.budget_bytes, "objective": self.objective,
            "strategy": self.strategy, "traffic_before_bytes": self.traffic_before,
            "traffic_planned_bytes": self.traffic_planned, "traffic_after_bytes": after,
            "traffic_ratio": self.traffic_before / after if after else None, "fixed_bytes": self.fixed_bytes,
            "latency_weight": self.latency_weight, "model_macs": self.model_macs, "probe_samples": self.probe_samples, "greedy_steps": self.steps,
            "estimated_rel_error": self.estimated_rel_error, "measured_rel_error": self.measured_rel_error,
            "maps": [self._map_entry(p) for p in self.proxies],
        }

    def _map_entry(self, proxy: MapProxy) -> dict[str, Any]:
        k = self.ranks[proxy.name]
        return {"name": proxy.name, "C": proxy.channels, "k": k, "k_max": proxy.k_max,
                "bytes_before": proxy.channels * proxy.plane_bytes, "bytes_after": k * proxy.plane_bytes,
                "energy_lost": proxy.energy_lost[k], "probes": [list(probe) for probe in proxy.probes],
                "cost": proxy.fidelity_cost(k), "latency_cost": proxy.latency_cost(k),
                "explicit_p": proxy.explicit_p, "explicit_u": proxy.explicit_u,
                "latency_penalty": proxy.latency_penalty}


class AllocatePass(Pass):
    """Chooses a rank per compressible map so that the total stored traffic fits the budget."""

    name = "allocate"
    provides = ("allocation", "plan")

    def __init__(self, budget: Ceiling | str, calibration: Dataset | None = None, *, objective: str = "traffic",
                 strategy: str = "greedy", batch_size: int = 16, probe_samples: int = 32,
                 latency_weight: float = 1.0, seed: int = 0, proxies: list[MapProxy] | None = None):
        if objective not in OBJECTIVES:
            raise InputError(f"unknown objective {objective!r}; available: {', '.join(OBJECTIVES)}")
        if strategy not in STRATEGIES:
            raise InputError(f"unknown allocation {strategy!r}; available: {', '.join(STRATEGIES)}")
        self.budget = budget if isinstance(budget, Ceiling) else parse_traffic(budget)
        self.calibration, self.objective, self.strategy = calibration, objective, strategy
        self.batch_size, self.probe_samples, self.seed = batch_size, probe_samples, seed
        self.latency_weight = latency_weight if objective == "traffic+latency" else 0.0
        self.proxies = proxies  # measured earlier for this model and budget (a sweep reuses them)

    @property
    def requires(self) -> tuple[str, ...]:
        measures = self.strategy == "greedy" and self.calibration is None and self.proxies is None
        return ("memory", "calibration") if measures else ("memory",)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        report = ctx.memory
        if not isinstance(report, AnalysisReport):
            raise InputError("the allocate pass needs the memory analysis: run MemoryAnalysisPass first")
        if self.calibration is None:
            self.calibration = ctx.calibration
        if self.strategy == "greedy" and self.calibration is None and self.proxies is None:
            raise InputError("greedy allocation needs calibration data to measure its proxies")
        ctx.allocation = self._allocate(model.proto(), ctx, report)
        ctx.plan = ctx.allocation.plan
        return PassResult(model, modified=False, data=ctx.allocation)

    def _allocate(self, model: onnx.ModelProto, ctx: PassContext, report: AnalysisReport) -> Allocation:
        ceiling_plan = ctx.plan
        before = stored_traffic(report)
        budget_bytes = self.budget.resolve(before)
        candidates = [m for m in report.stored if m.compressible]
        bounds = _upper_bounds(candidates, ceiling_plan)
        fixed = before - sum(m.bytes for m in candidates)
        _check_feasible(self.budget, budget_bytes, before, fixed, candidates)
        proxies = self.proxies or _bare_proxies(candidates, bounds)
        model_macs = count_flops(model, report.tensor_shapes) // 2
        allocation = Allocation(plan=ceiling_plan, budget=str(self.budget), budget_bytes=budget_bytes,
                                objective=self.objective, strategy=self.strategy, traffic_before=before,
                                fixed_bytes=fixed, ranks={}, proxies=proxies, latency_weight=self.latency_weight,
                                model_macs=model_macs)
        if self.strategy == "uniform":
            allocation.ranks = uniform_ranks(proxies, budget_bytes, fixed)
        else:
            self._greedy(model, ctx, allocation, report)
        allocation.plan = _plan(report, ceiling_plan, proxies, allocation.ranks)
        ctx.log(f"allocate ({self.strategy}, {self.objective}): traffic {format_bytes(before)} -> "
                f"{format_bytes(allocation.traffic_planned)} (budget {self.budget} = {budget_bytes} B), "
                f"{len(allocation.plan.maps)} map(s) cut")
        return allocation

    def _greedy(self, model: onnx.ModelProto, ctx: PassContext, allocation: Allocation,
                 report: AnalysisReport) -> None:
        proxies, fixed, budget = allocation.proxies, allocation.fixed_bytes, allocation.budget_bytes
        measured = self.proxies is not None
        if not measured and fixed + sum(p.k_max * p.plane_bytes for p in proxies) > budget:
            probe = uniform_ranks(proxies, budget, fixed)
            measure_proxies(model, proxies, probe, self._probe_set(), self.batch_size, self.seed)
            predict_folding(model, proxies, report, probe, allocation.model_macs)
            measured = True
        if self.calibration is not None:
            allocation.probe_samples = min(self.probe_samples, len(self.calibration))
        allocation.ranks, allocation.steps = greedy_ranks(
            proxies, budget, fixed, latency_weight=self.latency_weight)
        if not measured:
            return  # the upper bounds fit already: nothing to estimate
        allocation.estimated_rel_error = math.sqrt(sum(p.fidelity_cost(allocation.ranks[p.name]) for p in proxies))
        cut = [(p.name, p.channels, allocation.ranks[p.name]) for p in proxies
               if allocation.ranks[p.name] < p.channels]
        if cut and self.calibration is not None:
            allocation.measured_rel_error = measured_error(model, cut, self._probe_set(), self.batch_size)
        shown = allocation.measured_rel_error
        ctx.log(f"allocate: output relative error estimated {allocation.estimated_rel_error:.3g}, measured "
                f"{'n/a' if shown is None else f'{shown:.3g}'} on {allocation.probe_samples} calibration sample(s)")

    def _probe_set(self) -> Dataset:
        assert self.calibration is not None
        count = min(self.probe_samples, len(self.calibration))
        picked = np.random.default_rng(self.seed).permutation(len(self.calibration))[:count]
        return self.calibration.subset(np.sort(picked))


# ---------------------------------------------------------------- budget and bounds

def _upper_bounds(candidates: list[FeatureMap], ceiling_plan: Plan | None) -> dict[str, int]:
    capped = {m.name: m.k for m in ceiling_plan.maps} if isinstance(ceiling_plan, Plan) else {}
    return {m.name: capped.get(m.name, m.shape[1]) for m in candidates}


def _check_feasible(budget: Ceiling, budget_bytes: int, before: int, fixed: int,
                    candidates: list[FeatureMap]) -> None:
    """Rule b: InputError when even rank 1 on every candidate is above the budget."""
    smallest = fixed + sum(plane_bytes(m) for m in candidates)
    if smallest <= budget_bytes:
        return
    ratio = before / smallest if smallest else float("inf")
    raise InputError(f"traffic budget {budget} ({budget_bytes} B) is infeasible: the stored maps total {before} B "
                     f"and at rank 1 on every compressible map ({len(candidates)}) still {smallest} B "
                     f"({format_bytes(smallest)}, {fixed} B of them not compressible); the smallest feasible "
                     f"budget is {smallest} B ({ratio:.2f}x)")


def _bare_proxies(candidates: list[FeatureMap], bounds: dict[str, int]) -> list[MapProxy]:
    """Proxies with nothing measured yet (a flat spectrum: every channel alike)."""
    proxies = []
    for m in sorted(candidates, key=lambda m: m.step):
        channels = m.shape[1]
        flat = [1.0 - k / channels for k in range(channels + 1)]
        proxies.append(MapProxy(name=m.name, shape=list(m.shape), plane_bytes=plane_bytes(m), k_max=bounds[m.name],
                                producer=m.producer, step=m.step, energy_lost=flat))
    return proxies


def _plan(report: AnalysisReport, ceiling_plan: Plan | None, proxies: list[MapProxy],
          ranks: dict[str, int]) -> Plan:
    """Rule g's plan: the cut maps in execution order, the ceiling plan's fields kept."""
    maps = [PlannedMap(name=p.name, shape=list(p.shape), k=ranks[p.name], bytes_before=p.channels * p.plane_bytes,
                       bytes_after=ranks[p.name] * p.plane_bytes, producer=p.producer, step=p.step)
            for p in proxies if ranks[p.name] < p.channels]
    if isinstance(ceiling_plan, Plan):
        return replace(ceiling_plan, maps=sorted(maps, key=lambda m: m.step))
    assert report.ceiling is not None and report.ceiling_bytes is not None
    return Plan(ceiling=report.ceiling, ceiling_bytes=report.ceiling_bytes, act_bytes=report.act_bytes,
                maps=sorted(maps, key=lambda m: m.step))


# ---------------------------------------------------------------- allocation rules

def uniform_ranks(proxies: list[MapProxy], budget_bytes: int, fixed: int) -> dict[str, int]:
    """Rule g: k = max(1, round(rho * C)) capped by k_max, for the largest rho whose total fits."""
    def ranks_at(rho: float) -> dict[str, int]:
        return {p.name: min(p.k_max, max(1, round(rho * p.channels))) for p in proxies}

    def total(ranks: dict[str, int]) -> int:
        return fixed + sum(ranks[p.name] * p.plane_bytes for p in proxies)

    low, high = 0.0, 1.0
    if total(ranks_at(high)) <= budget_bytes:
        return ranks_at(high)
    for _ in range(60):  # bisection on rho; the total only grows with it
        middle = (low + high) / 2
        low, high = (middle, high) if total(ranks_at(middle)) <= budget_bytes else (low, middle)
    return ranks_at(low)


def greedy_ranks(proxies: list[MapProxy], budget_bytes: int, fixed: int, *,
                 latency_weight: float = 0.0) -> tuple[dict[str, int], int]:
    """Rule e (with f's latency term): the ranks, and how many cut steps were taken."""
    def cost(p: MapProxy, k: int) -> float:
        return p.fidelity_cost(k) + latency_weight * p.latency_cost(k)

    ranks = {p.name: p.k_max for p in proxies}
    total = fixed + sum(p.k_max * p.plane_bytes for p in proxies)
    steps = 0
    while total > budget_bytes:
        options = [((cost(p, max(1, ranks[p.name] - p.step_size())) - cost(p, ranks[p.name]))
                    / ((ranks[p.name] - max(1, ranks[p.name] - p.step_size())) * p.plane_bytes), p.step, p)
                   for p in proxies if ranks[p.name] > 1]
        if not options:
            break  # infeasible: the caller checked this before
        _, _, chosen = min(options, key=lambda option: option[:2])
        new = max(1, ranks[chosen.name] - chosen.step_size())
        total -= (ranks[chosen.name] - new) * chosen.plane_bytes
        ranks[chosen.name] = new
        steps += 1
    _give_back_slack(proxies, ranks, budget_bytes - total, cost)
    return ranks, steps


def _give_back_slack(proxies: list[MapProxy], ranks: dict[str, int], slack: int, cost) -> None:
    """The last cut step overshoots: one channel at a time back where the cost falls most per byte."""
    while True:
        options = [((cost(p, ranks[p.name]) - cost(p, ranks[p.name] + 1)) / p.plane_bytes, -p.step, p)
                   for p in proxies if ranks[p.name] < p.k_max and p.plane_bytes <= slack]
        options = [option for option in options if option[0] > 0]
        if not options:
            return
        _, _, chosen = max(options, key=lambda option: option[:2])
        ranks[chosen.name] += 1
        slack -= chosen.plane_bytes
