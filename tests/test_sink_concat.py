"""SinkConcatPass: an anchor-axis Concat computed per piece; outputs equal in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fmcompress import api
from fmcompress.evaluation.thirdparty import real_model
from fmcompress.passes import PassContext
from fmcompress.passes.graph import Model
from fmcompress.passes.runtime import runtime_view
from fmcompress.passes.sink_concat import SinkConcatPass

LEVELS = ((16, 16), (8, 8), (4, 4))  # H, W per level: 256 + 64 + 16 anchors
BOX, CLS, BINS = 16, 3, 4  # box channels = 4 sides x BINS


def _run(model: onnx.ModelProto, x: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, x)


def _inputs(batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"p{i}": rng.standard_normal((batch, 8, h, w)).astype(np.float32) for i, (h, w) in enumerate(LEVELS)}


def head(*, after_concat: list[onnx.NodeProto] | None = None, dynamic_grid: bool = False,
         batch: int | str = 1, out_rank: int = 3) -> onnx.ModelProto:
    """A YOLOv8-style decode head: per level Concat(box conv, cls conv) -> [N, 19, HW], the levels
    concatenated on the anchor axis, Split, DFL (Reshape, Transpose, Softmax, 1x1 Conv),
    dist2bbox with the anchor grid and strides, Concat with the class sigmoid.

    `after_concat` replaces everything after the anchor Concat (reading "cat", writing "out").
    `dynamic_grid`: the anchor grid comes from Shape / Range / Expand of the level maps."""
    rng = np.random.default_rng(1)
    anchors = sum(h * w for h, w in LEVELS)
    nodes, inits = [], []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    reshaped = []
    for i in range(len(LEVELS)):
        const(f"wb{i}", (rng.standard_normal((BOX, 8, 3, 3)) * 0.3).astype(np.float32))
        const(f"wc{i}", (rng.standard_normal((CLS, 8, 1, 1)) * 0.3).astype(np.float32))
        nodes += [helper.make_node("Conv", [f"p{i}", f"wb{i}"], [f"box{i}"], name=f"box{i}", kernel_shape=[3, 3],
                                   pads=[1, 1, 1, 1]),
                  helper.make_node("Conv", [f"p{i}", f"wc{i}"], [f"cls{i}"], name=f"cls{i}", kernel_shape=[1, 1]),
                  helper.make_node("Concat", [f"box{i}", f"cls{i}"], [f"lvl{i}"], name=f"lvl{i}", axis=1),
                  helper.make_node("Reshape", [f"lvl{i}", const(f"flat{i}", np.array([0, BOX + CLS, -1]))],
                                   [f"r{i}"], name=f"r{i}")]
        reshaped.append(f"r{i}")
    nodes.append(helper.make_node("Concat", reshaped, ["cat"], name="cat", axis=2))
    if after_concat is not None:
        nodes += after_concat
    else:
        grid, strides = _grid()
        grid_name = _dynamic_grid(nodes, const) if dynamic_grid else const("grid", grid)
        nodes += [
            helper.make_node("Split", ["cat", const("split", np.array([BOX, CLS]))], ["b", "c"], name="split", axis=1),
            helper.make_node("Reshape", ["b", const("dfl_shape", np.array([0, 4, BINS, anchors]))], ["b4"],
                             name="dfl_reshape"),
            helper.make_node("Transpose", ["b4"], ["bt"], name="dfl_transpose", perm=[0, 2, 1, 3]),
            helper.make_node("Softmax", ["bt"], ["bs"], name="dfl_softmax", axis=1),
            helper.make_node("Conv", ["bs", const("bins", np.arange(BINS, dtype=np.float32).reshape(1, BINS, 1, 1))],
                             ["bd"], name="dfl_conv", kernel_shape=[1, 1]),
            helper.make_node("Reshape", ["bd", const("d_shape", np.array([0, 4, anchors]))], ["d"], name="d"),
            helper.make_node("Split", ["d", const("half", np.array([2, 2]))], ["lt", "rb"], name="ltrb", axis=1),
            helper.make_node("Sub", [grid_name, "lt"], ["x1y1"], name="x1y1"),
            helper.make_node("Add", [grid_name, "rb"], ["x2y2"], name="x2y2"),
            helper.make_node("Add", ["x1y1", "x2y2"], ["csum"], name="csum"),
            helper.make_node("Div", ["csum", const("two", np.float32(2))], ["cxy"], name="cxy"),
            helper.make_node("Sub", ["x2y2", "x1y1"], ["wh"], name="wh"),
            helper.make_node("Concat", ["cxy", "wh"], ["xywh"], name="xywh", axis=1),
            helper.make_node("Mul", ["xywh", const("strides", strides)], ["scaled"], name="scaled"),
            helper.make_node("Sigmoid", ["c"], ["cs"], name="cls_sigmoid"),
            helper.make_node("Concat", ["scaled", "cs"], ["out"], name="out", axis=1),
        ]
    inputs = [helper.make_tensor_value_info(f"p{i}", TensorProto.FLOAT, [batch, 8, h, w])
              for i, (h, w) in enumerate(LEVELS)]
    graph = helper.make_graph(nodes, "head", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None] * out_rank)],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _grid() -> tuple[np.ndarray, np.ndarray]:
    points, strides = [], []
    for h, w in LEVELS:
        ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
        points.append(np.stack([xs.ravel(), ys.ravel()]))
        strides.append(np.full(h * w, 64 // h, np.float32))
    return np.concatenate(points, 1)[None].astype(np.float32), np.concatenate(strides)[None].astype(np.float32)


def _dynamic_grid(nodes: list[onnx.NodeProto], const) -> str:
    """The anchor points of each level from Shape(level map): Range over H and W, Expand, Concat."""
    parts = []
    for i, _ in enumerate(LEVELS):
        p = f"g{i}"
        nodes += [
            helper.make_node("Shape", [f"lvl{i}"], [f"{p}/shape"]),
            helper.make_node("Gather", [f"{p}/shape", const(f"{p}/i2", np.array(2))], [f"{p}/h"], axis=0),
            helper.make_node("Gather", [f"{p}/shape", const(f"{p}/i3", np.array(3))], [f"{p}/w"], axis=0),
            helper.make_node("Cast", [f"{p}/h"], [f"{p}/hf"], to=TensorProto.FLOAT),
            helper.make_node("Cast", [f"{p}/w"], [f"{p}/wf"], to=TensorProto.FLOAT),
            helper.make_node("Range", [const(f"{p}/zero", np.float32(0.5)), f"{p}/hf", const(f"{p}/one", np.float32(1))],
                             [f"{p}/ys"]),
            helper.make_node("Range", [f"{p}/zero", f"{p}/wf", f"{p}/one"], [f"{p}/xs"]),
            helper.make_node("Unsqueeze", [f"{p}/ys", const(f"{p}/ax1", np.array([1]))], [f"{p}/ycol"]),
            helper.make_node("Unsqueeze", [f"{p}/xs", const(f"{p}/ax0", np.array([0]))], [f"{p}/xrow"]),
            helper.make_node("Add", [f"{p}/ycol", f"{p}/xrow"], [f"{p}/sum"]),  # [H, W], for the shape
            helper.make_node("Mul", [f"{p}/sum", const(f"{p}/z", np.float32(0))], [f"{p}/zeros"]),
            helper.make_node("Add", [f"{p}/zeros", f"{p}/xrow"], [f"{p}/gx"]),
            helper.make_node("Add", [f"{p}/zeros", f"{p}/ycol"], [f"{p}/gy"]),
            helper.make_node("Unsqueeze", [f"{p}/gx", const(f"{p}/ax00", np.array([0, 1]))], [f"{p}/gx4"]),
            helper.make_node("Unsqueeze", [f"{p}/gy", f"{p}/ax00"], [f"{p}/gy4"]),
            helper.make_node("Concat", [f"{p}/gx4", f"{p}/gy4"], [f"{p}/gxy"], axis=1),
            helper.make_node("Reshape", [f"{p}/gxy", const(f"{p}/flat", np.array([1, 2, -1]))], [f"{p}/points"]),
        ]
        parts.append(f"{p}/points")
    nodes.append(helper.make_node("Concat", parts, ["grid_dyn"], axis=2))
    return "grid_dyn"


# the anchor Concat [1, 19, 336] is 25,536 B, the Split's box half [1, 16, 336] 21,504 B,
# level 0's channel Concat [1, 19, 16, 16] 19,456 B, its box conv 16,384 B
CEILING = 18 * 1024


def _sink(model: onnx.ModelProto, ceiling: int = CEILING):
    return SinkConcatPass(ceiling)(model, PassContext())


@pytest.mark.parametrize("dynamic_grid", [False, True])
def test_head_is_exact_and_its_concats_are_gone(dynamic_grid):
    model = head(dynamic_grid=dynamic_grid)
    result = _sink(model)
    assert result.modified
    onnx.checker.check_model(result.model, full_check=True)
    sunk = {fact.concat: fact for fact in result.data}
    assert sunk["cat"].axis == 2 and sunk["cat"].sizes == [256, 64, 16]
    assert "lvl0" in sunk and sunk["lvl0"].sizes == [BOX, CLS]  # the Split cancels level 0's channel Concat
    feeds = _inputs()
    np.testing.assert_allclose(_run(result.model, feeds)[0], _run(model, feeds)[0], rtol=1e-5, atol=1e-5)
    before = {t.name for t in runtime_view(model, ceiling_bytes=CEILING).over_ceiling()}
    after = runtime_view(result.model, ceiling_bytes=CEILING)
    assert {"cat", "lvl0", "b", "bt", "bs"} <= before
    assert not after.over_ceiling()


def test_symbolic_batch_stays_free():
    model = head(dynamic_grid=True, batch="batch")
    result = SinkConcatPass(CEILING)(model, PassContext(input_shapes={f"p{i}": (1, 8, h, w) for i, (h, w)
                                                                          in enumerate(LEVELS)}))
    assert result.modified
    feeds = _inputs(batch=3, seed=4)  # per-batch Reshape targets keep dim 0 (rule c)
    np.testing.assert_allclose(_run(result.model, feeds)[0], _run(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_sinks_to_a_graph_output_through_elementwise_ops_with_sliced_constants():
    anchors = sum(h * w for h, w in LEVELS)
    scale = np.linspace(0.5, 2.0, anchors, dtype=np.float32)[None, None]  # varies along the anchor axis
    tail = [helper.make_node("Mul", ["cat", "scale"], ["m"], name="m"),
            helper.make_node("Relu", ["m"], ["out"], name="relu")]
    model = head(after_concat=tail)
    model.graph.initializer.append(numpy_helper.from_array(scale, "scale"))
    result = _sink(model)
    assert result.data[0].concat == "cat" and result.data[0].materialized == ["out"]
    feeds = _inputs(seed=5)
    np.testing.assert_allclose(_run(result.model, feeds)[0], _run(model, feeds)[0], rtol=1e-6)
    assert not {"cat", "m"} & {t.name for t in runtime_view(result.model, ceiling_bytes=CEILING).tensors}


@pytest.mark.parametrize("op", ["Softmax", "ReduceSum", "MatMul"])
def test_an_op_that_mixes_anchors_stops_the_sinking(op):
    """A reader across the anchor axis needs the whole Concat: the anchor Concat stays."""
    if op == "Softmax":
        mixing = helper.make_node("Softmax", ["cat"], ["mixed"], name="mix", axis=2)
    elif op == "ReduceSum":
        mixing = helper.make_node("ReduceSum", ["cat", "axes"], ["mixed"], name="mix", keepdims=1)
    else:
        mixing = helper.make_node("MatMul", ["cat", "mat"], ["mixed"], name="mix")
    tail = [helper.make_node("Sigmoid", ["cat"], ["sig"], name="sig"),  # per anchor, but over the ceiling
            helper.make_node("Add", ["sig", "cat"], ["both"], name="both"), mixing,
            helper.make_node("Identity", ["mixed"], ["out"], name="out")]
    model = head(after_concat=tail)
    model.graph.initializer.extend([numpy_helper.from_array(np.array([2]), "axes"),
                                    numpy_helper.from_array(np.ones((336, 2), np.float32), "mat")])
    result = _sink(model)
    # the anchor Concat is never split along the anchors (level 0's channel Concat may still
    # sink through everything, the mixing op included: it runs per channel group)
    assert "cat" not in {fact.concat for fact in result.data} and all(f.axis != 2 for f in result.data)
    feeds = _inputs(seed=6)
    np.testing.assert_allclose(_run(result.model, feeds)[0], _run(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_a_refused_candidate_leaves_no_trace_in_the_graph():
    """Nodes built for a candidate that is then refused are unlinked again (rule e): every
    tensor's producers and readers are nodes of the graph."""
    tail = [helper.make_node("Sigmoid", ["cat"], ["sig"], name="sig"),
            helper.make_node("Add", ["sig", "cat"], ["both"], name="both"),
            helper.make_node("ReduceSum", ["both", "axes"], ["mixed"], name="mix", keepdims=1),
            helper.make_node("Identity", ["mixed"], ["out"], name="out")]
    proto = head(after_concat=tail)
    proto.graph.initializer.append(numpy_helper.from_array(np.array([2]), "axes"))
    model = Model.from_proto(proto)
    result = SinkConcatPass(CEILING).run(model, PassContext())
    assert "cat" not in {fact.concat for fact in result.data}
    placed = {id(node) for node in model.graph.nodes}
    for tensor in model.graph.tensors().values():
        assert all(id(node) in placed for node in [*tensor.inputs, *tensor.outputs]), tensor.name
    assert len(model.graph.tensors()["cat"].inputs) == 1


