"""MapCostPass: what each fitted projection costs, alone and in the chain, on held-out data.

A compile projects many maps at once and reports their joint cost; a user deciding what to
give up (a larger ceiling, a map left whole) needs to see which maps hurt. Rules:

a. For every fitted map, the torch executor runs the held-out part with that map's
   projection alone in place (every other map as the original computes it), and its
   outputs are compared with the original's as MeasurePass compares the whole model
   (`fmcompress.metrics`: its agreement figures, a recognizer's space classes left out as
   MeasurePass leaves them, else its cosine similarity).
b. The figure is the one a report leads with (`gated_agreement`: top-1 agreement, else
   sequence agreement), else the cosine similarity of the outputs; a map's cost is
   `drop_points`: 100 x (1 - that figure). With labels, `accuracy_drop_points` too (the
   original's held-out accuracy minus the accuracy with that map alone projected).
   Learned projections are fitted together, later ones correcting earlier ones' errors, so
   one alone can cost more than all of them together (the demo at 4x: a map alone 29.7
   points of agreement, all five 0.8; PP-OCR's recognizer at 4x: 3 to 100 points a map
   alone, 8 all together): the figure ranks what a map takes away, it is not a share of
   the joint cost. A projection fitted to a map that earlier projections already made
   low-rank (after a 1x1 conv reading a projected map, the recognizer's every other map)
   discards, alone, what the original map holds beyond that rank: 95-100 points alone,
   -9.4 to 1.6 added in the chain (64 samples). The log line leads with the chain's largest share.
b'. So each map also has its figure *in the chain* (`in_chain`: that map and every map
   before it in network order in place, as the fit pass fitted them) and `added_points`,
   the chain's drop there minus its drop at the map before: the shares sum to the drop
   with every map in place, and show where along the network the joint cost arises.
c. At most `max_samples` held-out samples are run (the first ones), so the pass costs at
   most that many forward passes per map; nothing fitted or no held-out part: no costs.
d. Cost: the held-out part runs once whole; then one original run per batch advances
   through the maps in network order, and a chain run forked from it at the first map
   keeps each projection; each map runs only the steps after its own, from a copy of each
   with the map projected (the first map's chain figure is its alone figure): about a
   forward pass per map, not two.
e. The model is not changed; `ctx.map_costs` (and `result.data`) is one dict per map in
   plan order: `name`, `metric`, `alone` (the figure), `drop_points`,
   `accuracy_drop_points` (None without labels), `samples`, `in_chain`, `added_points`.

Entry point: `MapCostPass().run(model, ctx)`, after FitProjectionsPass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fmcompress.data import Dataset
from fmcompress.featuremaps import Projection
from fmcompress.metrics import agreement_figures, gated_agreement, mean_cosine, space_classes

from .base import Pass, PassContext, PassResult
from .fit import torch_executor
from .graph import Model

MAX_SAMPLES = 64  # rule c: enough to rank maps (1.6 points a sample), a bounded cost per map
BATCH = 16


class MapCostPass(Pass):
    """Rules a-e: the held-out cost of each projection alone and in the chain."""

    name = "map-cost"
    requires = ("projections", "projected_graph", "held_out")
    provides = ("map_costs",)

    def __init__(self, max_samples: int = MAX_SAMPLES):
        self.max_samples = max_samples

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        held_out = ctx.held_out
        if not ctx.projections or held_out is None or len(held_out) == 0:
            ctx.map_costs = []
            return PassResult(model, modified=False, data=ctx.map_costs)
        part = held_out.head(self.max_samples)
        ctx.map_costs = map_costs(ctx.projected_graph.proto(), ctx.projections, part, ctx.batch_size or BATCH,
                                  space_classes(ctx.original))
        adds = max(ctx.map_costs, key=lambda cost: cost["added_points"])
        alone = max(ctx.map_costs, key=lambda cost: cost["drop_points"])
        ctx.log(f"map costs ({alone['metric']}, {len(part)} held-out samples): {adds['name']} adds most in the "
                f"chain ({adds['added_points']:.1f} points), {alone['name']} costs most alone "
                f"({alone['drop_points']:.1f})")
        return PassResult(model, modified=False, data=ctx.map_costs)


def map_costs(model, projections: dict[str, Projection], data: Dataset, batch: int = BATCH,
              ignore: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Rules a, b and b' for every projection of `projections` (in its order) on `data`, `batch`
    samples a run (what the graph allows: PrepareDataPass's `ctx.batch_size`); `ignore`: the
    classes sequence agreement leaves out (`fmcompress.metrics.space_classes`).

    Rule d: one original run and one chain run per batch are paused after each map's step in
    network order, and only the steps after it run again, from a fork with the map projected
    there; the chain run keeps the projection."""
    import torch

    from fmcompress.backend.projection import ChannelProjection

    executor = torch_executor(model)
    batches = list(data.torch_batches(batch, list(executor.input_names)))
    with torch.no_grad():
        reference = _concatenated([executor(*inputs) for inputs in batches])
        accuracy = agreement_figures(reference, reference, data.labels)["accuracy_reference"]
        paused = [executor.start(*inputs) for inputs in batches]
        chained: list | None = None  # the chain runs, forked from the original's at the first map
        costs, chain_drop = {}, 0.0
        for name in sorted(projections, key=executor.producer_step):
            projection = ChannelProjection(projections[name].P, projections[name].U)
            alone = [_run_projected(executor, frontier, name, projection, keep=False) for frontier in paused]
            if chained is None:  # at the first map the chain is that map alone: its runs are the ones above
                chained = [executor.fork(frontier) for frontier in paused]
                for frontier in chained:
                    executor.set_value(frontier, name, projection(executor.value(frontier, name)))
                chain = alone
            else:
                chain = [_run_projected(executor, frontier, name, projection, keep=True) for frontier in chained]
            costs[name] = {"name": name, **_cost(reference, _concatenated(alone), data, accuracy, ignore)}
            in_chain = _cost(reference, _concatenated(chain), data, accuracy, ignore)
            costs[name].update(in_chain=in_chain["alone"], added_points=in_chain["drop_points"] - chain_drop)
            chain_drop = in_chain["drop_points"]
    return [costs[name] for name in projections]


