"""InsertProjectionsPass: the plain, unfolded projection rewrite (the reference).

Rewrite rule, for every projected feature map X with P (k x C) and U (C x k); X
is NCHW (rank 4) or NCL (rank 3), channel axis 1 either way:
    producer -> X -> consumers
      -> producer -> X/fmc_src -> Conv1x1 fmc/P/<X> (weight P) -> Z = X/fmc_k<k>
                             -> Conv1x1 fmc/U/<X> (weight U) -> X -> consumers
The 1x1 convs are Conv2d (weight [k, C, 1, 1]) for rank 4 and Conv1d (weight
[k, C, 1], kernel_shape [1]) for rank 3. So every consumer of X, graph outputs
included, reads U P X, and the tensor name X (and its C channels) is unchanged.
Correct by construction: the folding pass is tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from fmcompress.errors import InputError
from fmcompress.featuremaps import Projection
from fmcompress.shapes import infer_tensor_infos, resolve_input_shapes

from .base import Pass, PassContext, PassResult
from .graphutil import (
    CONV_OPS,
    Namer,
    constant_value,
    conv1x1,
    elem_dtype,
    export_like,
    new_variable,
    tensor_ranks_and_channels,
)


@dataclass(frozen=True)
class MapInfo:
    """What the passes need to know of a projected tensor."""

    dtype: np.dtype
    rank: int  # 4 (NCHW) or 3 (NCL)


PROJECTABLE_RANKS = (3, 4)


def validate_projections(model: onnx.ModelProto, graph: gs.Graph, projections: dict[str, Projection],
                         input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, MapInfo]:
    """Check every projection against its tensor (exists, is a 3-D NCL or 4-D NCHW map with C channels).

    Shapes come from ONNX shape inference; where it cannot tell, from the exact shapes
    for the (pinned) input shapes. Returns the element dtype and rank of each projected tensor.
    """
    if not isinstance(projections, dict):
        raise InputError("projections must be a dict mapping tensor names to Projection objects")
    tensors = graph.tensors()
    inputs = {t.name for t in graph.inputs}
    shapes = tensor_ranks_and_channels(model)
    unknown = [n for n in projections if n in tensors and shapes.get(n, (None, None))[0] is None]
    if unknown:
        shapes.update(_exact_ranks_and_channels(model, input_shapes or {}))
    infos: dict[str, MapInfo] = {}
    for name, projection in projections.items():
        if not isinstance(projection, Projection):
            raise InputError(f"projection for {name!r} must be a Projection, got {type(projection).__name__}")
        tensor = tensors.get(name)
        if tensor is None:
            raise InputError(f"cannot project {name!r}: no tensor of that name in the model")
        if name in inputs:
            raise InputError(f"cannot project {name!r}: it is a graph input; graph inputs cannot be projected")
        if isinstance(tensor, gs.Constant) or constant_value(tensor) is not None:
            raise InputError(f"cannot project {name!r}: it is a constant, not a feature map")
        rank, channels = _rank_and_channels(tensor, shapes.get(name, (None, None)))
        if rank not in PROJECTABLE_RANKS:
            raise InputError(f"cannot project {name!r}: it is {'of unknown rank' if rank is None else f'{rank}-D'}, "
                             "not a 4-D NCHW or 3-D NCL feature map")
        if channels is not None and channels != projection.C:
            raise InputError(f"projection for {name!r} has C={projection.C} but the tensor has {channels} channels")
        infos[name] = MapInfo(elem_dtype(model, name), rank)
    return infos


def _exact_ranks_and_channels(model: onnx.ModelProto,
                              input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int | None, int | None]]:
    infos = infer_tensor_infos(model, resolve_input_shapes(model, input_shapes))
    return {name: (len(info.shape), info.shape[1] if len(info.shape) > 1 else None) for name, info in infos.items()}


def _rank_and_channels(tensor: gs.Tensor, inferred: tuple[int | None, int | None]) -> tuple[int | None, int | None]:
    """Shape inference's answer, else the producing conv's weight says it."""
    if inferred[0] is not None:
        return inferred
    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if producer is None or producer.op not in CONV_OPS:
        return None, None
    weight = constant_value(producer.inputs[1])
    if weight is None or weight.ndim not in PROJECTABLE_RANKS:
        return None, None
    if producer.op == "Conv":
        return weight.ndim, int(weight.shape[0])
    return weight.ndim, int(weight.shape[1]) * int(producer.attrs.get("group", 1))


class ProjectionPass(Pass):
    """Shared frame of the passes that take projections: import, check, rewrite, export.

    Subclasses implement `_rewrite(graph, infos) -> data`; with no projections the
    model is returned unchanged.
    """

    def __init__(self, projections: dict[str, Projection]):
        self.projections = projections

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        graph = gs.import_onnx(model)
        infos = validate_projections(model, graph, self.projections, ctx.input_shapes)
        if not self.projections:
            return PassResult(model, modified=False, data={})
        data = self._rewrite(graph, infos)
        return PassResult(export_like(graph, model), modified=True, data=data)

    def _rewrite(self, graph: gs.Graph, infos: dict[str, MapInfo]) -> dict[str, dict]:
        raise NotImplementedError


class InsertProjectionsPass(ProjectionPass):
    name = "insert-projections"

    def _rewrite(self, graph: gs.Graph, infos: dict[str, MapInfo]) -> dict[str, dict]:
        namer = Namer(graph)
        tensors = graph.tensors()
        data = {}
        for name, projection in self.projections.items():
            x = tensors[name]
            source = new_variable(namer, f"{name}/fmc_src")
            x.inputs[0].outputs[x.inputs[0].outputs.index(x)] = source
            z = new_variable(namer, f"{name}/fmc_k{projection.k}")
            dtype, rank = infos[name].dtype, infos[name].rank
            conv1x1(graph, namer, f"fmc/P/{name}", source, projection.P.astype(dtype), z, rank)
            conv1x1(graph, namer, f"fmc/U/{name}", z, projection.U.astype(dtype), x, rank)
            data[name] = {"stored": z.name}
        return data