def test_a_concat_read_by_a_spatial_conv_stays():
    """A channel Concat before a 3x3 conv (a C2f block): the conv mixes every channel."""
    tail = [helper.make_node("Conv", ["lvl0", "w3"], ["out"], name="conv3", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    model = head(after_concat=tail, out_rank=4)
    model.graph.initializer.append(numpy_helper.from_array(np.ones((4, BOX + CLS, 3, 3), np.float32), "w3"))
    result = SinkConcatPass(16 * 1024)(model, PassContext())
    assert not result.modified and result.model == model


@pytest.mark.real
@pytest.mark.slow
def test_yolov8n_compiles_at_512kb_with_runtime_ort():
    """The anchor Concat and level 0's channel Concat are sunk; every allocation fits, by
    exact rewrites alone (the stem's region walks through the C2f Split halves)."""
    ceiling = 512 * 1024
    result = api.compile(real_model("yolov8n"), ceiling="512KB", input_shapes=["images=1,3,320,320"],
                         method="pca", runtime="ort", num_samples=16, batch_size=8, measure_memory=False,
                         latency_rounds=1, latency_repeats=1)
    runtime = result.report["runtime"]
    assert {fact["concat"] for fact in result.report["sunk_concats"]} == {"/model.22/Concat_6_output_0",
                                                                  "/model.22/Concat_output_0"}
    assert not result.plan.maps and runtime["lossless"]
    assert runtime["after"]["largest_bytes"] <= ceiling
    assert not runtime_view(result.model, {"images": (1, 3, 320, 320)}, ceiling_bytes=ceiling).over_ceiling()
    assert result.report["verification"]["relative_error"] <= 1e-4


def test_a_computed_operand_along_the_axis_is_sliced_per_piece():
    """Add(cat, q) with q a whole map that varies along the anchor axis: q is cut by Slices."""
    tail = [helper.make_node("Relu", ["q"], ["qr"], name="qr"),
            helper.make_node("Add", ["cat", "qr"], ["s"], name="s"),
            helper.make_node("Tanh", ["s"], ["out"], name="tanh")]
    model = head(after_concat=tail)
    model.graph.input.append(helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, BOX + CLS, 336]))
    result = _sink(model)
    assert result.data[0].concat == "cat" and result.data[0].materialized == ["out"]
    assert sum(n.op_type == "Slice" for n in result.model.graph.node) == len(LEVELS)
    feeds = {**_inputs(seed=7), "q": np.random.default_rng(8).standard_normal((1, BOX + CLS, 336)).astype(np.float32)}
    np.testing.assert_allclose(_run(result.model, feeds)[0], _run(model, feeds)[0], rtol=1e-6)


def test_verify_checks_the_rewritten_graph_link_by_link():
    """Rule c' of passes/verify.py: the sunk graph must equal the original, and the
    projections' reference is built on it; a wrong constant in it is caught."""
    from fmcompress.data import Dataset
    from fmcompress.errors import VerificationError
    from fmcompress.passes.verify import VerifyPass

    model = head()
    sunk = _sink(model).model
    held_out = Dataset(inputs={name: np.concatenate([_inputs(seed=s)[name] for s in range(4)])
                               for name in _inputs()})
    ctx = PassContext()
    ctx.plan = None
    data = VerifyPass(model, held_out, projections={}, ceiling_bytes=1 << 30, rewritten=sunk)(sunk, ctx).data
    assert data["rewrite_relative_error"] <= 1e-6 and data["relative_error"] <= 1e-6
    broken = onnx.ModelProto.FromString(sunk.SerializeToString())
    weight = next(init for init in broken.graph.initializer if init.data_type == TensorProto.FLOAT and init.dims)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5 + 0.1, weight.name))
    with pytest.raises(VerificationError, match="rewritten graph"):
        VerifyPass(model, held_out, projections={}, ceiling_bytes=1 << 30, rewritten=broken)(broken, ctx)
