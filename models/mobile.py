"""Mobile inverted-bottleneck networks: MobileNetV3 small and large, EfficientNet-B0, MnasNet.

Block tables follow the papers and torchvision; a width multiplier (0.5 by default) keeps
them small, and the stems keep their stride 2, so a 64x64 input ends at 2x2 before pooling.
MobileNetV3 uses HardSwish and SE gates with HardSigmoid; EfficientNet SiLU and SE gates
with Sigmoid; MnasNet plain ReLU inverted residuals.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ClassifierHead, ConvBNAct, SqueezeExcite, init_weights, make_divisible, scaled

# MobileNetV3: (kernel, expanded channels, output channels, SE, activation, stride)
MOBILENET_V3_SMALL = (
    (3, 16, 16, True, "RE", 2),
    (3, 72, 24, False, "RE", 2),
    (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2),
    (5, 240, 40, True, "HS", 1),
    (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1),
    (5, 144, 48, True, "HS", 1),
    (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1),
    (5, 576, 96, True, "HS", 1),
)
MOBILENET_V3_LARGE = (
    (3, 16, 16, False, "RE", 1),
    (3, 64, 24, False, "RE", 2),
    (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2),
    (5, 120, 40, True, "RE", 1),
    (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2),
    (3, 200, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 480, 112, True, "HS", 1),
    (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2),
    (5, 960, 160, True, "HS", 1),
    (5, 960, 160, True, "HS", 1),
)
# EfficientNet-B0: (expand ratio, kernel, stride, input channels, output channels, layers)
EFFICIENTNET_B0 = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
# MnasNet-B1 stacks: (output channels, kernel, stride, expand ratio, repeats)
MNASNET_B1 = (
    (24, 3, 2, 3, 3),
    (40, 5, 2, 3, 3),
    (80, 5, 2, 6, 3),
    (96, 3, 1, 6, 2),
    (192, 5, 2, 6, 4),
    (320, 3, 1, 6, 1),
)
_ACTS: dict[str, type[nn.Module]] = {"RE": nn.ReLU, "HS": nn.Hardswish}


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, optional SE, 1x1 linear project."""

    def __init__(
        self,
        inp: int,
        expanded: int,
        out: int,
        kernel: int,
        stride: int,
        act: type[nn.Module],
        se: SqueezeExcite | None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if expanded != inp:
            layers.append(ConvBNAct(inp, expanded, 1, act=act))
        layers.append(ConvBNAct(expanded, expanded, kernel, stride, groups=expanded, act=act))
        if se is not None:
            layers.append(se)
        layers.append(ConvBNAct(expanded, out, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV3(nn.Module):
    """MobileNetV3 (Howard et al. 2019): HardSwish, SE with HardSigmoid gates."""

    def __init__(
        self, setting: tuple, last_channel: int, num_classes: int = 1000, width: float = 0.5
    ) -> None:
        super().__init__()
        channels = scaled(16, width)
        layers: list[nn.Module] = [ConvBNAct(3, channels, 3, 2, act=nn.Hardswish)]
        for kernel, expanded, out, use_se, act, stride in setting:
            exp_c, out_c = scaled(expanded, width), scaled(out, width)
            se = (
                SqueezeExcite(exp_c, make_divisible(exp_c // 4), nn.ReLU, nn.Hardsigmoid)
                if use_se
                else None
            )
            layers.append(MBConv(channels, exp_c, out_c, kernel, stride, _ACTS[act], se))
            channels = out_c
        layers.append(ConvBNAct(channels, 6 * channels, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(6 * channels, last_channel),
            nn.Hardswish(),
            nn.Dropout(0.2),
            nn.Linear(last_channel, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)
        return self.classifier(x)


class EfficientNet(nn.Module):
    """EfficientNet-B0 (Tan & Le 2019): MBConv with SiLU and SE (squeeze = block input / 4)."""

    def __init__(self, num_classes: int = 1000, width: float = 0.5) -> None:
        super().__init__()
        stem = scaled(32, width)
        layers: list[nn.Module] = [ConvBNAct(3, stem, 3, 2, act=nn.SiLU)]
        channels = stem
        for expand, kernel, stride, _, out, repeats in EFFICIENTNET_B0:
            out_c = scaled(out, width)
            for i in range(repeats):
                expanded = channels * expand
                se = SqueezeExcite(expanded, max(1, channels // 4), nn.SiLU, nn.Sigmoid)
                layers.append(
                    MBConv(channels, expanded, out_c, kernel, stride if i == 0 else 1, nn.SiLU, se)
                )
                channels = out_c
        head = scaled(1280, width)
        layers.append(ConvBNAct(channels, head, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.head = ClassifierHead(head, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MnasNet(nn.Module):
    """MnasNet-B1 (Tan et al. 2019) as torchvision builds it: ReLU inverted residuals, no SE."""

    def __init__(self, num_classes: int = 1000, width: float = 0.5) -> None:
        super().__init__()
        stem, first = scaled(32, width), scaled(16, width)
        layers: list[nn.Module] = [
            ConvBNAct(3, stem, 3, 2),
            ConvBNAct(stem, stem, 3, groups=stem),
            ConvBNAct(stem, first, 1, act=None),
        ]
        channels = first
        for out, kernel, stride, expand, repeats in MNASNET_B1:
            out_c = scaled(out, width)
            for i in range(repeats):
                layers.append(
                    MBConv(
                        channels,
                        channels * expand,
                        out_c,
                        kernel,
                        stride if i == 0 else 1,
                        nn.ReLU,
                        None,
                    )
                )
                channels = out_c
        layers.append(ConvBNAct(channels, 1280, 1))
        self.layers = nn.Sequential(*layers)
        self.head = ClassifierHead(1280, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x))


def mobilenet_v3_small(num_classes: int = 1000) -> MobileNetV3:
    """MobileNetV3-Small at width 0.5."""
    return MobileNetV3(MOBILENET_V3_SMALL, 1024, num_classes)


def mobilenet_v3_large(num_classes: int = 1000) -> MobileNetV3:
    """MobileNetV3-Large at width 0.5."""
    return MobileNetV3(MOBILENET_V3_LARGE, 1280, num_classes)


def efficientnet_b0(num_classes: int = 1000) -> EfficientNet:
    """EfficientNet-B0 at width 0.5 (all 16 MBConv blocks)."""
    return EfficientNet(num_classes)


def mnasnet(num_classes: int = 1000) -> MnasNet:
    """MnasNet-B1 at depth multiplier 0.5."""
    return MnasNet(num_classes)
