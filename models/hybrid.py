"""A MobileViT-style hybrid (Mehta & Rastegari 2022), MobileViT-XXS's layout for small inputs.

MobileNetV2 blocks (SiLU) down to stride 8, then MobileViT blocks: a local 3x3 + 1x1 conv,
unfold into 2x2 patches ([N, C, H, W] -> [N, 4, H*W/4, d] by reshape and permute), a
transformer (pre-LayerNorm multi-head self-attention written out as Linear / MatMul /
Softmax, and a SiLU MLP) over the patches of each pixel position, fold back by the inverse
permute, a 1x1 projection, concat with the block input and a 3x3 fusion conv.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ClassifierHead, ConvBNAct, init_weights
from .mobile import MBConv

PATCH = 2


class Attention(nn.Module):
    """Multi-head self-attention over the last two dims of [N, P, T, d]."""

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, p, t, d = x.shape
        qkv = self.qkv(x).reshape(n, p, t, 3, self.heads, d // self.heads).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each [N, P, heads, T, d/heads]
        weights = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
        out = (weights @ v).permute(0, 1, 3, 2, 4).reshape(n, p, t, d)
        return self.proj(out)


class TransformerLayer(nn.Module):
    def __init__(self, dim: int, mlp: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.SiLU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MobileViTBlock(nn.Module):
    def __init__(self, channels: int, dim: int, depth: int) -> None:
        super().__init__()
        self.local = nn.Sequential(
            ConvBNAct(channels, channels, 3, act=nn.SiLU), nn.Conv2d(channels, dim, 1, bias=False)
        )
        self.transformer = nn.Sequential(*(TransformerLayer(dim, 2 * dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.project = ConvBNAct(dim, channels, 1, act=nn.SiLU)
        self.fuse = ConvBNAct(2 * channels, channels, 3, act=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(x)
        n, d, h, w = y.shape
        nh, nw = h // PATCH, w // PATCH
        # unfold: [N, d, nh, ph, nw, pw] -> [N, ph*pw, nh*nw, d]
        patches = y.reshape(n, d, nh, PATCH, nw, PATCH).permute(0, 3, 5, 2, 4, 1)
        patches = self.norm(self.transformer(patches.reshape(n, PATCH * PATCH, nh * nw, d)))
        # fold: the inverse permutation
        y = (
            patches.reshape(n, PATCH, PATCH, nh, nw, d)
            .permute(0, 5, 3, 1, 4, 2)
            .reshape(n, d, h, w)
        )
        return self.fuse(torch.cat([x, self.project(y)], 1))


class MobileViT(nn.Module):
    """MobileViT-XXS channels (16-80, transformer dims 64/80/96) on a 64x64 input."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        act = nn.SiLU
        self.features = nn.Sequential(
            ConvBNAct(3, 16, 3, 2, act=act),
            MBConv(16, 32, 16, 3, 1, act, None),
            MBConv(16, 32, 24, 3, 2, act, None),
            MBConv(24, 48, 24, 3, 1, act, None),
            MBConv(24, 48, 48, 3, 2, act, None),
            MobileViTBlock(48, 64, 2),
            MBConv(48, 96, 64, 3, 2, act, None),
            MobileViTBlock(64, 80, 4),
            MBConv(64, 128, 80, 3, 2, act, None),
            MobileViTBlock(80, 96, 3),
            ConvBNAct(80, 320, 1, act=act),
        )
        self.head = ClassifierHead(320, num_classes, dropout=0.1)
        init_weights(self, linear_std=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def mobilevit(num_classes: int = 1000) -> MobileViT:
    """MobileViT-XXS-style hybrid."""
    return MobileViT(num_classes)
