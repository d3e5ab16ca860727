"""CoveringRewrite: the shape every rewrite for what row bands cannot split shares.

passes/chunk_positions.py, split_columns.py and chunk_batch_axes.py each find candidates in
a graph (`find`), rewrite each one into nodes placed where its `anchor` was (`emit`), record
what they did (`record`), and tell the runtime plan, before any data is loaded, which
allocations the rewrite would bring under the ceiling (`covers`, used by `uncovered`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import onnx
import onnx_graphsurgeon as gs

from fmcompress.featuremaps import FeatureMap

from .base import Pass, PassContext, PassResult
from .graph import Model
from .graphutil import Namer, node_index
from .runtime_names import not_covered


class CoveringRewrite(Pass):
    """Rewrites every candidate above `budget_bytes`; `result.data` records each one."""

    name: ClassVar[str]

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes

    # what each rewrite supplies
    def find(self, model: Model, ctx: PassContext) -> list[Any]:
        raise NotImplementedError

    def anchor(self, candidate: Any) -> gs.Node:
        """The node before which the candidate's nodes go."""
        raise NotImplementedError

    def emit(self, candidate: Any, namer: Namer, opset: int) -> list[gs.Node]:
        raise NotImplementedError

    def record(self, candidate: Any) -> dict:
        raise NotImplementedError

    def covers(self, candidate: Any) -> list[str]:
        """The graph tensors no longer made whole once the candidate is rewritten."""
        raise NotImplementedError

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        candidates = self.find(model, ctx)
        if not candidates:
            return PassResult(model, modified=False, data=[])
        namer, opset, done = Namer(model.graph), model.opset, []
        for candidate in candidates:
            done.append(self.record(candidate))
            where = node_index(model.graph, self.anchor(candidate))
            model.graph.nodes[where:where] = self.emit(candidate, namer, opset)
        model.touched(sort=False)
        return PassResult(model, modified=True, data=done)

    def uncovered(self, proto: onnx.ModelProto, uncovered: list[FeatureMap], ctx: PassContext,
                  aliases: dict[str, str]) -> list[FeatureMap]:
        """The runtime plan's coverage check: the allocations of `uncovered` this rewrite
        would not bring under the ceiling; `aliases` are the plan's names for what
        onnxruntime inlines or fuses (passes/runtime_names.py)."""
        if not uncovered:
            return uncovered
        covered = {name for cand in self.find(Model.from_proto(proto), ctx) for name in self.covers(cand)}
        return not_covered(uncovered, covered, aliases)
