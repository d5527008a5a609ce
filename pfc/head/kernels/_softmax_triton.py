"""The Triton kernels of the softmax chunk (imported only when one runs: it imports ``triton``).

Both kernels read one chunk ``[S_c, B]`` of the GEMM's fp32 products (or of the kept logits)
through its strides, so a column slice of a wider block (the MHE columns beside it) is read in
place. The target cell of column i is row ``cell_row[i]`` of the chunk where ``cell_mask[i]``.

- :func:`chunk_forward`: grid ``(P, ⌈B/BLOCK_B⌉)``; program ``(p, c)`` owns rows
  ``[p·⌈S_c/P⌉, (p+1)·⌈S_c/P⌉)`` of columns ``c`` and merges their online max and sum of exps
  into its own slot ``[p, c]`` of the ``[P, B]`` running statistics (no atomics: every chunk
  is launched on the same grid, so a slot has one owner for the whole pass).
- :func:`chunk_backward`: grid ``(⌈S_c/BLOCK_S⌉,)``; a program walks all columns of its rows,
  writes the gradient block once in its dtype and the row sums ``u_j`` once.

Both launch with ``enable_fp_fusion=False``: the backward rebuilds ``z = s·r·P`` from the products
when the logits were not kept, and an FMA contracting ``s·r·P − max`` would make those logits
differ from the forward's in the last bit (recomputing must be bit-identical to keeping; the
kernels are memory-bound, FMA saves nothing there).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pfc.head.kernels import triton_interpreted


@triton.jit
def _forward_kernel(prod_ptr, stride_s, stride_b, scaled_inv_ptr, margin_ptr, cell_row_ptr, cell_mask_ptr,
                    max_ptr, sum_ptr, num_rows_chunk, num_cols, rows_per_program, limit, fill,
                    FILTER: tl.constexpr, STORE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr):
    part = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    col_ok = cols < num_cols
    margin = tl.load(margin_ptr + cols, mask=col_ok, other=0.0)
    owned = tl.load(cell_mask_ptr + cols, mask=col_ok, other=0) != 0
    cell_row = tl.where(owned, tl.load(cell_row_ptr + cols, mask=col_ok, other=0), -1)
    run_max = tl.load(max_ptr + part * num_cols + cols, mask=col_ok, other=-float("inf"))
    run_sum = tl.load(sum_ptr + part * num_cols + cols, mask=col_ok, other=0.0)
    first = part * rows_per_program
    last = tl.minimum(first + rows_per_program, num_rows_chunk)
    for start in range(first, last, BLOCK_S):
        rows = start + tl.arange(0, BLOCK_S)
        row_ok = rows < last
        inside = row_ok[:, None] & col_ok[None, :]
        pointers = prod_ptr + rows[:, None] * stride_s + cols[None, :] * stride_b
        logits = tl.load(pointers, mask=inside, other=0.0) * \
            tl.load(scaled_inv_ptr + rows, mask=row_ok, other=0.0)[:, None]
        target = rows[:, None] == cell_row[None, :]
        logits = tl.where(target, margin[None, :], logits)
        if STORE:
            tl.store(pointers, logits, mask=inside)
        if FILTER:
            logits = tl.where((logits > limit) & (~target), fill, logits)
        logits = tl.where(inside, logits, -float("inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=0))
        new_max = tl.where(col_ok, new_max, 0.0)   # padding columns: keep exp() finite
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[None, :]), axis=0)
        run_max = new_max
    tl.store(max_ptr + part * num_cols + cols, run_max, mask=col_ok)
    tl.store(sum_ptr + part * num_cols + cols, run_sum, mask=col_ok)


@triton.jit
def _backward_kernel(z_ptr, stride_zs, stride_zb, grad_ptr, stride_gs, stride_gb, u_ptr,
                     scaled_inv_ptr, inv_sign_ptr, row_max_ptr, shift_ptr, grad_target_ptr, margin_ptr,
                     target_cos_ptr, cell_row_ptr, cell_mask_ptr, num_rows_chunk, num_cols, limit, inv_scale,
                     FROM_PRODUCTS: tl.constexpr, FILTER: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    row_ok = rows < num_rows_chunk
    inv_sign = tl.load(inv_sign_ptr + rows, mask=row_ok, other=0.0)
    scaled_inv = tl.load(scaled_inv_ptr + rows, mask=row_ok, other=0.0)
    u = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for start in range(0, num_cols, BLOCK_B):
        cols = start + tl.arange(0, BLOCK_B)
        col_ok = cols < num_cols
        inside = row_ok[:, None] & col_ok[None, :]
        owned = tl.load(cell_mask_ptr + cols, mask=col_ok, other=0) != 0
        cell_row = tl.where(owned, tl.load(cell_row_ptr + cols, mask=col_ok, other=0), -1)
        target = rows[:, None] == cell_row[None, :]
        z = tl.load(z_ptr + rows[:, None] * stride_zs + cols[None, :] * stride_zb, mask=inside, other=0.0)
        if FROM_PRODUCTS:
            margin = tl.load(margin_ptr + cols, mask=col_ok, other=0.0)
            z = tl.where(target, margin[None, :], z * scaled_inv[:, None])
        row_max = tl.load(row_max_ptr + cols, mask=col_ok, other=0.0)
        shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
        grad = tl.exp((z - row_max[None, :]) - shift[None, :])
        if FILTER:
            grad = tl.where((z > limit) & (~target), 0.0, grad)
        grad_target = tl.load(grad_target_ptr + cols, mask=col_ok, other=0.0)
        grad = tl.where(target, grad_target[None, :], grad) * inv_sign[:, None]
        grad = tl.where(inside, grad, 0.0)
        tl.store(grad_ptr + rows[:, None] * stride_gs + cols[None, :] * stride_gb,
                 grad.to(grad_ptr.dtype.element_ty), mask=inside)
        target_cos = tl.load(target_cos_ptr + cols, mask=col_ok, other=0.0)
        cosine = tl.where(target, target_cos[None, :], z * inv_scale)
        u += tl.sum(grad * cosine, axis=1)
    tl.store(u_ptr + rows, u, mask=row_ok)


def _blocks():
    """(BLOCK_S, BLOCK_B): small tiles in the interpreter (each tile is a numpy op there)."""
    return (16, 16) if triton_interpreted() else (64, 64)


def chunk_forward(products, scaled_inv, margin_logits, cell_row, cell_mask, run_max, run_sum,
                  filter_limit, filter_fill, store) -> None:
    """Launch :func:`_forward_kernel` over one chunk (see :func:`pfc.head.kernels.softmax_ops.chunk_forward`)."""
    rows, cols = products.shape
    parts = run_max.shape[0]
    block_s, block_b = _blocks()
    rows_per_program = triton.cdiv(triton.cdiv(rows, parts), block_s) * block_s
    grid = (parts, triton.cdiv(cols, block_b))
    _forward_kernel[grid](products, products.stride(0), products.stride(1), scaled_inv, margin_logits,
                          cell_row, cell_mask.view(torch.int8), run_max, run_sum, rows, cols, rows_per_program,
                          0.0 if filter_limit is None else filter_limit, filter_fill,
                          FILTER=filter_limit is not None, STORE=store, BLOCK_S=block_s, BLOCK_B=block_b,
                          enable_fp_fusion=False)


def chunk_backward(block, scaled_inv, inv_sign, row_max, shift, grad_target, margin_logits, target_cos,
                   cell_row, cell_mask, grad_out, u_out, filter_limit, scale, from_products) -> None:
    """Launch :func:`_backward_kernel` over one chunk (see :func:`pfc.head.kernels.softmax_ops.chunk_backward`)."""
    rows, cols = block.shape
    block_s, block_b = _blocks()
    _backward_kernel[(triton.cdiv(rows, block_s),)](
        block, block.stride(0), block.stride(1), grad_out, grad_out.stride(0), grad_out.stride(1), u_out,
        scaled_inv, inv_sign, row_max, shift, grad_target, margin_logits, target_cos, cell_row,
        cell_mask.view(torch.int8), rows, cols, 0.0 if filter_limit is None else filter_limit, 1.0 / scale,
        FROM_PRODUCTS=from_products, FILTER=filter_limit is not None, BLOCK_S=block_s, BLOCK_B=block_b,
        enable_fp_fusion=False)
