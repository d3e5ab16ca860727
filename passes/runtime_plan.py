"""RuntimePlanPass: which regions to tile, and which maps to project, so that every tensor
onnxruntime allocates fits under the ceiling (compile --runtime ort).

Inputs: the runtime view of the model (`ctx.runtime`, passes/runtime.py) made with the
ceiling, and the stored view and its plan (`ctx.memory`, `ctx.plan`) for what can be projected.
Rules:

a. The tensors to bring under the ceiling are the runtime view's allocations above it
   (graph inputs excepted: the caller owns them), in execution order. Convolution
   scratch (role "workspace") is SplitConvPass's job, after tiling.
b. For the first one not yet covered, t, candidate regions of passes/tile.py contain t's
   producer: `end` is one of the next `window` tensors from t on; its starts are the
   frontier found walking back from `end`, where every graph input and every tensor that
   fits (at or under the ceiling, a map an earlier region projects, or one value per
   channel) stops the walk (the main start, then side inputs: tile rule a'), except
   tensors computed from t: the region must contain t's producer, so a small tensor
   between t and `end` (YOLOv8's C2f Split halves) is computed in bands too. The region
   must be valid (tile rule a: no intermediate read outside it). A region is feasible when some band count keeps every band
   tensor at or under the ceiling (`bands_for_budget`), or, where none does, some 2-D patching
   (tile rule c', `patches_for_budget`: `PlannedRegion.columns`).
c. Tiling alone is lossless, so an end at or under the ceiling (or a graph output, which
   the caller receives whole, or one whose one reader is a Concat along its row axis whose
   output is either: the bands are spliced into it, tile rule f') wins: the first feasible
   one, which recomputes the fewest halo rows. Otherwise (`allow_projection`) the end is
   a compressible stored map above the ceiling that compile projects to
   k = ceiling // (bytes of one channel), so the concatenated band outputs are stored
   narrow; of those the furthest feasible end wins, which needs the fewest projections.
d. Everything the chosen region computes counts as covered; a tensor that no feasible
   region covers is listed in `uncovered` (the caller reports it: the ceiling cannot
   hold in onnxruntime).
e. A plan made with `allow_projection` is for the original graph; compile folds the
   projections, then plans again without them on the folded graph, where every region
   end fits, and tiles with that second plan.

f. Squeeze-excitation: a GlobalAveragePool whose input is above the ceiling is computed
   from bands of that input (tile rule i), recomputed from the nearest start that fits
   (where none is near enough, as in a pre-activation ResNet whose every residual map is
   above the ceiling, from the nearest map a projection makes fit, which is then projected);
   its gate then reaches the region that multiplies the map as a per-channel side
   input. Regions are planned on the graph so rewritten; a map only the pool read (a
   SqueezeNet's classifier conv) is then computed in its bands alone: covered.

g. The maps to project are the chosen region ends; where some allocation no region covers
   (a Resize or Concat of a feature pyramid, which bands cannot cross), every stored map of
   the plan above the ceiling is projected too: U is then carried through those ops and
   they run narrow. `ctx.plan` keeps its ceiling and takes those maps. Before any data is
   loaded, each such allocation must be one projecting can bring under the ceiling: a
   planned map, a tensor U is pushed to from one (passes/ops.py FOLD_PUSH_OPS: it runs on
   k channels), or one a region covers once every planned map and those tensors fit
   (`_Planner.beyond_projection`); otherwise compile stops with `uncovered_message`
   (VerificationError, exit 1), the refusal TileToCeilingPass would give after the fit.
   Allocations the runtime view names but the graph does not (rule h finds none) are left to
   that pass.

h. Names (passes/runtime_names.py): an allocation the graph lacks (what onnxruntime inlines or
   fuses) stands for the graph tensor it becomes, and a region covering it must also contain
   the graph tensors above the ceiling that the fusion hides (they reappear in bands).

Entry point: `RuntimePlanPass(allow_projection=True).run(model, ctx)`; the model is not
changed; `ctx.runtime_plan` and `result.data` are the `RuntimePlan`. `TileToCeilingPass(ceiling_bytes)` is rule e's
second half: runtime view, plan without projections, tile.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import onnx

from fmcompress.errors import InputError, VerificationError
from fmcompress.featuremaps import FeatureMap
from fmcompress.reports.analysis import AnalysisReport, RuntimeView
from fmcompress.shapes import infer_tensor_infos, resolve_input_shapes

from .base import Pass, PassContext, PassResult
from .chunk_batch_axes import ChunkBatchAxesPass
from .chunk_positions import ChunkPositionsPass
from .covering import CoveringRewrite
from .graph import Model
from .ops import FOLD_PUSH_OPS
from .plan import Plan, PlannedMap, carried_planes, planned_map, ranked_plane_bytes
from .runtime import DEFAULT_LEVEL, analyze_runtime
from .runtime_names import fused_away, runtime_names
from .split_columns import SplitColumnsPass
from .split_conv import SplitConvPass
from .tile import (
    Region,
    TilePass,
    bands_for_budget,
    patches_for_budget,
    pool_model,
    row_axes,
    tileable_region,
    walk_back,
)


@dataclass
class PlannedRegion:
    starts: list[str]  # the main start, then side inputs (tile rule a')
    end: str
    bands: int
    projected: bool  # the end is a map compile projects (rule c)
    covers: list[str]  # the over-ceiling runtime tensors it brings under the ceiling
    columns: int = 1  # column patches a band (tile rule c'): where no row bands fit


@dataclass
class PlannedPool:
    start: tuple[str, ...]
    pool: str  # a GlobalAveragePool node whose input is above the ceiling (tile rule i)
    bands: int


@dataclass
class RuntimePlan:
    ceiling_bytes: int
    regions: list[PlannedRegion] = field(default_factory=list)
    pools: list[PlannedPool] = field(default_factory=list)
    projected: list[PlannedMap] = field(default_factory=list)
    uncovered: list[FeatureMap] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"ceiling_bytes": self.ceiling_bytes,
                "regions": [vars(r) for r in self.regions],
                "pools": [vars(p) for p in self.pools],
                "projected": [m.name for m in self.projected],
                "uncovered": [{"name": t.name, "bytes": t.bytes, "producer_op": t.producer_op}
                              for t in self.uncovered]}


class RuntimePlanPass(Pass):
    """Plans tiling regions (and projections at their ends) for the runtime view's ceiling."""

    name = "runtime-plan"
    provides = ("runtime_plan", "plan")

    def __init__(self, *, allow_projection: bool = True, window: int = 200):
        self.allow_projection = allow_projection
        self.window = window

    @property
    def requires(self) -> tuple[str, ...]:
        return ("runtime", "memory", "plan") if self.allow_projection else ("runtime",)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if ctx.runtime is None or ctx.runtime.ceiling_bytes is None:
            raise InputError("the runtime plan needs a runtime view made with a ceiling: run RuntimeMemoryPass first")
        if self.allow_projection and ctx.memory is None:
            raise InputError("the runtime plan needs the stored view to project: run MemoryAnalysisPass first")
        plan, planner = _plan_and_planner(model.proto(), ctx, self.allow_projection, self.window)
        plan.uncovered = rewrites_uncovered(model.proto(), plan.uncovered, plan.ceiling_bytes, ctx, planner.aliases)
        ctx.runtime_plan = plan
        if self.allow_projection and ctx.plan is not None:
            hopeless = planner.beyond_projection(plan.uncovered, ctx.plan.maps) if plan.uncovered else []
            if hopeless:
                raise VerificationError(uncovered_message(hopeless, plan.ceiling_bytes))
            ctx.plan = _projected_plan(ctx.plan, plan, ctx)
        return PassResult(model, modified=False, data=plan)


