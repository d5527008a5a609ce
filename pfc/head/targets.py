"""Where each batch row's class sits in this rank's logits, dense over the B rows (static shapes).

The target cells of the ``[S, B]`` logits (classes-major) are addressed without boolean-mask
indexing or ``nonzero`` (both read the mask's count on the host): every row has a cell, the rows
whose class another rank owns (or that lies outside a chunk) point at a valid cell with a mask that
says to leave it alone. Reads are ``gather`` along the classes, writes ``scatter`` of
``where(mask, new, old)``; each column has exactly one cell, so a write never collides.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TargetCells:
    """The target cells of one chunk ``[S_c, B]``: column i's cell is row ``local[0, i]`` of the
    chunk, meaningful where ``mask[i]`` (row i's class is this rank's and in the chunk)."""

    mask: torch.Tensor    # [B] bool
    local: torch.Tensor   # [1, B] int64, clamped into the chunk

    def take(self, block: torch.Tensor) -> torch.Tensor:
        """``[B]``: each column's cell of ``block [S_c, B]`` (garbage where not ``mask``)."""
        return block.gather(0, self.local)[0]

    def put(self, block: torch.Tensor, values) -> None:
        """Write ``values`` ([B] or a scalar) into the cells of ``block`` where ``mask``, in place."""
        kept = torch.where(self.mask, values, self.take(block))
        block.scatter_(0, self.local, kept[None])

    def add_to(self, vector: torch.Tensor, values: torch.Tensor) -> None:
        """``vector[local[i]] += values[i]`` where ``mask`` (``vector [S_c]``, in place)."""
        vector.index_add_(0, self.local[0], torch.where(self.mask, values, 0.0))


@dataclass(frozen=True)
class Targets:
    """Batch row i has its class at sampled position ``positions[i]`` when ``owned[i]`` (another
    rank owns it otherwise; ``positions`` is then 0). ``cos``, ``value`` and ``slope`` (the target
    cosine, the margin's value and derivative there; 0 where not owned) are filled chunk by chunk
    by the softmax's forward."""

    owned: torch.Tensor
    positions: torch.Tensor
    cos: torch.Tensor
    value: torch.Tensor
    slope: torch.Tensor

    @classmethod
    def of(cls, target: torch.Tensor, like: torch.Tensor) -> Targets:
        """From ``target [B]`` (the sampled position of each row's class, −1 elsewhere)."""
        zeros = like.new_zeros(target.shape[0])
        return cls(target >= 0, target.clamp_min(0), zeros, zeros.clone(), zeros.clone())

    def in_chunk(self, start: int, stop: int) -> TargetCells:
        """The target cells of the chunk of sampled positions ``[start, stop)``."""
        mask = self.owned & (self.positions >= start) & (self.positions < stop)
        return TargetCells(mask, (self.positions - start).clamp_(0, stop - start - 1)[None])

    def record(self, cells: TargetCells, cos: torch.Tensor, value: torch.Tensor, slope: torch.Tensor) -> None:
        """Keep the chunk's target cosines and margin values (in place, where ``cells.mask``)."""
        for kept, new in ((self.cos, cos), (self.value, value), (self.slope, slope)):
            torch.where(cells.mask, new, kept, out=kept)
