"""Efficient mobile families: MobileNetV1, ShuffleNetV1 (g=3), MobileOne-S0, EfficientNetV2-S.

MobileNetV1 (Howard et al. 2017) is the published stack of 13 depthwise separable layers
(3x3 depthwise + BN + ReLU, then 1x1 pointwise + BN + ReLU) at width 0.25. ShuffleNetV1
(Zhang et al. 2018) with 3 groups at x0.5: grouped 1x1 convs around a 3x3 depthwise, a
channel shuffle after the first, residual add (stride 1) or a concat with a 3x3 average
pool of the input (stride 2). MobileOne-S0 (Vasu et al. 2023) in its training-time form at a
quarter of the width: each block is a depthwise stage (four 3x3 depthwise+BN branches, a 1x1
depthwise "scale" branch and a BN identity, summed, ReLU) then a pointwise stage (four
1x1+BN branches and a BN identity, summed, ReLU). EfficientNetV2-S (Tan & Le 2021) at half
width and half depth: Fused-MBConv stages (a full 3x3 conv expansion, 1x1 projection) then
MBConv stages with SE, SiLU throughout. The residual families (ResNet-34, WRN-16-4) and the
multi-branch aggregators (HRNet, VoVNet) are in models/more_branches.py.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .blocks import ClassifierHead, ConvBNAct, SqueezeExcite, init_weights, scaled
from .lightweight import channel_shuffle
from .mobile import MBConv

# MobileNetV1: (pointwise output channels, depthwise stride) for the 13 separable layers
MOBILENET_V1 = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)
# ShuffleNetV1 g=3 x0.5: stem width, stage output widths and repeats
SHUFFLENET_V1_STEM = 24
SHUFFLENET_V1_STAGES = ((120, 4), (240, 8), (480, 4))
# MobileOne-S0: (blocks, width) per stage at a quarter width; 4 over-parameterised branches
MOBILEONE_S0 = ((2, 12), (8, 32), (10, 64), (1, 256))
MOBILEONE_BRANCHES = 4
# EfficientNetV2-S: (fused, expand ratio, stride, output channels, layers) per stage
EFFICIENTNET_V2_S = (
    (True, 1, 1, 24, 2),
    (True, 4, 2, 48, 4),
    (True, 4, 2, 64, 4),
    (False, 4, 2, 128, 6),
    (False, 6, 1, 160, 9),
    (False, 6, 2, 256, 15),
)


class DepthwiseSeparable(nn.Sequential):
    """MobileNetV1's layer: 3x3 depthwise + BN + ReLU, then 1x1 pointwise + BN + ReLU."""

    def __init__(self, inp: int, out: int, stride: int) -> None:
        super().__init__(ConvBNAct(inp, inp, 3, stride, groups=inp), ConvBNAct(inp, out, 1))


class MobileNetV1(nn.Module):
    """MobileNetV1: a 3x3 stride-2 stem and 13 depthwise separable layers, width `width`."""

    def __init__(self, num_classes: int = 1000, width: float = 0.25) -> None:
        super().__init__()
        channels = scaled(32, width)
        layers: list[nn.Module] = [ConvBNAct(3, channels, 3, 2)]
        for out, stride in MOBILENET_V1:
            layers.append(DepthwiseSeparable(channels, scaled(out, width), stride))
            channels = scaled(out, width)
        self.features = nn.Sequential(*layers)
        self.head = ClassifierHead(channels, num_classes, dropout=0.0)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1, shuffle, 3x3 depthwise (the stride), grouped 1x1; add or concat a pool."""

    def __init__(self, inp: int, out: int, stride: int, groups: int, first_groups: int) -> None:
        super().__init__()
        self.stride, self.groups = stride, first_groups
        mid = out // 4
        branch_out = out - inp if stride > 1 else out
        self.compress = ConvBNAct(inp, mid, 1, groups=first_groups)
        self.depthwise = ConvBNAct(mid, mid, 3, stride, groups=mid, act=None)
        self.expand = ConvBNAct(mid, branch_out, 1, groups=groups, act=None)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.compress(x)
        if self.groups > 1:
            y = channel_shuffle(y, self.groups)
        y = self.expand(self.depthwise(y))
        if self.stride > 1:
            pooled = nn.functional.avg_pool2d(x, 3, self.stride, 1)
            return self.relu(torch.cat([pooled, y], dim=1))
        return self.relu(x + y)


class ShuffleNetV1(nn.Module):
    """ShuffleNetV1 with `groups` groups; the first unit's 1x1 is ungrouped (24 inputs)."""

    def __init__(self, num_classes: int = 1000, groups: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            ConvBNAct(3, SHUFFLENET_V1_STEM, 3, 2), nn.MaxPool2d(3, 2, 1)
        )
        layers: list[nn.Module] = []
        channels = SHUFFLENET_V1_STEM
        for stage, (out, repeats) in enumerate(SHUFFLENET_V1_STAGES):
            for i in range(repeats):
                first_groups = 1 if stage == 0 and i == 0 else groups
                layers.append(ShuffleV1Unit(channels, out, 2 if i == 0 else 1, groups, first_groups))
                channels = out
        self.stages = nn.Sequential(*layers)
        self.head = ClassifierHead(channels, num_classes, dropout=0.0)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class ReparamBranches(nn.Module):
    """MobileOne's over-parameterised conv: `k` kxk conv+BN branches, a 1x1 scale branch
    (kxk blocks only) and a BN identity (same shape only), summed, then ReLU."""

    def __init__(
        self, inp: int, out: int, kernel: int, stride: int, groups: int, branches: int
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            ConvBNAct(inp, out, kernel, stride, groups=groups, act=None) for _ in range(branches)
        )
        self.scale = (
            ConvBNAct(inp, out, 1, stride, groups=groups, act=None, padding=0)
            if kernel > 1 else None
        )
        self.identity = nn.BatchNorm2d(out) if inp == out and stride == 1 else None
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs[0](x)
        for conv in self.convs[1:]:
            out = out + conv(x)
        if self.scale is not None:
            out = out + self.scale(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.relu(out)


class MobileOneBlock(nn.Sequential):
    """A depthwise 3x3 stage (the stride) then a pointwise 1x1 stage, both re-parameterisable."""

    def __init__(self, inp: int, out: int, stride: int, branches: int) -> None:
        super().__init__(
            ReparamBranches(inp, inp, 3, stride, inp, branches),
            ReparamBranches(inp, out, 1, 1, 1, branches),
        )


class MobileOne(nn.Module):
    """MobileOne-S0 (training-time form): a dense 3x3 stem block, then 2/8/10/1 blocks."""

    def __init__(self, num_classes: int = 1000, branches: int = MOBILEONE_BRANCHES) -> None:
        super().__init__()
        channels = MOBILEONE_S0[0][1]
        layers: list[nn.Module] = [ReparamBranches(3, channels, 3, 2, 1, 1)]
        for blocks, width in MOBILEONE_S0:
            for i in range(blocks):
                layers.append(MobileOneBlock(channels, width, 2 if i == 0 else 1, branches))
                channels = width
        self.stages = nn.Sequential(*layers)
        self.head = ClassifierHead(channels, num_classes, dropout=0.0)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(x))