def plan_runtime(model: onnx.ModelProto, ctx: PassContext, allow_projection: bool,
                 window: int = 200) -> RuntimePlan:
    """Rules a-f on `model`, with the runtime and stored views of `ctx`."""
    return _plan_and_planner(model, ctx, allow_projection, window)[0]


def _plan_and_planner(model: onnx.ModelProto, ctx: PassContext, allow_projection: bool,
                      window: int = 200) -> tuple[RuntimePlan, _Planner]:
    """`plan_runtime`, and the planner that made it (for rule g's check)."""
    view, stored = ctx.runtime, ctx.memory if allow_projection else None
    planner = _Planner(model, ctx, view, stored, allow_projection, window)
    planner.aliases = runtime_names(model, view, planner.shapes)
    pools = planner.pools()
    if pools:  # plan the regions on the graph whose pools run in bands (rule f)
        banded = Model.from_proto(model)  # a copy to plan on: the model itself stays as it is
        with_pools_in_bands(banded, pools, ctx)
        before = planner
        planner = _Planner(banded.proto(), ctx, view, stored, allow_projection, window,
                           candidates=before.order)
        planner.aliases = before.aliases
        planner.projected = dict(before.projected)  # the starts of pools that recompute from a projection
        planner.pooled = set(before.producers) - set(planner.producers)  # read only by a banded pool
    plan = planner.plan()
    plan.pools = pools
    return plan, planner


