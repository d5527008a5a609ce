"""Backbones: one registry mapping a name to a constructor of an image → embedding network.

    model = build_backbone("iresnet50", embedding_size=512, dropout=0.0, image_size=112)
    x = model(images)        # images [b, 3, H, W] in [-1, 1] → x [b, embedding_size]

Every backbone ends in a BatchNorm1d over the embedding (the "feature" layer of the ArcFace
recipes), so its output is the un-normalised embedding; the head and the evaluation normalise it.

``grad_checkpointing=True`` (iresnet*, vit_*: :func:`supports_grad_checkpointing`) trades
memory for time in training: each residual unit / transformer block keeps only its input and is
recomputed in the backward (:func:`pfc.backbones.common.checkpointed`); the gradients are the same.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from pfc.backbones.iresnet import IResNet, IRESNET_DEPTHS
from pfc.backbones.mbf import MBF_VARIANTS, InsightfaceMobileFaceNet, mbf_factory
from pfc.backbones.mobilefacenet import MobileFaceNet
from pfc.backbones.tiny import TinyFaceNet
from pfc.backbones.vit import VIT_SETTINGS, VisionTransformer

BackboneFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, BackboneFactory] = {}
_CHECKPOINTABLE: set[str] = set()


def register_backbone(name: str, factory: BackboneFactory, grad_checkpointing: bool = False) -> None:
    """Add ``factory(embedding_size=, dropout=, image_size=) -> nn.Module`` under ``name``;
    ``grad_checkpointing``: the module has a boolean attribute ``grad_checkpointing`` that
    switches activation checkpointing on in training."""
    if name in _REGISTRY:
        raise ValueError(f"backbone {name!r} is already registered")
    _REGISTRY[name] = factory
    if grad_checkpointing:
        _CHECKPOINTABLE.add(name)


def supports_grad_checkpointing(name: str) -> bool:
    """Whether the registered backbone ``name`` offers gradient checkpointing."""
    return name in _CHECKPOINTABLE


def available_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone`, sorted."""
    return sorted(_REGISTRY)


def build_backbone(name: str, embedding_size: int = 512, dropout: float = 0.0,
                   image_size: int = 112, grad_checkpointing: bool = False) -> nn.Module:
    """Construct the backbone ``name`` producing ``embedding_size``-dim embeddings.

    ``dropout`` is applied to the last feature map before the embedding layer;
    ``image_size`` is the side of the square input (112 for aligned faces);
    ``grad_checkpointing`` recomputes activations in the backward (see the module docstring).
    Raises ValueError naming the unknown backbone and the known ones, or a backbone without
    gradient checkpointing asked for it.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown network {name!r}; known: {', '.join(available_backbones())}")
    if embedding_size < 1:
        raise ValueError(f"embedding_size must be positive, got {embedding_size}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if grad_checkpointing and not supports_grad_checkpointing(name):
        raise ValueError(f"network {name!r} has no gradient checkpointing; these have: "
                         f"{', '.join(sorted(_CHECKPOINTABLE))}")
    model = _REGISTRY[name](embedding_size=embedding_size, dropout=dropout, image_size=image_size)
    if grad_checkpointing:
        model.grad_checkpointing = True
    return model


def _iresnet_factory(depth: int) -> BackboneFactory:
    def factory(embedding_size: int, dropout: float, image_size: int) -> nn.Module:
        return IResNet(IRESNET_DEPTHS[depth], embedding_size, dropout, image_size)
    return factory


def _vit_factory(name: str) -> BackboneFactory:
    def factory(embedding_size: int, dropout: float, image_size: int) -> nn.Module:
        return VisionTransformer(VIT_SETTINGS[name], embedding_size, dropout, image_size)
    return factory


for _depth in IRESNET_DEPTHS:
    register_backbone(f"iresnet{_depth}", _iresnet_factory(_depth), grad_checkpointing=True)
register_backbone("mobilefacenet", MobileFaceNet)
for _name in MBF_VARIANTS:
    register_backbone(_name, mbf_factory(_name))
register_backbone("tiny", TinyFaceNet)
for _name in VIT_SETTINGS:   # vit_t … vit_h and insightface's config names (pfc/backbones/vit.py)
    register_backbone(_name, _vit_factory(_name), grad_checkpointing=True)

__all__ = ["build_backbone", "available_backbones", "register_backbone", "supports_grad_checkpointing",
           "IResNet", "MobileFaceNet", "InsightfaceMobileFaceNet", "TinyFaceNet", "VisionTransformer"]
