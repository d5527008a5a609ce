"""A small, fast CPU network for the demo and the tests (≈ 12 M multiply-adds at 112×112).

Four stride-2 conv-BN-PReLU stages (16, 32, 64, 128 channels), a residual 3×3 unit on the last
(7×7) stage, then the same BN → dropout → FC → BN embedding layer as the IResNet.
"""
from __future__ import annotations

import torch
from torch import nn

from pfc.backbones.common import EmbeddingHead, conv_bn, strided_size


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels, 3), conv_bn(channels, channels, 3, prelu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class TinyFaceNet(nn.Module):
    """image [b,3,S,S] → embedding [b,D]; meant for CPU demos, not for accuracy."""

    WIDTHS = (16, 32, 64, 128)

    def __init__(self, embedding_size: int = 128, dropout: float = 0.0, image_size: int = 112):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for index, width in enumerate(self.WIDTHS):
            layers.append(conv_bn(in_channels, width, 3, 2))
            if index == len(self.WIDTHS) - 1:
                layers.append(_Residual(width))
            in_channels = width
        self.body = nn.Sequential(*layers)
        self.embedding = EmbeddingHead(in_channels, strided_size(image_size, len(self.WIDTHS)),
                                       embedding_size, dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.body(images))
