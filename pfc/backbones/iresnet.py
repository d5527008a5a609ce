"""Improved ResNet ("IR") for 112×112 faces, as described in the ArcFace paper (Deng et al. 2019).

Differences from the ImageNet ResNet: the stem is a stride-1 3×3 convolution (no max-pool), so
four stride-2 stages take 112 → 7; each residual unit is BN → conv3×3 → BN → PReLU →
conv3×3(stride) → BN (the "improved residual unit"), with a 1×1 conv + BN shortcut when the
shape changes; the output is BN → dropout → FC → BN (see ``EmbeddingHead``).
"""
from __future__ import annotations

import torch
from torch import nn

from pfc.backbones.common import EmbeddingHead, checkpointed, conv_bn, strided_size

# depth → residual units per stage (stage widths 64, 128, 256, 512)
IRESNET_DEPTHS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
STAGE_WIDTHS = (64, 128, 256, 512)


class ImprovedResidualUnit(nn.Module):
    """BN → conv3×3 → BN → PReLU → conv3×3(stride) → BN, plus the (projected) input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.PReLU(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        if stride != 1 or in_channels != out_channels:
            self.shortcut = conv_bn(in_channels, out_channels, 1, stride, prelu=False)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class IResNet(nn.Module):
    """IResNet with ``units_per_stage`` residual units; image [b,3,S,S] → embedding [b,D].

    ``grad_checkpointing``: in training, each residual unit runs under activation checkpointing
    (:func:`pfc.backbones.common.checkpointed`): its input is kept, its inside recomputed in the
    backward."""

    def __init__(self, units_per_stage: tuple[int, ...], embedding_size: int = 512,
                 dropout: float = 0.0, image_size: int = 112, grad_checkpointing: bool = False):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        self.stem = conv_bn(3, STAGE_WIDTHS[0], 3, 1)
        stages = []
        in_channels = STAGE_WIDTHS[0]
        for units, width in zip(units_per_stage, STAGE_WIDTHS):
            blocks = [ImprovedResidualUnit(in_channels, width, stride=2)]
            blocks += [ImprovedResidualUnit(width, width, stride=1) for _ in range(units - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.embedding = EmbeddingHead(in_channels, strided_size(image_size, len(stages)),
                                       embedding_size, dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        if self.grad_checkpointing and self.training:
            for unit in (unit for stage in self.stages for unit in stage):
                x = checkpointed(unit, x)
        else:
            x = self.stages(x)
        return self.embedding(x)
