"""Differential tests of BN folding, projection insertion and projection folding.

Every folded model is run in onnxruntime and compared with InsertProjectionsPass's
model (the reference: each consumer reads U P X) on the same random input.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from modeltools import with_float_type
from onnx import TensorProto, helper, numpy_helper

from fmcompress.errors import InputError, UnsupportedOpError
from fmcompress.evaluation.thirdparty import REAL_MODELS, real_model
from fmcompress.featuremaps import Projection
from fmcompress.passes.base import PassContext
from fmcompress.passes.fold import FoldProjectionsPass
from fmcompress.passes.fold_bn import FoldBatchNormPass
from fmcompress.passes.insert import InsertProjectionsPass

RNG_SEED = 0
FLOAT = TensorProto.FLOAT


# ---------------------------------------------------------------- builders

class GraphBuilder:
    """Tiny helper to write small NCHW (or, with spatial=1, NCL) test graphs with seeded random weights."""

    def __init__(self, in_channels: int = 8, size: int = 8, opset: int = 17, spatial: int = 2):
        self.rng = np.random.default_rng(RNG_SEED)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.opset = opset
        self.spatial = spatial
        self.input_shape = (1, in_channels, *[size] * spatial)
        self.count = 0

    def const(self, value: np.ndarray, name: str | None = None) -> str:
        name = name or f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str] | str:
        self.count += 1
        outs = [f"{op.lower()}{self.count}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"{op}_{self.count}", **attrs))
        return outs if n_out > 1 else outs[0]

    def conv(self, x: str, c_in: int, c_out: int, k: int = 1, group: int = 1, bias: bool = True, **attrs) -> str:
        kernel = [k] * self.spatial
        w = self.const(self.rng.standard_normal((c_out, c_in // group, *kernel)).astype(np.float32) * 0.3)
        inputs = [x, w] + ([self.const(self.rng.standard_normal(c_out).astype(np.float32))] if bias else [])
        return self.node("Conv", inputs, kernel_shape=kernel, group=group, **attrs)

    def model(self, outputs: list[str]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "test", [helper.make_tensor_value_info("x", FLOAT, self.input_shape)],
            [helper.make_empty_tensor_value_info(o) for o in outputs], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8
        return with_inferred_types(model)


def with_inferred_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape-infer, keep the value_info (stale ones would fail the checker) and type the outputs."""
    model = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in model.graph.value_info}
    for out in model.graph.output:
        if out.name in known:
            out.type.CopyFrom(known[out.name].type)
    return model


