"""MobileFaceNet (Chen et al. 2018): inverted residual bottlenecks and a global depthwise conv.

Body, per the paper's table: conv3×3 s2 (64) → depthwise conv3×3 (64) → bottlenecks
(expansion t, channels c, repeats n, first stride s) = (2,64,5,2), (4,128,1,2), (2,128,6,1),
(4,128,1,2), (2,128,2,1) → conv1×1 (512) → linear global depthwise conv over the whole map
(GDConv, no non-linearity) → linear conv1×1 to the embedding → BN. PReLU everywhere.

This is the paper's network (1.20 M parameters at D = 512), not insightface's: arcface_torch's
``mbf`` (2.06 M, other layer widths and parameter names, so its weights do not load here) is
``mbf`` / ``mbf_large`` in :mod:`pfc.backbones.mbf`.
"""
from __future__ import annotations

import torch
from torch import nn

from pfc.backbones.common import conv_bn, strided_size

BOTTLENECK_SETTINGS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


class InvertedBottleneck(nn.Module):
    """1×1 expand (PReLU) → 3×3 depthwise (stride, PReLU) → 1×1 linear projection; residual if shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.body = nn.Sequential(
            conv_bn(in_channels, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, out_channels, 1, prelu=False),
        )
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileFaceNet(nn.Module):
    """MobileFaceNet; image [b,3,S,S] → embedding [b,D]; ``dropout`` before the embedding conv."""

    def __init__(self, embedding_size: int = 512, dropout: float = 0.0, image_size: int = 112):
        super().__init__()
        layers: list[nn.Module] = [conv_bn(3, 64, 3, 2), conv_bn(64, 64, 3, 1, groups=64)]
        in_channels = 64
        halvings = 1
        for expansion, channels, repeats, stride in BOTTLENECK_SETTINGS:
            for index in range(repeats):
                layers.append(InvertedBottleneck(in_channels, channels, stride if index == 0 else 1,
                                                 expansion))
                in_channels = channels
            halvings += stride == 2
        layers.append(conv_bn(in_channels, 512, 1))
        self.body = nn.Sequential(*layers)
        side = strided_size(image_size, halvings)
        # global depthwise conv: one k×k filter per channel covering the whole map, linear
        self.global_depthwise = nn.Sequential(nn.Conv2d(512, 512, side, groups=512, bias=False),
                                              nn.BatchNorm2d(512))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.project = nn.Conv2d(512, embedding_size, 1, bias=False)
        self.norm_embedding = nn.BatchNorm1d(embedding_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.global_depthwise(self.body(images))
        x = self.project(self.dropout(x)).flatten(1)
        return self.norm_embedding(x)
