"""AllocatePass: per-map ranks under a budget on the total stored feature-map traffic.

Tai et al.'s greedy dimension reduction, made cheap: instead of measuring every
candidate cut, a per-map proxy is measured once and the greedy runs on it. Rules:

a. Traffic is the sum of the bytes of every stored map with role "map" in the stored
   view (docs/design.md section 3.3), compressible or not: what crosses between kernel
   groups. Graph inputs and outputs belong to the caller and are excluded. A budget
   `Nx` is floor(that total / N); a size (`2MB`) is absolute (fmcompress.units).
b. Candidates are the compressible maps; each starts at its upper bound, C or the rank
   the ceiling plan gives it (`ctx.results["plan"]`, when compile has a ceiling too).
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

Entry point: `AllocatePass(budget, calibration).run(model, ctx)`; reads
`ctx.results["memory"]` (an analysis of this model) and, if present, the ceiling
plan `ctx.results["plan"]`; replaces `ctx.results["plan"]` with the allocated Plan
(maps with k < C, in execution order), so fit, fold, verify and measure run
unchanged. `result.data` is an `Allocation`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
from onnx import helper

from fmcompress.data import Dataset
from fmcompress.errors import InputError
from fmcompress.featuremaps import FeatureMap
from fmcompress.metrics import count_flops
from fmcompress.report import AnalysisReport
from fmcompress.units import Ceiling, format_bytes, parse_ceiling

from .base import Pass, PassContext, PassResult
from .plan import Plan, PlannedMap, plane_bytes

OBJECTIVES = ("traffic", "traffic+latency")
STRATEGIES = ("greedy", "uniform")
STEPS_PER_MAP = 16  # a cut step is max(1, C // 16) channels
PUSH_OPS = {"GlobalAveragePool", "AveragePool", "Identity", "Dropout", "Pad", "Resize", "Upsample", "Slice",
            "Split"}


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
class MapProxy:
    """What the greedy knows about one candidate map (rules c, d, f)."""

    name: str
    shape: list[int]
    plane_bytes: int
    k_max: int  # the upper bound: C, or the ceiling's rank
    producer: str
    step: int
    energy_lost: list[float]  # e(k) for k = 0..C
    probes: list[tuple[int, float]] = field(default_factory=list)  # (k, measured output relative error)
    explicit_p: bool = False  # predicted: P needs its own 1x1 conv
    explicit_u: int = 0  # predicted: readers that need their own U conv
    macs_per_rank: int = 0  # of those explicit convs, per channel of k
    latency_penalty: float = 0.0  # L: their MACs at the uniform rank / the model's MACs

    @property
    def channels(self) -> int:
        return self.shape[1]

    def step_size(self) -> int:
        return max(1, self.channels // STEPS_PER_MAP)

    def fidelity_cost(self, k: int) -> float:
        """Rule d: the squared output relative error estimated for this map alone at rank k."""
        lost = self.energy_lost[k]
        if not self.probes:
            return lost  # nothing measured: the energy itself
        xs, ys = [0.0], [0.0]
        for probe_k, error in sorted(self.probes, key=lambda probe: self.energy_lost[probe[0]]):
            if self.energy_lost[probe_k] > xs[-1]:
                xs.append(self.energy_lost[probe_k])
                ys.append(max(ys[-1], error**2))
        if lost <= xs[-1]:
            return float(np.interp(lost, xs, ys))
        slope = max(ys[-1] / xs[-1], (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])) if len(xs) > 1 else 0.0
        return ys[-1] + slope * (lost - xs[-1])

    def latency_cost(self, k: int) -> float:
        return 0.0 if k >= self.channels else self.latency_penalty


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

    def __init__(self, budget: Ceiling | str, calibration: Dataset | None = None, *, objective: str = "traffic",
                 strategy: str = "greedy", batch_size: int = 16, probe_samples: int = 32,
                 latency_weight: float = 1.0, seed: int = 0, proxies: list[MapProxy] | None = None):
        if objective not in OBJECTIVES:
            raise InputError(f"unknown objective {objective!r}; available: {', '.join(OBJECTIVES)}")
        if strategy not in STRATEGIES:
            raise InputError(f"unknown allocation {strategy!r}; available: {', '.join(STRATEGIES)}")
        if strategy == "greedy" and calibration is None and proxies is None:
            raise InputError("greedy allocation needs calibration data to measure its proxies")
        self.budget = budget if isinstance(budget, Ceiling) else parse_traffic(budget)
        self.calibration, self.objective, self.strategy = calibration, objective, strategy
        self.batch_size, self.probe_samples, self.seed = batch_size, probe_samples, seed
        self.latency_weight = latency_weight if objective == "traffic+latency" else 0.0
        self.proxies = proxies  # measured earlier for this model and budget (a sweep reuses them)

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        report = ctx.results.get("memory")
        if not isinstance(report, AnalysisReport):
            raise InputError("the allocate pass needs the memory analysis: run MemoryAnalysisPass first")
        ceiling_plan = ctx.results.get("plan")
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
        ctx.results["plan"] = allocation.plan
        ctx.log(f"allocate ({self.strategy}, {self.objective}): traffic {format_bytes(before)} -> "
                f"{format_bytes(allocation.traffic_planned)} (budget {self.budget} = {budget_bytes} B), "
                f"{len(allocation.plan.maps)} map(s) cut")
        return PassResult(model, modified=False, data=allocation)

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


# ---------------------------------------------------------------- measurements (rule c)

def measure_proxies(model: onnx.ModelProto, proxies: list[MapProxy], probe_ranks: dict[str, int],
                    data: Dataset, batch_size: int, seed: int = 0) -> None:
    """Spectra (one pass) and sensitivities (one pass per map) on `data`, in place."""
    import torch

    from fmcompress.backend.projection import (
        ChannelProjection,
        SecondMomentRecorder,
        pca_projection,
    )

    from .fit import torch_executor

    executor = torch_executor(model)
    names = list(executor.input_names)
    recorders = {p.name: SecondMomentRecorder(p.channels, seed=seed + i, stop=False) for i, p in enumerate(proxies)}
    for name, recorder in recorders.items():
        executor.set_transform(name, recorder)
    with torch.no_grad():
        reference = [executor(*inputs) for inputs in data.torch_batches(batch_size, names)]
    executor.clear_transforms()
    for proxy in proxies:
        moment = recorders[proxy.name].mean_moment()
        proxy.energy_lost = _energy_lost(moment)
        proxy.probes = []
        for k in _probe_ranks(proxy, probe_ranks[proxy.name]):
            projection = pca_projection(moment, k)
            executor.set_transform(proxy.name, ChannelProjection(projection.P, projection.U))
            proxy.probes.append((k, _relative_error(executor, data, batch_size, names, reference)))
            executor.clear_transforms()


def _energy_lost(moment) -> list[float]:
    """e(k) = the share of the trace beyond the top k eigenvalues, k = 0..C."""
    import torch

    values = torch.linalg.eigvalsh(moment).flip(0).clamp(min=0).numpy()
    total = float(values.sum())
    if total <= 0:
        return [0.0] * (len(values) + 1)
    kept = np.concatenate([[0.0], np.cumsum(values)]) / total
    return [float(max(0.0, 1.0 - share)) for share in kept]


def _probe_ranks(proxy: MapProxy, uniform_k: int) -> list[int]:
    """k_u, k_u/2, k_u/4 (distinct, 1 <= k < C): where the uniform allocation and deeper cuts land."""
    top = min(proxy.channels - 1, proxy.k_max, max(1, uniform_k))
    return sorted({max(1, top // divisor) for divisor in (1, 2, 4)}, reverse=True)


def _relative_error(executor, data: Dataset, batch_size: int, names: list[str], reference: list) -> float:
    """||y - y_ref|| / ||y_ref|| over every output of every batch (fidelity's relative_error)."""
    import torch

    diff = norm = 0.0
    with torch.no_grad():
        for inputs, ref in zip(data.torch_batches(batch_size, names), reference, strict=True):
            for out, expected in zip(executor(*inputs), ref, strict=True):
                diff += float(torch.sum((out.double() - expected.double()) ** 2))
                norm += float(torch.sum(expected.double() ** 2))
    return math.sqrt(diff / norm) if norm > 0 else 0.0


def measured_error(model: onnx.ModelProto, maps: list[tuple[str, int, int]], data: Dataset,
                   batch_size: int) -> float:
    """Rule c's check: the outputs' relative error with every cut map's PCA at its rank, fitted in
    network order with the earlier ones in place (as the fit pass does), on `data`.
    `maps`: (name, C, k) in network order."""
    import torch

    from fmcompress.backend.projection import fit_pca, install_projections

    from .fit import torch_executor

    executor = torch_executor(model)
    names = list(executor.input_names)
    with torch.no_grad():
        reference = [executor(*inputs) for inputs in data.torch_batches(batch_size, names)]
    projections = fit_pca(executor, maps, lambda: data.torch_batches(batch_size, names))
    install_projections(executor, projections)
    try:
        return _relative_error(executor, data, batch_size, names, reference)
    finally:
        executor.clear_transforms()


# ---------------------------------------------------------------- folding prediction (rule f)

class _Graph:
    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in dict.fromkeys(node.input):
                self.consumers.setdefault(name, []).append(node)
        self.constants = {init.name for init in graph.initializer}
        self.constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
        self.outputs = {out.name for out in graph.output}


def predict_folding(model: onnx.ModelProto, proxies: list[MapProxy], report: AnalysisReport,
                    uniform: dict[str, int], model_macs: int) -> None:
    """Rule f: explicit P and U convs each candidate's projection will need, and what they cost."""
    graph = _Graph(model)
    compressible = {m.name for m in report.stored if m.compressible}
    for proxy in proxies:
        proxy.explicit_p = not _p_folds(graph, proxy.name)
        proxy.explicit_u = _explicit_readers(graph, proxy.name, compressible, depth=0)
        positions = math.prod(proxy.shape) // proxy.channels  # N * H * W (or N * L)
        proxy.macs_per_rank = positions * proxy.channels * (int(proxy.explicit_p) + proxy.explicit_u)
        proxy.latency_penalty = proxy.macs_per_rank * uniform[proxy.name] / max(model_macs, 1)


def _group_one_conv(graph: _Graph, node: onnx.NodeProto) -> bool:
    group = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1)
    return node.op_type in ("Conv", "ConvTranspose") and group == 1 and len(node.input) > 1 \
        and node.input[1] in graph.constants