def projection(channels: int, k: int, seed: int = 1) -> Projection:
    """A random projection with orthonormal rows (P) and U = P^T."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((channels, k)))
    return Projection(P=q.T.astype(np.float32), U=q.astype(np.float32))


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], extra_outputs: tuple[str, ...] = ()) -> list[np.ndarray]:
    if extra_outputs:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in extra_outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def assert_well_formed(original: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    """Checker passes, nothing dead, new names under fmc/, interface and versions unchanged."""
    onnx.checker.check_model(folded, full_check=True)
    graph = folded.graph
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    assert all(any(o in used for o in n.output) for n in graph.node), "dead node left"
    assert all(init.name in used for init in graph.initializer), "dead initializer left"
    old_nodes = {n.name for n in original.graph.node}
    old_inits = {i.name for i in original.graph.initializer}
    assert all(n.name.startswith("fmc/") for n in graph.node if n.name not in old_nodes)
    assert all(i.name.startswith("fmc/") for i in graph.initializer if i.name not in old_inits)
    assert folded.ir_version == original.ir_version
    assert list(folded.opset_import) == list(original.opset_import)
    assert list(folded.graph.input) == list(original.graph.input)
    assert list(folded.graph.output) == list(original.graph.output)


def check_fold(model: onnx.ModelProto, projections: dict[str, Projection], feeds: dict[str, np.ndarray] | None = None,
               tol: float = 1e-4) -> dict:
    """Fold and insert, compare in onnxruntime, check each stored tensor has k channels; returns data."""
    if feeds is None:
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        feeds = {"x": np.random.default_rng(2).standard_normal(shape).astype(np.float32)}
    ctx = PassContext(input_shapes={name: value.shape for name, value in feeds.items()})
    reference = InsertProjectionsPass(projections)(model, ctx).model
    result = FoldProjectionsPass(projections)(model, ctx)
    assert result.modified
    assert_well_formed(model, result.model)
    stored = tuple(result.data[name]["stored"] for name in projections)
    declared = [v for v in result.model.graph.value_info if v.name not in stored]
    got = run(result.model, feeds, stored + tuple(v.name for v in declared))
    want = run(reference, feeds)
    n_out = len(model.graph.output)
    for a, b in zip(got[:n_out], want, strict=True):
        assert a.shape == b.shape
        assert rel_err(a, b) <= tol
    for name, tensor in zip(projections, got[n_out:n_out + len(stored)], strict=True):
        assert tensor.shape[1] == projections[name].k, name
    for info, tensor in zip(declared, got[n_out + len(stored):], strict=True):  # no stale value_info
        dims = info.type.tensor_type.shape.dim
        assert all(not d.HasField("dim_value") or d.dim_value == n for d, n in zip(dims, tensor.shape, strict=True))
    return result.data


def ops_of(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# ---------------------------------------------------------------- rule a: P into the producer

def test_p_folds_into_producing_conv_and_u_into_consumer_conv():
    b = GraphBuilder()
    x = b.conv("x", 8, 16, k=3, pads=[1, 1, 1, 1])
    y = b.conv(x, 16, 4, k=3, strides=[2, 2], pads=[2, 2, 2, 2], dilations=[2, 2])
    model = b.model([y])
    data = check_fold(model, {x: projection(16, 4)})
    assert data[x]["producer"] == "folded"
    assert data[x]["consumers"] == {"Conv_2": "folded"}
    folded = FoldProjectionsPass({x: projection(16, 4)})(model).model
    assert ops_of(folded) == ["Conv", "Conv"]  # nothing inserted at all


def test_explicit_p_after_nonconv_producer():
    b = GraphBuilder()
    x = b.node("Relu", [b.conv("x", 8, 16)])
    y = b.conv(x, 16, 4)
    data = check_fold(b.model([y]), {x: projection(16, 5)})
    assert data[x]["producer"] == "explicit"


def test_conv_transpose_producer_and_consumer():
    b = GraphBuilder()
    wt = b.const(b.rng.standard_normal((8, 12, 2, 2)).astype(np.float32))
    x = b.node("ConvTranspose", ["x", wt, b.const(np.ones(12, np.float32))], strides=[2, 2])
    wt2 = b.const(b.rng.standard_normal((12, 6, 3, 3)).astype(np.float32))
    y = b.node("ConvTranspose", [x, wt2], pads=[1, 1, 1, 1])
    data = check_fold(b.model([y]), {x: projection(12, 3)})
    assert data[x]["producer"] == "folded"
    assert data[x]["consumers"] == {"ConvTranspose_2": "folded"}


# ---------------------------------------------------------------- rule c: pushed through linear ops

def _push_case(name: str) -> tuple[onnx.ModelProto, str, str]:
    b = GraphBuilder(opset=13)
    x = b.node("Relu", [b.conv("x", 8, 16)])
    if name == "GlobalAveragePool":
        y = b.node(name, [x])
    elif name == "AveragePool":
        y = b.node(name, [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    elif name == "Pad":
        y = b.node(name, [x, b.const(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64))])
    elif name == "Resize-scales":
        y = b.node("Resize", [x, "", b.const(np.array([1, 1, 2, 2], np.float32))], mode="linear")
    elif name == "Resize-sizes":
        y = b.node("Resize", [x, "", "", b.const(np.array([1, 16, 12, 12], np.int64))], mode="nearest")
    elif name == "Slice":
        y = b.node(name, [x, b.const(np.array([1, 2], np.int64)), b.const(np.array([7, 6], np.int64)),
                          b.const(np.array([2, 3], np.int64))])
    else:  # Identity, Dropout
        y = b.node(name, [x])
    return b.model([b.conv(y, 16, 4, k=3, pads=[1, 1, 1, 1])]), x, y


@pytest.mark.parametrize("op", ["GlobalAveragePool", "AveragePool", "Pad", "Resize-scales", "Resize-sizes",
                                "Slice", "Identity", "Dropout"])
def test_u_pushed_through_linear_op_then_folded(op):
    model, x, _ = _push_case(op)
    data = check_fold(model, {x: projection(16, 4)})
    actions = list(data[x]["consumers"].values())
    assert actions == ["pushed", "folded"]


def test_pad_on_channel_axis_is_not_crossed():
    b = GraphBuilder(opset=13)
    x = b.node("Relu", [b.conv("x", 8, 16)])
    y = b.node("Pad", [x, b.const(np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64))])
    data = check_fold(b.model([b.conv(y, 18, 4)]), {x: projection(16, 4)})
    assert list(data[x]["consumers"].values()) == ["explicit"]


@pytest.mark.parametrize(("opset", "op", "extra"), [(9, "Upsample", "scales"), (10, "Resize", "scales"),
                                                   (10, "Slice", "channel"), (12, "Dropout", "mask")])
def test_older_op_forms_and_non_crossable_ops(opset, op, extra):
    b = GraphBuilder(opset=opset)
    x = b.node("Relu", [b.conv("x", 8, 16)])
    if op in ("Upsample", "Resize"):
        y = b.node(op, [x, b.const(np.array([1, 1, 2, 3], np.float32))], mode="nearest")
    elif op == "Slice":  # cuts channels: U cannot cross it
        y = b.node(op, [x, b.const(np.array([2], np.int64)), b.const(np.array([9], np.int64)),
                        b.const(np.array([1], np.int64))])
    else:  # Dropout whose mask is used: the mask needs the full width
        y, mask = b.node(op, [x], n_out=2)
    outs = [b.conv(y, 7 if op == "Slice" else 16, 4)] + ([mask] if op == "Dropout" else [])
    data = check_fold(b.model(outs), {x: projection(16, 4)})
    expected = ["pushed", "folded"] if op in ("Upsample", "Resize") else ["explicit"]
    assert list(data[x]["consumers"].values()) == expected


def test_unnamed_nodes_are_reported_by_their_output():
    b = GraphBuilder()
    x = b.node("Relu", [b.conv("x", 8, 16)])
    y = b.node("Sigmoid", [x])
    model = b.model([y])
    for node in model.graph.node:
        node.name = ""
    data = check_fold(model, {x: projection(16, 4)})
    assert data[x]["consumers"] == {f"Sigmoid->{y}": "explicit"}


def test_no_projections_leaves_the_model_alone():
    b = GraphBuilder()
    model = b.model([b.node("Relu", [b.conv("x", 8, 16)])])
    for pass_class in (FoldProjectionsPass, InsertProjectionsPass):
        result = pass_class({})(model)
        assert not result.modified and result.model is model


def test_pushed_op_output_that_is_projected_composes_the_projections():
    b = GraphBuilder()
    x = b.node("Relu", [b.conv("x", 8, 16)])
    y = b.node("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
    z = b.node("Relu", [y])
    data = check_fold(b.model([z]), {x: projection(16, 6), y: projection(16, 3, seed=5)})
    assert data[y]["producer"] == "explicit"


# ---------------------------------------------------------------- rules d, e: Split and Concat

def test_channel_split_is_dropped_and_concat_merged():
    b = GraphBuilder(opset=13)
    x = b.node("Relu", [b.conv("x", 8, 16)])
    left, right = b.node("Split", [x, b.const(np.array([6, 10], np.int64))], n_out=2, axis=1)
    m = b.node("Relu", [b.conv(right, 10, 10, k=3, pads=[1, 1, 1, 1])])
    cat = b.node("Concat", [left, right, m], axis=1)
    y = b.conv(cat, 26, 5)
    model = b.model([y])
    data = check_fold(model, {x: projection(16, 4)})
    assert data[x]["consumers"]["Split_3"] == "dropped (channel split)"
    assert data[x]["consumers"]["Concat_6"] == "concat"
    folded = FoldProjectionsPass({x: projection(16, 4)})(model).model
    assert "Split" not in ops_of(folded)


def test_concat_with_nonfoldable_consumer_expands_inputs():
    b = GraphBuilder(opset=11)
    x = b.node("Relu", [b.conv("x", 8, 16)])
    other = b.conv("x", 8, 3)
    cat = b.node("Concat", [other, x], axis=1)
    y = b.node("MaxPool", [cat], kernel_shape=[2, 2])
    data = check_fold(b.model([y]), {x: projection(16, 4)})
    assert data[x]["consumers"] == {"Concat_4": "explicit"}


def test_split_attribute_form_and_equal_chunks():
    b = GraphBuilder(opset=11)
    x = b.node("Relu", [b.conv("x", 8, 16)])
    parts = b.node("Split", [x], n_out=2, axis=1)
    outs = [b.conv(parts[0], 8, 2), b.node("Sigmoid", [parts[1]])]
    check_fold(b.model(outs), {x: projection(16, 5)})


# ---------------------------------------------------------------- rule f: Shape and Size

def test_shape_and_size_consumers_see_original_channels():
    b = GraphBuilder(opset=15)
    x = b.node("Relu", [b.conv("x", 8, 16)])
    shape = b.node("Shape", [x])
    tail = b.node("Shape", [x], start=1)
    size = b.node("Size", [x])
    y = b.conv(x, 16, 2)
    model = b.model([y, shape, tail, size])
    data = check_fold(model, {x: projection(16, 4)})
    assert sorted(data[x]["consumers"].values()) == ["folded", "shape", "shape", "shape"]
    folded = FoldProjectionsPass({x: projection(16, 4)})(model).model
    feeds = {"x": np.zeros((1, 8, 8, 8), np.float32)}
    _, got_shape, got_tail, got_size = run(folded, feeds)
    assert got_shape.tolist() == [1, 16, 8, 8] and got_tail.tolist() == [16, 8, 8] and int(got_size) == 1024


# ---------------------------------------------------------------- rule g: linear residual stream

def test_linear_residual_stream_keeps_no_full_width_tensor():
    b = GraphBuilder()
    x = b.conv("x", 8, 16)  # linear bottleneck output
    h = b.node("Relu", [b.conv(x, 16, 32)])
    f = b.conv(h, 32, 16)
    y = b.node("Add", [x, f])
    out = b.conv(y, 16, 4)
    model = b.model([out])
    projections = {x: projection(16, 6), y: projection(16, 5, seed=3)}
    data = check_fold(model, projections)
    assert data[y]["producer"] == "residual"
    assert data[x]["consumers"] == {"Conv_2": "folded", "Add_5": "residual"}
    folded = FoldProjectionsPass(projections)(model).model
    assert not any(n.name.startswith("fmc/U/") for n in folded.graph.node)


# ---------------------------------------------------------------- rule h: explicit U

def test_explicit_u_before_depthwise_maxpool_add_and_graph_output():
    b = GraphBuilder()
    x = b.conv("x", 8, 16)
    dw = b.conv(x, 16, 16, k=3, group=16, pads=[1, 1, 1, 1])
    mp = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    add = b.node("Add", [x, b.conv("x", 8, 16)])
    model = b.model([dw, mp, add, x])
    data = check_fold(model, {x: projection(16, 4)})
    assert data[x]["producer"] == "folded"
    assert set(data[x]["consumers"].values()) == {"explicit"}
    assert len(data[x]["consumers"]) == 4  # three nodes and the graph output
    folded = FoldProjectionsPass({x: projection(16, 4)})(model).model
    assert sum(n.name.startswith("fmc/U/") for n in folded.graph.node) == 4


def test_graph_output_with_explicit_producer_keeps_its_name():
    b = GraphBuilder()
    x = b.node("Relu", [b.conv("x", 8, 16)])
    model = b.model([x, b.conv(x, 16, 3)])
    data = check_fold(model, {x: projection(16, 4)})
    assert data[x]["producer"] == "explicit"


def test_insert_matches_numpy_reference():
    b = GraphBuilder()
    x = b.node("Relu", [b.conv("x", 8, 16)])
    model = b.model([x])
    proj = projection(16, 4)
    feeds = {"x": np.random.default_rng(3).standard_normal((1, 8, 8, 8)).astype(np.float32)}
    (plain,) = run(model, feeds)
    (inserted,) = run(InsertProjectionsPass({x: proj})(model).model, feeds)
    want = np.einsum("ck,kj,njhw->nchw", proj.U, proj.P, plain)
    assert rel_err(inserted, want) <= 1e-5


# ---------------------------------------------------------------- BN folding

def _conv_bn_model(constant_nodes: bool, transpose: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    c_in, c_out, group = 8, 12, (2 if transpose else 1)
    weight_shape = (c_in, c_out // group, 3, 3) if transpose else (c_out, c_in, 3, 3)
    values = {"W": rng.standard_normal(weight_shape), "B": rng.standard_normal(c_out),
              "gamma": rng.standard_normal(c_out), "beta": rng.standard_normal(c_out),
              "mean": rng.standard_normal(c_out), "var": rng.uniform(0.5, 2, c_out)}
    values = {k: v.astype(np.float32) for k, v in values.items()}
    nodes, inits = [], []
    for name, value in values.items():
        if constant_nodes:
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
        else:
            inits.append(numpy_helper.from_array(value, name))
    op = "ConvTranspose" if transpose else "Conv"
    nodes += [helper.make_node(op, ["x", "W", "B"], ["c"], name="conv", kernel_shape=[3, 3], group=group, pads=[1, 1, 1, 1]),
              helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn", epsilon=1e-3),
              helper.make_node("Relu", ["y"], ["out"], name="relu")]
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("x", FLOAT, (1, c_in, 6, 6))],
                              [helper.make_tensor_value_info("out", FLOAT, None)], inits)
    return with_inferred_types(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=7))


@pytest.mark.parametrize(("constant_nodes", "transpose"), [(False, False), (True, False), (False, True)])
def test_fold_bn_matches_unfolded_model(constant_nodes, transpose):
    model = _conv_bn_model(constant_nodes, transpose)
    result = FoldBatchNormPass()(model)
    assert result.modified and result.data["folded"] == ["bn"]
    folded = result.model
    onnx.checker.check_model(folded, full_check=True)
    assert ops_of(folded) == [("ConvTranspose" if transpose else "Conv"), "Relu"]
    assert folded.graph.node[0].output[0] == "y"
    assert len(folded.graph.initializer) == 2  # just the folded W and B: nothing dead
    feeds = {"x": np.random.default_rng(5).standard_normal((1, 8, 6, 6)).astype(np.float32)}
    (want,) = run(model, feeds)
    assert rel_err(run(folded, feeds)[0], want) <= 1e-5


def test_fold_bn_skips_conv_with_another_consumer():
    model = _conv_bn_model(False)
    model.graph.output.append(helper.make_tensor_value_info("c", FLOAT, None))
    result = FoldBatchNormPass()(model)
    assert not result.modified and "BatchNormalization" in ops_of(result.model)


@pytest.mark.real
def test_real_ppocr_classifier_bn_fold_matches_onnxruntime():
    model, feeds = _real("ppocr-cls")
    result = FoldBatchNormPass()(model)
    assert "BatchNormalization" not in ops_of(result.model) and len(result.data["folded"]) == 35
    onnx.checker.check_model(result.model, full_check=True)
    assert len(result.model.graph.node) < len(model.graph.node) - 35 * 4  # BN and its 4 Constants gone
    assert rel_err(run(result.model, feeds)[0], run(model, feeds)[0]) <= 1e-5


# ---------------------------------------------------------------- errors

def _error_model() -> tuple[onnx.ModelProto, str, str]:
    b = GraphBuilder()
    x = b.node("Relu", [b.conv("x", 8, 16)])
    flat = b.node("Flatten", [x])
    return b.model([flat]), x, flat


@pytest.mark.parametrize("pass_class", [FoldProjectionsPass, InsertProjectionsPass])
def test_bad_projections_raise_input_error(pass_class):
    model, x, flat = _error_model()
    cases = [({"nope": projection(16, 4)}, "no tensor"),
             ({flat: projection(16, 4)}, "not a 4-D"),
             ({x: projection(12, 4)}, "C=12"),
             ({"x": projection(8, 4)}, "graph input"),
             ({"c0": projection(16, 4)}, "constant")]
    for projections, message in cases:
        with pytest.raises(InputError, match=message):
            pass_class(projections)(model)


def test_tensor_read_inside_if_body_is_refused():
    b = GraphBuilder()
    x = b.node("Relu", [b.conv("x", 8, 16)])
    branch = helper.make_graph([helper.make_node("Sigmoid", [x], ["branch_out"])], "branch", [],
                               [helper.make_tensor_value_info("branch_out", FLOAT, None)])
    y = b.node("If", [b.const(np.array(True))], then_branch=branch, else_branch=branch)
    model = b.model([b.conv(x, 16, 2), y])
    with pytest.raises(UnsupportedOpError, match="If/Loop/Scan"):
        FoldProjectionsPass({x: projection(16, 4)})(model)


def test_projection_shape_mismatch_raises_input_error():
    with pytest.raises(InputError, match="disagree"):
        Projection(P=np.zeros((4, 16)), U=np.zeros((16, 5)))
    with pytest.raises(InputError, match="matrices"):
        Projection(P=np.zeros(16), U=np.zeros((16, 1)))
    with pytest.raises(InputError, match="NaN"):
        Projection(P=np.full((2, 4), np.nan), U=np.zeros((4, 2)))


# ---------------------------------------------------------------- real models

def _real(name: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    model = onnx.load(str(real_model(name)))
    feeds = {model.graph.input[0].name:
             np.random.default_rng(6).uniform(0, 1, REAL_MODELS[name].input_shape).astype(np.float32)}
    return model, feeds


def _tensor_consumed_by(model: onnx.ModelProto, op: str, depthwise: bool | None = None) -> str:
    """A 4-D intermediate tensor whose consumers include an `op` node (first in order)."""
    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"}
    for node in model.graph.node:
        if node.op_type != op or node.input[0] in consts or node.input[0] in inits:
            continue
        if depthwise is not None:
            weight = numpy_helper.to_array(inits.get(node.input[1]) or consts[node.input[1]])
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if (group > 1 and group == weight.shape[0]) != depthwise:
                continue
        if node.input[0] not in {i.name for i in model.graph.input}:
            return node.input[0]
    raise AssertionError(f"no tensor consumed by {op}")


def _channels(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, int]:
    return {n: t.shape[1] for n, t in zip(names, run(model, feeds, tuple(names))[len(model.graph.output):], strict=True)}


@pytest.mark.real
def test_real_ppocr_classifier_folded_vs_inserted():
    model, feeds = _real("ppocr-cls")
    model = FoldBatchNormPass()(model).model
    names = [_tensor_consumed_by(model, "Conv", depthwise=False), _tensor_consumed_by(model, "Conv", depthwise=True),
             _tensor_consumed_by(model, "GlobalAveragePool"), _tensor_consumed_by(model, "Add")]
    names = list(dict.fromkeys(names))
    channels = _channels(model, feeds, names)
    projections = {n: projection(c, c // 4, seed=i) for i, (n, c) in enumerate(channels.items())}
    check_fold(model, projections, feeds)


@pytest.mark.real
def test_real_yolov8n_folded_vs_inserted():
    model, feeds = _real("yolov8n")
    names = list(dict.fromkeys(_tensor_consumed_by(model, op) for op in ("Split", "Concat", "MaxPool", "Conv")))
    channels = _channels(model, feeds, names)
    projections = {n: projection(c, c // 4, seed=i) for i, (n, c) in enumerate(channels.items())}
    data = check_fold(model, projections, feeds)
    split_input = names[0]
    assert "dropped (channel split)" in data[split_input]["consumers"].values()


# ---------------------------------------------------------------- rank 3: NCL maps [N, C, L]

def ncl(opset: int = 17) -> GraphBuilder:
    """A builder of NCL graphs: input [1, 8, 12], Conv1d layers."""
    return GraphBuilder(in_channels=8, size=12, opset=opset, spatial=1)


def projection_convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.name.startswith(("fmc/P/", "fmc/U/"))]


def assert_conv1d(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    """An explicit P/U conv on an NCL map: kernel_shape [1], weight [k, C, 1]."""
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "kernel_shape")) == [1]
    assert weights[node.input[1]].ndim == 3 and weights[node.input[1]].shape[2] == 1


def test_rank3_insert_matches_numpy_reference_with_conv1d():
    b = ncl()
    x = b.node("Relu", [b.conv("x", 8, 16)])
    model = b.model([x])
    proj = projection(16, 4)
    feeds = {"x": np.random.default_rng(3).standard_normal((1, 8, 12)).astype(np.float32)}
    (plain,) = run(model, feeds)
    inserted = InsertProjectionsPass({x: proj})(model).model
    onnx.checker.check_model(inserted, full_check=True)
    assert len(projection_convs(inserted)) == 2
    for node in projection_convs(inserted):
        assert_conv1d(inserted, node)
    want = np.einsum("ck,kj,njl->ncl", proj.U, proj.P, plain)
    assert rel_err(run(inserted, feeds)[0], want) <= 1e-5


def test_rank3_p_and_u_fold_into_conv1d():
    b = ncl()
    x = b.conv("x", 8, 16, k=3, pads=[1, 1])
    y = b.conv(x, 16, 4, k=3, strides=[2], pads=[2, 2], dilations=[2])
    model = b.model([y])
    data = check_fold(model, {x: projection(16, 4)})
    assert data[x] == {"stored": f"{x}/fmc_k4", "producer": "folded", "consumers": {"Conv_2": "folded"}}
    assert ops_of(FoldProjectionsPass({x: projection(16, 4)})(model).model) == ["Conv", "Conv"]


def test_rank3_conv_transpose_producer_and_consumer():
    b = ncl()
    wt = b.const(b.rng.standard_normal((8, 12, 2)).astype(np.float32))
    x = b.node("ConvTranspose", ["x", wt, b.const(np.ones(12, np.float32))], strides=[2])
    y = b.node("ConvTranspose", [x, b.const(b.rng.standard_normal((12, 6, 3)).astype(np.float32))], pads=[1, 1])
    data = check_fold(b.model([y]), {x: projection(12, 3)})
    assert data[x]["producer"] == "folded" and data[x]["consumers"] == {"ConvTranspose_2": "folded"}


def test_rank3_explicit_p_and_u_are_conv1d():
    b = ncl()
    x = b.node("Relu", [b.conv("x", 8, 16)])
    model = b.model([b.node("Sigmoid", [x]), x])
    data = check_fold(model, {x: projection(16, 5)})
    assert data[x]["producer"] == "explicit"
    assert data[x]["consumers"] == {"Sigmoid_3": "explicit", f"output:{x}": "explicit"}
    folded = FoldProjectionsPass({x: projection(16, 5)})(model).model
    assert len(projection_convs(folded)) == 3
    for node in projection_convs(folded):
        assert_conv1d(folded, node)


def _rank3_push_case(name: str) -> tuple[onnx.ModelProto, str]:
    b = ncl(opset=18)
    x = b.node("Relu", [b.conv("x", 8, 16)])
    if name == "Slice":
        y = b.node(name, [x, b.const(np.array([2], np.int64)), b.const(np.array([10], np.int64)),
                          b.const(np.array([-1], np.int64))])
    elif name == "Split+Concat":  # along L: both halves carry the same U
        left, right = b.node("Split", [x, b.const(np.array([5, 7], np.int64))], n_out=2, axis=2)
        y = b.node("Concat", [right, left], axis=-1)
    elif name == "AveragePool":
        y = b.node(name, [x], kernel_shape=[3], strides=[2], pads=[1, 1])
    elif name == "Pad":
        y = b.node(name, [x, b.const(np.array([0, 0, 2, 0, 0, 1], np.int64))])
    else:  # Identity, Dropout, GlobalAveragePool
        y = b.node(name, [x])
    return b.model([b.conv(y, 16, 4, k=3, pads=[1, 1])]), x


@pytest.mark.parametrize("op", ["Identity", "Slice", "Split+Concat", "AveragePool", "GlobalAveragePool",
                                "Pad", "Dropout"])
def test_rank3_u_pushed_through_linear_op_then_folded(op):
    model, x = _rank3_push_case(op)
    data = check_fold(model, {x: projection(16, 4)})
    actions = list(data[x]["consumers"].values())
    assert actions == (["pushed", "pushed", "folded"] if op == "Split+Concat" else ["pushed", "folded"])


def test_rank3_channel_slice_is_not_crossed():
    b = ncl()
    x = b.node("Relu", [b.conv("x", 8, 16)])
    y = b.node("Slice", [x, b.const(np.array([3], np.int64)), b.const(np.array([12], np.int64)),
                         b.const(np.array([-2], np.int64))])
    data = check_fold(b.model([b.conv(y, 9, 4)]), {x: projection(16, 4)})
    assert list(data[x]["consumers"].values()) == ["explicit"]


def test_rank3_channel_split_dropped_and_concat_merged():
    b = ncl(opset=13)
    x = b.node("Relu", [b.conv("x", 8, 16)])
    left, right = b.node("Split", [x, b.const(np.array([6, 10], np.int64))], n_out=2, axis=1)
    m = b.node("Relu", [b.conv(right, 10, 10, k=3, pads=[1, 1])])
    cat = b.node("Concat", [left, right, m], axis=-2)
    model = b.model([b.conv(cat, 26, 5)])
    data = check_fold(model, {x: projection(16, 4)})
    assert data[x]["consumers"] == {"Split_3": "dropped (channel split)", "Conv_4": "folded", "Concat_6": "concat",
                                    "Conv_7": "folded"}
    assert "Split" not in ops_of(FoldProjectionsPass({x: projection(16, 4)})(model).model)


def test_rank3_channel_concat_with_nonfoldable_consumer_expands_inputs():
    b = ncl()
    x = b.node("Relu", [b.conv("x", 8, 16)])
    cat = b.node("Concat", [b.conv("x", 8, 3), x], axis=1)
    data = check_fold(b.model([b.node("Sigmoid", [cat])]), {x: projection(16, 4)})
    assert data[x]["consumers"] == {"Concat_4": "explicit"}


def test_rank3_projected_anchor_concat_never_full_width():
    """Rule e' as in a detection head: Concat along L of a projected map and a plain one, itself projected."""
    b = ncl()
    x = b.node("Relu", [b.conv("x", 8, 16)])
    other = b.node("Relu", [b.conv("x", 8, 16)])
    cat = b.node("Concat", [x, other], axis=2)
    model = b.model([b.conv(cat, 16, 4), b.node("Sigmoid", [cat])])
    projections = {x: projection(16, 6), cat: projection(16, 5, seed=3)}
    data = check_fold(model, projections)
    assert data[cat]["producer"] == "concat"
    assert data[x]["consumers"] == {"Concat_5": "concat"}
    assert data[cat]["consumers"] == {"Conv_6": "folded", "Sigmoid_7": "explicit"}
    folded = FoldProjectionsPass(projections)(model).model
    concat = next(n for n in folded.graph.node if n.op_type == "Concat")
    assert concat.output[0] == f"{cat}/fmc_k5"
    assert all(n.name.startswith("fmc/P/") for n in folded.graph.node if set(n.output) & set(concat.input))


