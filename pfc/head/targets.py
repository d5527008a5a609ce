"""Where each batch row's class sits in this rank's logits, dense over the B rows (static shapes).

The target cells of the ``[S, B]`` logits (classes-major) are addressed without boolean-mask
indexing or ``nonzero`` (both read the mask's count on the host): every row has a cell, the rows
whose class another rank owns (or that lies outside a chunk) point at a valid cell with a mask that
says to leave it alone. Reads are ``gather`` along the classes, writes ``scatter`` of
``where(mask, new, old)``; each column has exactly one cell, so a write never collides.

The target cosines and the margin there are computed once per step, before the chunks
(:meth:`Targets.measure`: the B target centers gathered, a row-wise dot product), so a chunk only
writes the margin logits into its cells; the cells of every chunk come from a few ops over all
chunks at once (:meth:`Targets.in_chunks`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pfc.head.norms import inverse_norms


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


@dataclass(frozen=True)
class ChunkCells:
    """The target cells of every chunk ``[k·chunk_rows, …)`` of the sampled positions, stacked:
    ``masks [K, B]`` and ``local [K, B]``; ``cells[k]`` is chunk k's :class:`TargetCells`."""

    masks: torch.Tensor
    local: torch.Tensor

    def __getitem__(self, chunk: int) -> TargetCells:
        return TargetCells(self.masks[chunk], self.local[chunk:chunk + 1])

    def masked(self, values: torch.Tensor) -> torch.Tensor:
        """``[K, B]``: row k holds ``values [B]`` where chunk k has the cell, else 0."""
        return torch.where(self.masks, values, 0.0)


@dataclass
class Targets:
    """Batch row i has its class at sampled position ``positions[i]`` when ``owned[i]`` (another
    rank owns it otherwise; ``positions`` is then 0). ``cos``, ``value`` and ``slope`` (the target
    cosine, the margin's value and derivative there; 0 where not owned) are filled in place by
    :meth:`measure`, which also keeps the target centers it gathered, ``centers [B, D]`` in the
    features' type (garbage rows where not owned), and their ``inv_norm [B]`` (MHE uses both)."""

    owned: torch.Tensor
    positions: torch.Tensor
    cos: torch.Tensor
    value: torch.Tensor
    slope: torch.Tensor
    centers: torch.Tensor | None = None
    inv_norm: torch.Tensor | None = None

    @classmethod
    def of(cls, target: torch.Tensor, like: torch.Tensor) -> Targets:
        """From ``target [B]`` (the sampled position of each row's class, −1 elsewhere)."""
        zeros = like.new_zeros(target.shape[0])
        return cls(target >= 0, target.clamp_min(0), zeros, zeros.clone(), zeros.clone())

    def in_chunks(self, chunk_rows: int, num_sampled: int) -> ChunkCells:
        """The target cells of every chunk ``[k·chunk_rows, min((k+1)·chunk_rows, num_sampled))``:
        column i's cell in chunk k is row ``positions[i] − k·chunk_rows`` (clamped into the chunk),
        meaningful where the class is owned and its position falls in the chunk."""
        starts = torch.arange(0, num_sampled, chunk_rows, device=self.positions.device)[:, None]
        local = self.positions[None, :] - starts                              # [K, B]
        masks = self.owned & (local >= 0) & (local < chunk_rows)
        last = (num_sampled - starts).clamp_(max=chunk_rows) - 1              # each chunk's last row
        return ChunkCells(masks, torch.minimum(local.clamp_(min=0), last))

    def measure(self, weight: torch.Tensor, index: torch.Tensor | None, features: torch.Tensor, margin) -> None:
        """Fill ``cos``, ``value``, ``slope`` (in place, 0 where not owned): the target centers
        ``w_y`` gathered (B rows), ``cos = clamp(ŵ_y·x̂, −1, 1)`` in the features' type, and
        ``margin.target_logit(cos)``."""
        rows = self.positions if index is None else index[self.positions]
        self.centers = weight.index_select(0, rows).to(features.dtype)
        self.inv_norm = inverse_norms(self.centers)
        cos = (self.centers * features).sum(dim=1).mul_(self.inv_norm).clamp_(-1.0, 1.0)
        value, slope = margin.target_logit(cos)
        for kept, new in ((self.cos, cos), (self.value, value), (self.slope, slope)):
            torch.where(self.owned, new, kept, out=kept)   # kept: zeros