def _p_folds(graph: _Graph, name: str) -> bool:
    producer = graph.producer.get(name)
    if producer is not None and producer.op_type == "BatchNormalization":  # folded into its conv first
        source = producer.input[0]
        if len(graph.consumers.get(source, [])) != 1:
            return False
        producer = graph.producer.get(source)
    return producer is not None and _group_one_conv(graph, producer)


def _explicit_readers(graph: _Graph, name: str, compressible: set[str], depth: int) -> int:
    explicit = int(name in graph.outputs)
    for reader in graph.consumers.get(name, []):
        explicit += _reader_needs_u(graph, reader, name, compressible, depth)
    return explicit


def _reader_needs_u(graph: _Graph, reader: onnx.NodeProto, name: str, compressible: set[str], depth: int) -> int:
    if _group_one_conv(graph, reader) and reader.input[0] == name and name not in reader.input[1:]:
        return 0  # rule b
    if reader.op_type in ("Shape", "Size"):
        return 0  # rule f
    if reader.op_type == "Add" and reader.output[0] in compressible:
        return 0  # rule g: the linear residual stream, when its sum is projected too
    if reader.op_type in PUSH_OPS and reader.input[0] == name and depth < 4:
        # rules c, d: U moves on; what its readers need decides (at most one U per reader)
        return min(1, sum(_explicit_readers(graph, out, compressible, depth + 1) for out in reader.output if out))
    return 1  # rule h
