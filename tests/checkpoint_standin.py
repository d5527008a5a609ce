"""A stand-in for PartialFC with the attributes the checkpoint module uses (until pfc.head lands)."""
from __future__ import annotations

import torch

from pfc.dist import class_partition, get_rank, get_world_size


class StandInHead(torch.nn.Module):
    """Rows ``[class_start, class_start + num_local)`` of a ``[num_classes, D]`` matrix."""

    def __init__(self, num_classes: int, embedding_size: int, group=None, seed: int = 0):
        super().__init__()
        part = class_partition(num_classes, get_world_size(group), get_rank(group))
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.class_start, self.num_local = part.class_start, part.num_local
        full = torch.randn(num_classes, embedding_size, generator=torch.Generator().manual_seed(seed))
        self.weight = torch.nn.Parameter(full[part.class_start:part.class_end].clone())

    def optimizer(self, lr=0.1, momentum=0.9, weight_decay=5e-4):
        return torch.optim.SGD([self.weight], lr=lr, momentum=momentum, weight_decay=weight_decay)
