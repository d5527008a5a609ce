"""The softmax chunk seam: the elementwise work around each chunk's GEMMs, torch or Triton.

Per chunk ``[S_c, B]`` of the sampled centers (notation of :mod:`pfc.head.softmax`), around the
GEMM products ``P = W_c·X̂ᵀ`` (fp32; the MHE columns beside them stay in torch):

- ``forward``: ``z = s·r_j·P`` with the margin logits (:meth:`pfc.head.targets.Targets.measure`)
  at the target cells, the inter-class filter (:class:`ChunkFilter`), and the per-row running max
  and sum of exps (online softmax) into the row statistics. The torch path leaves the logits in
  the block; the Triton one leaves the products there and its backward rebuilds the logits.
- ``backward``: the gradient block ``r_j·sign(c)·|c|·(softmax − onehot)`` (0 at filtered cells,
  the target cells' value from the caller) written once in the GEMM operand type, and, Triton
  only, the row sums ``r_j·sign(c)·u_j`` with ``u_j = Σ_i G_ji·cos_ji`` the center gradient needs.

:func:`softmax_kernels` picks the implementation by the head's ``kernels`` name
(:func:`pfc.head.kernels.resolve_kernels`): :class:`TorchSoftmaxChunk` (the reference and the
CPU path: the code the head always ran, bit for bit) or
:class:`pfc.head.kernels.softmax_ops.TritonSoftmaxChunk` (one launch per chunk and pass).
"""
from __future__ import annotations

import math

import torch

from pfc.head.scratch import Workspace
from pfc.head.targets import TargetCells

EXCLUDED_LOGIT = -1e30  # a filtered logit left out of the softmax: exp() is exactly 0
FILTER_MODES = ("exclude", "zero")


class ChunkFilter:
    """Inter-class filtering of a chunk's logits ``z [S_c, B]`` (target cells never filtered): a
    non-target logit above ``s·t`` is left out of the softmax (``exclude``: its exp is 0) or
    replaced by 0 (``zero``, insightface's recipes: the cosine times 0, so it still adds exp(0)
    and passes no gradient). The kept logits stay unfiltered; the forward's statistics see the
    filtered values and the backward zeroes the filtered cells' gradient (in both modes: a
    constant logit), so both passes decide by the same test on the same values.
    ``limit`` (``s·t``, None without a threshold) and ``fill`` are what a kernel needs."""

    def __init__(self, threshold: float | None, mode: str, scale: float):
        self.limit = None if threshold is None else scale * threshold
        self.fill = EXCLUDED_LOGIT if mode == "exclude" else 0.0

    def mask(self, chunk, cells, workspace):
        """The filtered cells of ``chunk`` (None without a threshold)."""
        if self.limit is None:
            return None
        noisy = torch.gt(chunk, self.limit, out=workspace.get("noisy", chunk.shape[0], chunk.new_empty(
            (0, chunk.shape[1]), dtype=torch.bool)))
        cells.put(noisy, False)
        return noisy

    def apply(self, chunk, noisy, workspace):
        """The logits the softmax sees: ``chunk`` itself, or a filtered copy in a scratch block."""
        if noisy is None:
            return chunk
        return workspace.get("filtered", chunk.shape[0], chunk).copy_(chunk).masked_fill_(noisy, self.fill)


