"""ChunkBatchAxesPass: attention computed in chunks of its batch axes (N, P, heads), exactly."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from fmcompress.cli import main
from fmcompress.passes import PassContext
from fmcompress.passes.chunk_batch_axes import ChunkBatchAxesPass, batch_uncovered
from fmcompress.passes.runtime import runtime_view
from fmcompress.passes.runtime_names import runtime_names
from fmcompress.shapes import resolve_input_shapes

KB = 1024


def attention(p: int = 2, heads: int = 4, t: int = 32, d: int = 8, *, transpose_k: bool = False,
              tail: str | None = None, softmax_axis: int = -1, mixer: str | None = None, bias: bool = False,
              merge: bool = False, opset: int = 17) -> onnx.ModelProto:
    """q, k, v [1, p, heads, t, d] (k given as k^T [.., d, t] unless `transpose_k`):
    scores = Softmax(q @ k^T * scale) [1, p, heads, t, t], o = scores @ v, then Relu.

    `tail`: "linear" permutes o back to [1, p, t, heads * d] and projects it to 4 columns (a
    Linear, which sums over the heads); "reshape" ends at that reshape, a graph output.
    `bias`: a constant per-head bias [heads, t, t] added to the scores. `merge`: the softmax
    runs on the scores reshaped to [1, p * heads, t, t]. `mixer`: an op over the heads (axis 2)
    after the softmax ("ReduceSum", keepdims), whose output the MatMul by v broadcasts."""
    rng = np.random.default_rng(0)
    five = [1, p, heads, t, d]
    inits = [numpy_helper.from_array(np.array(d ** -0.5, np.float32), "scale")]
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, five),
              helper.make_tensor_value_info("k" if transpose_k else "kt", TensorProto.FLOAT,
                                            five if transpose_k else [1, p, heads, d, t]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, five)]
    nodes = []
    if transpose_k:
        nodes.append(helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 1, 2, 4, 3]))
    nodes += [helper.make_node("MatMul", ["q", "kt"], ["s"], name="qk"),
              helper.make_node("Mul", ["s", "scale"], ["z"], name="scale")]
    scores = "z"
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal((heads, t, t)).astype(np.float32), "pos"))
        nodes.append(helper.make_node("Add", ["z", "pos"], ["zb"], name="pos_bias"))
        scores = "zb"
    if merge:
        inits += [numpy_helper.from_array(np.array([1, p * heads, t, t], np.int64), "merged"),
                  numpy_helper.from_array(np.array([1, p, heads, t, t], np.int64), "unmerged")]
        nodes += [helper.make_node("Reshape", [scores, "merged"], ["zm"], name="merge"),
                  helper.make_node("Softmax", ["zm"], ["am"], name="softmax", axis=softmax_axis),
                  helper.make_node("Reshape", ["am", "unmerged"], ["a"], name="unmerge")]
    else:
        nodes.append(helper.make_node("Softmax", [scores], ["a"], name="softmax", axis=softmax_axis))
    probs = "a"
    if mixer:
        nodes.append(helper.make_node(mixer, ["a", "heads_axis"] if opset >= 13 else ["a"], ["m"], name="mixer",
                                      keepdims=1, **({} if opset >= 13 else {"axes": [2]})))
        inits.append(numpy_helper.from_array(np.array([2], np.int64), "heads_axis"))
        probs = "m"
    nodes.append(helper.make_node("MatMul", [probs, "v"], ["o"], name="av"))
    if tail in ("linear", "reshape"):
        inits.append(numpy_helper.from_array(np.array([1, p, t, heads * d], np.int64), "back"))
        nodes += [helper.make_node("Transpose", ["o"], ["ot"], name="heads_last", perm=[0, 1, 3, 2, 4]),
                  helper.make_node("Reshape", ["ot", "back"], ["x"], name="reshape_back")]
    if tail == "linear":
        inits.append(numpy_helper.from_array(rng.standard_normal((heads * d, 4)).astype(np.float32), "W"))
        nodes += [helper.make_node("MatMul", ["x", "W"], ["lin"], name="proj"),
                  helper.make_node("Relu", ["lin"], ["y"], name="relu")]
        output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, p, t, 4])
    elif tail == "reshape":
        output = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, p, t, heads * d])
    else:
        nodes.append(helper.make_node("Relu", ["o"], ["y"], name="relu"))
        output = helper.make_tensor_value_info("y", TensorProto.FLOAT, five)
    graph = helper.make_graph(nodes, "attention", inputs, [output], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _chunked(model: onnx.ModelProto, budget: int) -> tuple[onnx.ModelProto, list[dict]]:
    """The pass's model, checked: the input untouched, outputs as the input's (1e-5), and no
    onnxruntime allocation above `budget`."""
    before = onnx.ModelProto.FromString(model.SerializeToString())
    result = ChunkBatchAxesPass(budget)(model, PassContext())
    assert model == before
    onnx.checker.check_model(result.model, full_check=True)
    feeds = _feeds(model)
    for got, want in zip(_run(result.model, feeds), _run(model, feeds), strict=True):
        assert np.abs(got - want).max() <= 1e-5
    assert runtime_view(model, ceiling_bytes=budget).over_ceiling()
    assert not runtime_view(result.model, ceiling_bytes=budget).over_ceiling()
    return result.model, result.data


def _uncovered(model: onnx.ModelProto, budget: int) -> list[str]:
    view = runtime_view(model, ceiling_bytes=budget)
    aliases = runtime_names(model, view, resolve_input_shapes(model, {}))
    over = [t for t in view.over_ceiling() if t.role != "workspace"]
    return [t.name for t in batch_uncovered(model, over, budget, PassContext(), aliases)]


@pytest.mark.parametrize("opset", [17, 11, 9])
def test_attention_in_chunks_of_heads_is_exact(opset):
    """Scores 32 KiB, 4 KiB per (p, head); at 8 KiB a chunk is one head of both p: 4 chunks,
    the end (o, 8 KiB) written by one Concat along the heads."""
    model, data = _chunked(attention(opset=opset), 8 * KB)
    assert data == [{"node": "qk", "end": "o", "axes": {1: 2, 2: 4}, "singles": [], "axis": 2, "chunk": 1,
                     "chunks": 4}]
    concat = next(n for n in model.graph.node if n.output[0] == "o")
    assert concat.op_type == "Concat" and helper.get_attribute_value(concat.attribute[0]) == 2
    assert sum(n.op_type == "Softmax" for n in model.graph.node) == 4


def test_two_axes_when_one_is_not_enough():
    """At 4 KiB one head of both p is above: one p and one head a chunk (S = {P}, A = heads),
    Concats along the heads then along p; k^T (8 KiB, a Transpose of the input k) is above the
    budget, so the Transpose joins the region and runs per chunk."""
    model, data = _chunked(attention(transpose_k=True), 4 * KB)
    assert data[0]["singles"] == [1] and data[0]["axis"] == 2 and data[0]["chunks"] == 8
    assert sum(n.op_type == "Transpose" for n in model.graph.node) == 8
    assert "kt" not in {o for n in model.graph.node for o in n.output}


def test_transpose_of_k_that_fits_stays_outside():
    model, data = _chunked(attention(transpose_k=True), 8 * KB)
    assert data[0]["chunks"] == 4
    assert sum(n.op_type == "Transpose" for n in model.graph.node) == 1  # kt (8 KiB) is sliced


def test_reshape_back_and_linear_join_and_the_heads_are_summed():
    """o (8 KiB) above a 4 KiB budget: the region runs on through the permute, the reshape back
    to [1, p, t, heads * d] and the Linear (1 KiB: the end), which sums over the heads, so the
    chunks are along p alone: 2 p a chunk of 4 p."""
    model, data = _chunked(attention(p=4, heads=2, t=16, d=16, tail="linear"), 4 * KB)
    assert data == [{"node": "qk", "end": "lin", "axes": {1: 4, 2: 2}, "singles": [], "axis": 1, "chunk": 2,
                     "chunks": 2}]
    reshapes = [n for n in model.graph.node if n.op_type == "Reshape"]
    shapes = {tuple(numpy_helper.to_array(i).tolist()) for i in model.graph.initializer
              if i.name in {r.input[1] for r in reshapes}}
    assert shapes == {(1, 2, 16, 32)}


def test_reshape_back_keeps_the_heads_as_the_outer_part_of_its_columns():
    """o (4 KiB) above 2 KiB: ending at the reshape back (a graph output), the heads are the outer part of its last
    axis (4 x 8 columns), so chunks along the heads are spliced by a Concat along it."""
    model, data = _chunked(attention(t=16, tail="reshape"), 2 * KB)
    assert data[0]["end"] == "x" and data[0]["axis"] == 2
    concat = next(n for n in model.graph.node if n.output[0] == "x")
    assert concat.op_type == "Concat" and helper.get_attribute_value(concat.attribute[0]) == 3


def test_per_head_constant_is_sliced_and_a_merging_reshape_keeps_the_outer_axis():
    _, data = _chunked(attention(bias=True), 8 * KB)
    assert data[0]["axis"] == 2  # the bias [heads, t, t] in blocks of heads
    _, data = _chunked(attention(merge=True), 16 * KB)  # p and heads merged: only p stays whole
    assert data[0]["axis"] == 1 and data[0]["chunks"] == 2


def test_a_softmax_over_the_heads_leaves_the_other_axis():
    _, data = _chunked(attention(softmax_axis=2), 16 * KB)
    assert data[0]["axis"] == 1 and data[0]["chunks"] == 2


@pytest.mark.parametrize("model", [attention(p=1, softmax_axis=2), attention(mixer="ReduceSum")],
                         ids=["softmax-over-the-only-axis", "reducesum-over-heads"])
def test_an_op_that_mixes_the_chunk_axis_is_refused(model):
    """The scores' region is refused: a softmax over the one batch axis longer than 1, or a
    ReduceSum (not a listed op) over the heads. (The MatMul of the summed scores [1, p, 1, t, t]
    by v is a region of its own, chunked with the summed scores broadcast along the heads.)"""
    result = ChunkBatchAxesPass(4 * KB)(model, PassContext())
    assert all(entry["node"] != "qk" for entry in result.data)
    assert any(n.name == "qk" for n in result.model.graph.node)
    feeds = _feeds(model)
    np.testing.assert_allclose(_run(result.model, feeds)[0], _run(model, feeds)[0], rtol=1e-5, atol=1e-5)
    over = _uncovered(model, 4 * KB)
    assert "a" in over and "z" in over  # the softmax, and the FusedMatMul writing the Mul's output


def test_budget_below_one_slice_is_refused():
    model = attention()
    assert ChunkBatchAxesPass(4 * KB - 4)(model, PassContext()).data == []  # one (p, head): 4 KiB
    assert ChunkBatchAxesPass(32 * KB)(model, PassContext()).data == []  # everything fits


def test_coverage_names_what_onnxruntime_fuses():
    model = attention()
    names = {t.name for t in runtime_view(model, ceiling_bytes=8 * KB).over_ceiling()}
    assert names  # the scores, under onnxruntime's names (MatMul and Mul fused: a FusedMatMul)
    assert _uncovered(model, 8 * KB) == []
    assert _uncovered(model, 4 * KB - 4)  # one (p, head) above the ceiling stays uncovered


@pytest.mark.slow
def test_compile_mobilevit_256_holds_512kb_in_onnxruntime(zoo_onnx, tmp_path):
    """The zoo's MobileViT at 256x256: its first transformer's scores [1, 4, 4, 256, 256] (4 MiB)
    are the only allocations nothing else covers at 512KB; in chunks of one p and two heads
    (512 KiB) the compile succeeds (it verifies outputs and the ceiling in onnxruntime)."""
    path, out = zoo_onnx("mobilevit", (1, 3, 256, 256)), tmp_path / "mv512.onnx"
    result = CliRunner().invoke(main, ["compile", str(path), "--runtime", "ort", "--ceiling", "512KB",
                                       "--method", "pca", "--num-samples", "8", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    compiled = onnx.load(str(out))
    assert sum(n.op_type == "Softmax" and "/chunk" in n.name for n in compiled.graph.node) == 16
    assert not runtime_view(compiled, ceiling_bytes=512 * KB,
                            input_shapes={"input": (1, 3, 256, 256)}).over_ceiling()
