"""Helpers several test modules share (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from fmcompress.featuremaps import Projection

NUMPY_FLOAT = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def with_float_type(model: onnx.ModelProto, elem_type: int) -> onnx.ModelProto:
    """A copy whose float weights, inputs and outputs are `elem_type`, without value_info
    (so passes must find the dtype themselves)."""
    converted = onnx.ModelProto.FromString(model.SerializeToString())
    for init in converted.graph.initializer:
        if init.data_type in NUMPY_FLOAT and init.data_type != elem_type:
            array = numpy_helper.to_array(init).astype(NUMPY_FLOAT[elem_type])
            init.CopyFrom(numpy_helper.from_array(array, init.name))
    for value in [*converted.graph.input, *converted.graph.output]:
        if value.type.tensor_type.elem_type in NUMPY_FLOAT:
            value.type.tensor_type.elem_type = elem_type
    del converted.graph.value_info[:]
    return converted


def random_projections(plan, seed: int = 0) -> dict[str, Projection]:
    """A random orthonormal P (U = P^T) for every planned map."""
    rng = np.random.default_rng(seed)
    projections = {}
    for fmap in plan.maps:
        q, _ = np.linalg.qr(rng.standard_normal((fmap.channels, fmap.k)))
        projections[fmap.name] = Projection(q.T, q)
    return projections
