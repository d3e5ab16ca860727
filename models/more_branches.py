"""Residual and multi-branch families: ResNet-34, WRN-16-4, HRNet-lite and VoVNet-27-slim.

ResNet-34 (He et al. 2016) is the 3/4/6/3 stack of basic blocks (two 3x3 convs) at a
quarter of the width (16-128 channels). Wide ResNet-16-4 (Zagoruyko & Komodakis 2016) is the
CIFAR layout with pre-activation blocks (BN, ReLU, 3x3, BN, ReLU, 3x3; the shortcut a 1x1
conv on the pre-activated input where the shape changes), 2 blocks per group at widths
64/128/256. HRNet-lite (Wang et al. 2020) keeps three parallel resolutions: a stride-4 stem,
a branch added by a strided 3x3 conv at each transition, basic blocks per branch, and
exchange units where every output sums the branches brought to its resolution (1x1 conv and
nearest upsampling from below, chains of strided 3x3 convs from above); the head
concatenates all branches upsampled to the finest (HRNetV2). VoVNet-27-slim (Lee et al.
2019) at half width: one-shot aggregation modules, a chain of five 3x3 convs whose outputs
are concatenated once (with the module input) and reduced by a 1x1 conv.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .blocks import ClassifierHead, ConvBNAct, init_weights

RESNET34_LAYERS = (3, 4, 6, 3)
WRN_DEPTH, WRN_WIDEN = 16, 4
HRNET_WIDTHS = (16, 32, 64)  # channels per resolution (1/4, 1/8, 1/16 of the input)
# VoVNet-27-slim at half width: (3x3 conv channels, concat output channels) per stage
VOVNET27_SLIM = ((32, 64), (40, 128), (48, 192), (56, 256))
VOVNET_LAYERS = 5


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN (the first with the stride), the shortcut added before the ReLU."""

    def __init__(self, inp: int, out: int, stride: int = 1) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            ConvBNAct(inp, out, 3, stride), ConvBNAct(out, out, 3, act=None)
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inp != out:
            self.shortcut = ConvBNAct(inp, out, 1, stride, act=None)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.branch(x) + self.shortcut(x))


class ResNet34(nn.Module):
    """ResNet-34: 7x7 stride-2 stem and max pool, 3/4/6/3 basic blocks at `base` width."""

    def __init__(self, num_classes: int = 1000, base: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(ConvBNAct(3, base, 7, 2), nn.MaxPool2d(3, 2, 1))
        layers: list[nn.Module] = []
        channels = base
        for stage, blocks in enumerate(RESNET34_LAYERS):
            width = base * 2**stage
            for i in range(blocks):
                layers.append(BasicBlock(channels, width, 2 if i == 0 and stage > 0 else 1))
                channels = width
        self.layers = nn.Sequential(*layers)
        self.head = ClassifierHead(channels, num_classes, dropout=0.0)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


class WideBasic(nn.Module):
    """Pre-activation wide block: BN-ReLU-3x3 (stride), BN-ReLU-dropout-3x3, plus shortcut."""

    def __init__(self, inp: int, out: int, stride: int, dropout: float = 0.3) -> None:
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(inp), nn.ReLU()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(out), nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(inp, out, 1, stride, bias=False) if stride != 1 or inp != out else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        y = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(act)))))
        return y + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """WRN-`depth`-`widen`: a 3x3 stem of 16, three groups of (depth-4)/6 wide blocks."""

    def __init__(self, num_classes: int = 1000, depth: int = WRN_DEPTH,
                 widen: int = WRN_WIDEN) -> None:
        super().__init__()
        blocks = (depth - 4) // 6
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        layers: list[nn.Module] = []
        channels = 16
        for group in range(3):
            width = 16 * widen * 2**group
            for i in range(blocks):
                layers.append(WideBasic(channels, width, 2 if i == 0 and group > 0 else 1))
                channels = width
        layers += [nn.BatchNorm2d(channels), nn.ReLU()]
        self.groups = nn.Sequential(*layers)
        self.head = ClassifierHead(channels, num_classes, dropout=0.0)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.groups(self.stem(x)))


class Downsample(nn.Sequential):
    """`steps` strided 3x3 conv+BN from one branch to a coarser one (ReLU between steps)."""

    def __init__(self, inp: int, out: int, steps: int) -> None:
        layers: list[nn.Module] = []
        for step in range(steps):
            last = step == steps - 1
            layers.append(ConvBNAct(inp, out if last else inp, 3, 2, act=None if last else nn.ReLU))
        super().__init__(*layers)


class Upsample(nn.Module):
    """1x1 conv+BN to the finer branch's width, then nearest upsampling by `factor`."""

    def __init__(self, inp: int, out: int, factor: int) -> None:
        super().__init__()
        self.conv = ConvBNAct(inp, out, 1, act=None)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.conv(x), scale_factor=float(self.factor), mode="nearest")


