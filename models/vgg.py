"""VGG-16 with BatchNorm in plain torch, the torchvision definition (same parameter names).

`vgg16_bn()` is the ImageNet network (224x224 input, 7x7 pooled features, 4096-wide
classifier). `vgg16_bn_small()` keeps the same `features` for 32x32 inputs, pools them
to 1x1 and uses a small 512-wide classifier.
"""

from __future__ import annotations

import torch
from torch import nn

# torchvision's configuration "D": output channels of each 3x3 conv, "M" for a 2x2 max pool
VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                    512, 512, 512, "M", 512, 512, 512, "M")


def make_features(cfg: tuple[int | str, ...] = VGG16_CFG) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out_channels = int(item)
        layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                   nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
        in_channels = out_channels
    return nn.Sequential(*layers)


def _classifier(in_features: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
        nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
        nn.Linear(hidden, num_classes),
    )


class VGG(nn.Module):
    def __init__(self, features: nn.Sequential, pooled: int, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((pooled, pooled))
        self.classifier = classifier
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.constant_(module.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def vgg16_bn(num_classes: int = 1000) -> VGG:
    """VGG-16 with BatchNorm for 224x224 inputs (138,365,992 parameters at 1000 classes)."""
    return VGG(make_features(), 7, _classifier(512 * 7 * 7, 4096, num_classes, 0.5))


def vgg16_bn_small(num_classes: int = 10) -> VGG:
    """VGG-16 with BatchNorm for 32x32 inputs: 1x1 pooled features, a 512-wide classifier."""
    return VGG(make_features(), 1, _classifier(512, 512, num_classes, 0.5))
