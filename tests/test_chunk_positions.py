"""ChunkPositionsPass: a per-position classifier computed in chunks of positions (exact)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fmcompress import api
from fmcompress.errors import VerificationError
from fmcompress.passes import PassContext
from fmcompress.passes.chunk_positions import ChunkPositionsPass
from fmcompress.passes.fold import FoldProjectionsPass
from fmcompress.passes.runtime import runtime_view

CLASSES = 2000


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def recognizer(width: int = 64, softmax: str = "Softmax") -> onnx.ModelProto:
    """Convs down to one row, reshaped to [1, T, K] (T = width / 4 time steps), then a
    classifier over 2000 classes at every step: MatMul, bias, softmax."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 2 else shape[0]
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name)

    steps = width // 4
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="rows", kernel_shape=[4, 1], strides=[4, 1]),
        helper.make_node("Reshape", ["p1", "shape"], ["seq0"], name="to_seq"),  # [1, K, T]
        helper.make_node("Transpose", ["seq0"], ["seq"], name="time_major", perm=[0, 2, 1]),  # [1, T, K]
        helper.make_node("MatMul", ["seq", "fc"], ["logits"], name="fc"),
        helper.make_node("Add", ["logits", "fc_b"], ["biased"], name="fc_bias"),
        helper.make_node(softmax, ["biased"], ["probs"], name="probs", axis=-1),
    ]
    inits = [weight("w0", 16, 3, 3, 3), weight("w1", 32, 16, 3, 3), weight("fc", 32, CLASSES),
             numpy_helper.from_array(np.full(16, 0.05, np.float32), "b0"),
             numpy_helper.from_array(np.full(32, 0.05, np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal(CLASSES).astype(np.float32) * 0.1, "fc_b"),
             numpy_helper.from_array(np.array([1, 32, steps], np.int64), "shape")]
    graph = helper.make_graph(
        nodes, "recognizer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, width])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, steps, CLASSES])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("softmax", ["Softmax", "LogSoftmax"])
def test_chunking_is_exact_and_every_chunk_fits(softmax):
    model = recognizer(softmax=softmax)
    budget = 16 * 1024  # one step of 2000 classes is 8000 B: chunks of 2 steps, 8 chunks
    before = onnx.ModelProto.FromString(model.SerializeToString())
    result = ChunkPositionsPass(budget)(model, PassContext())
    assert result.data == [{"node": "fc", "positions": 16, "chunk": 2, "chunks": 8}]
    assert model == before  # the input model is untouched
    onnx.checker.check_model(result.model, full_check=True)
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(result.model, x), _run(model, x), rtol=1e-5, atol=1e-5)
    assert runtime_view(model, ceiling_bytes=budget).over_ceiling()  # the fused Gemm's 128000 B
    view = runtime_view(result.model, ceiling_bytes=budget)
    assert not view.over_ceiling()


def test_a_chain_that_does_not_end_at_an_output_is_left_alone():
    model = recognizer()
    reduce = helper.make_node("ReduceMax", ["probs"], ["best"], keepdims=0, axes=[2])  # opset 17: attribute
    model.graph.node.append(reduce)
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("best", TensorProto.FLOAT, [1, 16]))
    result = ChunkPositionsPass(16 * 1024)(model, PassContext())
    assert result.data == [] and not result.modified


def test_compile_runtime_ort_chunks_the_classifier_and_holds_the_ceiling():
    model = recognizer()
    ceiling = 16 * 1024
    result = api.compile(model, ceiling=f"{ceiling}B", method="pca", runtime="ort", num_samples=8,
                         measure_memory=False, latency_rounds=1, latency_repeats=2)
    assert result.report["runtime"]["before"]["computed_peak_bytes"] > 3 * ceiling
    after = runtime_view(result.model, ceiling_bytes=ceiling)
    assert not after.over_ceiling()
    assert any(n.op_type == "Concat" and n.output[0] == "probs" for n in result.model.graph.node)
    # exact: the same projections folded without chunking (or tiling) give the same outputs
    unchunked = FoldProjectionsPass(result.projections)(model, PassContext()).model if result.projections else model
    x = np.random.default_rng(2).standard_normal((1, 3, 16, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(result.model, x), _run(unchunked, x), rtol=1e-5, atol=1e-5)


def test_one_step_above_the_ceiling_is_still_refused():
    with pytest.raises(VerificationError, match="cannot be tiled or projected"):
        api.compile(recognizer(), ceiling="4KB", method="pca", runtime="ort", num_samples=8, measure_memory=False)


@pytest.mark.real
@pytest.mark.slow
def test_ppocr_rec_compiles_at_1mb_with_its_classifier_in_chunks():
    """PP-OCRv4's recognizer: at 1MB every allocation but the classifier's fused Gemm
    (40 steps x 6625 classes, 1060000 B) fits; it is computed in 2 chunks, losslessly."""
    from fmcompress.evaluation.thirdparty import REAL_MODELS, real_model

    model = onnx.load(str(real_model("ppocr-rec")))
    shape = REAL_MODELS["ppocr-rec"].input_shape
    result = api.compile(model, ceiling="1MB", method="pca", runtime="ort", num_samples=8,
                         input_shapes=[",".join(map(str, shape))], measure_memory=False,
                         latency_rounds=1, latency_repeats=2)
    assert not runtime_view(result.model, ceiling_bytes=1 << 20,
                            input_shapes={model.graph.input[0].name: shape}).over_ceiling()
    chunks = [n for n in result.model.graph.node if n.op_type == "Softmax" and "/chunk" in n.name]
    assert len(chunks) == 2  # 39 steps fit: 2 chunks
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(_run(result.model, x), _run(model, x), rtol=1e-5, atol=1e-5)
