"""The executor runs inlined activations fused (fmcompress/backend/fusion.py rules a-d):
the same outputs as onnxruntime and as the chain run node by node, the same gradients, and a
chain whose inside is asked for by name runs unfused."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fmcompress.backend.executor import OnnxModule

C = 4


def _const(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, np.float32), name)


def hard_swish_chain(*, ending: str = "div", swap: bool = False,
                     three: float = 3.0) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """x * Clip(x + 3, 0, 6) / 6 as paddle2onnx writes it (`swap` flips Add's and Mul's operands)."""
    add = ["three", "x"] if swap else ["x", "three"]
    mul = ["clipped", "x"] if swap else ["x", "clipped"]
    nodes = [helper.make_node("Add", add, ["shifted"]), helper.make_node("Clip", ["shifted", "zero", "six"], ["clipped"]),
             helper.make_node("Mul", mul, ["product"])]
    last = helper.make_node("Div", ["product", "six"], ["act"]) if ending == "div" else \
        helper.make_node("Mul", ["sixth", "product"], ["act"])
    return [*nodes, last], [_const("three", three)]


def gated_chain(gate: str, swap: bool = False) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    attrs = {"alpha": 1 / 6, "beta": 0.5} if gate == "HardSigmoid" else {}
    return [helper.make_node(gate, ["x"], ["gate"], **attrs),
            helper.make_node("Mul", ["gate", "x"] if swap else ["x", "gate"], ["act"])], []


def scale_shift_chain(swap: bool = False, scale_shape: tuple[int, ...] = ()) -> tuple[list, list]:
    """x * a + b with one-element a and b (PP-LCNetV3's learnable affine block)."""
    scale = numpy_helper.from_array(np.full(scale_shape, 1.3, np.float32), "scale")
    return [helper.make_node("Mul", ["scale", "x"] if swap else ["x", "scale"], ["scaled"]),
            helper.make_node("Add", ["shift", "scaled"] if swap else ["scaled", "shift"], ["act"])], \
        [scale, _const("shift", -0.4)]


def batch_norm_chain() -> tuple[list, list]:
    """An inference BatchNormalization with non-trivial statistics (epsilon not the default)."""
    rng = np.random.default_rng(2)
    stats = {"gamma": rng.uniform(0.5, 2, C), "beta": rng.standard_normal(C), "mean": rng.standard_normal(C),
             "var": rng.uniform(0.1, 3, C)}
    return [helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["act"], epsilon=1e-3)], \
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in stats.items()]


def model_around(chain: list[onnx.NodeProto], extra: list[onnx.TensorProto], outputs=("y",),
                 opset: int = 17, bias: bool = False) -> onnx.ModelProto:
    """Conv -> chain -> Conv: the chain reads a map and feeds a consumer, as in a network
    (`bias`: the first Conv has one)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((C, C, 3, 3)) / 6).astype(np.float32), f"w{i}") for i in (0, 1)]
    inits += [_const("zero", 0.0), _const("six", 6.0), _const("sixth", 1 / 6), *extra]
    inits += [numpy_helper.from_array(rng.standard_normal(C).astype(np.float32), "b0")] if bias else []
    nodes = [helper.make_node("Conv", ["inp", "w0", *(["b0"] if bias else [])], ["x"], pads=[1] * 4,
                              strides=[1, 1]), *chain,
             helper.make_node("Conv", ["act", "w1"], ["y"], pads=[1] * 4)]
    value = {n: helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs if n != "y"}
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("inp", TensorProto.FLOAT, [2, C, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, C, 8, 8]),
                               *value.values()], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _input() -> np.ndarray:
    return (np.random.default_rng(1).standard_normal((2, C, 8, 8)) * 3).astype(np.float32)


def _ort(model: onnx.ModelProto) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"inp": _input()})[0]


def _unfused(model: onnx.ModelProto) -> OnnxModule:
    module = OnnxModule(model, fuse=False)  # the chain node by node: the reference
    assert not module.fused_chains()
    return module


@pytest.mark.parametrize(("chain", "kind"), [
    (hard_swish_chain(), "HardSwish"), (hard_swish_chain(swap=True), "HardSwish"),
    (hard_swish_chain(ending="mul"), "HardSwish"), (gated_chain("HardSigmoid"), "HardSwish"),
    (gated_chain("Sigmoid"), "SiLU"), (gated_chain("Sigmoid", swap=True), "SiLU"),
    (scale_shift_chain(), "ConvScaleShift"), (scale_shift_chain(swap=True), "ConvScaleShift"),
    (scale_shift_chain(scale_shape=(1,)), "ConvScaleShift"), (batch_norm_chain(), "ConvBatchNorm")])
@pytest.mark.parametrize("bias", [False, True])
def test_chains_fuse_and_agree_with_onnxruntime(chain, kind, bias):
    """Rules a, b, b', b'' and b''': one fused chain, outputs equal to onnxruntime's and to the chain
    unfused, gradients equal to the chain's."""
    model = model_around(*chain, bias=bias)
    module = OnnxModule(model)
    assert module.fused_chains() == [(kind, "act")]
    x = torch.from_numpy(_input())
    with torch.no_grad():
        fused = module(x)[0].numpy()
    np.testing.assert_allclose(fused, _ort(model), rtol=1e-5, atol=1e-5)
    grads = []
    for executor in (module, _unfused(model)):
        leaf = x.clone().requires_grad_(True)
        executor(leaf)[0].square().sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-4)


