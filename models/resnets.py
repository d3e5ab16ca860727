"""Residual families: ResNet-50, ResNeXt-50, SE-ResNet-50, RegNetY-200MF, RepVGG-A0, ConvNeXt.

ResNet-50 and its variants use torchvision's Bottleneck (1x1 reduce, 3x3 with the stride,
1x1 expand x4) at a quarter of the width (stage widths 16-128, outputs 64-512); ResNeXt's
3x3 is a grouped conv (cardinality 8), SE-ResNet gates each block's branch before the add.
RegNetY-200MF (Radosavovic et al. 2020) is the published design: widths 24/56/152/368,
depths 1/1/4/7, group width 8, SE on the block input width / 4. RepVGG-A0 (Ding et al. 2021)
is the training-time form at half width: 3x3+BN, 1x1+BN and identity-BN branches summed.
ConvNeXt is the "atto" size (dims 40-320, depths 2/2/6/2): 7x7 depthwise, LayerNorm over
channels in channels-last layout (permute), Linear 4x / GELU / Linear (MatMul in ONNX).
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ClassifierHead, ConvBNAct, SqueezeExcite, init_weights

RESNET50_LAYERS = (3, 4, 6, 3)
REGNETY_200MF = ((24, 1), (56, 1), (152, 4), (368, 7))  # (width, depth) per stage
REPVGG_A0 = ((2, 24), (4, 48), (14, 96), (1, 640))  # (blocks, width) per stage at half width
CONVNEXT_ATTO = ((2, 40), (2, 80), (6, 160), (2, 320))  # (depth, dim) per stage


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt, with the stride), 1x1 expand; optional SE gate."""

    expansion = 4

    def __init__(
        self,
        inp: int,
        planes: int,
        stride: int = 1,
        groups: int = 1,
        width: int | None = None,
        se: bool = False,
    ) -> None:
        super().__init__()
        mid = width or planes
        out = planes * self.expansion
        layers: list[nn.Module] = [
            ConvBNAct(inp, mid, 1),
            ConvBNAct(mid, mid, 3, stride, groups=groups),
            ConvBNAct(mid, out, 1, act=None),
        ]
        if se:
            layers.append(SqueezeExcite(out, max(1, out // 16)))
        self.branch = nn.Sequential(*layers)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or inp != out:
            self.downsample = ConvBNAct(inp, out, 1, stride, act=None)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.branch(x) + self.downsample(x))


class ResNet(nn.Module):
    """ResNet-50 layout at `base` stem width; `groups`/`group_width` make it ResNeXt."""

    def __init__(
        self,
        num_classes: int = 1000,
        base: int = 16,
        groups: int = 1,
        group_width: int | None = None,
        se: bool = False,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(ConvBNAct(3, base, 7, 2), nn.MaxPool2d(3, 2, 1))
        layers: list[nn.Module] = []
        channels = base
        for stage, blocks in enumerate(RESNET50_LAYERS):
            planes = base * 2**stage
            width = groups * group_width * 2**stage if group_width else None
            for i in range(blocks):
                stride = 2 if i == 0 and stage > 0 else 1
                layers.append(Bottleneck(channels, planes, stride, groups, width, se))
                channels = planes * Bottleneck.expansion
        self.layers = nn.Sequential(*layers)
        self.head = ClassifierHead(channels, num_classes, dropout=0.0)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


class RegNetYBlock(nn.Module):
    """RegNet's X block with SE: 1x1, 3x3 grouped (group width 8, the stride), SE, 1x1."""

    def __init__(self, inp: int, out: int, stride: int, group_width: int = 8) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            ConvBNAct(inp, out, 1),
            ConvBNAct(out, out, 3, stride, groups=out // group_width),
            SqueezeExcite(out, max(1, round(0.25 * inp))),
            ConvBNAct(out, out, 1, act=None),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inp != out:
            self.shortcut = ConvBNAct(inp, out, 1, stride, act=None)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.branch(x) + self.shortcut(x))


class RegNetY(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 32, 3, 2)
        layers: list[nn.Module] = []
        channels = 32
        for width, depth in REGNETY_200MF:
            layers += [
                RegNetYBlock(channels if i == 0 else width, width, 2 if i == 0 else 1)
                for i in range(depth)
            ]
            channels = width
        self.trunk = nn.Sequential(*layers)
        self.head = ClassifierHead(channels, num_classes, dropout=0.0)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(self.stem(x)))


class RepVGGBlock(nn.Module):
    """Training-time RepVGG block: ReLU(BN(3x3) + BN(1x1) + BN(identity)), summed branches."""

    def __init__(self, inp: int, out: int, stride: int) -> None:
        super().__init__()
        self.dense = ConvBNAct(inp, out, 3, stride, act=None)
        self.pointwise = ConvBNAct(inp, out, 1, stride, act=None, padding=0)
        self.identity = nn.BatchNorm2d(out) if inp == out and stride == 1 else None
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.relu(out)


class RepVGG(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [RepVGGBlock(3, REPVGG_A0[0][1], 2)]
        channels = REPVGG_A0[0][1]
        for blocks, width in REPVGG_A0:
            for i in range(blocks):
                layers.append(RepVGGBlock(channels, width, 2 if i == 0 else 1))
                channels = width
        self.stages = nn.Sequential(*layers)
        self.head = ClassifierHead(channels, num_classes, dropout=0.0)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(x))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map: permute to NHWC, normalise, permute back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise, then channels-last LayerNorm, Linear 4x, GELU, Linear, layer scale."""

    def __init__(self, dim: int, layer_scale: float = 0.1) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """ConvNeXt-atto; layer scale starts at 0.1 (not 1e-6) so untrained blocks matter."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for stage, (depth, dim) in enumerate(CONVNEXT_ATTO):
            if stage == 0:
                layers += [nn.Conv2d(3, dim, 4, 4), LayerNorm2d(dim, eps=1e-6)]
            else:
                layers += [LayerNorm2d(channels, eps=1e-6), nn.Conv2d(channels, dim, 2, 2)]
            layers += [ConvNeXtBlock(dim) for _ in range(depth)]
            channels = dim
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self, linear_std=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean([2, 3])
        return self.fc(self.norm(x))


def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50 (3/4/6/3 bottlenecks) at quarter width."""
    return ResNet(num_classes)


def resnext50(num_classes: int = 1000) -> ResNet:
    """ResNeXt-50 8x2d at quarter width: 3x3 convs in 8 groups."""
    return ResNet(num_classes, groups=8, group_width=2)


def se_resnet50(num_classes: int = 1000) -> ResNet:
    """SE-ResNet-50 at quarter width: an SE gate (reduction 16) in every bottleneck."""
    return ResNet(num_classes, se=True)


def regnety_200mf(num_classes: int = 1000) -> RegNetY:
    """RegNetY-200MF."""
    return RegNetY(num_classes)


def repvgg_a0(num_classes: int = 1000) -> RepVGG:
    """RepVGG-A0 (2/4/14/1 blocks) at half width, in its training-time (multi-branch) form."""
    return RepVGG(num_classes)


def convnext_atto(num_classes: int = 1000) -> ConvNeXt:
    """ConvNeXt-atto."""
    return ConvNeXt(num_classes)
