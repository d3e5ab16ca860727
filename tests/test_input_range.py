"""The input range a model states (leading normalisation, metadata) against the data's."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fmcompress.data import InputSpec, load_dataset
from fmcompress.evaluation.thirdparty import real_model
from fmcompress.input_range import (
    channel_statistics,
    expected_range,
    input_range_warnings,
    leading_affine,
)
from fmcompress.passes import PassContext, Pipeline
from fmcompress.passes.memory import MemoryAnalysisPass
from fmcompress.passes.prepare_data import DataOptions, PrepareDataPass

SHAPE = (1, 3, 16, 16)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def _model(steps: list[tuple[str, np.ndarray | None]], metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """x -> each (op, constant) in turn (x op constant; BatchNormalization takes 4 arrays) -> Conv."""
    nodes, inits, tensor = [], [], "x"
    for index, (op, value) in enumerate(steps):
        out = f"t{index}"
        if op == "BatchNormalization":
            names = [f"bn{index}_{part}" for part in ("scale", "bias", "mean", "var")]
            inits += [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in zip(names, value, strict=True)]
            nodes.append(helper.make_node(op, [tensor, *names], [out], epsilon=1e-5))
        else:
            inits.append(numpy_helper.from_array(np.asarray(value, np.float32), f"c{index}"))
            nodes.append(helper.make_node(op, [tensor, f"c{index}"], [out]))
        tensor = out
    inits.append(numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32) / 27, "w"))
    nodes.append(helper.make_node("Conv", [tensor, "w"], ["y"], pads=[1, 1, 1, 1]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    helper.set_model_props(model, metadata or {})
    return model


def _pixels(count: int = 4, seed: int = 0) -> np.ndarray:
    """0-255 pixel values [N, 3, 16, 16]."""
    return np.random.default_rng(seed).uniform(0, 255, (count, *SHAPE[1:])).astype(np.float32)


def _imagenet(pixels: np.ndarray) -> np.ndarray:
    return ((pixels / 255 - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]).astype(np.float32)


PER_CHANNEL = (1, 3, 1, 1)
DIV_255 = [("Div", np.array(255.0))]
IMAGENET_UNIT = [("Sub", IMAGENET_MEAN.reshape(PER_CHANNEL)), ("Div", IMAGENET_STD.reshape(PER_CHANNEL))]
IMAGENET_BYTE = [("Sub", (255 * IMAGENET_MEAN).reshape(PER_CHANNEL)), ("Div", (255 * IMAGENET_STD).reshape(PER_CHANNEL))]


def test_leading_affine_composes_the_chain_like_numpy():
    x = _pixels(1)
    a, b, ops = leading_affine(_model(IMAGENET_BYTE), "x", 3)
    want = (x - 255 * IMAGENET_MEAN[:, None, None]) / (255 * IMAGENET_STD[:, None, None])
    assert ops == ["Sub", "Div"]
    np.testing.assert_allclose(a[:, None, None] * x[0] + b[:, None, None], want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps, top", [(DIV_255, 255), (IMAGENET_BYTE, 255), (IMAGENET_UNIT, 1),
                                        ([("Div", np.array(127.5)), ("Sub", np.array(1.0))], 255),
                                        ([("Mul", np.array(2.0)), ("Sub", np.array(1.0))], 1),
                                        ([("Mul", np.array(1 / 255))], 255)])
def test_graph_normalisation_tells_the_pixel_range(steps, top):
    expected = expected_range(_model(steps), "x", 3)
    assert expected is not None and "graph" in expected.source
    np.testing.assert_array_equal(expected.high, [top] * 3)
    np.testing.assert_array_equal(expected.low, [0] * 3)
    assert expected.flags().startswith(f"--scale {top / 255:.8g} --mean 0,0,0 --std 1,1,1")


def test_batchnorm_on_the_input_counts_as_normalisation():
    bn = ("BatchNormalization", [np.ones(3), np.zeros(3), 255 * IMAGENET_MEAN, (255 * IMAGENET_STD) ** 2])
    a, b, _ = leading_affine(_model([bn]), "x", 3)
    np.testing.assert_allclose(a, 1 / np.sqrt((255 * IMAGENET_STD) ** 2 + 1e-5), rtol=1e-5)
    assert expected_range(_model([bn]), "x", 3).high[0] == 255


def test_div_by_255_warns_on_normalised_data_and_names_the_flags():
    model = _model(DIV_255)
    warnings = input_range_warnings(model, {"x": _imagenet(_pixels())})
    assert len(warnings) == 1 and "'x'" in warnings[0] and "[0, 255]" in warnings[0]
    assert "--scale 1 --mean 0,0,0 --std 1,1,1" in warnings[0] and "\n" not in warnings[0]
    assert input_range_warnings(model, {"x": _pixels()}) == []
    assert input_range_warnings(model, {"x": _pixels() / 255}) != []  # [0, 1] is far too narrow


def test_imagenet_in_the_graph_wants_unit_pixels():
    model = _model(IMAGENET_UNIT)
    assert input_range_warnings(model, {"x": _pixels() / 255}) == []
    assert "--scale 0.0039215686" in input_range_warnings(model, {"x": _pixels()})[0]
    assert input_range_warnings(model, {"x": _imagenet(_pixels())}) != []


def test_nothing_said_where_nothing_tells():
    plain = _model([])
    assert expected_range(plain, "x", 3) is None
    assert input_range_warnings(plain, {"x": _pixels()}) == []
    assert expected_range(_model([("Mul", np.array(1.0))]), "x", 3) is None  # identity
    assert expected_range(_model([("Mul", np.ones((1, 1, 16, 1)))]), "x", 3) is None  # not per channel


def test_metadata_mean_std_and_ultralytics():
    listed = _model([], {"mean": "[0.485, 0.456, 0.406]", "std": "0.229,0.224,0.225"})
    expected = expected_range(listed, "x", 3)
    np.testing.assert_allclose(expected.low, -IMAGENET_MEAN / IMAGENET_STD)
    np.testing.assert_allclose(expected.high, (1 - IMAGENET_MEAN) / IMAGENET_STD)
    assert input_range_warnings(listed, {"x": _imagenet(_pixels())}) == []
    assert input_range_warnings(listed, {"x": _pixels()}) != []
    scaled = expected_range(_model([], {"norm_scale": "1/255"}), "x", 3)
    np.testing.assert_allclose(scaled.high, [1, 1, 1])
    yolo = expected_range(_model([], {"author": "Ultralytics", "task": "detect"}), "x", 3)
    np.testing.assert_allclose((yolo.low, yolo.high), ([0] * 3, [1] * 3))


def test_channel_statistics_match_numpy():
    x = _imagenet(_pixels())
    stats = channel_statistics(x)
    np.testing.assert_allclose(stats.minimum, [x[:, c].min() for c in range(3)])
    np.testing.assert_allclose(stats.maximum, [x[:, c].max() for c in range(3)])
    np.testing.assert_allclose(stats.mean, [x[:, c].mean() for c in range(3)], rtol=1e-6)


def test_surrogate_against_the_flags_that_fit(tmp_path):
    """The default surrogate (ImageNet-normalised) warns on a Div-by-255 model; 0-255 does not."""
    path = tmp_path / "div255.onnx"
    onnx.save(_model(DIV_255), str(path))
    spec = [InputSpec("x", SHAPE)]
    surrogate = load_dataset(None, spec, num_samples=4)
    assert input_range_warnings(_model(DIV_255), surrogate.inputs) != []
    raw = load_dataset(None, spec, num_samples=4, scale=1.0, mean=(0, 0, 0), std=(1, 1, 1))
    assert input_range_warnings(_model(DIV_255), raw.inputs) == []


def test_prepare_data_pass_says_it_in_the_warnings():
    ctx = PassContext(input_shapes={"x": SHAPE})
    passes = [MemoryAnalysisPass(), PrepareDataPass(DataOptions(num_samples=4, batch_size=2))]
    _, ctx = Pipeline(passes).run(_model(DIV_255), ctx)
    assert sum("--scale 1 --mean 0,0,0 --std 1,1,1" in w for w in ctx.warnings) == 1
    _, quiet = Pipeline(passes).run(_model([]), PassContext(input_shapes={"x": SHAPE}))
    assert not any("--scale" in w for w in quiet.warnings)


@pytest.mark.parametrize("name", ["yolov8n", "ppocr-cls", "ppocr-det", "ppocr-rec"])
def test_real_models(name):
    """YOLOv8n (an Ultralytics export) wants [0, 1]; the PP-OCR files state nothing."""
    model = onnx.load(str(real_model(name)), load_external_data=False)
    expected = expected_range(model, model.graph.input[0].name, 3)
    if name == "yolov8n":
        np.testing.assert_allclose((expected.low, expected.high), ([0] * 3, [1] * 3))
        surrogate = _imagenet(_pixels())
        assert "--scale 0.0039215686 --mean 0,0,0 --std 1,1,1" in input_range_warnings(model, {"images": surrogate})[0]
    else:
        assert expected is None