def _projected_plan(stored_plan: Plan, runtime_plan: RuntimePlan, ctx: PassContext) -> Plan:
    """Rule g."""
    maps = runtime_plan.projected
    if runtime_plan.uncovered:
        chosen = {m.name for m in maps}
        maps = sorted([*maps, *(m for m in stored_plan.maps if m.name not in chosen)], key=lambda m: m.step)
        ctx.log(f"runtime plan: {len(runtime_plan.uncovered)} allocation(s) no band covers; projecting every "
                f"stored map above the ceiling too")
    ctx.log(f"runtime plan: {len(runtime_plan.regions)} tiled region(s), {len(maps)} projected map(s)")
    return replace(stored_plan, maps=maps)


class _Planner:
    def __init__(self, model: onnx.ModelProto, ctx: PassContext, view: RuntimeView, stored: AnalysisReport | None,
                 allow_projection: bool, window: int, candidates: list[str] | None = None):
        self.model = model
        self.ceiling = int(view.ceiling_bytes or 0)
        self.view = view
        self.act_bytes = ctx.act_bytes
        self.shapes = resolve_input_shapes(model, ctx.input_shapes)
        self.infos = infer_tensor_infos(model, self.shapes)
        self.layout = row_axes(model.graph, self.infos)  # every region's starts' row axes (tile rule a'')
        self.window = window
        self.inputs = set(self.shapes)
        self.outputs = {out.name for out in model.graph.output}
        # data tensors only: exporters such as paddle2onnx open the graph with hundreds of Constants
        self.order: list[str] = list(self.inputs) + [o for n in model.graph.node if n.op_type != "Constant"
                                                      for o in n.output if o]
        if candidates is not None:  # the graph's own tensors, not the band copies a pool rewrite added
            known = set(candidates)
            self.order = [name for name in self.order if name in known]
        self.position = {name: i for i, name in enumerate(self.order)}
        self.projectable = {m.name: m for m in stored.stored if m.compressible} if allow_projection and stored else {}
        self.carried = carried_planes(model, stored) if self.projectable else {}
        self.projected: dict[str, PlannedMap] = {}
        self.narrow: set[str] = set()  # rule g's check: tensors that fit once projections are folded
        self.regions: dict[tuple[tuple[str, ...], str], Region] = {}
        self.downstream: dict[str, set[str]] = {}
        self.producers = {out: node for node in model.graph.node for out in node.output if out}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.constants = {init.name for init in model.graph.initializer} - self.inputs
        self.constants |= {node.output[0] for node in model.graph.node if node.op_type == "Constant"}
        self.aliases: dict[str, str] = {}  # runtime name -> graph name (rule h)
        self.pooled: set[str] = set()  # computed only in the bands of a pool (rule f)

    def plan(self) -> RuntimePlan:
        result = RuntimePlan(self.ceiling)
        covered: set[str] = set()
        for names, tensor in self._targets():
            if all(name in covered or name in self.pooled for name in names):
                continue
            choice = self._best_region(names) if all(name in self.position for name in names) else None
            if choice is None:
                if not any(t is tensor for t in result.uncovered):
                    result.uncovered.append(tensor)
                continue
            region, bands, columns, projected = choice
            inside = {n for node in region.nodes for n in node.output}
            covered |= inside
            if projected:
                self.projected[region.end] = planned_map(self.projectable[region.end], self.ceiling, self.carried)
            over = [t.name for t in self.view.over_ceiling() if self.aliases.get(t.name, t.name) in inside]
            result.regions.append(PlannedRegion(list(region.starts), region.end, bands, projected, over, columns))
        result.projected = sorted(self.projected.values(), key=lambda m: m.step)
        return result

    def _targets(self) -> list[tuple[tuple[str, ...], FeatureMap]]:
        """Rules a and h: (graph tensors, the allocation they stand for) in execution order; one
        region must contain them all. With an allocation named by rule h come the graph tensors
        above the ceiling its fusion hides (a Focus stem's row Slices): bands break the fusion,
        and they reappear."""
        present = {t.name for t in self.view.tensors}
        targets = []
        for tensor in self.view.over_ceiling():
            if tensor.role == "workspace":
                continue
            name = self.aliases.get(tensor.name, tensor.name)
            if name != tensor.name and name in self.producers:
                hidden = {out for out in fused_away(self.model, name, self.producers, self.constants, present)
                          if self._bytes(out) > self.ceiling}
                group = (*sorted(hidden, key=lambda n: self.position.get(n, -1)), name)
                targets.append((group, tensor))
                continue
            targets.append(((name,), tensor))
        return targets

    def _best_region(self, tensors: str | tuple[str, ...]) -> tuple[Region, int, int, bool] | None:
        """Rules b and c, for a region that contains every one of `tensors`."""
        tensors = (tensors,) if isinstance(tensors, str) else tensors
        first = min(self.position[name] for name in tensors)
        best_projected = None
        for end in self.order[first:first + self.window]:
            fits = self._bytes(end) <= self.ceiling or end in self.outputs or end in self.narrow
            # (the caller receives outputs whole)
            splice = None if fits else self._splice_axis(end)
            if not fits and splice is None and not self._can_project(end):
                continue
            found = self._feasible(tensors, end)
            if found is None:
                continue
            if fits or found[0].axes[end] == splice:
                return (*found, False)
            if self._can_project(end):
                best_projected = (*found, True)
        return best_projected

    def _splice_axis(self, end: str) -> int | None:
        """Rule c: the axis of the Concat that alone reads `end`, when its output fits or is a
        graph output (a region ending at `end` with its rows on that axis is spliced into it)."""
        readers = self.readers.get(end, [])
        if len(readers) != 1 or readers[0].op_type != "Concat" or end not in self.infos:
            return None
        concat = readers[0].output[0]
        if self._bytes(concat) > self.ceiling and concat not in self.outputs:
            return None
        axis = next((a.i for a in readers[0].attribute if a.name == "axis"), 0)
        return axis % len(self.infos[end].shape)

    def _feasible(self, tensors: tuple[str, ...], end: str) -> tuple[Region, int, int] | None:
        """The region ending at `end` that contains `tensors`, with its bands and columns."""
        downstream = set().union(*(self._downstream(name) for name in tensors))
        starts = self._frontier(end, downstream)
        region = self._region(starts, end)
        if region is None or not set(tensors) <= {o for n in region.nodes for o in n.output}:
            return None
        try:
            return region, bands_for_budget(self.model, starts, end, self.ceiling, self.act_bytes, region=region), 1
        except InputError:  # no row bands fit: 2-D patches (tile rule c')
            patches = patches_for_budget(self.model, region, self.ceiling, self.act_bytes, self.infos)
            return None if patches is None else (region, patches.bands, patches.columns)

    def pools(self) -> list[PlannedPool]:
        """Rule f: every named GlobalAveragePool whose input is above the ceiling, with the
        nearest start from which its input can be recomputed in bands that fit."""
        planned = []
        for node in self.model.graph.node:
            if node.op_type != "GlobalAveragePool" or not node.name or self._bytes(node.input[0]) <= self.ceiling:
                continue
            found = self._pool_region(node.input[0])
            if found is not None:
                planned.append(PlannedPool(found[0].starts, node.name, found[1]))
                for start in found[0].starts:  # a start above the ceiling is projected (rule f)
                    if not self._fits_as_start(start) and self._can_project(start):
                        self.projected[start] = planned_map(self.projectable[start], self.ceiling, self.carried)
        return planned

    def _pool_region(self, tensor: str) -> tuple[Region, int] | None:
        if tensor not in self.producers:
            return None
        found = self._pool_region_from(tensor, self._frontier(tensor))
        if found is None and self.projectable:  # recompute from the nearest map a projection makes fit
            found = self._pool_region_from(tensor, self._frontier(tensor, projecting=True))
        return found

    def _pool_region_from(self, tensor: str, starts: tuple[str, ...]) -> tuple[Region, int] | None:
        try:
            region = tileable_region(self.model, starts, tensor, self.shapes, infos=self.infos, layout=self.layout,
                                     consumers_checked=False)
            return region, bands_for_budget(self.model, starts, tensor, self.ceiling, self.act_bytes,
                                            region=region)
        except InputError:
            return None

    def _can_project(self, name: str) -> bool:
        fmap = self.projectable.get(name)
        return fmap is not None and ranked_plane_bytes(fmap, self.carried) <= self.ceiling

    def _frontier(self, end: str, downstream: set[str] = frozenset(), projecting: bool = False) -> tuple[str, ...]:
        """The starts of the region ending at `end` (rule b): walking back from `end`, every
        graph input and every tensor that fits (under the ceiling, projected, or one value
        per channel; with `projecting`, also a map a projection would make fit) stops the walk
        and is a start, except those in `downstream` (computed from the tensor to cover, which
        the region must contain); the main one is the earliest."""
        def stop(name: str) -> bool:
            return name not in downstream and (self._fits_as_start(name) or (projecting and self._can_project(name)))

        _, boundary = walk_back(end, self.producers, self.constants, stop)
        starts = [name for name, _ in boundary]
        return tuple(sorted(starts, key=lambda name: (self._per_channel(name), self.position.get(name, -1))))

    def _downstream(self, tensor: str) -> set[str]:
        """The tensors computed from `tensor` (it excluded)."""
        if tensor not in self.downstream:
            found: set[str] = set()
            for node in self.model.graph.node:  # graph order is topological
                if any(name == tensor or name in found for name in node.input):
                    found.update(name for name in node.output if name)
            self.downstream[tensor] = found
        return self.downstream[tensor]

    def _per_channel(self, name: str) -> bool:
        info = self.infos.get(name)
        return info is not None and len(info.shape) == 4 and info.shape[2:] == (1, 1)

    def _fits_as_start(self, name: str) -> bool:
        return (name in self.inputs or name in self.projected or name in self.narrow
                or self._bytes(name) <= self.ceiling)

    def beyond_projection(self, uncovered: list[FeatureMap], maps: list[PlannedMap]) -> list[FeatureMap]:
        """Rule g's check: the uncovered allocations that projecting every map of `maps` cannot
        bring under the ceiling. A planned map fits, and so does every tensor U is pushed to
        from one (FOLD_PUSH_OPS, in graph order); any other allocation needs a region once
        those fit (as starts and as ends). Names the graph lacks are not judged."""
        self.narrow = {m.name for m in maps} | set(self.projected)
        for node in self.model.graph.node:  # graph order is topological
            if node.op_type in FOLD_PUSH_OPS and node.input and node.input[0] in self.narrow:
                self.narrow.update(name for name in node.output if name)
        names = {t.name: self.aliases.get(t.name, t.name) for t in uncovered}
        return [t for t in uncovered if names[t.name] in self.position and names[t.name] not in self.narrow
                and self._best_region(names[t.name]) is None]

    def _region(self, start: tuple[str, ...], end: str) -> Region | None:
        key = (start, end)
        if key not in self.regions:
            try:
                self.regions[key] = tileable_region(self.model, start, end, self.shapes, infos=self.infos,
                                                    layout=self.layout)
            except InputError:
                self.regions[key] = None  # type: ignore[assignment]
        return self.regions[key]

    def _bytes(self, name: str) -> int:
        info = self.infos.get(name)
        if info is None:
            return 1 << 62
        return info.numel * (self.act_bytes or info.dtype.itemsize)


