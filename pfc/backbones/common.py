"""Layers shared by the backbones."""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
            groups: int = 1, prelu: bool = True) -> nn.Sequential:
    """Conv (no bias, 'same' padding for odd kernels) → BatchNorm → optional PReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                  groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if prelu:
        layers.append(nn.PReLU(out_channels))
    return nn.Sequential(*layers)


def strided_size(size: int, num_halvings: int) -> int:
    """Spatial side after ``num_halvings`` stride-2 convolutions with kernel 3 and padding 1."""
    for _ in range(num_halvings):
        size = (size - 1) // 2 + 1
    return size


class EmbeddingHead(nn.Module):
    """Last feature map → embedding: BN2d → dropout → flatten → Linear → BN1d.

    This is the "E" output structure of the ArcFace paper: a fully connected layer on the
    flattened map keeps the spatial layout (which a global pooling would discard); the final
    BatchNorm1d's scale is frozen at 1 (only its shift is learned), as in the recipes.
    """

    def __init__(self, channels: int, side: int, embedding_size: int, dropout: float):
        super().__init__()
        self.norm_map = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.linear = nn.Linear(channels * side * side, embedding_size)
        self.norm_embedding = nn.BatchNorm1d(embedding_size)
        nn.init.constant_(self.norm_embedding.weight, 1.0)
        self.norm_embedding.weight.requires_grad_(False)

    def forward(self, feature_map):
        x = self.dropout(self.norm_map(feature_map))
        return self.norm_embedding(self.linear(x.flatten(1)))


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@contextlib.contextmanager
def _running_stats_frozen(module: nn.Module):
    """The BatchNorms inside ``module`` normalise by the batch as in training but leave their
    running statistics as they are: the recompute of a checkpointed segment must not count the
    batch a second time. Momentum 0 keeps the statistics (``(1 − 0)·running + 0·batch``) while
    the op still receives them, so the recompute saves the same tensors for the backward as the
    forward did (which checkpointing requires); ``num_batches_tracked`` is put back after it."""
    norms = [m for m in module.modules() if isinstance(m, _BATCH_NORMS) and m.training and m.track_running_stats]
    settings = [(norm.momentum, norm.num_batches_tracked.clone()) for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, (momentum, tracked) in zip(norms, settings):
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(tracked)


def checkpointed(module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """``module(*inputs)`` under activation checkpointing: only the inputs are kept for the
    backward, which runs the forward again (``torch.utils.checkpoint``, non-reentrant, with the
    RNG state of the forward restored, so dropout and drop-path draw the same numbers). The
    gradients equal those of ``module(*inputs)``; BatchNorm running statistics are updated
    once, by the first forward only."""
    return checkpoint(module, *inputs, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _running_stats_frozen(module)))
