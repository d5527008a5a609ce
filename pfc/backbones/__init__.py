"""Backbones: one registry mapping a name to a constructor of an image → embedding network.

    model = build_backbone("iresnet50", embedding_size=512, dropout=0.0, image_size=112)
    x = model(images)        # images [b, 3, H, W] in [-1, 1] → x [b, embedding_size]

Every backbone ends in a BatchNorm1d over the embedding (the "feature" layer of the ArcFace
recipes), so its output is the un-normalised embedding; the head and the evaluation normalise it.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from pfc.backbones.iresnet import IResNet, IRESNET_DEPTHS
from pfc.backbones.mbf import MBF_VARIANTS, InsightfaceMobileFaceNet, mbf_factory
from pfc.backbones.mobilefacenet import MobileFaceNet
from pfc.backbones.tiny import TinyFaceNet

BackboneFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, BackboneFactory] = {}


def register_backbone(name: str, factory: BackboneFactory) -> None:
    """Add ``factory(embedding_size=, dropout=, image_size=) -> nn.Module`` under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"backbone {name!r} is already registered")
    _REGISTRY[name] = factory


def available_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone`, sorted."""
    return sorted(_REGISTRY)


def build_backbone(name: str, embedding_size: int = 512, dropout: float = 0.0,
                   image_size: int = 112) -> nn.Module:
    """Construct the backbone ``name`` producing ``embedding_size``-dim embeddings.

    ``dropout`` is applied to the last feature map before the embedding layer;
    ``image_size`` is the side of the square input (112 for aligned faces).
    Raises ValueError naming the unknown backbone and the known ones.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown network {name!r}; known: {', '.join(available_backbones())}")
    if embedding_size < 1:
        raise ValueError(f"embedding_size must be positive, got {embedding_size}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return _REGISTRY[name](embedding_size=embedding_size, dropout=dropout, image_size=image_size)


def _iresnet_factory(depth: int) -> BackboneFactory:
    def factory(embedding_size: int, dropout: float, image_size: int) -> nn.Module:
        return IResNet(IRESNET_DEPTHS[depth], embedding_size, dropout, image_size)
    return factory


for _depth in IRESNET_DEPTHS:
    register_backbone(f"iresnet{_depth}", _iresnet_factory(_depth))
register_backbone("mobilefacenet", MobileFaceNet)
for _name in MBF_VARIANTS:
    register_backbone(_name, mbf_factory(_name))
register_backbone("tiny", TinyFaceNet)

__all__ = ["build_backbone", "available_backbones", "register_backbone",
           "IResNet", "MobileFaceNet", "InsightfaceMobileFaceNet", "TinyFaceNet"]
