"""How the head normalises: every norm is floored at :data:`NORM_EPS`, as ``F.normalize`` does."""
from __future__ import annotations

import torch

NORM_EPS = 1e-12


def inverse_norms(rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``1 / max(‖row‖, NORM_EPS)`` of each row of ``rows [n, D]``, as ``[n]`` (into ``out`` if
    given: the centers are never normalised in a copy, their logits are scaled by this instead)."""
    wide = None if rows.dtype in (torch.float32, torch.float64) else torch.float32  # narrow rows: an fp32 norm
    inverse = torch.linalg.vector_norm(rows, dim=1, dtype=wide, out=out)
    return inverse.clamp_min_(NORM_EPS).reciprocal_()  # in place: no second [n] buffer