def test_a_scale_and_shift_of_a_shared_conv_output_fuses_alone():
    """Rule b' without b'': the Conv's output is read elsewhere too (here a graph output), so the
    Conv runs as it is and the scale and shift fuse into one kernel after it."""
    model = model_around(*scale_shift_chain(), outputs=("y", "x"), bias=True)
    module = OnnxModule(model)
    assert module.fused_chains() == [("ScaleShift", "act")]
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.from_numpy(_input()))[0].numpy(), _ort(model), rtol=1e-5, atol=1e-5)


def test_a_transform_on_the_conv_output_unfuses_the_conv_scale_shift():
    """Rule d for b'': the Conv's output is a hidden value; a transform on it is applied."""
    model = model_around(*scale_shift_chain(), bias=True)
    module = OnnxModule(model)
    module.set_transform("x", torch.nn.Identity())
    assert module.fused_chains() == []


def test_opset_10_clip_attributes_fuse():
    chain, extra = hard_swish_chain()
    chain[1] = helper.make_node("Clip", ["shifted"], ["clipped"], min=0.0, max=6.0)
    model = model_around(chain, extra, opset=10)
    assert OnnxModule(model).fused_chains() == [("HardSwish", "act")]
    with torch.no_grad():
        np.testing.assert_allclose(OnnxModule(model)(torch.from_numpy(_input()))[0].numpy(), _ort(model),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["other constant", "hidden value is an output", "gate of another map",
                                  "scale per channel", "batch norm of a conv output read elsewhere"])
def test_what_does_not_fuse(case):
    """Rule c: another constant, a hidden value read outside the chain, a gate of another tensor;
    rule b': a scale of more than one element; rule b''': a Conv output that is a graph output."""
    if case == "batch norm of a conv output read elsewhere":
        model = model_around(*batch_norm_chain(), outputs=("y", "x"))
    elif case == "scale per channel":
        model = model_around(*scale_shift_chain(scale_shape=(C, 1, 1)))
    elif case == "other constant":
        model = model_around(*hard_swish_chain(three=2.5))
    elif case == "hidden value is an output":
        model = model_around(*hard_swish_chain(), outputs=("y", "clipped"))
    else:
        chain = [helper.make_node("Sigmoid", ["inp"], ["gate"]), helper.make_node("Mul", ["x", "gate"], ["act"])]
        model = model_around(chain, [])
    module = OnnxModule(model)
    assert module.fused_chains() == []
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.from_numpy(_input()))[0].numpy(), _ort(model), rtol=1e-5, atol=1e-5)


def test_a_hidden_value_asked_for_by_name_is_computed():
    """Rule d: a transform on a hidden value applies (the chain runs unfused); the producer
    step of another hidden value reveals it to a paused run."""
    model = model_around(*hard_swish_chain())
    module = OnnxModule(model)
    x = torch.from_numpy(_input())
    module.set_transform("clipped", torch.nn.Identity())
    assert module.fused_chains() == []

    other = OnnxModule(model)
    step = other.producer_step("product")
    frontier = other.advance(other.start(x), step + 1)
    assert other.fused_chains() == [] and other.value(frontier, "product") is not None


@pytest.mark.parametrize(("chain", "kind"), [(hard_swish_chain(), "HardSwish"),
                                             (scale_shift_chain(), "ConvScaleShift"),
                                             (batch_norm_chain(), "ConvBatchNorm")])
def test_a_run_paused_inside_a_fused_chain_resumes_as_forward(chain, kind):
    """Rule d: steps keep their numbers; a fork taken at every step resumes to the same output."""
    model = model_around(*chain, bias=True)
    module = OnnxModule(model)
    x = torch.from_numpy(_input())
    with torch.no_grad():
        whole = module(x)[0]
        for stop in range(module.num_steps + 1):
            paused = module.trim(module.advance(module.start(x), stop))
            resumed = module.outputs(module.advance(module.fork(paused), module.num_steps))[0]
            torch.testing.assert_close(resumed, whole, rtol=0, atol=0)
    assert module.fused_chains() == [(kind, "act")]


def test_real_models_fuse_every_inlined_activation():
    """PP-OCR's recognizer writes its 28 HardSwishes as chains and 56 scalar affine blocks as
    Mul then Add, 28 of them right after a Conv; the fused executor agrees with the chains run
    node by node."""
    from fmcompress.evaluation.thirdparty import real_model

    path = real_model("ppocr-rec")
    module = OnnxModule(str(path))
    kinds = [kind for kind, _ in module.fused_chains()]
    assert (kinds.count("HardSwish"), kinds.count("ScaleShift"), kinds.count("ConvScaleShift")) == (28, 28, 28)
    x = torch.rand(2, 3, 48, 320)
    with torch.no_grad():
        torch.testing.assert_close(module(x)[0], _unfused(onnx.load(str(path)))(x)[0], rtol=1e-5, atol=1e-5)
