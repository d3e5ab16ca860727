"""Shape inference reads a weightless view of the model (shapes.weightless): the same shapes
as ONNX's inference on the full model, without serialising the weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fmcompress.modelio import load_model
from fmcompress.shapes import (
    WEIGHTLESS_ABOVE,
    best_effort_inference,
    infer_tensor_infos,
    weightless,
)

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def _conv_then_reshape() -> onnx.ModelProto:
    """A Conv whose weight is over the threshold, then a Reshape to a shape held in a small
    initializer (data propagation must read it)."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
    assert weight.nbytes > WEIGHTLESS_ABOVE
    shape = np.array([1, 64, -1], np.int64)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
         helper.make_node("Reshape", ["y", "shape"], ["z"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(shape, "shape")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_large_initializers_lose_their_data_and_keep_name_dims_type():
    model = _conv_then_reshape()
    before = model.SerializeToString()
    light = weightless(model)
    weight, shape = light.graph.initializer
    assert (weight.name, list(weight.dims), weight.data_type) == ("w", [64, 64, 3, 3], TensorProto.FLOAT)
    assert weight.data_location == TensorProto.EXTERNAL and not weight.raw_data and not weight.float_data
    np.testing.assert_array_equal(numpy_helper.to_array(shape), [1, 64, -1])  # small: kept whole
    assert light.ByteSize() < 1024
    assert model.SerializeToString() == before, "the model given must not change"


def test_inference_on_the_weightless_view_reads_the_small_constants():
    inferred = best_effort_inference(_conv_then_reshape(), data_prop=True)
    z = inferred.graph.output[0].type.tensor_type
    assert [d.dim_value for d in z.shape.dim] == [1, 64, 64]  # the Reshape's constant was read
    infos = infer_tensor_infos(_conv_then_reshape(), {"x": (1, 64, 8, 8)})
    assert infos["z"].shape == (1, 64, 64) and infos["w"].shape == (64, 64, 3, 3)


@pytest.mark.parametrize("name", ["squeezenet", "bvlc_alexnet"])
def test_a_real_models_inferred_value_info_is_unchanged(name):
    path = LIGHT / f"light_{name}.onnx"
    if not path.exists():
        pytest.skip(f"this onnx wheel does not ship {path.name}")
    model = load_model(path)
    full = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    light = best_effort_inference(model, check_type=False, strict_mode=False, data_prop=True)
    expected = {v.name: v.SerializeToString() for v in [*full.graph.value_info, *full.graph.output]}
    found = {v.name: v.SerializeToString() for v in [*light.graph.value_info, *light.graph.output]}
    assert expected and found == expected