class FusedMBConv(nn.Module):
    """EfficientNetV2's Fused-MBConv: a full 3x3 conv expansion (the stride), 1x1 project;
    with expand ratio 1 the 3x3 conv is the whole block."""

    def __init__(self, inp: int, out: int, expand: int, stride: int) -> None:
        super().__init__()
        if expand == 1:
            self.block: nn.Module = ConvBNAct(inp, out, 3, stride, act=nn.SiLU)
        else:
            expanded = inp * expand
            self.block = nn.Sequential(
                ConvBNAct(inp, expanded, 3, stride, act=nn.SiLU),
                ConvBNAct(expanded, out, 1, act=None),
            )
        self.use_residual = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class EfficientNetV2(nn.Module):
    """EfficientNetV2-S's stage table at `width` and `depth` multipliers (0.5 and 0.5)."""

    def __init__(self, num_classes: int = 1000, width: float = 0.5, depth: float = 0.5) -> None:
        super().__init__()
        channels = scaled(24, width)
        layers: list[nn.Module] = [ConvBNAct(3, channels, 3, 2, act=nn.SiLU)]
        for fused, expand, stride, out, repeats in EFFICIENTNET_V2_S:
            out_c = scaled(out, width)
            for i in range(math.ceil(repeats * depth)):
                step = stride if i == 0 else 1
                if fused:
                    layers.append(FusedMBConv(channels, out_c, expand, step))
                else:
                    expanded = channels * expand
                    se = SqueezeExcite(expanded, max(1, channels // 4), nn.SiLU, nn.Sigmoid)
                    layers.append(MBConv(channels, expanded, out_c, 3, step, nn.SiLU, se))
                channels = out_c
        head = scaled(1280, width)
        layers.append(ConvBNAct(channels, head, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.head = ClassifierHead(head, num_classes, dropout=0.2)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def mobilenet_v1(num_classes: int = 1000) -> MobileNetV1:
    """MobileNetV1 at width 0.25 (8 to 256 channels)."""
    return MobileNetV1(num_classes)


def shufflenet_v1(num_classes: int = 1000) -> ShuffleNetV1:
    """ShuffleNetV1 g=3 x0.5 (stages of 120/240/480 channels, 4/8/4 units)."""
    return ShuffleNetV1(num_classes)


def mobileone_s0(num_classes: int = 1000) -> MobileOne:
    """MobileOne-S0 at a quarter width, training-time form (4 conv branches per stage)."""
    return MobileOne(num_classes)


def efficientnet_v2_s(num_classes: int = 1000) -> EfficientNetV2:
    """EfficientNetV2-S at half width and half depth (1/2/2/3/5/8 blocks)."""
    return EfficientNetV2(num_classes)


__all__ = [
    "EfficientNetV2", "MobileNetV1", "MobileOne", "ShuffleNetV1",
    "efficientnet_v2_s", "mobilenet_v1", "mobileone_s0", "shufflenet_v1",
]
