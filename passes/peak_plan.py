"""PeakPlanPass: the per-allocation ceiling that keeps onnxruntime's live peak under a size
(compile --peak), and VerifyPeakPass, which holds the emitted model to it.

`--ceiling --runtime ort` caps every onnxruntime allocation; what a chip must hold is the
sum of those alive at once, the runtime view's live peak (passes/runtime.py rule f). This
pass chooses the ceiling that tiling (and, where tiling alone cannot, projections) works to.
Rules:

a. The peak: the runtime view's live peak (graph inputs excepted, outputs counted) of the
   model as compile would emit it, at `level` (the report's level: `--ort-level`, else
   `all`, what a user's session runs and what VerifyPeakPass measures). The model "as
   emitted" at a ceiling c is what `probe(c)` gives: compile's own planning passes at c
   (stored plan, runtime view, Concats sunk, runtime plan), shape-only projections of the
   planned ranks (`ShapeProjectionsPass`: random orthonormal P, the shapes are what count),
   BatchNorm and projections folded, TileToCeilingPass; value_info dropped as compile does.
b. The search: c starts at the largest ceiled allocation of the input (no tiling at all),
   capped by `--ceiling` when given, and steps down by a factor sqrt(2) until the peak is at
   most the size or the probe fails (a ceiling nothing tiles or projects under), at most
   down to `MIN_CEILING`; it then bisects (`REFINE_STEPS` times, in log space) between the
   last two ceilings for the largest that meets the size, or, when none met it, for the
   smallest that the probe still takes (where the peak is lowest). Integer KiB ceilings. A
   refusal with InputError at the first ceiling, where nothing is tiled, is the model's own
   and is raised (exit 2); below it, any refusal only marks a ceiling the planner cannot take.
b'. The walk down also stops once `STALL_STEPS` ceilings in a row have peaks above the lowest
   found so far (and none met the size): below the ceiling of the lowest peak, more bands
   and projections hold more than they save, while each probe's graph, and the time to
   quantize it under --int8, keeps growing (MobileNetV2-224 `--peak 172KB --int8`: an int8
   peak of 253 KiB at a 48 KiB ceiling and 308 KiB at 32 KiB; the walk went on to graphs
   of 16,000 nodes and had not finished after 30 CPU-minutes). It then bisects between the
   lowest peak's ceiling and the one below it, as for a refusal.
c. The choice: of the trials whose peak is at most the size, the largest ceiling that tiling
   alone meets (lossless: the runtime plan projects nothing), else the largest ceiling: larger
   ceilings project less, so where tiling alone cannot reach the size this takes the fewest
   projections that do. None
   meets it: VerificationError (exit 1, before any data is loaded) naming the smallest
   peak found, its ceiling and the tensors alive at it.
d. `ctx.memory`, `ctx.before` and `ctx.plan` are then those of the input at the chosen
   ceiling (what MemoryAnalysisPass and PlanPass give there); compile's runtime passes plan
   on from them. `ctx.peak` is the `PeakPlan`: the size, the chosen ceiling, the predicted
   peak, lossless or not, every trial, and the tensors alive at the peak before and after.
e. Long-lived tensors: a tensor alive at the peak step, produced before it, read after it
   but not at it, and alive for at least `LONG_LIVED_STEPS` steps: it is held across the
   peak for a later reader (a skip connection, a region's start kept for its later bands).
   When they hold at least a third of the peak's bytes the peak is said to be set by them.
f. VerifyPeakPass: the emitted model's computed peak (rule a's view, value_info dropped) at
   most the size; then, where `measure`, its measured peak (fmcompress.memprobe, a fresh
   process, the model as it will be written, at `level`) too; either over: VerificationError,
   nothing written. Where the platform cannot measure, the reason is recorded and the
   computed figure stands. `ctx.verification["peak"]` holds the figures.
g. int8 (`compile --peak --int8`): the probes plan and tile the float graph with every map at
   one byte (`ctx.act_bytes` 1, as `--int8` plans; the band planner sizes bands by the
   integer convs' buffers, passes/tile_bands.py), then quantize it as QuantizePass will
   (`ShapeQuantizePass`: onnxruntime's tools with placeholder ranges and no calibration run,
   fmcompress/int8.py rule e; the ranges do not matter, the int8 graph's tensors and buffers
   do), and
   the trial's peak is that int8 graph's, every tensor at its own dtype's size (uint8 maps,
   the input's uint8 copy, float tensors left, integer convs' workspaces). VerifyPeakPass
   runs after QuantizePass on the int8 model itself, sized the same way: that is what the
   size holds for.
h. No size (`--peak lossless`, and `--int8` alone): the smallest peak that tiling alone
   reaches. The search steps down from rule b's start while the trials stay lossless,
   bisects (`REFINE_STEPS`) between the last lossless ceiling and the first that projects
   or is refused, and takes, of the lossless trials whose peak is within `NEAR_LOWEST` of
   the lowest, the largest ceiling (fewer bands, less recomputation for nearly the same
   peak). Nothing is projected, so nothing is fitted; VerifyPeakPass records the emitted
   model's figures and holds it to no size.

Entry point: `PeakPlanPass(peak_bytes or None, probe=lambda c: peak_probe(c, "extended"), level="all",
plan_level="extended").run(model, ctx)` (`fmcompress.compiler.peak_probe`);
`peak_search(...)` is the search alone (examples/peak_sweep.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from fmcompress.errors import FmcError, InputError, VerificationError
from fmcompress.featuremaps import FeatureMap, Projection
from fmcompress.int8 import quantized_layout
from fmcompress.memprobe import measure_peak
from fmcompress.reports.analysis import RuntimeView
from fmcompress.units import Ceiling, format_bytes

from .base import Pass, PassContext, PassResult, Pipeline
from .graph import Model
from .memory import analyze_stored
from .plan import carried_planes, plan_from_report
from .quantize import own_dtypes
from .runtime import CEILED_ROLES, analyze_runtime

Probe = Callable[[int], Pipeline]  # a ceiling in bytes -> compile's passes up to tiling (rule a)
KIB = 1024
MIN_CEILING = 4 * KIB  # rule b
STEP = math.sqrt(2)
REFINE_STEPS = 3
STALL_STEPS = 2  # rule b'
LONG_LIVED_STEPS = 3  # rule e
LONG_LIVED_SHARE = 1 / 3
LISTED = 12  # tensors listed per peak
NEAR_LOWEST = 1.1  # rule h: a peak within a tenth of the lowest lossless one is as good


@dataclass
class PeakTrial:
    """One probe (rule a): the ceiling, its peak (None: the probe failed) and what it projects."""

    ceiling_bytes: int
    peak_bytes: int | None
    lossless: bool = True
    projected: list[str] = field(default_factory=list)
    reason: str = ""
    view: RuntimeView | None = field(default=None, repr=False)
    error: FmcError | None = field(default=None, repr=False)  # why the probe refused

    def to_dict(self) -> dict:
        return {"ceiling_bytes": self.ceiling_bytes, "peak_bytes": self.peak_bytes, "lossless": self.lossless,
                "projected": self.projected, "reason": self.reason}


@dataclass
class PeakPlan:
    """Rule d: what the search chose and why."""

    peak_bytes: int | None  # the size asked for (None: the smallest lossless, rule h)
    level: str
    ceiling_bytes: int  # the chosen per-allocation ceiling
    predicted_peak_bytes: int
    lossless: bool
    before_peak_bytes: int
    trials: list[PeakTrial]
    before: dict = field(default_factory=dict)  # `peak_facts` of the input's view
    after: dict = field(default_factory=dict)  # `peak_facts` of the predicted emitted view

    def to_dict(self) -> dict:
        data = {key: value for key, value in asdict(self).items() if key != "trials"}
        data["trials"] = [trial.to_dict() for trial in self.trials]
        return data


# ---------------------------------------------------------------- the peak and its tensors

def long_lived(tensor: FeatureMap, step: int, node: str) -> bool:
    """Rule e; `node` is the label of the node run at `step`."""
    return (tensor.step < step < tensor.last_use and tensor.last_use - tensor.step >= LONG_LIVED_STEPS
            and node not in tensor.consumers)


def peak_facts(view: RuntimeView, listed: int = LISTED) -> dict:
    """The peak of `view`, its step and node, and the tensors alive there (largest first, rule e's
    flag on each); `set_by_long_lived` when long-lived ones hold at least half its bytes."""
    step = view.peak_step
    alive = sorted(view.alive_at(step), key=lambda t: -t.bytes) if step >= 0 else []
    node = view.live[step].node if 0 <= step < len(view.live) else ""
    lasting = sum(t.bytes for t in alive if long_lived(t, step, node))
    return {"peak_bytes": view.peak_bytes, "step": step, "node": node,
            "long_lived_bytes": lasting,
            "set_by_long_lived": bool(view.peak_bytes) and lasting >= LONG_LIVED_SHARE * view.peak_bytes,
            "alive": [{"name": t.name, "bytes": t.bytes, "shape": t.shape, "role": t.role, "op": t.producer_op,
                       "step": t.step, "last_use": t.last_use, "long_lived": long_lived(t, step, node)}
                      for t in alive[:listed]],
            "alive_count": len(alive)}


def arena(view: RuntimeView) -> dict:
    """The live bytes of every execution step of `view` (report.json `runtime.arena`)."""
    return {"level": view.level, "peak_bytes": view.peak_bytes, "peak_step": view.peak_step,
            "steps": [point.node for point in view.live], "bytes": [point.bytes for point in view.live]}


def alive_note(facts: dict, count: int = 3) -> str:
    """`a (784.0 KiB, long-lived), b (...)`: the largest tensors alive at a peak."""
    return ", ".join(f"{t['name']} ({format_bytes(t['bytes'])}{', long-lived' if t['long_lived'] else ''})"
                     for t in facts["alive"][:count])


# ---------------------------------------------------------------- rule a: one probe

def _sizing(ctx: PassContext) -> PassContext:
    """Rule g: an int8 model's tensors count at their own dtypes, not at the plan's one byte."""
    return ctx if ctx.quantization is None else own_dtypes(ctx)


class ShapeQuantizePass(Pass):
    """Rule g: the probe's model quantized as QuantizePass will quantize the real one, with
    placeholder ranges (fmcompress/int8.py rule e: the int8 graph's shapes, not its ranges, count)."""

    name = "shape-quantize"
    provides = ("quantization",)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        ctx.quantization = {"probe": True}  # rule g: the trial's view sizes this graph at its own dtypes
        return PassResult(Model.of(quantized_layout(model.proto(), ctx.input_shapes)), modified=True)


class ShapeProjectionsPass(Pass):
    """Rule a: a random orthonormal projection of every planned map's rank (U = P^T), so that the
    folded and tiled graph has the shapes the fitted one will have. They go into `into`, the dict
    the probe's FoldProjectionsPass was given (fitting stays FitProjectionsPass's: this pass
    provides no context field)."""

    name = "shape-projections"
    requires = ("plan",)

    def __init__(self, into: dict[str, Projection]):
        self.into = into

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        rng = np.random.default_rng(0)
        self.into.clear()
        for fmap in ctx.plan.maps:
            q, _ = np.linalg.qr(rng.standard_normal((fmap.channels, fmap.k)))
            self.into[fmap.name] = Projection(q.T, q)
        return PassResult(model, modified=False, data=self.into)


def written(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` as compile writes it, for onnxruntime's memory: value_info dropped (compiler.py)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.value_info[:]
    return copy


def probe_peak(model: onnx.ModelProto, ctx: PassContext, ceiling_bytes: int, probe: Probe,
               level: str) -> PeakTrial:
    """Rule a at one ceiling; a probe that refuses gives a trial without a peak (a refusal at the
    search's first ceiling, where nothing is tiled, is the model's own: `peak_search` raises it)."""
    local = PassContext(input_shapes=dict(ctx.input_shapes), act_bytes=ctx.act_bytes)
    try:
        emitted, local = probe(ceiling_bytes).run(Model.from_proto(model), local)
    except (VerificationError, InputError) as exc:
        return PeakTrial(ceiling_bytes, None, lossless=False, reason=str(exc), error=exc)
    view = analyze_runtime(written(emitted.proto()), _sizing(local), level)
    projected = [m.name for m in local.plan.maps]
    return PeakTrial(ceiling_bytes, view.peak_bytes, lossless=not projected, projected=projected, view=view)


# ---------------------------------------------------------------- rule b: the search

def peak_search(model: onnx.ModelProto, ctx: PassContext, peak_bytes: int | None, probe: Probe, level: str,
                highest: int, log: Callable[[str], None] = lambda message: None) -> list[PeakTrial]:
    """Rule b (rule h when `peak_bytes` is None): every trial, in the order made."""
    trials: list[PeakTrial] = []

    def trial(ceiling: int) -> PeakTrial:
        done = probe_peak(model, ctx, ceiling, probe, level)
        trials.append(done)
        figure = "refused" if done.peak_bytes is None else format_bytes(done.peak_bytes)
        log(f"peak plan: ceiling {format_bytes(ceiling)} -> peak {figure}"
            f"{'' if done.lossless or done.peak_bytes is None else f' ({len(done.projected)} projected)'}")
        return done

    above = trial(highest)
    if isinstance(above.error, InputError):
        raise above.error
    if _meets(above, peak_bytes):
        return trials
    ceiling, best, stalled = highest, above, 0
    while ceiling > MIN_CEILING:
        lower = max(MIN_CEILING, _kib(ceiling / STEP))
        if lower >= ceiling:
            break
        below = trial(lower)
        if peak_bytes is None:  # rule h: down while tiling alone takes it; then its smallest ceiling
            if not _tiled_alone(below):
                _refine(trial, lower, ceiling, _tiled_alone, largest=False)
                break
        elif below.peak_bytes is None:  # the smallest ceiling the probe takes (the lowest peak)
            _refine(trial, lower, ceiling, _taken, largest=False)
            break
        elif _meets(below, peak_bytes):  # the largest that meets
            _refine(trial, lower, ceiling, lambda done: _meets(done, peak_bytes), largest=True)
            break
        elif best.peak_bytes is not None and below.peak_bytes >= best.peak_bytes:
            stalled += 1
            if stalled >= STALL_STEPS:  # rule b': lower ceilings stopped lowering the peak
                _refine(trial, _kib(best.ceiling_bytes / STEP), best.ceiling_bytes, _lower_than(best), largest=False)
                break
        else:
            best, stalled = below, 0
        ceiling = lower
    return trials


def _refine(trial: Callable[[int], PeakTrial], low: int, high: int, good: Callable[[PeakTrial], bool],
            largest: bool) -> None:
    """Rules b and h's bisection between `low` and `high`, one of them `good`: for the largest good
    ceiling (`low` is good) or the smallest (`high` is)."""
    for _ in range(REFINE_STEPS):
        middle = _kib(math.sqrt(low * high))
        if not low < middle < high:
            return
        if good(trial(middle)) == largest:
            low = middle
        else:
            high = middle


def _meets(trial: PeakTrial, peak_bytes: int | None) -> bool:
    return peak_bytes is not None and trial.peak_bytes is not None and trial.peak_bytes <= peak_bytes


def _lower_than(best: PeakTrial) -> Callable[[PeakTrial], bool]:
    """Rule b': the bisection's good side, a trial whose peak is below `best`'s (a refusal is not)."""
    def lower(trial: PeakTrial) -> bool:
        return trial.peak_bytes is not None and trial.peak_bytes < best.peak_bytes
    return lower


def _taken(trial: PeakTrial) -> bool:
    return trial.peak_bytes is not None


def _tiled_alone(trial: PeakTrial) -> bool:
    return trial.peak_bytes is not None and trial.lossless


def _kib(value: float) -> int:
    return max(KIB, int(value) // KIB * KIB)


def choose(trials: list[PeakTrial], peak_bytes: int | None) -> PeakTrial | None:
    """Rule c: the largest lossless ceiling that meets the size, else the largest that does;
    rule h without a size."""
    if peak_bytes is None:
        return smallest_lossless(trials)
    met = [t for t in trials if _meets(t, peak_bytes)]
    return max(met, key=lambda t: (t.lossless, t.ceiling_bytes), default=None)


def smallest_lossless(trials: list[PeakTrial]) -> PeakTrial | None:
    """Rule h: of the lossless trials within `NEAR_LOWEST` of the lowest peak, the largest ceiling."""
    lossless = [t for t in trials if _tiled_alone(t)]
    if not lossless:
        return None
    lowest_peak = min(t.peak_bytes for t in lossless)
    return max((t for t in lossless if t.peak_bytes <= NEAR_LOWEST * lowest_peak), key=lambda t: t.ceiling_bytes)


def lowest(trials: list[PeakTrial]) -> PeakTrial | None:
    taken = [t for t in trials if _taken(t)]
    return min(taken, key=lambda t: (t.peak_bytes, -t.ceiling_bytes), default=None)


def highest_ceiling(view: RuntimeView, ceiling_bytes: int | None) -> int:
    """Rule b's start: the largest ceiled allocation (no tiling), capped by --ceiling."""
    largest = max((t.bytes for t in view.tensors if t.role in CEILED_ROLES), default=KIB)
    return max(KIB, min(largest, ceiling_bytes) if ceiling_bytes else largest)


def unmet_message(peak_bytes: int | None, trials: list[PeakTrial], level: str) -> str:
    """Rule c's refusal, one line."""
    best = lowest(trials)
    if peak_bytes is None:  # rule h: even the untiled model was refused
        return f"onnxruntime's peak cannot be planned: {trials[-1].reason if trials else 'no trial'}"
    if best is None:
        return (f"onnxruntime's peak cannot be brought to {format_bytes(peak_bytes)}: no ceiling could be tiled "
                f"or projected under ({trials[-1].reason if trials else 'no trial'})")
    facts = peak_facts(best.view) if best.view is not None else {"alive": [], "set_by_long_lived": False}
    lasting = "; set by long-lived tensors (skip connections)" if facts["set_by_long_lived"] else ""
    return (f"onnxruntime's peak cannot be brought to {format_bytes(peak_bytes)} ({level}): the smallest found is "
            f"{format_bytes(best.peak_bytes)} at a ceiling of {format_bytes(best.ceiling_bytes)}"
            f"{'' if best.lossless else ' with projections'}; alive there: {alive_note(facts)}{lasting}")


# ---------------------------------------------------------------- the passes

class PeakPlanPass(Pass):
    """Rules a-e: chooses the ceiling, then plans the input at it as MemoryAnalysisPass and PlanPass do."""

    name = "peak-plan"
    provides = ("peak", "plan", "memory", "before")

    def __init__(self, peak_bytes: int | None, *, probe: Probe, level: str, plan_level: str,
                 ceiling: Ceiling | None = None, source: str = ""):
        self.peak_bytes = peak_bytes
        self.probe = probe
        self.level = level  # where the peak is judged (rule a)
        self.plan_level = plan_level  # where the ceiling is held (the runtime passes')
        self.ceiling = ceiling  # --ceiling: the largest per-allocation ceiling allowed
        self.source = source

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        proto = model.proto()
        cap = analyze_stored(proto, ctx, self.ceiling).ceiling_bytes if self.ceiling is not None else None
        before = analyze_runtime(proto, ctx, self.level)
        held = before if self.plan_level == self.level else analyze_runtime(proto, ctx, self.plan_level)
        highest = highest_ceiling(held, cap)
        trials = peak_search(proto, ctx, self.peak_bytes, self.probe, self.level, highest, ctx.log)
        chosen = choose(trials, self.peak_bytes)
        if chosen is None:
            raise VerificationError(unmet_message(self.peak_bytes, trials, self.level))
        ctx.peak = PeakPlan(self.peak_bytes, self.level, chosen.ceiling_bytes, chosen.peak_bytes, chosen.lossless,
                            before.peak_bytes, trials, peak_facts(before), peak_facts(chosen.view))
        ceiling = Ceiling(bytes=chosen.ceiling_bytes, text=format_bytes(chosen.ceiling_bytes))
        ctx.memory = analyze_stored(proto, ctx, ceiling, self.source)
        ctx.before = ctx.before or ctx.memory
        ctx.plan = plan_from_report(ctx.memory, carried_planes(proto, ctx.memory), refuse_infeasible=False)
        bound = (f"<= {format_bytes(self.peak_bytes)}" if self.peak_bytes is not None
                 else f"from {format_bytes(before.peak_bytes)}, the smallest tiling alone reaches")
        ctx.log(f"peak plan: ceiling {format_bytes(chosen.ceiling_bytes)}, predicted peak "
                f"{format_bytes(chosen.peak_bytes)} {bound} "
                f"({'tiling alone, lossless' if chosen.lossless else f'{len(chosen.projected)} map(s) projected'})")
        return PassResult(model, modified=False, data=ctx.peak)


class VerifyPeakPass(Pass):
    """Rule f: the emitted model's peak, computed and measured, at most the size."""

    name = "verify-peak"
    requires = ("verification",)

    def __init__(self, peak_bytes: int | None, level: str, *, measure: bool = True, rounds: int = 5):
        self.peak_bytes = peak_bytes
        self.level = level
        self.measure = measure
        self.rounds = rounds

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        emitted = written(model.proto())
        view = analyze_runtime(emitted, _sizing(ctx), self.level)
        figures = {"peak_bytes": self.peak_bytes, "level": self.level, "computed_peak_bytes": view.peak_bytes,
                   "measured_peak_bytes": None, "measure_note": None, "rounds": []}
        if self.peak_bytes is not None and view.peak_bytes > self.peak_bytes:  # rule h: no size to hold
            raise VerificationError(self._over(view.peak_bytes, "computed", peak_facts(view)))
        if self.measure:
            measured = measure_peak(emitted, ctx.input_shapes, level=self.level, rounds=self.rounds)
            figures.update(measured_peak_bytes=measured.bytes, rounds=measured.rounds,
                           measure_note=f"{measured.reason}; the computed figure stands" if measured.bytes is None
                           else None)
            if measured.bytes is not None and self.peak_bytes is not None and measured.bytes > self.peak_bytes:
                raise VerificationError(self._over(measured.bytes, "measured", peak_facts(view)))
        else:
            figures["measure_note"] = "not measured (switched off); the computed figure stands"
        if figures["measure_note"]:
            ctx.log(f"peak: {figures['measure_note']}")
        figures["ok"] = True
        ctx.verification["peak"] = figures
        return PassResult(model, modified=False, data=figures)

    def _over(self, figure: int, kind: str, facts: dict) -> str:
        return (f"the emitted model's onnxruntime peak is {format_bytes(figure)} {kind} ({self.level}), above "
                f"--peak {format_bytes(self.peak_bytes)}; alive at the computed peak: {alive_note(facts)}; "
                f"nothing was written")
