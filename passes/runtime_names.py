"""The graph's names for the tensors of onnxruntime's optimised graph (passes/runtime_plan.py
rule h).

Rules:

a. onnxruntime's optimised graph has tensors the graph lacks: an inlined function's internal
   tensors (HardSwish as HardSigmoid and Mul: `_inlfunc_HardSwish_HS_X`), a fusion's new
   outputs (MatMul+Add as Reshape, Gemm, Reshape: `gemm_output_reshape_arg`; a Focus stem's
   Slices and Concat as SpaceToDepth and Gather: `space_to_depth_out`), an op a Transpose
   was pushed below. Each belongs to the first graph tensor met walking forward from it
   through the optimised graph, in execution order: the function's output, the fused
   chain's last output (`runtime_names`).
b. The optimised graph is made again (at the view's level, the input shapes pinned) only
   when the view names an allocation above the ceiling that the graph lacks, so the plan of
   every other model is made as before.
c. What a fusion hides: walking back from such a graph tensor, the graph tensors onnxruntime
   does not allocate, up to the ones it does (`fused_away`). Bands break the fusion, so
   they reappear and a region must contain them too.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx

from fmcompress.featuremaps import FeatureMap
from fmcompress.reports.analysis import RuntimeView
from fmcompress.shapes import with_input_shapes

from .runtime import optimized_model
from .tile import walk_back


def runtime_names(model: onnx.ModelProto, view: RuntimeView,
                  shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Rules a, b: the graph tensor each over-ceiling allocation the graph lacks belongs to. The
    optimised graph is made again only when the view names such an allocation."""
    known = set(shapes) | {name for node in model.graph.node for name in node.output if name}
    foreign = [t.name for t in view.over_ceiling() if t.role != "workspace" and t.name not in known]
    if not foreign:
        return {}
    optimized = optimized_model(with_input_shapes(model, shapes), view.level)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in optimized.graph.node:  # execution order
        for name in dict.fromkeys(node.input):
            readers.setdefault(name, []).append(node)
    aliases = {}
    for name in foreign:
        queue, seen = [name], {name}
        while queue and name not in aliases:
            for node in readers.get(queue.pop(0), []):
                mapped = next((out for out in node.output if out in known), None)
                if mapped is not None:
                    aliases[name] = mapped
                    break
                queue += [out for out in node.output if out and out not in seen]
                seen.update(node.output)
    return aliases


def not_covered(uncovered: list[FeatureMap], covered: set[str], aliases: Mapping[str, str]) -> list[FeatureMap]:
    """The allocations of `uncovered` whose graph tensor (through the runtime plan's `aliases`
    for what onnxruntime inlines or fuses) is not in `covered`."""
    if not covered:
        return uncovered
    return [t for t in uncovered if aliases.get(t.name, t.name) not in covered]


def fused_away(model: onnx.ModelProto, name: str, producers: Mapping[str, onnx.NodeProto],
               constants: Mapping[str, object] | set[str], present: set[str]) -> set[str]:
    """Rule c: the graph tensors computing `name` back to those in `present` (or graph inputs),
    which the optimised graph does not allocate; `name` excluded."""
    ids, _ = walk_back(name, producers, constants, lambda tensor: tensor in present)
    return {out for node in model.graph.node if id(node) in ids for out in node.output
            if out and out != name and out not in present}
