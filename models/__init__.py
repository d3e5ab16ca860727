"""Reference architectures in plain torch (importable as `fmcompress.models`).

ResNet-18, VGG-16 with BatchNorm and MobileNetV2, with torchvision's layer structure and
parameter names (a torchvision state_dict loads into them), for 224x224 ImageNet inputs and
in `_small` variants for 32x32 inputs. `get_model` builds one with a reproducible
initialisation and returns it in eval mode.

models/catalog.py adds compact versions of twenty-odd other architectures (MobileNetV3,
EfficientNet, DenseNet, Inception, ConvNeXt, a UNet, DeepLabV3, detectors, a CRNN, MobileViT,
...) at small inputs, by family in models/mobile.py, lightweight.py, resnets.py,
dense_inception.py, dense_prediction.py, sequence.py and hybrid.py.

`digits_resnet` (models/digits.py) is a small ResNet for 1x28x28 handwritten digits; unlike
the others it ships trained: `digits_onnx_path()` is its committed ONNX export
(examples/train_digits.py made it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fmcompress.errors import InputError

from .catalog import ARCHITECTURES
from .digits import (
    DIGITS_INPUT_SHAPE,
    DIGITS_ONNX,
    DIGITS_TEST_ACCURACY,
    DigitsResNet,
    digits_resnet,
)
from .mobilenetv2 import MobileNetV2, mobilenet_v2, mobilenet_v2_small
from .resnet import ResNet, resnet18, resnet18_small
from .vgg import VGG, vgg16_bn, vgg16_bn_small

IMAGENET_INPUT_SHAPE = (1, 3, 224, 224)
SMALL_INPUT_SHAPE = (1, 3, 32, 32)


@dataclass(frozen=True)
class ZooEntry:
    factory: Callable[[int], nn.Module]
    default_num_classes: int
    input_shape: tuple[int, ...]


ZOO: dict[str, ZooEntry] = {
    "resnet18": ZooEntry(resnet18, 1000, IMAGENET_INPUT_SHAPE),
    "vgg16_bn": ZooEntry(vgg16_bn, 1000, IMAGENET_INPUT_SHAPE),
    "mobilenet_v2": ZooEntry(mobilenet_v2, 1000, IMAGENET_INPUT_SHAPE),
    "resnet18_small": ZooEntry(resnet18_small, 10, SMALL_INPUT_SHAPE),
    "vgg16_bn_small": ZooEntry(vgg16_bn_small, 10, SMALL_INPUT_SHAPE),
    "mobilenet_v2_small": ZooEntry(mobilenet_v2_small, 10, SMALL_INPUT_SHAPE),
    "digits_resnet": ZooEntry(digits_resnet, 10, DIGITS_INPUT_SHAPE),
    # the compact architectures of models/catalog.py (64x64 inputs mostly)
    **{name: ZooEntry(*spec) for name, spec in ARCHITECTURES.items()},
}
MODEL_NAMES: tuple[str, ...] = tuple(ZOO)


def _entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise InputError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    return ZOO[name]


def get_model(name: str, *, num_classes: int | None = None, seed: int = 0,
              calibrate_bn: bool = True) -> nn.Module:
    """Build zoo model `name` in eval mode; the same `seed` always gives the same weights.

    With `calibrate_bn` (the default) the BatchNorm running statistics are set from one
    batch of seeded noise (see `calibrate_batchnorm`); parameters are torchvision's init.
    """
    entry = _entry(name)
    classes = entry.default_num_classes if num_classes is None else num_classes
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise InputError(f"num_classes must be a positive integer, got {num_classes!r}")
    # a private RNG stream: reproducible weights without disturbing the caller's global seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.factory(classes)
        if calibrate_bn:
            calibrate_batchnorm(model, entry.input_shape)
    return model.eval()


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Set every BatchNorm's running mean/var to its statistics on one batch of noise.

    With torchvision's init (mean 0, var 1) an untrained network's activations shrink or
    grow through depth (MobileNetV2's logits are ~1e-9) and folding BN is the identity. After
    this they stay O(1), as in a trained network, and the BN fold is a real rewrite.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: one batch sets the statistics exactly
    batch = 2 if input_shape[-1] >= 128 else 16  # enough samples per channel, bounded cost
    model.train()
    model(torch.randn(batch, *input_shape[1:]))
    model.eval()
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


def default_input_shape(name: str) -> tuple[int, ...]:
    """The input shape a zoo model is meant for: (1, 3, 224, 224), (1, 3, 64, 64), ..."""
    return _entry(name).input_shape


def digits_onnx_path() -> Path:
    """The committed, trained ONNX export of `digits_resnet` (models/digits_resnet.onnx)."""
    return Path(__file__).resolve().with_name(DIGITS_ONNX)


__all__ = [
    "DIGITS_TEST_ACCURACY", "MODEL_NAMES", "ZOO", "DigitsResNet", "MobileNetV2", "ResNet", "VGG", "calibrate_batchnorm",
    "default_input_shape", "digits_onnx_path", "digits_resnet", "get_model",
    "mobilenet_v2", "mobilenet_v2_small", "resnet18", "resnet18_small", "vgg16_bn", "vgg16_bn_small",
]