def test_rank3_anchor_concat_of_different_u_not_projected_expands():
    b = ncl()
    x = b.node("Relu", [b.conv("x", 8, 16)])
    cat = b.node("Concat", [x, b.node("Relu", [b.conv("x", 8, 16)])], axis=2)
    data = check_fold(b.model([b.conv(cat, 16, 4)]), {x: projection(16, 6)})
    assert data[x]["consumers"] == {"Concat_5": "explicit"}


def test_rank3_shape_and_size_see_original_channels():
    b = ncl(opset=15)
    x = b.node("Relu", [b.conv("x", 8, 16)])
    outs = [b.node("Shape", [x]), b.node("Shape", [x], start=1), b.node("Shape", [x], start=-2, end=-1),
            b.node("Size", [x]), b.conv(x, 16, 2)]
    model = b.model(outs)
    data = check_fold(model, {x: projection(16, 4)})
    assert sorted(data[x]["consumers"].values()) == ["folded", "shape", "shape", "shape", "shape"]
    folded = FoldProjectionsPass({x: projection(16, 4)})(model).model
    got = run(folded, {"x": np.zeros((1, 8, 12), np.float32)})
    assert [g.tolist() for g in got[:4]] == [[1, 16, 12], [16, 12], [16], 192]


def test_rank3_linear_residual_stream():
    b = ncl()
    x = b.conv("x", 8, 16)
    f = b.conv(b.node("Relu", [b.conv(x, 16, 32)]), 32, 16)
    y = b.node("Add", [x, f])
    model = b.model([b.conv(y, 16, 4)])
    projections = {x: projection(16, 6), y: projection(16, 5, seed=3)}
    data = check_fold(model, projections)
    assert data[y]["producer"] == "residual"
    assert not any(n.name.startswith("fmc/U/") for n in FoldProjectionsPass(projections)(model).model.graph.node)


