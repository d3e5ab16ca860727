"""Concatenating networks: DenseNet-121, GoogLeNet and Inception-v3.

DenseNet-121 (Huang et al. 2017): blocks of 6/12/24/16 pre-activation layers (BN, ReLU,
1x1, BN, ReLU, 3x3) each concatenating everything before it, at growth rate 12 (not 32)
with 24 stem channels. GoogLeNet (Szegedy et al. 2015) and Inception-v3 (Szegedy et al.
2016, factorised 1x7/7x1 and 1x3/3x1 convs) keep every inception module and branch of
torchvision's definitions at a quarter of their channels. Inception-v3's stem uses
unpadded convs like the original, so it needs an input of at least 75x75 (zoo default 96).
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ClassifierHead, ConvBNAct, init_weights

DENSENET121_BLOCKS = (6, 12, 24, 16)
# GoogLeNet inception modules: (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj), full width
GOOGLENET_3 = ((64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64))
GOOGLENET_4 = (
    (192, 96, 208, 16, 48, 64),
    (160, 112, 224, 24, 64, 64),
    (128, 128, 256, 24, 64, 64),
    (112, 144, 288, 32, 64, 64),
    (256, 160, 320, 32, 128, 128),
)
GOOGLENET_5 = ((256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128))
WIDTH = 4  # GoogLeNet and Inception-v3 channels are divided by this


def _q(channels: int) -> int:
    return max(1, channels // WIDTH)


class DenseLayer(nn.Module):
    def __init__(self, inp: int, growth: int, bn_size: int = 4) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.BatchNorm2d(inp),
            nn.ReLU(),
            nn.Conv2d(inp, bn_size * growth, 1, bias=False),
            nn.BatchNorm2d(bn_size * growth),
            nn.ReLU(),
            nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.layers(torch.cat(features, 1))


class DenseBlock(nn.Module):
    def __init__(self, count: int, inp: int, growth: int) -> None:
        super().__init__()
        self.dense_layers = nn.ModuleList(
            DenseLayer(inp + i * growth, growth) for i in range(count)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.dense_layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self, num_classes: int = 1000, growth: int = 12, stem: int = 24) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNAct(3, stem, 7, 2), nn.MaxPool2d(3, 2, 1)]
        channels = stem
        for i, count in enumerate(DENSENET121_BLOCKS):
            layers.append(DenseBlock(count, channels, growth))
            channels += count * growth
            if i < len(DENSENET121_BLOCKS) - 1:  # transition: BN, ReLU, 1x1 halving, avgpool 2
                layers += [
                    nn.BatchNorm2d(channels),
                    nn.ReLU(),
                    nn.Conv2d(channels, channels // 2, 1, bias=False),
                    nn.AvgPool2d(2, 2),
                ]
                channels //= 2
        layers += [nn.BatchNorm2d(channels), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = ClassifierHead(channels, num_classes, dropout=0.0)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Inception(nn.Module):
    """GoogLeNet's module: 1x1 | 1x1-3x3 | 1x1-5x5 | maxpool-1x1, concatenated."""

    def __init__(self, inp: int, spec: tuple[int, ...]) -> None:
        super().__init__()
        c1, r3, c3, r5, c5, pool = (_q(c) for c in spec)
        self.branches = nn.ModuleList(
            [
                ConvBNAct(inp, c1, 1),
                nn.Sequential(ConvBNAct(inp, r3, 1), ConvBNAct(r3, c3, 3)),
                nn.Sequential(ConvBNAct(inp, r5, 1), ConvBNAct(r5, c5, 5)),
                nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), ConvBNAct(inp, pool, 1)),
            ]
        )
        self.out_channels = c1 + c3 + c5 + pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], 1)


class GoogLeNet(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            ConvBNAct(3, _q(64), 7, 2),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            ConvBNAct(_q(64), _q(64), 1),
            ConvBNAct(_q(64), _q(192), 3),
            nn.MaxPool2d(3, 2, ceil_mode=True),
        ]
        channels = _q(192)
        for i, group in enumerate((GOOGLENET_3, GOOGLENET_4, GOOGLENET_5)):
            for spec in group:
                layers.append(Inception(channels, spec))
                channels = layers[-1].out_channels
            if i < 2:
                layers.append(nn.MaxPool2d(3 if i == 0 else 2, 2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.head = ClassifierHead(channels, num_classes, dropout=0.2)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Branches(nn.Module):
    """Run every branch on the same input and concatenate (an inception module)."""

    def __init__(self, *branches: nn.Module) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], 1)


class Split(nn.Module):
    """A conv whose output feeds two parallel convs, concatenated (Inception-v3's E branches)."""

    def __init__(self, head: nn.Module, left: nn.Module, right: nn.Module) -> None:
        super().__init__()
        self.head, self.left, self.right = head, left, right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(x)
        return torch.cat([self.left(x), self.right(x)], 1)


