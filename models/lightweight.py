"""Light networks built from cheap operations: GhostNet, ShuffleNetV2 and SqueezeNet 1.1.

GhostNet (Han et al. 2020) makes half of each map with a depthwise "cheap operation" on the
other half and concatenates them (then slices to the width); ShuffleNetV2 (Ma et al. 2018)
splits channels, runs one half and shuffles them with view/transpose/view; SqueezeNet 1.1
(Iandola et al. 2016) is a stack of fire modules (1x1 squeeze, then 1x1 and 3x3 expands
concatenated) without BatchNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ConvBNAct, SqueezeExcite, init_weights, make_divisible, scaled

# GhostNet: (kernel, expanded channels, output channels, SE ratio, stride), stage by stage
GHOSTNET = (
    (3, 16, 16, 0, 1),
    (3, 48, 24, 0, 2),
    (3, 72, 24, 0, 1),
    (5, 72, 40, 0.25, 2),
    (5, 120, 40, 0.25, 1),
    (3, 240, 80, 0, 2),
    (3, 200, 80, 0, 1),
    (3, 184, 80, 0, 1),
    (3, 184, 80, 0, 1),
    (3, 480, 112, 0.25, 1),
    (3, 672, 112, 0.25, 1),
    (5, 672, 160, 0.25, 2),
    (5, 960, 160, 0, 1),
    (5, 960, 160, 0.25, 1),
    (5, 960, 160, 0, 1),
    (5, 960, 160, 0.25, 1),
)
# ShuffleNetV2 x0.5: stage repeats and channels (stem, stage 2..4, last conv)
SHUFFLENET_REPEATS = (4, 8, 4)
SHUFFLENET_CHANNELS = (24, 48, 96, 192, 1024)


class GhostModule(nn.Module):
    """A 1x1 primary conv to half the outputs, a 3x3 depthwise on it for the rest, concat."""

    def __init__(self, inp: int, out: int, relu: bool = True) -> None:
        super().__init__()
        self.out = out
        init = (out + 1) // 2
        act = nn.ReLU if relu else None
        self.primary = ConvBNAct(inp, init, 1, act=act)
        self.cheap = ConvBNAct(init, init, 3, groups=init, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        primary = self.primary(x)
        return torch.cat([primary, self.cheap(primary)], dim=1)[:, : self.out]


class GhostBottleneck(nn.Module):
    def __init__(
        self, inp: int, mid: int, out: int, kernel: int, stride: int, se_ratio: float
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [GhostModule(inp, mid)]
        if stride > 1:
            layers.append(ConvBNAct(mid, mid, kernel, stride, groups=mid, act=None))
        if se_ratio:
            layers.append(
                SqueezeExcite(mid, make_divisible(mid * se_ratio, 4), nn.ReLU, nn.Hardsigmoid)
            )
        layers.append(GhostModule(mid, out, relu=False))
        self.ghost = nn.Sequential(*layers)
        self.shortcut: nn.Module = nn.Identity()
        if stride > 1 or inp != out:
            self.shortcut = nn.Sequential(
                ConvBNAct(inp, inp, kernel, stride, groups=inp, act=None),
                ConvBNAct(inp, out, 1, act=None),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ghost(x) + self.shortcut(x)


class GhostNet(nn.Module):
    def __init__(self, num_classes: int = 1000, width: float = 0.5) -> None:
        super().__init__()
        channels = scaled(16, width, 4)
        layers: list[nn.Module] = [ConvBNAct(3, channels, 3, 2)]
        for kernel, expanded, out, se_ratio, stride in GHOSTNET:
            mid, out_c = scaled(expanded, width, 4), scaled(out, width, 4)
            layers.append(GhostBottleneck(channels, mid, out_c, kernel, stride, se_ratio))
            channels = out_c
        layers.append(ConvBNAct(channels, scaled(960, width, 4), 1))
        self.features = nn.Sequential(*layers)
        self.conv_head = nn.Sequential(nn.Conv2d(scaled(960, width, 4), 1280, 1), nn.ReLU())
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(self.conv_head(x), 1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channel groups: view to (N, g, C/g, H, W), swap, view back."""
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, inp: int, out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = out // 2
        self.branch1: nn.Module = nn.Identity()
        if stride > 1:
            self.branch1 = nn.Sequential(
                ConvBNAct(inp, inp, 3, stride, groups=inp, act=None), ConvBNAct(inp, half, 1)
            )
        branch_in = inp if stride > 1 else half
        self.branch2 = nn.Sequential(
            ConvBNAct(branch_in, half, 1),
            ConvBNAct(half, half, 3, stride, groups=half, act=None),
            ConvBNAct(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            kept, active = x.chunk(2, dim=1)
            out = torch.cat((kept, self.branch2(active)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        stem, *stages, last = SHUFFLENET_CHANNELS
        self.conv1 = ConvBNAct(3, stem, 3, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers: list[nn.Module] = []
        channels = stem
        for repeats, out in zip(SHUFFLENET_REPEATS, stages, strict=True):
            layers += [ShuffleUnit(channels, out, 2)] + [
                ShuffleUnit(out, out, 1) for _ in range(repeats - 1)
            ]
            channels = out
        self.stages = nn.Sequential(*layers)
        self.conv5 = ConvBNAct(channels, last, 1)
        self.fc = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stages(self.maxpool(self.conv1(x))))
        return self.fc(x.mean([2, 3]))


class Fire(nn.Module):
    """1x1 squeeze conv, then 1x1 and 3x3 expand convs side by side, concatenated."""

    def __init__(self, inp: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(inp, squeeze, 1), nn.ReLU())
        self.expand1x1 = nn.Sequential(nn.Conv2d(squeeze, expand1x1, 1), nn.ReLU())
        self.expand3x3 = nn.Sequential(nn.Conv2d(squeeze, expand3x3, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze(x)
        return torch.cat([self.expand1x1(x), self.expand3x3(x)], 1)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1, torchvision's layer list (its init: Kaiming-uniform convs)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2),
            nn.ReLU(),
            pool,
            Fire(64, 16, 64, 64),
            Fire(128, 16, 64, 64),
            pool,
            Fire(128, 32, 128, 128),
            Fire(256, 32, 128, 128),
            pool,
            Fire(256, 48, 192, 192),
            Fire(384, 48, 192, 192),
            Fire(384, 64, 256, 256),
            Fire(512, 64, 256, 256),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Conv2d(512, num_classes, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


def ghostnet(num_classes: int = 1000) -> GhostNet:
    """GhostNet 1.0's 16 bottlenecks at width 0.5."""
    return GhostNet(num_classes)


def shufflenet_v2(num_classes: int = 1000) -> ShuffleNetV2:
    """ShuffleNetV2 x0.5."""
    return ShuffleNetV2(num_classes)


def squeezenet(num_classes: int = 1000) -> SqueezeNet:
    """SqueezeNet 1.1."""
    return SqueezeNet(num_classes)


__all__ = ["GhostNet", "ShuffleNetV2", "SqueezeNet", "ghostnet", "shufflenet_v2", "squeezenet"]