def test_rank3_reshape_and_transpose_consumers_get_explicit_u():
    b = ncl()
    x = b.node("Relu", [b.conv("x", 8, 16)])
    r = b.node("Reshape", [x, b.const(np.array([1, 4, 4, 12], np.int64))])
    t = b.node("Transpose", [x], perm=[0, 2, 1])
    data = check_fold(b.model([b.node("Softmax", [r], axis=1), t]), {x: projection(16, 4)})
    assert data[x]["consumers"] == {"Reshape_3": "explicit", "Transpose_4": "explicit"}


def test_rank3_projected_reshape_outputs_mix_ranks():
    """A 4-D map reshaped to NCL and back, both sides projected (the DFL pattern of YOLOv8)."""
    b = GraphBuilder(in_channels=8, size=4)
    x = b.conv("x", 8, 16)
    flat = b.node("Reshape", [x, b.const(np.array([1, 16, 16], np.int64))])
    grid = b.node("Reshape", [flat, b.const(np.array([1, 4, 4, 16], np.int64))])
    soft = b.node("Softmax", [grid], axis=1)
    model = b.model([b.conv(soft, 4, 1)])
    projections = {flat: projection(16, 5), grid: projection(4, 3, seed=2), soft: projection(4, 2, seed=4)}
    data = check_fold(model, projections)
    assert data[flat]["consumers"] == {"Reshape_3": "explicit"}
    assert data[soft]["consumers"] == {"Conv_5": "folded"}


