"""Calibration data loading: npz files, image folders, the surrogate set, splits."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper
from PIL import Image

import fmcompress.data as data_module
from fmcompress.data import (
    DEFAULT_MEAN,
    DEFAULT_SCALE,
    DEFAULT_STD,
    Dataset,
    InputSpec,
    input_specs,
    load_dataset,
)
from fmcompress.errors import InputError

IMAGE = [InputSpec("image", (1, 3, 16, 16), np.float32)]


def _npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def _write_image(path: Path, size: tuple[int, int] = (20, 12), mode: str = "RGB", value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=value if mode == "L" else (value,) * len(mode)).save(path)
    return path


def _rgb_images(folder: Path, count: int, prefix: str = "img") -> None:
    for index in range(count):
        _write_image(folder / f"{prefix}{index}.png", value=40 * index)


# ------------------------------------------------------------------- npz: happy


def test_npz_keyed_by_input_name_with_labels(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(5, 3, 16, 16)).astype(np.float64)
    path = _npz(tmp_path, image=x, labels=np.array([0, 1, 2, 1, 0]))
    data = load_dataset(path, IMAGE, num_samples=4, num_classes=3)
    assert data.source == f"npz:{path}" and not data.surrogate
    assert len(data) == 4
    assert data.inputs["image"].dtype == np.float32
    np.testing.assert_allclose(data.inputs["image"], x[:4].astype(np.float32))
    assert data.labels.tolist() == [0, 1, 2, 1]


def test_npz_any_key_for_single_input_and_ints_become_float(tmp_path: Path) -> None:
    x = np.arange(2 * 3 * 16 * 16, dtype=np.int32).reshape(2, 3, 16, 16)
    data = load_dataset(_npz(tmp_path, whatever=x), IMAGE)
    assert data.inputs["image"].dtype == np.float32
    assert data.labels is None
    np.testing.assert_array_equal(data.inputs["image"], x.astype(np.float32))


def test_npz_free_dims_and_multiple_inputs(tmp_path: Path) -> None:
    specs = [InputSpec("a", (None, 4, 0), np.float32), InputSpec("ids", (1, 3), np.int64)]
    path = _npz(tmp_path, a=np.ones((3, 4, 7)), ids=np.array([[1, 2, 3]] * 3, dtype=np.int32))
    data = load_dataset(path, specs)
    assert data.inputs["a"].shape == (3, 4, 7)
    assert data.inputs["ids"].dtype == np.int64


# -------------------------------------------------------------------- npz: bad


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"image": np.zeros((2, 3, 8, 8))}, "shape"),
        ({"image": np.zeros((2, 3, 16))}, "shape"),
        ({"image": np.full((2, 3, 16, 16), "a")}, "dtype"),
        ({"image": np.zeros((2, 3, 16, 16), dtype=np.complex64)}, "dtype"),
        ({"image": np.zeros((0, 3, 16, 16))}, "no samples"),
        ({"image": np.zeros((2, 3, 16, 16)), "labels": np.array([0, 1, 2])}, "labels"),
        ({"image": np.zeros((2, 3, 16, 16)), "labels": np.array([0.0, 1.0])}, "integers"),
        ({"image": np.zeros((2, 3, 16, 16)), "labels": np.array([0, 10])}, "[0, 10]"),
        ({"image": np.zeros((2, 3, 16, 16)), "labels": np.array([-1, 0])}, "range over [-1, 0]"),
        ({"first": np.zeros((2, 3, 16, 16)), "second": np.zeros((2, 3, 16, 16))}, "'image'"),
    ],
)
def test_npz_bad_arrays(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(InputError, match=re.escape(message)) as info:
        load_dataset(_npz(tmp_path, **arrays), IMAGE, num_classes=10 if "labels" in arrays else None)
    assert "\n" not in str(info.value)


def test_npz_nan_and_inf_are_counted(tmp_path: Path) -> None:
    x = np.zeros((2, 3, 16, 16), dtype=np.float32)
    x[0, 0, 0, :2] = np.nan
    x[1, 2, 3, 4] = np.inf
    with pytest.raises(InputError, match=r"'image' has 3 NaN/Inf"):
        load_dataset(_npz(tmp_path, image=x), IMAGE)


def test_npz_overflow_to_float16_is_caught(tmp_path: Path) -> None:
    spec = [InputSpec("x", (1, 2), np.float16)]
    with pytest.raises(InputError, match="after conversion to float16"):
        load_dataset(_npz(tmp_path, x=np.array([[1e6, 0.0]])), spec)


def test_npz_lossy_integer_input_rejected(tmp_path: Path) -> None:
    spec = [InputSpec("ids", (1, 2), np.int64)]
    with pytest.raises(InputError, match="convert exactly"):
        load_dataset(_npz(tmp_path, ids=np.array([[1.5, 2.0]])), spec)


def test_npz_missing_key_names_input_and_keys(tmp_path: Path) -> None:
    specs = [InputSpec("a", (1, 2), np.float32), InputSpec("b", (1, 2), np.float32)]
    with pytest.raises(InputError, match=r"input 'b' \(keys present: a, labels\)"):
        load_dataset(_npz(tmp_path, a=np.zeros((1, 2)), labels=np.array([0])), specs)


def test_npz_inputs_with_different_counts(tmp_path: Path) -> None:
    specs = [InputSpec("a", (1, 2), np.float32), InputSpec("b", (1, 2), np.float32)]
    with pytest.raises(InputError, match="different numbers of samples"):
        load_dataset(_npz(tmp_path, a=np.zeros((2, 2)), b=np.zeros((3, 2))), specs)


def test_npz_object_arrays_rejected(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, image=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(InputError, match="object arrays"):
        load_dataset(path, IMAGE)


def test_corrupt_npz_and_missing_or_unknown_paths(tmp_path: Path) -> None:
    corrupt = tmp_path / "bad.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match="not a readable .npz"):
        load_dataset(corrupt, IMAGE)
    with pytest.raises(InputError, match="no such file"):
        load_dataset(tmp_path / "nowhere", IMAGE)
    with pytest.raises(InputError, match="not a directory"):
        load_dataset(_write_image(tmp_path / "one.png"), IMAGE)


# ------------------------------------------------------------------ image folders


def test_image_folder_with_class_subfolders(tmp_path: Path) -> None:
    _rgb_images(tmp_path / "dog", 2)
    _rgb_images(tmp_path / "cat", 3)
    _write_image(tmp_path / "cat" / "gray.JPG", mode="L")
    _write_image(tmp_path / "dog" / "alpha.png", mode="RGBA")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    data = load_dataset(tmp_path, IMAGE, num_classes=2)
    assert data.source == f"images:{tmp_path}" and data.skipped == 0
    assert data.inputs["image"].shape == (7, 3, 16, 16)
    assert data.inputs["image"].dtype == np.float32
    assert sorted(data.labels.tolist()) == [0, 0, 0, 0, 1, 1, 1]  # cat=0, dog=1


def test_image_normalisation_and_grayscale_input(tmp_path: Path) -> None:
    _write_image(tmp_path / "a.png", value=100)
    rgb = load_dataset(tmp_path, IMAGE)
    expected = (100 * DEFAULT_SCALE - np.array(DEFAULT_MEAN)) / np.array(DEFAULT_STD)
    np.testing.assert_allclose(rgb.inputs["image"][0, :, 5, 5], expected, rtol=1e-5)
    gray = load_dataset(tmp_path, [InputSpec("g", (1, 1, 8, 24), np.float32)], mean=(0.5,), std=(0.5,))
    assert gray.inputs["g"].shape == (1, 1, 8, 24)
    np.testing.assert_allclose(gray.inputs["g"], (100 / 255 - 0.5) / 0.5, rtol=1e-5)
    assert gray.labels is None


def test_image_folder_takes_a_seeded_subset(tmp_path: Path) -> None:
    _rgb_images(tmp_path, 6)
    first = load_dataset(tmp_path, IMAGE, num_samples=3, seed=1)
    again = load_dataset(tmp_path, IMAGE, num_samples=3, seed=1)
    assert len(first) == 3
    np.testing.assert_array_equal(first.inputs["image"], again.inputs["image"])


def test_some_corrupt_images_are_skipped_and_counted(tmp_path: Path) -> None:
    _rgb_images(tmp_path, 3)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "empty.jpg").write_bytes(b"")
    data = load_dataset(tmp_path, IMAGE)
    assert len(data) == 3 and data.skipped == 2


def test_all_corrupt_images(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"nope")
    (tmp_path / "b.bmp").write_bytes(b"nope")
    with pytest.raises(InputError, match="none of its 2 image"):
        load_dataset(tmp_path, IMAGE)


def test_empty_folder_and_folder_without_images(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no images"):
        load_dataset(tmp_path, IMAGE)
    (tmp_path / "readme.txt").write_text("hi")
    (tmp_path / "sub").mkdir()
    with pytest.raises(InputError, match="no images"):
        load_dataset(tmp_path, IMAGE)


def test_more_class_folders_than_classes(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        _rgb_images(tmp_path / name, 1)
    with pytest.raises(InputError, match="3 class subfolders"):
        load_dataset(tmp_path, IMAGE, num_classes=2)


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ([InputSpec("a", (1, 3, 8, 8)), InputSpec("b", (1, 3, 8, 8))], "one image input.*npz"),
        ([InputSpec("ids", (1, 3, 8, 8), np.int64)], "4-D float.*npz"),
        ([InputSpec("seq", (1, 3, 8))], "4-D float"),
        ([InputSpec("image", (1, 3, None, None))], "--input-shape"),
        ([InputSpec("image", (1, 4, 8, 8))], "4 channels"),
    ],
)
def test_images_need_one_fixed_image_input(tmp_path: Path, specs: list[InputSpec], message: str) -> None:
    _rgb_images(tmp_path, 1)
    with pytest.raises(InputError, match=message):
        load_dataset(tmp_path, specs)
    with pytest.raises(InputError, match=message):
        load_dataset(None, specs)


def test_bad_normalisation_and_sample_count(tmp_path: Path) -> None:
    _rgb_images(tmp_path, 1)
    with pytest.raises(InputError, match="std must be positive"):
        load_dataset(tmp_path, IMAGE, std=(0.2, 0.0, 0.2))
    with pytest.raises(InputError, match="mean has 2 values"):
        load_dataset(tmp_path, IMAGE, mean=(0.5, 0.5))
    with pytest.raises(InputError, match="at least 1"):
        load_dataset(tmp_path, IMAGE, num_samples=0)


# ---------------------------------------------------------------------- surrogate


def test_surrogate_is_deterministic_and_roughly_normalised() -> None:
    specs = [InputSpec("x", (1, 3, 64, 48), np.float32)]
    data = load_dataset(None, specs, num_samples=64, seed=3)
    x = data.inputs["x"]
    assert data.surrogate and data.source == "surrogate" and data.labels is None
    assert x.shape == (64, 3, 64, 48) and x.dtype == np.float32
    assert abs(float(x.mean())) < 0.3 and 0.6 < float(x.std()) < 1.5
    np.testing.assert_array_equal(x, load_dataset(None, specs, num_samples=64, seed=3).inputs["x"])
    assert not np.array_equal(x, load_dataset(None, specs, num_samples=64, seed=4).inputs["x"])
    assert len({x[i].tobytes() for i in range(len(x))}) == len(x)  # every crop differs


def test_surrogate_never_touches_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the surrogate set tried to open a socket")

    monkeypatch.setattr(socket, "socket", no_network)
    data_module._surrogate_photos.cache_clear()
    assert len(load_dataset(None, [InputSpec("x", (1, 3, 8, 8))], num_samples=2)) == 2
    assert len(data_module._surrogate_photos()) >= 10


def test_surrogate_grayscale_input() -> None:
    data = load_dataset(None, [InputSpec("x", (1, 1, 32, 32), np.float32)], num_samples=4)
    assert data.inputs["x"].shape == (4, 1, 32, 32)


# ------------------------------------------------------------ batches and split


def _numbered(count: int) -> Dataset:
    return Dataset({"x": np.arange(count, dtype=np.float32)[:, None]}, np.arange(count), "npz:t")


def test_batches_cover_everything_in_order() -> None:
    batches = list(_numbered(5).batches(2))
    assert [len(labels) for _, labels in batches] == [2, 2, 1]
    assert np.concatenate([inputs["x"][:, 0] for inputs, _ in batches]).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(InputError):
        list(_numbered(5).batches(0))


def test_split_is_deterministic_disjoint_and_non_empty() -> None:
    calibration, held_out = _numbered(10).split(0.3, seed=7)
    again_cal, _ = _numbered(10).split(0.3, seed=7)
    assert len(calibration) == 7 and len(held_out) == 3
    assert calibration.labels.tolist() == again_cal.labels.tolist()
    assert sorted(calibration.labels.tolist() + held_out.labels.tolist()) == list(range(10))
    np.testing.assert_array_equal(calibration.inputs["x"][:, 0], calibration.labels)
    tiny_cal, tiny_held = _numbered(2).split(0.01)
    assert len(tiny_cal) == 1 and len(tiny_held) == 1
    with pytest.raises(InputError, match="at least 2"):
        _numbered(1).split()
    with pytest.raises(InputError, match="between 0 and 1"):
        _numbered(4).split(1.0)


def test_input_specs_from_model() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    (spec,) = input_specs(helper.make_model(graph))
    assert spec.name == "x" and spec.shape == (None, 3, 8, 8) and spec.dtype == np.float32
