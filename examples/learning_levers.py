"""Which training levers pay: learned projections on the trained digits demo at one ceiling.

    python examples/learning_levers.py [--ceiling 4x] [--calibration 1024] [--configs NAME ...]

Calibration: `--calibration` digits of the demo's train split, unlabeled (a quarter of
them is compile's held-out part that picks the best epoch). Every compressed model is
then scored on the whole 1000-digit test split, which neither the demo's training nor
compile ever sees. One line per configuration: accuracy before and after, the drop in
points, the best epoch and the compile time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from fmcompress.compiler import CompileOptions, compile_model
from fmcompress.datasets import mnist
from fmcompress.models import digits_onnx_path
from fmcompress.ortrun import run_ort
from fmcompress.train_config import TrainConfig


def from_pca(**settings) -> tuple[str, dict]:
    """`learned` started from plain PCA (no block stage), as every row was before the stage existed."""
    return "learned", {"block_epochs": 0, **settings}


PCA_BLOCK = {"block_epochs": 12, "block_init": "pca"}  # the block stage as it was before the lstsq start
CONFIGS = {  # lr is relative: a map of C channels steps at lr / sqrt(C)
    "pca": ("pca", {}),
    "10 epochs, lr 3e-3": from_pca(epochs=10, lr=3e-3),
    "10 epochs, lr 1e-2": from_pca(epochs=10, lr=1e-2),
    "30 epochs, lr 3e-3": from_pca(epochs=30, lr=3e-3),
    "30 epochs, lr 1e-2": from_pca(epochs=30, lr=1e-2),
    "30 epochs, lr 3e-2": from_pca(epochs=30, lr=3e-2),
    "30 epochs, lr 1e-2, feature 0.5 (self)": from_pca(epochs=30, lr=1e-2, feature_weight=0.5,
                                                       feature_reference="self"),
    "30 epochs, lr 1e-2, feature 0.5 (teacher)": from_pca(epochs=30, lr=1e-2, feature_weight=0.5),
    "30 epochs, lr 1e-2, T 4": from_pca(epochs=30, lr=1e-2, temperature=4.0),
    "30 epochs, lr 1e-2, no augmentation": from_pca(epochs=30, lr=1e-2, augment="none"),
    "greedy 2/stage + 30, lr 1e-2": from_pca(epochs=30, lr=1e-2, schedule="greedy", stage_epochs=2),
    "random init, 30 epochs, lr 1e-2": ("random", {"epochs": 30, "lr": 1e-2}),
    "block 12/map from PCA, then 1 epoch, lr 1e-2": ("learned", {**PCA_BLOCK, "epochs": 1, "lr": 1e-2}),
    "block 12/map from PCA, then 10 epochs, lr 1e-2": ("learned", {**PCA_BLOCK, "epochs": 10, "lr": 1e-2}),
    "block 12/map from PCA, then 30 epochs, lr 1e-2": ("learned", {**PCA_BLOCK, "epochs": 30, "lr": 1e-2}),
    "default: block 3/map from lstsq, then 10 epochs": ("learned", {}),
    "block 3/map from lstsq, then 30 epochs": ("learned", {"epochs": 30}),
}


def accuracy(model, inputs: np.ndarray, labels: np.ndarray) -> float:
    return float((run_ort(model, [{"input": inputs}])[0].argmax(1) == labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ceiling", default="4x")
    parser.add_argument("--calibration", type=int, default=1024)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    train_x, _ = mnist("train")
    test_x, test_y = mnist("test")
    pick = np.random.default_rng(0).permutation(len(train_x))[: args.calibration]
    path = str(digits_onnx_path())
    before = accuracy(path, test_x, test_y)
    print(f"demo at {args.ceiling}, {args.calibration} calibration digits, accuracy on the 1000-digit test split")
    print("| configuration | accuracy before | after | drop (points) | best epoch | compile s |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "calibration.npz"
        np.savez(data, input=train_x[pick])
        for name in args.configs:
            method, settings = CONFIGS[name]
            start = time.perf_counter()
            result = compile_model(path, CompileOptions(ceiling=args.ceiling, data=data, num_samples=args.calibration,
                                                        method=method, batch_size=32, latency_rounds=1,
                                                        latency_repeats=1, training=TrainConfig(**settings)))
            after = accuracy(result.model, test_x, test_y)
            best = (result.report.get("training") or {}).get("best_epoch", "-")
            print(f"| {name} | {before:.1%} | {after:.1%} | {100 * (before - after):.1f} | {best} | "
                  f"{time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
