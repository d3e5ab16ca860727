"""The analysis recognises compile's projection (P) and expansion (U) convs by structure, not by
node name: compressed models keep their verdict when renaming tools rewrite node names, and no
genuine layer of the zoo or real models is taken for one."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import onnxslim
import pytest
from modeltools import random_projections
from onnx import TensorProto, helper, numpy_helper

from fmcompress import analyze
from fmcompress.compiler import build_context
from fmcompress.evaluation.thirdparty import REAL_MODELS, real_model
from fmcompress.passes import memory
from fmcompress.passes.fold import FoldProjectionsPass
from fmcompress.passes.insert import InsertProjectionsPass
from fmcompress.passes.memory import GraphIndex, is_expansion_conv, is_projection_conv
from fmcompress.passes.plan import Plan, PlanPass
from fmcompress.units import parse_ceiling

ZOO = [("resnet18_small", (1, 3, 32, 32)), ("mobilenet_v2_small", (1, 3, 32, 32))]


def compress(model: onnx.ModelProto, pass_class) -> tuple[onnx.ModelProto, Plan, dict]:
    """Plan at 4x and project every planned map with a random orthonormal P (U = P^T)."""
    ctx = build_context(model, None, None)
    plan = PlanPass(parse_ceiling("4x"))(model, ctx).data
    projections = random_projections(plan)
    result = pass_class(projections)(model, ctx)
    return result.model, plan, result.data


def renamed(model: onnx.ModelProto, how: str) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for i, node in enumerate(copy.graph.node):
        node.name = f"n{i}" if how == "numbered" else ""
    return copy


def slimmed(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnxslim.slim(model)


def ort_channels(model: onnx.ModelProto, names: list[str]) -> dict[str, int]:
    """Channel count of each tensor, from an onnxruntime run with the tensors exposed as outputs."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.zeros((1, 3, 32, 32), np.float32)}
    values = session.run(names, feed)
    return {name: value.shape[1] for name, value in zip(names, values, strict=True)}


def stored_view(model: onnx.ModelProto, ceiling_bytes: int) -> tuple[list[tuple[str, int]], list[str]]:
    report = analyze(model, ceiling=str(ceiling_bytes))
    return [(m.name, m.bytes) for m in report.stored], [m.name for m in report.over_ceiling()]


@pytest.mark.parametrize("zoo_name, shape", ZOO)
@pytest.mark.parametrize("pass_class", [FoldProjectionsPass, InsertProjectionsPass])
def test_renamed_and_slimmed_compressed_models_keep_their_stored_maps_and_verdict(zoo_onnx, zoo_name, shape,
                                                                                pass_class):
    compressed, plan, data = compress(onnx.load(str(zoo_onnx(zoo_name, shape))), pass_class)
    stored, over = stored_view(compressed, plan.ceiling_bytes)
    assert plan.maps and over == []
    # each planned map is stored as its narrow tensor, k channels wide in onnxruntime
    narrow = {m.name: data[m.name]["stored"] for m in plan.maps}
    assert set(narrow.values()) <= {name for name, _ in stored}
    assert ort_channels(compressed, list(narrow.values())) == {narrow[m.name]: m.k for m in plan.maps}
    for variant in (renamed(compressed, "numbered"), renamed(compressed, "cleared"), slimmed(compressed),
                    slimmed(renamed(compressed, "numbered"))):
        assert stored_view(variant, plan.ceiling_bytes) == (stored, [])


def recognised(model: onnx.ModelProto) -> list[str]:
    """Nodes taken for a projection or an expansion conv (named by their output)."""
    index = GraphIndex(model)
    return [n.output[0] for n in model.graph.node if is_projection_conv(n, index) or is_expansion_conv(n, index)]


def view_without_recognition(model: onnx.ModelProto, monkeypatch) -> list[tuple]:
    with monkeypatch.context() as patch:
        patch.setattr(memory, "is_projection_conv", lambda node, index: False)
        patch.setattr(memory, "is_expansion_conv", lambda node, index: False)
        return view_of(model)


def view_of(model: onnx.ModelProto) -> list[tuple]:
    report = analyze(model, ceiling="4x")
    return [(m.name, m.bytes, m.step, m.last_use, m.over_ceiling) for m in report.stored]


@pytest.mark.parametrize("zoo_name, shape", ZOO + [("vgg16_bn_small", (1, 3, 32, 32))])
def test_no_genuine_layer_of_the_zoo_is_taken_for_a_projection_or_expansion(zoo_onnx, zoo_name, shape,
                                                                            monkeypatch):
    model = onnx.load(str(zoo_onnx(zoo_name, shape)))
    assert recognised(model) == []
    assert view_of(model) == view_without_recognition(model, monkeypatch)  # the stored view is unchanged


@pytest.mark.real
def test_ppocr_det_fpn_inputs_stay_stored():
    """PP-OCRv4's FPN input convs are bias-free 1x1 widening convs read by three nodes: genuine, stored."""
    path = real_model("ppocr-det")
    model = onnx.load(str(path))
    assert recognised(model) == []
    report = analyze(model, input_shapes=[",".join(map(str, REAL_MODELS["ppocr-det"].input_shape))])
    fpn_inputs = [n.output[0] for n in model.graph.node if n.name in ("p2o.Conv.40", "p2o.Conv.43", "p2o.Conv.46")]
    assert len(fpn_inputs) == 3 and set(fpn_inputs) <= {m.name for m in report.stored}


# ---------------------------------------------------------------- hand-built look-alikes

RNG = np.random.default_rng(0)


