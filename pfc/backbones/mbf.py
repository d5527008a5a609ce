"""insightface's MobileFaceNet: arcface_torch's ``mbf`` and ``mbf_large``, layer for layer.

The layers, their order and their parameter names are those of arcface_torch's
``backbones/mobilefacenet.py`` (itself after cavaface), so an insightface ``mbf`` state dict loads
with the same keys (``pfc.evaluation.import_weights``). It is wider than the paper's network
(:mod:`pfc.backbones.mobilefacenet`): every channel count of the paper is multiplied by ``scale``
while each bottleneck's inner (depthwise) width stays fixed, so at scale 4 the "expansion" narrows.

With c1 = 64·scale and c2 = 128·scale, ``layers`` is

    0  conv3×3 s2 3 → c1, BN, PReLU
    1  blocks[0] = 1: conv3×3 c1 → c1 in 64 groups (not depthwise at scale > 1), BN, PReLU
       else: blocks[0] residual bottlenecks of width c1, inner width 128
    2  bottleneck s2 c1 → c1, inner 128          3  blocks[1] residual bottlenecks, inner 128
    4  bottleneck s2 c1 → c2, inner 256          5  blocks[2] residual bottlenecks, inner 256
    6  bottleneck s2 c2 → c2, inner 512          7  blocks[3] residual bottlenecks, inner 256

a bottleneck being conv1×1 → inner (BN, PReLU) → depthwise conv3×3 (stride; BN, PReLU) →
conv1×1 → out (BN, linear), plus the input when it is residual. Then ``conv_sep`` (conv1×1 c2 →
512, BN, PReLU) and ``features``, the global depthwise conv (a k×k filter per channel over the
whole k×k map, BN, linear) → flatten → Linear(512, D, no bias) → BatchNorm1d(D).

    mbf        scale 2, blocks (1, 4, 6, 2)     2.06 M parameters at D = 512
    mbf_large  scale 4, blocks (2, 8, 12, 4)

insightface fixes k = 7 (112 px input); here k follows ``image_size`` (7 at 112), and ``dropout``
(insightface has none) acts on the flattened map before the Linear, outside the parameter names.
Initialisation as insightface's: Kaiming normal (fan out) for convs and the Linear, BN 1 and 0.
"""
from __future__ import annotations

import torch
from torch import nn

from pfc.backbones.common import strided_size

# name → (scale, blocks): the arguments arcface_torch's get_model gives MobileFaceNet
MBF_VARIANTS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    "mbf": (2, (1, 4, 6, 2)),
    "mbf_large": (4, (2, 8, 12, 4)),
}
EMBEDDING_CHANNELS = 512   # conv_sep's output, the global depthwise conv's width


class ConvUnit(nn.Module):
    """conv (no bias) → BN → PReLU (``activation``) or linear, as ``layers.{0,1,2}``
    (insightface's ConvBlock with the PReLU, LinearBlock without)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int = 0, groups: int = 1, activation: bool = True):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if activation:
            layers.append(nn.PReLU(out_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Bottleneck(nn.Module):
    """conv1×1 → ``inner`` → depthwise conv3×3 (``stride``) → linear conv1×1 → ``out_channels``,
    plus the input when ``residual`` (insightface's DepthWise)."""

    def __init__(self, in_channels: int, out_channels: int, inner: int, stride: int, residual: bool):
        super().__init__()
        if residual and (stride != 1 or in_channels != out_channels):
            raise ValueError("a residual bottleneck keeps its shape (stride 1, in = out channels)")
        self.residual = residual
        self.layers = nn.Sequential(
            ConvUnit(in_channels, inner, 1),
            ConvUnit(inner, inner, 3, stride, 1, groups=inner),
            ConvUnit(inner, out_channels, 1, activation=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class ResidualStack(nn.Module):
    """``count`` residual bottlenecks of width ``channels`` (insightface's Residual)."""

    def __init__(self, channels: int, count: int, inner: int):
        super().__init__()
        self.layers = nn.Sequential(*(Bottleneck(channels, channels, inner, 1, residual=True)
                                      for _ in range(count)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GlobalDepthwiseEmbedding(nn.Module):
    """[b, 512, k, k] → [b, D]: depthwise k×k conv + BN (linear) → flatten → dropout →
    Linear(512, D, no bias) → BatchNorm1d (insightface's GDC; ``layers.1`` is the flatten)."""

    def __init__(self, side: int, embedding_size: int, dropout: float):
        super().__init__()
        self.layers = nn.Sequential(
            ConvUnit(EMBEDDING_CHANNELS, EMBEDDING_CHANNELS, side, groups=EMBEDDING_CHANNELS, activation=False),
            nn.Flatten(),
            nn.Linear(EMBEDDING_CHANNELS, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        depthwise, flatten, linear, norm = self.layers
        return norm(linear(self.dropout(flatten(depthwise(feature_map)))))


class InsightfaceMobileFaceNet(nn.Module):
    """insightface's MobileFaceNet (module docstring); image [b,3,S,S] → embedding [b,D]."""

    def __init__(self, scale: int, blocks: tuple[int, int, int, int], embedding_size: int = 512,
                 dropout: float = 0.0, image_size: int = 112):
        super().__init__()
        c1, c2 = 64 * scale, 128 * scale
        if blocks[0] == 1:
            second: nn.Module = ConvUnit(c1, c1, 3, 1, 1, groups=64)
        else:
            second = ResidualStack(c1, blocks[0], inner=128)
        self.layers = nn.ModuleList([
            ConvUnit(3, c1, 3, 2, 1),
            second,
            Bottleneck(c1, c1, 128, stride=2, residual=False),
            ResidualStack(c1, blocks[1], inner=128),
            Bottleneck(c1, c2, 256, stride=2, residual=False),
            ResidualStack(c2, blocks[2], inner=256),
            Bottleneck(c2, c2, 512, stride=2, residual=False),
            ResidualStack(c2, blocks[3], inner=256),
        ])
        self.conv_sep = ConvUnit(c2, EMBEDDING_CHANNELS, 1)
        self.features = GlobalDepthwiseEmbedding(strided_size(image_size, 4), embedding_size, dropout)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


def mbf_factory(name: str):
    """The registry's constructor ``(embedding_size, dropout, image_size) -> module`` of ``name``
    in :data:`MBF_VARIANTS`."""
    scale, blocks = MBF_VARIANTS[name]

    def factory(embedding_size: int, dropout: float, image_size: int) -> nn.Module:
        return InsightfaceMobileFaceNet(scale, blocks, embedding_size, dropout, image_size)
    return factory
