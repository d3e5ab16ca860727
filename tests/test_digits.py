"""The trained demo model (models/digits_resnet.onnx), the `mnist` named dataset and its training script."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest

from fmcompress.data import InputSpec, load_dataset
from fmcompress.datasets import (
    MNIST_CLASSES,
    MNIST_MEAN,
    MNIST_STD,
    MNIST_TEST_PER_CLASS,
    _mnist_raw,
    mnist,
    mnist_split_indices,
)
from fmcompress.errors import InputError
from fmcompress.models import DIGITS_TEST_ACCURACY, digits_onnx_path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_digits.py"
MAX_ONNX_BYTES = 5 * 1024 * 1024
SPEC = [InputSpec("input", (1, 1, 28, 28))]


def _script():
    spec = importlib.util.spec_from_file_location("train_digits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_onnx_is_valid_and_small():
    path = digits_onnx_path()
    assert path == ROOT / "models" / "digits_resnet.onnx"
    assert path.stat().st_size < MAX_ONNX_BYTES
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    (inp,) = model.graph.input
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    assert dims[1:] == [1, 28, 28]
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)  # folded at export


def test_committed_onnx_reaches_its_documented_accuracy_on_the_test_split():
    x, y = mnist("test")
    accuracy = _script().onnx_accuracy(digits_onnx_path(), x, y)
    assert accuracy >= DIGITS_TEST_ACCURACY


def test_split_is_fixed_disjoint_balanced_and_complete():
    pixels, labels = _mnist_raw()
    train, test = mnist_split_indices()
    assert len(train) == 4000 and len(test) == 1000
    assert not set(train.tolist()) & set(test.tolist())
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[test], minlength=MNIST_CLASSES).tolist() == [MNIST_TEST_PER_CLASS] * MNIST_CLASSES
    assert len(set(labels[test[:50]].tolist())) == MNIST_CLASSES  # any prefix mixes the classes
    # what the training script trains on holds none of the test images (the file has no duplicates)
    assert len(np.unique(pixels.reshape(len(pixels), -1), axis=0)) == len(pixels)
    train_x, _ = mnist("train")
    test_x, _ = mnist("test")
    train_rows = {row.tobytes() for row in train_x.reshape(len(train_x), -1)}
    assert not any(row.tobytes() in train_rows for row in test_x.reshape(len(test_x), -1))


def test_load_dataset_mnist_gives_the_labelled_test_split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "mnist" names the dataset while no such file exists here
    dataset = load_dataset("mnist", SPEC, num_samples=300)
    x, y = mnist("test")
    assert len(dataset) == 300 and dataset.source == "mnist:test"
    assert dataset.inputs["input"].shape == (300, 1, 28, 28) and dataset.inputs["input"].dtype == np.float32
    assert dataset.labels.dtype == np.int64 and set(dataset.labels.tolist()) == set(range(10))
    np.testing.assert_array_equal(dataset.inputs["input"], x[:300])
    np.testing.assert_array_equal(dataset.labels, y[:300])
    raw = x * MNIST_STD + MNIST_MEAN  # the documented convention inverts to pixels / 255
    assert raw.min() == pytest.approx(0, abs=1e-6) and raw.max() == pytest.approx(1, abs=1e-6)
    assert len(load_dataset(Path("mnist"), SPEC, num_samples=5000)) == 1000  # capped at the split


def test_an_existing_path_named_mnist_is_still_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mnist").mkdir()
    with pytest.raises(InputError, match="no images"):
        load_dataset("mnist", SPEC, num_samples=8)


@pytest.mark.parametrize("spec, match", [
    (InputSpec("x", (1, 3, 32, 32)), r"\[N, 1, 28, 28\] float"),
    (InputSpec("x", (1, 1, 28, 28), np.int64), r"\[N, 1, 28, 28\] float"),
])
def test_mnist_refuses_a_model_of_another_input(spec, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=match):
        load_dataset("mnist", [spec], num_samples=8)


def test_training_script_smoke(tmp_path):
    import torch

    from fmcompress.models import get_model

    script = _script()
    x, y = mnist("train")
    model = get_model("digits_resnet", calibrate_bn=False).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logs = []
    script.train(model, x[:64], y[:64], epochs=1, batch_size=32, seed=0, log=logs.append)
    assert len(logs) == 1 and logs[0].startswith("epoch 1/1")
    assert not model.training
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    out = tmp_path / "d.onnx"
    assert script.export(model, out) < 1e-4
    assert 0 <= script.onnx_accuracy(out, x[:16], y[:16]) <= 1