def with_pools_in_bands(model: Model, pools: list[PlannedPool], ctx: PassContext) -> None:
    """Rule f applied to `model.graph`: each planned pool computed from bands of its input
    (tile rule i)."""
    for planned in pools:
        pool_model(model, planned.start, planned.pool, planned.bands, ctx.input_shapes)


# the rewrites for what bands cannot split (passes/covering.py), in the order they run after
# tiling and conv splitting; each also checks coverage at plan time. Keys name their results
# in `ctx.tiling`.
COVERING_REWRITES: dict[str, type[CoveringRewrite]] = {
    "chunked": ChunkPositionsPass,  # a per-position product, by positions
    "split_columns": SplitColumnsPass,  # attention's qkv, by column blocks
    "chunked_batch_axes": ChunkBatchAxesPass,  # attention's scores, by heads and patches
}


def rewrites_uncovered(model: onnx.ModelProto, uncovered: list[FeatureMap], ceiling: int, ctx: PassContext,
                       aliases: dict[str, str]) -> list[FeatureMap]:
    """The allocations of `uncovered` that no covering rewrite brings under the ceiling."""
    for rewrite in COVERING_REWRITES.values():
        uncovered = rewrite(ceiling).uncovered(model, uncovered, ctx, aliases)
    return uncovered


