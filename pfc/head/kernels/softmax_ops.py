"""The softmax chunk's Triton kernels as torch custom ops (``pfc::chunk_forward``,
``pfc::chunk_backward``), their fake implementations and declared costs, and
:class:`TritonSoftmaxChunk`, the seam's Triton implementation (:mod:`pfc.head.kernels.softmax_chunk`).

The ops are registered when this module is imported; ``triton`` is imported only inside their
real implementations (:mod:`pfc.head.kernels._softmax_triton`), so fake tensors (``meta``, the
planner's simulated GPU) run the head's Triton path without it. Both ops return nothing and
write into arguments they declare as mutated.

Traffic per chunk ``[S_c, B]`` (fp32 products, ``g`` bytes per gradient element):

- forward: reads ``4·S_c·B`` once and reads/writes the ``[P, B]`` running statistics: one
  launch. The head never asks it to write the logits back (``store=False``): the kept block
  holds the GEMM's products and the backward rebuilds the logits from them;
- backward: reads ``4·S_c·B`` (the products, kept or recomputed by the GEMM), writes the
  gradient once (``g·S_c·B``; ``g = 2`` with narrow storage on a GPU) and ``u`` (``4·S_c``):
  one launch. The torch path makes 5 passes over the block in the forward and 7 in the backward.
"""
from __future__ import annotations

import torch

from pfc.head.kernels.costs import KernelCost, declare_cost
from pfc.head.kernels.softmax_chunk import ChunkFilter
from pfc.head.scratch import Workspace

# row splits of the forward's grid (each owns a [B] slot of the running statistics): enough
# programs to fill a GPU at B = 1,024 with 64-column tiles (64 × 16 = 1,024 programs)
STATISTICS_PARTS = 64
_INTERPRETED_PARTS = 2   # the interpreter runs programs one by one: few, large ones


@torch.library.custom_op("pfc::chunk_forward", mutates_args=("products", "run_max", "run_sum"))
def chunk_forward(products: torch.Tensor, scaled_inv: torch.Tensor, margin_logits: torch.Tensor,
                  cell_row: torch.Tensor, cell_mask: torch.Tensor, run_max: torch.Tensor, run_sum: torch.Tensor,
                  filter_limit: float | None, filter_fill: float, store: bool) -> None:
    """One chunk's forward epilogue, one launch: ``z = scaled_inv[j]·products[j, i]``, the margin
    logit ``margin_logits[i]`` at the target cell (row ``cell_row[i]`` where ``cell_mask[i]``),
    written back into ``products`` when ``store``; a non-target ``z > filter_limit`` becomes
    ``filter_fill`` for the statistics; each program's running ``(max, Σ exp(z − max))`` over its
    rows is merged into its slot of ``run_max``/``run_sum [P, B]``."""
    from pfc.head.kernels import _softmax_triton
    _softmax_triton.chunk_forward(products, scaled_inv, margin_logits, cell_row, cell_mask, run_max, run_sum,
                                  filter_limit, filter_fill, store)


@chunk_forward.register_fake
def _(products, scaled_inv, margin_logits, cell_row, cell_mask, run_max, run_sum, filter_limit, filter_fill,
      store) -> None:
    return None


@declare_cost("pfc::chunk_forward")
def _chunk_forward_cost(args, kwargs, out) -> KernelCost:
    products, run_max, store = args[0], args[5], args[9]
    cells = products.numel()
    return KernelCost(flops=6 * cells, bytes_read=4 * cells + 2 * run_max.nbytes + 24 * products.shape[1],
                      bytes_written=(4 * cells if store else 0) + 2 * run_max.nbytes)


@torch.library.custom_op("pfc::chunk_backward", mutates_args=("grad_out", "u_out"))
def chunk_backward(block: torch.Tensor, scaled_inv: torch.Tensor, inv_sign: torch.Tensor, row_max: torch.Tensor,
                   shift: torch.Tensor, grad_target: torch.Tensor, margin_logits: torch.Tensor,
                   target_cos: torch.Tensor, cell_row: torch.Tensor, cell_mask: torch.Tensor,
                   grad_out: torch.Tensor, u_out: torch.Tensor, filter_limit: float | None, scale: float,
                   from_products: bool) -> None:
    """One chunk's backward prologue, one launch: with ``z`` the logits (``block``, or rebuilt
    from the products as :func:`chunk_forward` does when ``from_products``),
    ``grad_out = inv_sign[j]·g`` where ``g = exp(z − row_max − shift)``, 0 at a filtered cell,
    ``grad_target[i]`` at the target cell, stored in ``grad_out``'s type; and
    ``u_out[j] = Σ_i grad_out[j, i]·c_ji`` in fp32, ``c = z/scale`` except ``target_cos[i]`` at
    the target cells (the raw cosine, without the margin)."""
    from pfc.head.kernels import _softmax_triton
    _softmax_triton.chunk_backward(block, scaled_inv, inv_sign, row_max, shift, grad_target, margin_logits,
                                   target_cos, cell_row, cell_mask, grad_out, u_out, filter_limit, scale,
                                   from_products)