def init(name: str, *shape: int, zero: bool = False) -> onnx.TensorProto:
    value = np.zeros(shape, np.float32) if zero else RNG.standard_normal(shape).astype(np.float32)
    return numpy_helper.from_array(value, name)


def one_by_one(name: str, x: str, w: str, out: str, bias: str | None = None, **attrs) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w] + ([bias] if bias else []), [out], name=name, kernel_shape=[1, 1],
                            **attrs)


def model_of(nodes, inits, out: str, channels: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, channels, 8, 8])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def stem(nodes: list, inits: list) -> str:
    """x -> 3x3 conv (16 channels, bias) -> Relu = `r`."""
    nodes += [helper.make_node("Conv", ["x", "w0", "b0"], ["a"], name="stem", kernel_shape=[3, 3], pads=[1] * 4),
              helper.make_node("Relu", ["a"], ["r"], name="relu")]
    inits += [init("w0", 16, 4, 3, 3), init("b0", 16)]
    return "r"


@pytest.mark.parametrize("name_p, name_u", [("fmc/P/r", "fmc/U/r"), ("n7", "n8"), ("", "")])
def test_a_projection_pair_is_recognised_whatever_the_node_names(name_p, name_u):
    # r -> P (16 -> 4, no bias) -> z -> U (4 -> 16, zero bias) -> depthwise conv (cannot fold U)
    nodes, inits = [], []
    stem(nodes, inits)
    nodes += [one_by_one(name_p, "r", "wp", "z"), one_by_one(name_u, "z", "wu", "u", "bu"),
              helper.make_node("Conv", ["u", "wd"], ["y"], name="dw", kernel_shape=[3, 3], pads=[1] * 4, group=16)]
    inits += [init("wp", 4, 16, 1, 1), init("wu", 16, 4, 1, 1), init("bu", 16, zero=True), init("wd", 16, 1, 3, 3)]
    model = model_of(nodes, inits, "y", 16)
    assert recognised(model) == ["z", "u"]
    report = analyze(model, ceiling="1KB")
    assert [m.name for m in report.stored] == ["x", "z", "y"]
    assert [m.name for m in report.over_ceiling()] == []  # z: 4x8x8 floats = 1 KiB


def test_a_conv1d_projection_pair_of_an_ncl_map_is_recognised():
    # a detection head's [N, C, anchors] map: P and U are Conv1d with kernel_shape [1]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], kernel_shape=[3], pads=[1, 1]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "wp"], ["z"], kernel_shape=[1]),
             helper.make_node("Conv", ["z", "wu"], ["u"], kernel_shape=[1]),
             helper.make_node("MaxPool", ["u"], ["y"], kernel_shape=[3], pads=[1, 1])]
    inits = [init("w0", 16, 4, 3), init("wp", 4, 16, 1), init("wu", 16, 4, 1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 64])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert recognised(model) == ["z", "u"]
    assert [m.name for m in analyze(model).stored] == ["x", "z", "y"]


@pytest.mark.parametrize("case", ["mobilenet expansion", "fpn input", "downsample", "bias-free then batchnorm"])
def test_genuine_layers_that_look_like_projections_stay_stored(case):
    nodes, inits = [], []
    stem(nodes, inits)
    if case == "mobilenet expansion":  # BN folded: a bias, then ReLU6
        nodes += [one_by_one("expand", "r", "we", "e", "be"),
                  helper.make_node("Clip", ["e", "lo", "hi"], ["e6"]),
                  helper.make_node("Conv", ["e6", "wd"], ["y"], kernel_shape=[3, 3], pads=[1] * 4, group=64)]
        inits += [init("we", 64, 16, 1, 1), init("be", 64), init("wd", 64, 1, 3, 3),
                  numpy_helper.from_array(np.array(0, np.float32), "lo"),
                  numpy_helper.from_array(np.array(6, np.float32), "hi")]
        expected, out, channels = ["x", "r", "e6", "y"], "y", 64
    elif case == "fpn input":  # bias-free widening conv read by three nodes
        nodes += [one_by_one("in_conv", "r", "wi", "i"),
                  helper.make_node("GlobalAveragePool", ["i"], ["g"]),
                  helper.make_node("Mul", ["i", "g"], ["m"]), helper.make_node("Add", ["i", "m"], ["y"])]
        inits += [init("wi", 64, 16, 1, 1)]
        expected, out, channels = ["x", "r", "i", "y"], "y", 64
    elif case == "downsample":  # a strided bias-free 1x1 conv is not a channel mix
        nodes += [one_by_one("down", "r", "wd", "d", strides=[2, 2]),
                  helper.make_node("MaxPool", ["d"], ["y"], kernel_shape=[1, 1])]
        inits += [init("wd", 32, 16, 1, 1)]
        graph_out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 4, 4])
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                                  [graph_out], initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        assert recognised(model) == []
        assert [m.name for m in analyze(model).stored] == ["x", "r", "d", "y"]
        return
    else:  # unfolded BatchNorm after a bias-free narrowing conv (PP-OCR's project convs)
        nodes += [one_by_one("project", "r", "wp", "p"),
                  helper.make_node("BatchNormalization", ["p", "s", "b", "mu", "var"], ["y"])]
        inits += [init("wp", 4, 16, 1, 1), init("s", 4), init("b", 4), init("mu", 4),
                  numpy_helper.from_array(np.ones(4, np.float32), "var")]
        expected, out, channels = ["x", "r", "y"], "y", 4
    model = model_of(nodes, inits, out, channels)
    assert recognised(model) == []
    assert [m.name for m in analyze(model).stored] == expected