class HRModule(nn.Module):
    """Basic blocks on each branch, then exchange: output i sums every branch at resolution i."""

    def __init__(self, widths: tuple[int, ...], blocks: int = 2) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(*(BasicBlock(w, w) for _ in range(blocks))) for w in widths
        )
        self.fuse = nn.ModuleList()
        for i, out in enumerate(widths):
            row = nn.ModuleList()
            for j, inp in enumerate(widths):
                if j > i:
                    row.append(Upsample(inp, out, 2 ** (j - i)))
                elif j < i:
                    row.append(Downsample(inp, out, i - j))
                else:
                    row.append(nn.Identity())
            self.fuse.append(row)
        self.relu = nn.ReLU()

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        ys = [branch(x) for branch, x in zip(self.branches, xs, strict=True)]
        outs = []
        for row in self.fuse:
            total = row[0](ys[0])
            for layer, y in zip(row[1:], ys[1:], strict=True):
                total = total + layer(y)
            outs.append(self.relu(total))
        return outs


class HRNetLite(nn.Module):
    """HRNet with 2 then 3 parallel resolutions; HRNetV2 head (upsample all, concat, 1x1)."""

    def __init__(self, num_classes: int = 1000, widths: tuple[int, ...] = HRNET_WIDTHS) -> None:
        super().__init__()
        first = widths[0]
        self.stem = nn.Sequential(
            ConvBNAct(3, first, 3, 2), ConvBNAct(first, first, 3, 2), BasicBlock(first, first)
        )
        self.transition1 = ConvBNAct(first, widths[1], 3, 2)
        self.stage2 = HRModule(widths[:2])
        self.transition2 = ConvBNAct(widths[1], widths[2], 3, 2)
        self.stage3 = nn.ModuleList([HRModule(widths), HRModule(widths)])
        self.fuse = ConvBNAct(sum(widths), 4 * sum(widths), 1)
        self.head = ClassifierHead(4 * sum(widths), num_classes, dropout=0.0)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        xs = self.stage2([x, self.transition1(x)])
        xs = [*xs, self.transition2(xs[-1])]
        for module in self.stage3:
            xs = module(xs)
        size = xs[0].shape[-2:]
        ups = [xs[0]] + [F.interpolate(y, size=size, mode="nearest") for y in xs[1:]]
        return self.head(self.fuse(torch.cat(ups, dim=1)))


class OSAModule(nn.Module):
    """One-shot aggregation: a chain of 3x3 convs, all outputs (and the input) concatenated
    once, then a 1x1 conv to the module's output width."""

    def __init__(self, inp: int, mid: int, out: int, layers: int = VOVNET_LAYERS) -> None:
        super().__init__()
        self.chain = nn.ModuleList(
            ConvBNAct(inp if i == 0 else mid, mid, 3) for i in range(layers)
        )
        self.concat = ConvBNAct(inp + layers * mid, out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [x]
        for conv in self.chain:
            outputs.append(conv(outputs[-1]))
        return self.concat(torch.cat(outputs, dim=1))


class VoVNet(nn.Module):
    """VoVNet-27-slim: a 3-conv stride-4 stem, one OSA module per stage, 3x3/2 max pools."""

    def __init__(self, num_classes: int = 1000, stem: tuple[int, int, int] = (32, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            ConvBNAct(3, stem[0], 3, 2), ConvBNAct(stem[0], stem[1], 3),
            ConvBNAct(stem[1], stem[2], 3, 2),
        )
        layers: list[nn.Module] = []
        channels = stem[2]
        for stage, (mid, out) in enumerate(VOVNET27_SLIM):
            if stage > 0:
                layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
            layers.append(OSAModule(channels, mid, out))
            channels = out
        self.stages = nn.Sequential(*layers)
        self.head = ClassifierHead(channels, num_classes, dropout=0.0)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def resnet34(num_classes: int = 1000) -> ResNet34:
    """ResNet-34 (3/4/6/3 basic blocks) at quarter width."""
    return ResNet34(num_classes)


def wide_resnet16_4(num_classes: int = 1000) -> WideResNet:
    """WRN-16-4, pre-activation blocks, widths 64/128/256 (CIFAR layout, stride-1 stem)."""
    return WideResNet(num_classes)


def hrnet_lite(num_classes: int = 1000) -> HRNetLite:
    """HRNet-lite: three resolutions (16/32/64 channels), one 2-branch and two 3-branch modules."""
    return HRNetLite(num_classes)


def vovnet27_slim(num_classes: int = 1000) -> VoVNet:
    """VoVNet-27-slim at half width (OSA modules of five 3x3 convs, 64 to 256 outputs)."""
    return VoVNet(num_classes)


__all__ = [
    "HRNetLite", "ResNet34", "VoVNet", "WideResNet",
    "hrnet_lite", "resnet34", "vovnet27_slim", "wide_resnet16_4",
]