class RowStatistics:
    """Each row's max and sum of ``exp(z − max)`` over the chunks seen so far (torch: one running
    pair per row, merged chunk by chunk)."""

    def __init__(self, num_rows: int, like: torch.Tensor):
        self.max = like.new_full((num_rows,), -math.inf)
        self.sum = like.new_zeros(num_rows)

    def add(self, chunk: torch.Tensor, workspace: Workspace) -> None:
        chunk_max = torch.maximum(chunk.amax(dim=0), self.max)
        self.sum.mul_(torch.exp(self.max - chunk_max))
        self.max = chunk_max
        shifted = torch.sub(chunk, self.max, out=workspace.get("softmax", chunk.shape[0], chunk))
        self.sum += shifted.exp_().sum(dim=0)  # in place: the exps never need their own block

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(max [B], sum [B])`` over all chunks added (this rank's local statistics)."""
        return self.max, self.sum


def softmax_logits_(products: torch.Tensor, scaled_inv: torch.Tensor, margin_logits: torch.Tensor,
                    cells: TargetCells) -> torch.Tensor:
    """``products [S_c, B]`` → logits in place: ``s·r_j·(w_j·x_i)`` (``scaled_inv = s·r``; one
    pass, unclamped: |cos| ≤ 1 up to rounding) with ``margin_logits [B]`` at the target cells."""
    products.mul_(scaled_inv[:, None])
    cells.put(products, margin_logits)
    return products


class TorchSoftmaxChunk:
    """The softmax chunk in torch ops (module docstring): the reference and the CPU path.

    Launches per chunk (CUDA): forward 13 (scale 1, target cells 3, running max and rescale 5,
    shifted exps and their sum 4; +6 filtering); backward 7 (+4 recomputing, +5 filtering), and
    the caller's row sums ``u_j`` 4 more. The Triton implementation: 1 and 1."""

    name = "torch"

    def statistics(self, num_rows: int, like: torch.Tensor) -> RowStatistics:
        """Empty running statistics for ``num_rows`` columns."""
        return RowStatistics(num_rows, like)

    def grad_dtype(self, gemm, mhe: bool) -> torch.dtype:
        """The gradient block's type: fp32 (the GEMM's operand cast is the caller's)."""
        return torch.float32

    def forward(self, products, scaled_inv, margin_logits, cells, filtering: ChunkFilter,
                stats: RowStatistics, workspace: Workspace, keep: bool) -> None:
        """Turn ``products [S_c, B]`` into logits in place (always, ``keep`` or not) and add the
        chunk to ``stats`` (filtered as ``filtering`` says)."""
        chunk = softmax_logits_(products, scaled_inv, margin_logits, cells)
        stats.add(filtering.apply(chunk, filtering.mask(chunk, cells, workspace), workspace), workspace)

    def backward(self, block, from_products: bool, scaled_inv, inv_sign, row_max, shift, grad_target,
                 margin_logits, target_cos, cells, filtering: ChunkFilter, scale: float,
                 workspace: Workspace, out: torch.Tensor) -> torch.Tensor | None:
        """``out = r·sign(c)·|c|·(softmax − onehot)`` for the chunk ``block`` (the kept logits, or
        the GEMM products when ``from_products``: turned into logits in place, bit-identical to
        the forward's). ``|c|·softmax = exp(z − max − shift)``; ``grad_target [B]`` at the
        target cells; 0 at the filtered cells. Returns None: the caller sums ``u_j`` from
        ``out`` and the logits left in ``block``."""
        if from_products:
            softmax_logits_(block, scaled_inv, margin_logits, cells)
        noisy = filtering.mask(block, cells, workspace)
        torch.sub(block, row_max, out=out)
        out.sub_(shift).exp_()
        if noisy is not None:
            out.masked_fill_(noisy, 0.0)
        cells.put(out, grad_target)
        out.mul_(inv_sign[:, None])  # in place: G·r·sign(c)
        return None


def softmax_kernels(name: str):
    """The softmax chunk implementation for the head's resolved ``kernels`` name
    (``"torch"`` or ``"triton"``; :func:`pfc.head.kernels.resolve_kernels`)."""
    if name == "torch":
        return TorchSoftmaxChunk()
    if name == "triton":
        from pfc.head.kernels.softmax_ops import TritonSoftmaxChunk
        return TritonSoftmaxChunk()
    raise ValueError(f"kernels={name!r}: the softmax chunk runs on 'torch' or 'triton'")