def _run_projected(executor, frontier, name: str, projection, keep: bool) -> tuple:
    """The outputs of a fork of `frontier` (advanced past `name`'s step) with `name` projected;
    with `keep`, `frontier` itself keeps the projected value (the chain run)."""
    executor.trim(executor.advance(frontier, executor.producer_step(name) + 1), keep_outputs=False)
    projected = projection(executor.value(frontier, name))
    if keep:
        executor.set_value(frontier, name, projected)
    fork = executor.fork(frontier)
    executor.set_value(fork, name, projected)
    return executor.outputs(executor.advance(fork, executor.num_steps))


def _concatenated(runs: list[tuple]) -> list[np.ndarray]:
    return [np.concatenate([run[i].numpy() for run in runs]) for i in range(len(runs[0]))]


def _cost(reference: list[np.ndarray], candidate: list[np.ndarray], data: Dataset,
          accuracy: float | None, ignore: Sequence[int]) -> dict[str, Any]:
    """Rule b for one map (its name added by the caller)."""
    quality = agreement_figures(reference, candidate, data.labels, ignore)
    metric, figure = gated_agreement(quality)
    if figure is None:
        metric, figure = "cosine similarity", mean_cosine(reference, candidate)
    candidate_accuracy = quality.get("accuracy_candidate")
    return {"metric": metric, "alone": figure, "drop_points": 100 * (1 - figure),
            "accuracy_drop_points": None if accuracy is None or candidate_accuracy is None
            else 100 * (accuracy - candidate_accuracy), "samples": len(data)}
