"""Building blocks shared by the zoo's architecture families (models/mobile.py, resnets.py, ...).

`ConvBNAct` is torchvision's Conv2dNormActivation (conv, BatchNorm, optional activation),
`SqueezeExcite` the channel gate of SENet / MobileNetV3 / EfficientNet / RegNetY, and
`init_weights` torchvision's initialisation (Kaiming-normal convs, unit BatchNorm, small
Linear weights); `calibrate_batchnorm` (models/__init__.py) then sets BN statistics.
"""

from __future__ import annotations

import torch
from torch import nn

ActFactory = type[nn.Module] | None


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of `divisor`, never going down by more than 10%."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new_value + divisor if new_value < 0.9 * value else new_value


def scaled(channels: int, width: float, divisor: int = 8) -> int:
    """`channels` times a width multiplier, rounded to a multiple of `divisor`."""
    return make_divisible(channels * width, divisor)


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + activation (`act=None`: linear)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int = 1,
        groups: int = 1,
        act: ActFactory = nn.ReLU,
        dilation: int = 1,
        padding: int | tuple[int, int] | None = None,
    ) -> None:
        if padding is None:
            kernel = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
            padding = ((kernel[0] - 1) // 2 * dilation, (kernel[1] - 1) // 2 * dilation)
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding,
                dilation=dilation,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
        ]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)
        self.out_channels = out_channels


class SqueezeExcite(nn.Module):
    """x * gate(fc2(act(fc1(avgpool(x))))): the SE channel attention, with 1x1 convs as FCs."""

    def __init__(
        self,
        channels: int,
        squeeze: int,
        act: type[nn.Module] = nn.ReLU,
        gate: type[nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(scale))))


class ClassifierHead(nn.Module):
    """Global average pooling, flatten, dropout, Linear."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.dropout(x))


def init_weights(model: nn.Module, linear_std: float | None = 0.01) -> nn.Module:
    """torchvision's initialisation for every Conv, norm layer and Linear of `model`.

    `linear_std=None` keeps nn.Linear's own (uniform, fan-in) init: the transformer-style
    blocks need it, as with N(0, 0.01) their branches would vanish in an untrained network.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and linear_std is not None:
            nn.init.normal_(module.weight, 0, linear_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model
