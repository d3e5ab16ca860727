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
from fmcompress.featuremaps import PROJECTABLE_RANKS, Projection, channels_last, layout_reason
from fmcompress.shapes import InferredType, infer_tensor_infos, inferred_types, resolve_input_shapes

from .base import Pass, PassContext, PassResult
from .graph import Model
from .graphutil import (
    Namer,
    constant_value,
    conv1x1,
    new_variable,
)
from .ops import CONV_OPS


@dataclass(frozen=True)
class MapInfo:
    """What the passes need to know of a projected tensor."""

    dtype: np.dtype
    rank: int  # 4 (NCHW) or 3 (NCL)




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
    types = inferred_types(model)
    unknown = [n for n in projections if n in tensors and (n not in types or types[n].rank is None)]
    exact = _exact_types(model, input_shapes or {}) if unknown else {}
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
        inferred = types.get(name, InferredType(None, None, None))
        if inferred.rank is None and name in exact:
            inferred = InferredType(exact[name].rank, exact[name].channels, inferred.dtype or exact[name].dtype)
        rank, channels = _rank_and_channels(tensor, inferred)
        layout = layout_reason(rank, channels, rank == 4 and _channels_last(tensor))  # the analysis's rule too
        if layout is not None:
            raise InputError(f"cannot project {name!r}: {layout}")
        if channels is not None and channels != projection.C:
            raise InputError(f"projection for {name!r} has C={projection.C} but the tensor has {channels} channels")
        dtype = inferred.dtype or _producer_weight_dtype(tensor) or np.dtype(np.float32)
        if dtype.kind != "f":
            raise InputError(f"cannot project {name!r}: it holds {dtype.name} values; only floating-point "
                             "feature maps can be projected")
        infos[name] = MapInfo(dtype, rank)
    return infos


def _channels_last(tensor: gs.Variable) -> bool:
    producer = (tensor.inputs[0].op, tensor.inputs[0].attrs) if tensor.inputs else None
    readers = [(node.op, node.attrs, [t.name for t in node.inputs].index(tensor.name)) for node in tensor.outputs]
    return channels_last(producer, readers)


def _exact_types(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, InferredType]:
    infos = infer_tensor_infos(model, resolve_input_shapes(model, input_shapes))
    return {name: InferredType(len(info.shape), info.shape[1] if len(info.shape) > 1 else None,
                               np.dtype(info.dtype) if info.dtype is not None else None)
            for name, info in infos.items()}


def _rank_and_channels(tensor: gs.Tensor, inferred: InferredType) -> tuple[int | None, int | None]:
    """Shape inference's answer, else the producing conv's weight says it."""
    if inferred.rank is not None:
        return inferred.rank, inferred.channels
    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if producer is None or producer.op not in CONV_OPS:
        return None, None
    weight = constant_value(producer.inputs[1])
    if weight is None or weight.ndim not in PROJECTABLE_RANKS:
        return None, None
    if producer.op == "Conv":
        return weight.ndim, int(weight.shape[0])
    return weight.ndim, int(weight.shape[1]) * int(producer.attrs.get("group", 1))


def _producer_weight_dtype(tensor: gs.Tensor) -> np.dtype | None:
    """A conv's output has its weight's dtype (when shape inference could not type the tensor)."""
    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if producer is None or producer.op not in CONV_OPS or len(producer.inputs) < 2:
        return None
    weight = constant_value(producer.inputs[1])
    return None if weight is None else weight.dtype


class ProjectionPass(Pass):
    """Shared frame of the passes that take projections: import, check, rewrite, export.

    The projections are the constructor's, or else the fit pass's (`ctx.projections`),
    so the pass works alone and inside a Pipeline.
    Subclasses implement `_rewrite(graph, projections, infos) -> data`; with no
    projections the model is returned unchanged.
    """

    def __init__(self, projections: dict[str, Projection] | None = None):
        self.projections = projections

    @property
    def requires(self) -> tuple[str, ...]:
        return ("projections",) if self.projections is None else ()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        projections = self.projections if self.projections is not None else ctx.projections or {}
        infos = validate_projections(model.proto(), model.graph, projections, ctx.input_shapes)
        if not projections:
            return self._result(model, ctx, {})
        data = self._rewrite(model.graph, projections, infos)
        model.touched()
        return self._result(model, ctx, data)

    def _result(self, model: Model, ctx: PassContext, data: dict[str, dict]) -> PassResult:
        return PassResult(model, modified=bool(data), data=data)

    def _rewrite(self, graph: gs.Graph, projections: dict[str, Projection],
                 infos: dict[str, MapInfo]) -> dict[str, dict]:
        raise NotImplementedError


class InsertProjectionsPass(ProjectionPass):
    name = "insert-projections"

    def _rewrite(self, graph: gs.Graph, projections: dict[str, Projection],
                 infos: dict[str, MapInfo]) -> dict[str, dict]:
        namer = Namer(graph)
        tensors = graph.tensors()
        data = {}
        for name, projection in projections.items():
            x = tensors[name]
            source = new_variable(namer, f"{name}/fmc_src")
            x.inputs[0].outputs[x.inputs[0].outputs.index(x)] = source
            z = new_variable(namer, f"{name}/fmc_k{projection.k}")
            dtype, rank = infos[name].dtype, infos[name].rank
            conv1x1(graph, namer, f"fmc/P/{name}", source, projection.P.astype(dtype), z, rank)
            conv1x1(graph, namer, f"fmc/U/{name}", z, projection.U.astype(dtype), x, rank)
            data[name] = {"stored": z.name}
        return data