def uncovered_message(uncovered: list[FeatureMap], ceiling_bytes: int) -> str:
    names = ", ".join(f"{t.name} ({t.producer_op}, {t.bytes} B)" for t in uncovered[:3])
    more = f" and {len(uncovered) - 3} more" if len(uncovered) > 3 else ""
    return (f"{len(uncovered)} onnxruntime allocation(s) above the ceiling of {ceiling_bytes} B cannot be "
            f"tiled or projected under it: {names}{more}")


class TileToCeilingPass(Pass):
    """Rule e: on a graph whose projections are folded, tile every region the ceiling needs.

    Runs the runtime view, plans without projections, applies TilePass, then SplitConvPass
    for convolution scratch above the ceiling, ChunkPositionsPass, SplitColumnsPass and
    ChunkBatchAxesPass for the products bands cannot split (by positions, by column blocks, by
    attention's batch axes); a tensor that no region covers raises
    VerificationError (the planned projections should have made every region end fit).
    `result.data` holds the plan, the tile pass's facts and the split convs.
    """

    name = "tile-to-ceiling"
    provides = ("tiling",)

    def __init__(self, ceiling_bytes: int | None = None, level: str = DEFAULT_LEVEL):
        self.ceiling_bytes = ceiling_bytes  # None: the plan's
        self.level = level

    @property
    def requires(self) -> tuple[str, ...]:
        return ("plan",) if self.ceiling_bytes is None else ()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        ceiling = self.ceiling_bytes if self.ceiling_bytes is not None else ctx.plan.ceiling_bytes
        local = PassContext(input_shapes=ctx.input_shapes, act_bytes=ctx.act_bytes, log=ctx.log)
        local.runtime = analyze_runtime(model.proto(), local, self.level, ceiling)
        plan, planner = _plan_and_planner(model.proto(), local, allow_projection=False)
        plan.uncovered = rewrites_uncovered(model.proto(), plan.uncovered, ceiling, local, planner.aliases)
        if plan.uncovered:
            raise VerificationError(uncovered_message(plan.uncovered, ceiling))
        with_pools_in_bands(model, plan.pools, local)
        tiled = TilePass([(r.starts, r.end, r.bands, r.columns) for r in plan.regions]).run(model, local)
        split = SplitConvPass(ceiling).run(model, local)
        rewritten = {key: rewrite(ceiling).run(model, local).data for key, rewrite in COVERING_REWRITES.items()}
        ctx.tiling = {"plan": plan, "regions": tiled.data, "split_convs": split.data, **rewritten}
        modified = bool(plan.regions or split.data or any(rewritten.values()))
        return PassResult(model, modified=modified, data=ctx.tiling)