def _avg_branch(inp: int, out: int) -> nn.Module:
    return nn.Sequential(nn.AvgPool2d(3, 1, 1), ConvBNAct(inp, out, 1))


def inception_a(inp: int, pool: int) -> Branches:
    return Branches(
        ConvBNAct(inp, _q(64), 1),
        nn.Sequential(ConvBNAct(inp, _q(48), 1), ConvBNAct(_q(48), _q(64), 5)),
        nn.Sequential(
            ConvBNAct(inp, _q(64), 1), ConvBNAct(_q(64), _q(96), 3), ConvBNAct(_q(96), _q(96), 3)
        ),
        _avg_branch(inp, _q(pool)),
    )


def inception_b(inp: int) -> Branches:
    return Branches(
        ConvBNAct(inp, _q(384), 3, 2, padding=0),
        nn.Sequential(
            ConvBNAct(inp, _q(64), 1),
            ConvBNAct(_q(64), _q(96), 3),
            ConvBNAct(_q(96), _q(96), 3, 2, padding=0),
        ),
        nn.MaxPool2d(3, 2),
    )


def inception_c(inp: int, c7: int) -> Branches:
    """The factorised 7x7: 1x7 and 7x1 convs in sequence."""
    c7, out = _q(c7), _q(192)
    return Branches(
        ConvBNAct(inp, out, 1),
        nn.Sequential(ConvBNAct(inp, c7, 1), ConvBNAct(c7, c7, (1, 7)), ConvBNAct(c7, out, (7, 1))),
        nn.Sequential(
            ConvBNAct(inp, c7, 1),
            ConvBNAct(c7, c7, (7, 1)),
            ConvBNAct(c7, c7, (1, 7)),
            ConvBNAct(c7, c7, (7, 1)),
            ConvBNAct(c7, out, (1, 7)),
        ),
        _avg_branch(inp, out),
    )


def inception_d(inp: int) -> Branches:
    c = _q(192)
    return Branches(
        nn.Sequential(ConvBNAct(inp, c, 1), ConvBNAct(c, _q(320), 3, 2, padding=0)),
        nn.Sequential(
            ConvBNAct(inp, c, 1),
            ConvBNAct(c, c, (1, 7)),
            ConvBNAct(c, c, (7, 1)),
            ConvBNAct(c, c, 3, 2, padding=0),
        ),
        nn.MaxPool2d(3, 2),
    )


def inception_e(inp: int) -> Branches:
    """1x3 and 3x1 convs side by side on a shared 1x1 (or 1x1-3x3) head."""
    c = _q(384)
    return Branches(
        ConvBNAct(inp, _q(320), 1),
        Split(ConvBNAct(inp, c, 1), ConvBNAct(c, c, (1, 3)), ConvBNAct(c, c, (3, 1))),
        Split(
            nn.Sequential(ConvBNAct(inp, _q(448), 1), ConvBNAct(_q(448), c, 3)),
            ConvBNAct(c, c, (1, 3)),
            ConvBNAct(c, c, (3, 1)),
        ),
        _avg_branch(inp, _q(192)),
    )


class InceptionV3(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        q = _q
        self.stem = nn.Sequential(
            ConvBNAct(3, q(32), 3, 2, padding=0),
            ConvBNAct(q(32), q(32), 3, padding=0),
            ConvBNAct(q(32), q(64), 3),
            nn.MaxPool2d(3, 2),
            ConvBNAct(q(64), q(80), 1),
            ConvBNAct(q(80), q(192), 3, padding=0),
            nn.MaxPool2d(3, 2),
        )
        a_out = q(64) + q(64) + q(96)
        self.mixed = nn.Sequential(
            inception_a(q(192), 32),
            inception_a(a_out + q(32), 64),
            inception_a(a_out + q(64), 64),
            inception_b(a_out + q(64)),
            *(inception_c(4 * q(192), c7) for c7 in (128, 160, 160, 192)),
            inception_d(4 * q(192)),
            inception_e(q(320) + q(192) + 4 * q(192)),
            inception_e(q(320) + 4 * q(384) + q(192)),
        )
        self.head = ClassifierHead(q(320) + 4 * q(384) + q(192), num_classes, dropout=0.5)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mixed(self.stem(x)))


def densenet121(num_classes: int = 1000) -> DenseNet:
    """DenseNet-121's 6/12/24/16 dense layers at growth rate 12."""
    return DenseNet(num_classes)


def googlenet(num_classes: int = 1000) -> GoogLeNet:
    """GoogLeNet (BatchNorm after every conv, as torchvision) at quarter width, no aux heads."""
    return GoogLeNet(num_classes)


def inception_v3(num_classes: int = 1000) -> InceptionV3:
    """Inception-v3 at quarter width, no aux head."""
    return InceptionV3(num_classes)
