"""Normalisation at load (fmcompress/normalize.py): old IR, initializers listed as inputs, old
opsets and weights computed from constants, checked with onnx.checker and onnxruntime running
the model as the user brought it; current models come back untouched."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fmcompress.errors import InputError
from fmcompress.modelio import load_model
from fmcompress.normalize import TARGET_OPSET, normalize_model

RNG = np.random.default_rng(0)


def _old_model(ir_version: int = 3, opset: int = 9) -> onnx.ModelProto:
    """A Caffe2-style model: ConstantOfShape weights, a Constant -> Unsqueeze bias chain, every
    initializer also a graph input, Dropout and Reshape in their opset-9 forms."""
    shape = numpy_helper.from_array(np.array([4, 3, 3, 3], np.int64), "w_SHAPE")
    fc_shape = numpy_helper.from_array(np.array([5, 4 * 6 * 6], np.int64), "fc_SHAPE")
    reshape = numpy_helper.from_array(np.array([1, -1], np.int64), "flat")
    fc_bias = numpy_helper.from_array(RNG.standard_normal(5).astype(np.float32), "fb")
    inits = [shape, fc_shape, reshape, fc_bias]
    fill = helper.make_tensor("v", TensorProto.FLOAT, [1], [0.02])
    nodes = [
        helper.make_node("ConstantOfShape", ["w_SHAPE"], ["w"], value=fill),
        helper.make_node("Constant", [], ["b0"], value=numpy_helper.from_array(RNG.standard_normal(4)
                                                                               .astype(np.float32))),
        helper.make_node("Identity", ["b0"], ["b"]),
        helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["y"], ["r"]),
        helper.make_node("Dropout", ["r"], ["d"], ratio=0.5),
        helper.make_node("Reshape", ["d", "flat"], ["f"]),
        helper.make_node("ConstantOfShape", ["fc_SHAPE"], ["fw"], value=fill),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["out"], transB=1),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "old", inputs,
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_an_old_model_becomes_current_and_computes_the_same():
    old = _old_model()
    new = normalize_model(old)
    onnx.checker.check_model(new, full_check=True)
    assert new.ir_version >= 8
    assert [(o.domain, o.version) for o in new.opset_import] == [("", TARGET_OPSET)]
    assert [i.name for i in new.graph.input] == ["x"]  # rule b: initializers are no inputs
    ops = [n.op_type for n in new.graph.node]
    assert "ConstantOfShape" not in ops and "Identity" not in ops  # rule e: weights folded
    assert {"w", "b", "fw"} <= {i.name for i in new.graph.initializer}
    assert not {"w_SHAPE", "fc_SHAPE"} & {i.name for i in new.graph.initializer}  # no longer read
    x = RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(new, x), _run(old, x), rtol=1e-6, atol=1e-6)
    assert old.ir_version == 3 and len(old.graph.input) == 5  # the input is not modified


def test_an_old_ir_with_a_current_opset_only_loses_its_initializer_inputs():
    model = _old_model(ir_version=7, opset=13)
    model.graph.node[5].attribute.pop()  # Dropout-13 takes its ratio as an input
    new = normalize_model(model)
    onnx.checker.check_model(new, full_check=True)
    assert new.opset_import[0].version == 13 and new.ir_version == 7
    assert [i.name for i in new.graph.input] == ["x"]


def test_a_current_model_is_returned_as_it_is():
    current = normalize_model(_old_model())
    assert normalize_model(current) is current
    assert load_model(current) is current


def test_constant_arithmetic_that_is_no_weight_stays():
    """A bias reshaped for an Add (paddle2onnx's form) is left to the passes, as it was."""
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(3, np.float32))),
             helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(np.array([1, 3, 1, 1]))),
             helper.make_node("Reshape", ["c", "s"], ["cb"]),
             helper.make_node("Add", ["x", "cb"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 2, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    assert normalize_model(model) is model


def test_computed_weights_over_two_gigabytes_are_refused_before_they_are_computed():
    model = _old_model(ir_version=8, opset=17)
    del model.graph.node[5].attribute[:]
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array([2**16, 2**14, 1, 1], np.int64),
                                                                "w_SHAPE"))
    with pytest.raises(InputError, match="over the 2 GB protobuf limit") as caught:
        normalize_model(model)
    assert "\n" not in str(caught.value)


def test_an_opset_newer_than_onnx_knows_is_refused_in_one_line(tmp_path):
    from modeltools import tiny_classifier

    model = tiny_classifier()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    path = tmp_path / "future.onnx"
    onnx.save(model, str(path))
    for source in (model, path):
        with pytest.raises(InputError, match=rf"opset {onnx.defs.onnx_opset_version() + 1};") as caught:
            load_model(source)
        assert "\n" not in str(caught.value)