@chunk_backward.register_fake
def _(block, scaled_inv, inv_sign, row_max, shift, grad_target, margin_logits, target_cos, cell_row, cell_mask,
      grad_out, u_out, filter_limit, scale, from_products) -> None:
    return None


@declare_cost("pfc::chunk_backward")
def _chunk_backward_cost(args, kwargs, out) -> KernelCost:
    block, grad_out, u_out = args[0], args[10], args[11]
    cells = block.numel()
    return KernelCost(flops=10 * cells, bytes_read=4 * cells + 8 * block.shape[0] + 40 * block.shape[1],
                      bytes_written=grad_out.element_size() * cells + u_out.nbytes)


class PartialStatistics:
    """The Triton forward's running statistics: ``[P, B]`` partial max and sum of exps, one slot
    per row split of its grid (:data:`STATISTICS_PARTS`), merged over the splits at the end."""

    def __init__(self, num_rows: int, like: torch.Tensor, parts: int):
        self.max = like.new_full((parts, num_rows), -float("inf"))
        self.sum = like.new_zeros((parts, num_rows))

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(max [B], sum [B])``: ``max = max_p m_p``, ``sum = Σ_p s_p·exp(m_p − max)``
        (a split that saw no rows has ``s_p = 0``, ``m_p = −inf``: it adds 0)."""
        row_max = self.max.amax(dim=0)
        return row_max, (self.sum * torch.exp(self.max - row_max)).sum(dim=0)


class TritonSoftmaxChunk:
    """The softmax chunk in one Triton launch per chunk and pass (module docstring of
    :mod:`pfc.head.kernels.softmax_chunk`)."""

    name = "triton"

    def statistics(self, num_rows: int, like: torch.Tensor) -> PartialStatistics:
        """Empty running statistics for ``num_rows`` columns."""
        from pfc.head.kernels import triton_interpreted
        parts = _INTERPRETED_PARTS if like.device.type == "cpu" and triton_interpreted() else STATISTICS_PARTS
        return PartialStatistics(num_rows, like, parts)

    def grad_dtype(self, gemm, mhe: bool) -> torch.dtype:
        """The gradient block's type: the GEMM operand's (the storage type with narrow storage on
        a GPU; fp32 otherwise, and with MHE, whose columns share the block)."""
        return gemm.storage_dtype if gemm.native and not mhe else torch.float32

    def forward(self, products, scaled_inv, margin_logits, cells, filtering: ChunkFilter,
                stats: PartialStatistics, workspace: Workspace, keep: bool) -> None:
        """:func:`chunk_forward` on the chunk, the products left as they are: kept or not, the
        backward rebuilds the logits from them in registers (bit-identical, one pass over the
        block saved when they are kept)."""
        torch.ops.pfc.chunk_forward(products, scaled_inv, margin_logits, cells.local[0], cells.mask,
                                    stats.max, stats.sum, filtering.limit, filtering.fill, False)

    def backward(self, block, from_products: bool, scaled_inv, inv_sign, row_max, shift, grad_target,
                 margin_logits, target_cos, cells, filtering: ChunkFilter, scale: float,
                 workspace: Workspace, out: torch.Tensor) -> torch.Tensor:
        """:func:`chunk_backward` on the chunk into ``out``; returns ``r·sign(c)·u [S_c]`` (fp32).
        ``block`` holds the products whether kept or recomputed (:meth:`forward`)."""
        u = workspace.get("row_sums", block.shape[0], scaled_inv)
        torch.ops.pfc.chunk_backward(block, scaled_inv, inv_sign, row_max, shift, grad_target, margin_logits,
                                     target_cos, cells.local[0], cells.mask, out, u, filtering.limit, scale, True)
        return u
