"""A CRNN text recognizer (Shi et al. 2016): a VGG-style conv stack, then a BiLSTM over width.

For a 1x3x32x128 line image the convs (half of the paper's channels) reduce the height to 1
and the width to 33 (the paper's (2, 1) poolings and final 2x2 valid conv); the map is
squeezed to [N, C, W], made time-major [W, N, C], run through two bidirectional LSTMs and a
Linear per step: the output is [T, N, classes] as CTC decoding expects (T = 33, 37 classes:
blank, digits, letters). Time-major means the batch is not the leading output dim.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ConvBNAct, init_weights


class BidirectionalLSTM(nn.Module):
    """A BiLSTM over [T, N, C], then a Linear from both directions' states."""

    def __init__(self, inp: int, hidden: int, out: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(inp, hidden, bidirectional=True)
        self.embedding = nn.Linear(2 * hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recurrent, _ = self.rnn(x)
        return self.embedding(recurrent)


class CRNN(nn.Module):
    def __init__(self, num_classes: int = 37, hidden: int = 64) -> None:
        super().__init__()
        c = (32, 64, 128, 128, 256, 256, 256)
        self.cnn = nn.Sequential(
            ConvBNAct(3, c[0], 3),
            nn.MaxPool2d(2, 2),
            ConvBNAct(c[0], c[1], 3),
            nn.MaxPool2d(2, 2),
            ConvBNAct(c[1], c[2], 3),
            ConvBNAct(c[2], c[3], 3),
            nn.MaxPool2d((2, 2), (2, 1), (0, 1)),
            ConvBNAct(c[3], c[4], 3),
            ConvBNAct(c[4], c[5], 3),
            nn.MaxPool2d((2, 2), (2, 1), (0, 1)),
            ConvBNAct(c[5], c[6], 2, padding=0),
        )
        self.rnn = nn.Sequential(
            BidirectionalLSTM(c[6], hidden, hidden), BidirectionalLSTM(hidden, hidden, num_classes)
        )
        init_weights(self, linear_std=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.cnn(x).squeeze(2)  # [N, C, 1, W] -> [N, C, W]
        return self.rnn(features.permute(2, 0, 1))  # [T, N, C] -> [T, N, classes]


def crnn(num_classes: int = 37) -> CRNN:
    """CRNN for 32x128 text lines."""
    return CRNN(num_classes)
