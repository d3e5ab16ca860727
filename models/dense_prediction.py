"""Dense prediction: a UNet, DeepLabV3 on a MobileNetV2 backbone, an FPN detector, a YOLOv5 net.

* `unet`: 4 levels of double 3x3 convs (16-256 channels), max-pool down, ConvTranspose 2x2 up,
  long skip concats, 1x1 head: [N, 2, H, W].
* `deeplabv3_mobilenet`: a MobileNetV2 (width 0.5) at output stride 8 (the last two strided
  stages dilated 2 and 4), ASPP (1x1, three dilated 3x3 at rates 2/4/6 for the small input,
  image pooling upsampled bilinearly), then bilinear upsampling to the input: [N, 21, H, W].
* `fpn_detector`: a small ResNet's C3-C5, lateral 1x1 convs, top-down nearest 2x upsampling
  and adds, 3x3 output convs, a shared class/box head per level: [N, anchors, classes + 4].
* `yolov5_focus`: YOLOv5's Focus stem (space-to-depth by strided slicing, then a conv), C3
  blocks with SiLU, SPPF, a top-down neck and a detect conv per level: [N, anchors, 85].
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .blocks import ConvBNAct, init_weights, scaled
from .mobilenetv2 import INVERTED_RESIDUAL_SETTING


def double_conv(inp: int, out: int) -> nn.Sequential:
    return nn.Sequential(ConvBNAct(inp, out, 3), ConvBNAct(out, out, 3))


class UNet(nn.Module):
    def __init__(self, num_classes: int = 2, base: int = 16, levels: int = 4) -> None:
        super().__init__()
        widths = [base * 2**i for i in range(levels + 1)]
        self.down = nn.ModuleList(
            [double_conv(3, widths[0])]
            + [double_conv(widths[i], widths[i + 1]) for i in range(levels)]
        )
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, 2) for i in reversed(range(levels))
        )
        self.decode = nn.ModuleList(
            double_conv(2 * widths[i], widths[i]) for i in reversed(range(levels))
        )
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        skips.pop()
        for up, decode in zip(self.up, self.decode, strict=True):
            x = decode(torch.cat([skips.pop(), up(x)], 1))
        return self.head(x)


class DilatedInvertedResidual(nn.Module):
    """MobileNetV2's inverted residual with a dilated depthwise conv."""

    def __init__(self, inp: int, out: int, stride: int, expand: int, dilation: int) -> None:
        super().__init__()
        hidden = inp * expand
        layers: list[nn.Module] = [ConvBNAct(inp, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6, dilation=dilation),
            ConvBNAct(hidden, out, 1, act=None),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet_v2_backbone(width: float = 0.5, output_stride: int = 8) -> tuple[nn.Sequential, int]:
    """MobileNetV2's features, strides past `output_stride` replaced by dilation."""
    channels = scaled(32, width)
    layers: list[nn.Module] = [ConvBNAct(3, channels, 3, 2, act=nn.ReLU6)]
    stride_so_far, dilation = 2, 1
    for expand, c, repeats, s in INVERTED_RESIDUAL_SETTING:
        out = scaled(c, width)
        if s == 2 and stride_so_far >= output_stride:
            s, dilation = 1, dilation * 2
        elif s == 2:
            stride_so_far *= 2
        for i in range(repeats):
            layers.append(
                DilatedInvertedResidual(channels, out, s if i == 0 else 1, expand, dilation)
            )
            channels = out
    return nn.Sequential(*layers), channels


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, dilated 3x3s and image pooling, concat, 1x1."""

    def __init__(self, inp: int, out: int = 64, rates: tuple[int, ...] = (2, 4, 6)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [ConvBNAct(inp, out, 1)] + [ConvBNAct(inp, out, 3, dilation=rate) for rate in rates]
        )
        self.pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBNAct(inp, out, 1))
        self.project = nn.Sequential(ConvBNAct(out * (len(rates) + 2), out, 1), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(
            self.pooling(x), size=x.shape[-2:], mode="bilinear", align_corners=False
        )
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], 1))


class DeepLabV3(nn.Module):
    def __init__(self, num_classes: int = 21) -> None:
        super().__init__()
        self.backbone, channels = mobilenet_v2_backbone()
        self.aspp = ASPP(channels)
        self.head = nn.Sequential(ConvBNAct(64, 64, 3), nn.Conv2d(64, num_classes, 1))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.aspp(self.backbone(x)))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class BasicBlock(nn.Module):
    def __init__(self, inp: int, out: int, stride: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            ConvBNAct(inp, out, 3, stride), ConvBNAct(out, out, 3, act=None)
        )
        self.shortcut = (
            ConvBNAct(inp, out, 1, stride, act=None) if stride != 1 or inp != out else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))


def _flatten_levels(maps: list[torch.Tensor], per_anchor: int) -> torch.Tensor:
    """[N, A*K, H, W] per level -> [N, sum(A*H*W), K]: the usual detector output layout."""
    n = maps[0].shape[0]
    return torch.cat([m.permute(0, 2, 3, 1).reshape(n, -1, per_anchor) for m in maps], 1)


class FPNDetector(nn.Module):
    """ResNet-18-style backbone (half width), FPN on C3-C5, a shared RetinaNet-style head."""

    def __init__(self, num_classes: int = 20, anchors: int = 3, width: int = 64) -> None:
        super().__init__()
        self.per_anchor = num_classes + 4
        self.stem = nn.Sequential(ConvBNAct(3, 16, 3, 2), BasicBlock(16, 32, 2))
        self.c3 = nn.Sequential(BasicBlock(32, 64, 2), BasicBlock(64, 64, 1))
        self.c4 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128, 1))
        self.c5 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256, 1))
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in (64, 128, 256))
        self.smooth = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(3))
        self.head = nn.Sequential(
            ConvBNAct(width, width, 3), nn.Conv2d(width, anchors * self.per_anchor, 1)
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c3 = self.c3(self.stem(x))
        c4 = self.c4(c3)
        features = [c3, c4, self.c5(c4)]
        laterals = [conv(f) for conv, f in zip(self.lateral, features, strict=True)]
        for i in (1, 0):  # top-down: upsample the coarser level and add
            laterals[i] = laterals[i] + F.interpolate(
                laterals[i + 1], scale_factor=2.0, mode="nearest"
            )
        levels = [smooth(p) for smooth, p in zip(self.smooth, laterals, strict=True)]
        return _flatten_levels([self.head(p) for p in levels], self.per_anchor)


class Focus(nn.Module):
    """Space-to-depth by strided slicing (four phase images concatenated), then a conv."""

    def __init__(self, inp: int, out: int) -> None:
        super().__init__()
        self.conv = ConvBNAct(4 * inp, out, 3, act=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(
            torch.cat(
                [x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1
            )
        )


class C3(nn.Module):
    """CSP bottleneck: two 1x1 paths, bottlenecks on one, concat, 1x1."""

    def __init__(self, inp: int, out: int, depth: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        hidden = out // 2
        self.cv1, self.cv2 = (
            ConvBNAct(inp, hidden, 1, act=nn.SiLU),
            ConvBNAct(inp, hidden, 1, act=nn.SiLU),
        )
        self.blocks = nn.ModuleList(
            nn.Sequential(
                ConvBNAct(hidden, hidden, 1, act=nn.SiLU), ConvBNAct(hidden, hidden, 3, act=nn.SiLU)
            )
            for _ in range(depth)
        )
        self.shortcut = shortcut
        self.cv3 = ConvBNAct(2 * hidden, out, 1, act=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv1(x)
        for block in self.blocks:
            y = y + block(y) if self.shortcut else block(y)
        return self.cv3(torch.cat([y, self.cv2(x)], 1))


class SPPF(nn.Module):
    """Three chained 5x5 max pools, all four maps concatenated."""

    def __init__(self, inp: int, out: int) -> None:
        super().__init__()
        self.cv1 = ConvBNAct(inp, inp // 2, 1, act=nn.SiLU)
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.cv2 = ConvBNAct(inp * 2, out, 1, act=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], 1))


class YoloV5(nn.Module):
    """YOLOv5n-like: Focus stem, C3 backbone to stride 32, SPPF, top-down neck, 3 detect convs."""

    def __init__(self, num_classes: int = 80, anchors: int = 3) -> None:
        super().__init__()
        self.per_anchor = num_classes + 5
        self.stem = nn.Sequential(Focus(3, 16), ConvBNAct(16, 32, 3, 2, act=nn.SiLU), C3(32, 32))
        self.p3 = nn.Sequential(ConvBNAct(32, 64, 3, 2, act=nn.SiLU), C3(64, 64, 2))
        self.p4 = nn.Sequential(ConvBNAct(64, 128, 3, 2, act=nn.SiLU), C3(128, 128, 3))
        self.p5 = nn.Sequential(
            ConvBNAct(128, 256, 3, 2, act=nn.SiLU), C3(256, 256), SPPF(256, 256)
        )
        self.reduce5, self.reduce4 = (
            ConvBNAct(256, 128, 1, act=nn.SiLU),
            ConvBNAct(128, 64, 1, act=nn.SiLU),
        )
        self.merge4 = C3(256, 128, shortcut=False)
        self.merge3 = C3(128, 64, shortcut=False)
        self.detect = nn.ModuleList(
            nn.Conv2d(c, anchors * self.per_anchor, 1) for c in (64, 128, 256)
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        up = nn.functional.interpolate
        n4 = self.merge4(torch.cat([up(self.reduce5(p5), scale_factor=2.0, mode="nearest"), p4], 1))
        n3 = self.merge3(torch.cat([up(self.reduce4(n4), scale_factor=2.0, mode="nearest"), p3], 1))
        maps = [conv(f) for conv, f in zip(self.detect, (n3, n4, p5), strict=True)]
        return _flatten_levels(maps, self.per_anchor)


def unet(num_classes: int = 2) -> UNet:
    """A 4-level UNet, 16 base channels."""
    return UNet(num_classes)


def deeplabv3_mobilenet(num_classes: int = 21) -> DeepLabV3:
    """DeepLabV3 with a MobileNetV2 (width 0.5, output stride 8) backbone."""
    return DeepLabV3(num_classes)


def fpn_detector(num_classes: int = 20) -> FPNDetector:
    """An FPN detector (P3-P5, 3 anchors per location)."""
    return FPNDetector(num_classes)


def yolov5_focus(num_classes: int = 80) -> YoloV5:
    """A YOLOv5-style detector with the Focus stem."""
    return YoloV5(num_classes)
