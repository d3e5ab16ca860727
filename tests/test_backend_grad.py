"""Gradients through OnnxModule, transforms at named tensors, and the error paths."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from modeltools import ChannelBottleneck
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from fmcompress.backend import OnnxModule, check_supported, unsupported_ops
from fmcompress.errors import InputError, UnsupportedOpError


def make_model(nodes, inputs, outputs, inits=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in dict(inits).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def small_cnn() -> onnx.ModelProto:
    """conv -> relu -> (conv, skip) -> add -> pool -> reshape(0,-1) -> gemm; 'r' has two consumers."""
    rng = np.random.default_rng(0)  # same weights on every call
    w1 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.3
    fc = rng.standard_normal((5, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r"], ["a"]),
        helper.make_node("GlobalAveragePool", ["a"], ["p"]),
        helper.make_node("Reshape", ["p", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])
    inits = {"w1": w1, "w2": w2, "fc": fc, "shape": np.array([0, -1], np.int64)}
    return make_model(nodes, [x], [y], inits)


class Counting(nn.Module):
    def __init__(self, scale: float = 2.0):
        super().__init__()
        self.calls, self.scale = 0, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * self.scale


def test_backward_reaches_inner_transform_and_is_finite() -> None:
    module = OnnxModule(small_cnn())
    projection = ChannelBottleneck(4, 2)
    module.set_transform("r", projection)
    assert {id(p) for p in projection.parameters()} <= {id(p) for p in module.parameters()}
    assert all(not b.requires_grad for b in module.buffers())
    (y,) = module(torch.randn(2, 3, 8, 8))
    y.square().sum().backward()
    for parameter in projection.parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
        assert parameter.grad.abs().sum() > 0


def test_gradcheck_float64_with_transform() -> None:
    module = OnnxModule(small_cnn()).double()
    module.set_transform("r", ChannelBottleneck(4, 3).double())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    assert module(x)[0].dtype == torch.float64
    assert torch.autograd.gradcheck(lambda t: module(t)[0], (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_transform_applies_once_to_every_consumer_and_matches_an_edited_graph() -> None:
    model = small_cnn()
    module = OnnxModule(model)
    counter = Counting(2.0)
    module.set_transform("r", counter)
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        (got,) = module(torch.from_numpy(x))
    assert counter.calls == 1  # two consumers, one application
    # the same rewrite done on the graph, run by onnxruntime
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    for node in edited.graph.node:
        node.input[:] = ["r2" if name == "r" else name for name in node.input]
    edited.graph.node.insert(2, helper.make_node("Mul", ["r", "two"], ["r2"]))
    edited.graph.initializer.append(numpy_helper.from_array(np.array(2.0, np.float32), "two"))
    want = ort.InferenceSession(edited.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    module.clear_transforms()
    assert len(list(module.transforms)) == 0
    with torch.no_grad():
        plain = module(torch.from_numpy(x))[0]
    want_plain = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(plain.numpy(), want_plain, rtol=1e-5, atol=1e-5)


def test_transform_on_graph_input_and_output() -> None:
    module = OnnxModule(small_cnn())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        base = module(x)[0]
        module.set_transform("y", Counting(3.0))
        assert torch.allclose(module(x)[0], 3 * base)
        module.clear_transforms()
        module.set_transform("x", Counting(2.0))
        assert torch.allclose(module(x)[0], module.__class__(small_cnn())(2 * x)[0], atol=1e-5)
        assert torch.allclose(module({"x": x / 2})[0], base, atol=1e-5)


def test_unknown_transform_name_is_an_input_error() -> None:
    module = OnnxModule(small_cnn())
    assert "r" in module.tensor_names() and "w1" in module.tensor_names()
    with pytest.raises(InputError, match="'nope'"):
        module.set_transform("nope", nn.Identity())


def test_unsupported_ops_are_all_named_with_counts() -> None:
    nodes = [helper.make_node("Foo", ["x"], ["a"]), helper.make_node("Foo", ["a"], ["b"]),
             helper.make_node("Bar", ["b"], ["c"], domain="com.example"),
             helper.make_node("Foo", ["c"], ["d"]),
             helper.make_node("Resize", ["d", "", "s"], ["y"], antialias=1)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = make_model(nodes, [x], [y], {"s": np.array([1, 1, 2, 2], np.float32)}, opset=18)
    with pytest.raises(UnsupportedOpError) as caught:
        OnnxModule(model)
    assert str(caught.value) == "unsupported ops: Foo x3, com.example::Bar x1, Resize(antialias=1) x1"


def test_unsupported_ops_counts_what_compile_would_refuse() -> None:
    nodes = [helper.make_node("Foo", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Bar", ["b"], ["c"], domain="com.example"),
             helper.make_node("Bar", ["c"], ["d"], domain="com.example"),
             helper.make_node("Constant", [], ["k"], sparse_value=helper.make_sparse_tensor(
                 numpy_helper.from_array(np.array([1.0], np.float32), "v"),
                 numpy_helper.from_array(np.array([0], np.int64), "i"), [2])),
             helper.make_node("MaxPool", ["d"], ["e", "idx"], kernel_shape=[2, 2]),
             helper.make_node("Add", ["e", "k"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = make_model(nodes, [x], [y])
    missing = unsupported_ops(model)
    assert missing == {"com.example::Bar": 2, "Foo": 1, "Constant(sparse_value)": 1, "MaxPool(with indices output)": 1}
    assert list(missing)[0] == "com.example::Bar"  # most frequent first
    assert unsupported_ops(small_cnn()) == {}
    check_supported(small_cnn())  # no error
    with pytest.raises(UnsupportedOpError, match="^unsupported ops: com.example::Bar x2, Foo x1, "):
        check_supported(model)


def pinned_model() -> onnx.ModelProto:
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"], name="pool"),
             helper.make_node("Reshape", ["p", "shape"], ["y"], name="flatten_to_1x8")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return make_model(nodes, [x], [y], {"shape": np.array([1, 8], np.int64)})


def test_constant_shape_pinning_batch_is_named() -> None:
    module = OnnxModule(pinned_model())
    assert module(torch.randn(1, 8, 4, 4))[0].shape == (1, 8)
    with pytest.raises(InputError, match=r"pins batch size to 1 at node 'flatten_to_1x8'"):
        module(torch.randn(4, 8, 4, 4))


def test_batch_free_on_shape_derived_reshape() -> None:
    """Reshape [0, -1] and Shape-derived shapes follow the runtime batch (vs onnxruntime)."""
    module = OnnxModule(small_cnn())
    x = np.random.default_rng(2).standard_normal((5, 3, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(small_cnn().SerializeToString()).run(None, {"x": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.from_numpy(x))[0].numpy(), want, rtol=1e-5, atol=1e-5)


def test_input_errors_are_one_line_input_errors() -> None:
    module = OnnxModule(small_cnn())
    with pytest.raises(InputError, match=r"missing input\(s\): 'x'"):
        module({})
    with pytest.raises(InputError, match=r"missing input\(s\): 'x'"):
        module()
    with pytest.raises(InputError, match="unknown input"):
        module({"x": torch.randn(1, 3, 8, 8), "z": torch.randn(1)})
    with pytest.raises(InputError, match="rank 3.*expects rank 4"):
        module(torch.randn(3, 8, 8))
    with pytest.raises(InputError, match="axis 1"):
        module(torch.randn(1, 2, 8, 8))
    with pytest.raises(InputError, match="takes 1 input"):
        module(torch.randn(1, 3, 8, 8), torch.randn(1))
    with pytest.raises(InputError, match="Conv"):
        module(torch.randn(1, 3, 1, 0))
    with pytest.raises(InputError) as caught:
        module(torch.randn(3, 8, 8))
    assert "\n" not in str(caught.value)


def test_module_moves_and_converts_like_a_torch_module() -> None:
    module = OnnxModule(small_cnn())
    weights = [b for b in module.buffers() if b.dim() == 4]
    assert weights and all(b.dtype == torch.float32 for b in weights)
    module.double()
    assert all(b.dtype == torch.float64 for b in module.buffers() if b.is_floating_point())
    assert module(torch.randn(1, 3, 8, 8))[0].dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    module = OnnxModule(small_cnn())
    x = torch.randn(2, 3, 8, 8)
    want = module(x)[0]
    got = module.cuda()(x.cuda())[0]
    assert got.is_cuda
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_cpu_inputs_run_channels_last_with_the_same_values_and_gradients() -> None:
    """The layout rule: a 4-D float input runs channels last, which the convs and a projection
    keep; outputs and the projection's gradients are the default layout's, to float rounding."""
    from fmcompress.backend.projection import ChannelProjection, mix_channels

    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    P, U = rng.standard_normal((2, 4)).astype(np.float32), rng.standard_normal((4, 2)).astype(np.float32)  # noqa: N806
    runs = {}
    for channels_last in (False, True):
        module = OnnxModule(small_cnn())
        module.channels_last = channels_last
        projection = ChannelProjection(P, U)
        module.set_transform("r", projection)
        with torch.no_grad():
            frontier = module.advance(module.start(x), module.producer_step("r") + 1)
        projected = module.value(frontier, "r")
        (y,) = module(x)
        y.square().sum().backward()
        runs[channels_last] = (y.detach(), projection.P.grad, projection.U.grad, projected)
    assert runs[True][3].is_contiguous(memory_format=torch.channels_last) and runs[False][3].is_contiguous()
    for before, now in zip(runs[False], runs[True], strict=True):
        torch.testing.assert_close(now, before, rtol=1e-5, atol=1e-5)
    mixing = torch.from_numpy(rng.standard_normal((5, 3)).astype(np.float32))
    mixed = mix_channels(mixing, x.contiguous(memory_format=torch.channels_last))
    assert mixed.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(mixed, mix_channels(mixing, x))