YOLO_CEILING = 409600  # bytes; float32 maps
YOLO_MAPS = {  # name: (C, positions per channel) at 320x320
    "/model.22/Reshape_output_0": (82, 1600),  # [1, 82, 1600]
    "/model.22/Concat_6_output_0": (82, 2100),  # [1, 82, 2100]
    "/model.22/dfl/Softmax_output_0": (16, 4 * 2100),  # [1, 16, 4, 2100], read by the DFL conv
    "/model.22/dfl/Reshape_output_0": (4, 16 * 2100),  # [1, 4, 16, 2100], read by a Transpose
    "/model.0/act/Mul_output_0": (16, 160 * 160),
    "/model.2/Concat_output_0": (48, 80 * 80),
    "/model.2/cv1/act/Mul_output_0": (32, 80 * 80),
}


@pytest.mark.real
def test_real_yolov8n_head_rank3_maps_folded_vs_inserted():
    model, feeds = _real("yolov8n")
    projections = {name: projection(c, YOLO_CEILING // (positions * 4), seed=i)
                   for i, (name, (c, positions)) in enumerate(YOLO_MAPS.items())}
    assert [p.k for p in projections.values()] == [64, 48, 12, 3, 4, 16, 16]
    data = check_fold(model, projections, feeds)  # also checks each stored map has k channels
    assert data["/model.22/Reshape_output_0"]["consumers"] == {"/model.22/Concat_6": "concat"}
    assert data["/model.22/Concat_6_output_0"]["producer"] == "concat"
    assert data["/model.22/Concat_6_output_0"]["consumers"]["/model.22/Split_1"] == "dropped (channel split)"
    assert data["/model.22/Concat_6_output_0"]["consumers"]["/model.22/dfl/Shape"] == "shape"
    assert data["/model.22/dfl/Softmax_output_0"]["consumers"] == {"/model.22/dfl/conv/Conv": "folded"}
    assert data["/model.22/dfl/Reshape_output_0"]["consumers"] == {"/model.22/dfl/Transpose": "explicit"}
    folded = FoldProjectionsPass(projections)(model, PassContext({"images": (1, 3, 320, 320)})).model
    names = [n.output[0] for n in folded.graph.node if n.op_type == "Concat"]
    assert "/model.22/Concat_6_output_0" not in names  # the full-width anchor concat is gone
    head = [n for n in projection_convs(folded)
            if n.name.startswith(("fmc/P//model.22/Reshape_", "fmc/P//model.22/Concat_6", "fmc/U//model.22/Split_1"))]
    assert len(head) == 6  # P after the Reshape, P on each of the 3 concat inputs, U before Sigmoid and dfl/Reshape
    for node in head:
        assert_conv1d(folded, node)


# ------------------------------------------------------- resize linearity, dtypes

@pytest.mark.parametrize(("extrapolation", "expected"), [(0.0, "pushed"), (2.5, "explicit")])
def test_tf_crop_and_resize_is_crossed_only_when_linear(extrapolation, expected):
    """A non-zero extrapolation value outside the crop box breaks Resize(U T) = U Resize(T)."""
    b = GraphBuilder(opset=13)
    x = b.node("Relu", [b.conv("x", 8, 16)])
    roi = b.const(np.array([0, 0, -0.25, -0.25, 1, 1, 1.25, 1.25], np.float32))
    y = b.node("Resize", [x, roi, b.const(np.array([1, 1, 2, 2], np.float32))], mode="linear",
               coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=extrapolation)
    data = check_fold(b.model([b.conv(y, 16, 4, k=3, pads=[1, 1, 1, 1])]), {x: projection(16, 4)})
    assert list(data[x]["consumers"].values())[0] == expected


@pytest.mark.parametrize("pass_class", [FoldProjectionsPass, InsertProjectionsPass])
def test_float16_model_gets_float16_projection_weights(pass_class):
    b = GraphBuilder()
    x = b.node("Relu", [b.conv("x", 8, 16)])  # P folds into the conv, or an explicit P after the Relu
    y = b.node("Sigmoid", [x])  # explicit U before a nonlinear consumer
    model = with_float_type(b.model([b.conv(y, 16, 4), b.conv(x, 16, 4, k=3, pads=[1, 1, 1, 1])]), TensorProto.FLOAT16)
    result = pass_class({x: projection(16, 4)})(model, PassContext())
    onnx.checker.check_model(result.model, full_check=True)
    new = [i for i in result.model.graph.initializer if i.name.startswith("fmc/")]
    assert new and {i.data_type for i in new} == {TensorProto.FLOAT16}
    feeds = {"x": np.random.default_rng(2).standard_normal((1, 8, 8, 8)).astype(np.float16)}
    got = run(result.model, feeds)
    want = run(InsertProjectionsPass({x: projection(16, 4)})(with_float_type(model, TensorProto.FLOAT), PassContext()).model,
               {"x": feeds["x"].astype(np.float32)})
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.float16
        assert rel_err(g, w) < 1e-2  # float16 rounding


def test_integer_map_cannot_be_projected():
    b = GraphBuilder()
    x = b.node("Relu", [b.conv("x", 8, 16)])
    q = b.node("QuantizeLinear", [x, b.const(np.float32(0.1)), b.const(np.uint8(0))])
    model = b.model([b.node("DequantizeLinear", [q, b.const(np.float32(0.1)), b.const(np.uint8(0))])])
    with pytest.raises(InputError, match="uint8"):
        FoldProjectionsPass({q: projection(16, 4)})(model, PassContext())
