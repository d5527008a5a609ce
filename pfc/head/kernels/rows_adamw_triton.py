"""AdamW's row update as one Triton kernel (:mod:`pfc.head.kernels.rows_adamw`), registered as the
custom op ``pfc::apply_adamw_rows``.

One launch per call gathers the weight and moment rows (by index or a contiguous range), widens
them to fp32 in registers (the gradient ``g − c·w`` with ``radial = c``, then times ``unscale``),
applies ``torch.optim.AdamW``'s operations in its order (each rounded to fp32; a GPU may fuse a
multiply and an add into one FMA, ≤ 2⁻²⁴ of the product apart; division and square root
correctly rounded, as torch's), writes the old values for the rollback, and rounds the new ones
into their storage types (nearest, or stochastic with Philox bits keyed by ``step.seed`` at each
value's (row, column)) unless the 0-d ``found_inf`` is nonzero. The per-row step counts and the
two bias corrections (``lr/(1 − β1^t)`` and ``sqrt(1 − β2^t)``, in float64 and then rounded to
fp32 as the torch path does) are a handful of torch ops on the ``[n]`` counts around the launch.

Importing this module does not import ``triton`` (the kernel, :mod:`._adamw_triton_kernels`,
loads when first launched); the op's fake implementation lets fake tensors through, and it
declares its cost (:mod:`pfc.head.kernels.costs`). float64 rows, strided rows and old-row
blocks of different row strides go to the torch path.
"""
from __future__ import annotations

import torch

from pfc.head.kernels import triton_interpreted
from pfc.head.kernels.costs import KernelCost, declare_cost
from pfc.head.kernels.rows import AdamWStep
from pfc.head.kernels.rows_triton import _store_mode
from pfc.head.rounding import check_rounding
from pfc.head.scratch import ScratchBlocks

_ADAMW_FLOPS_PER_VALUE = 12   # decay, lerp, the second moment, root, two divisions, the update


def apply_adamw_rows(weight: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                     row_steps: torch.Tensor, rows: slice | torch.Tensor, grad: torch.Tensor, step: AdamWStep, *,
                     weight_rows: torch.Tensor | None = None, wide_rows: torch.Tensor | None = None,
                     old_rows: tuple[torch.Tensor | None, ...] | None = None,
                     scratch: ScratchBlocks | None = None, chunk_rows: int | None = None,
                     radial: torch.Tensor | None = None) -> None:
    """:func:`pfc.head.kernels.rows_adamw.apply_adamw_rows` as one kernel (module docstring): the
    same arguments; ``weight_rows``, ``wide_rows``, ``scratch`` and ``chunk_rows`` are not needed."""
    check_rounding(step.rounding)
    if not _kernel_can_take(weight, exp_avg, exp_avg_sq, old_rows):
        from pfc.head.kernels import rows_adamw
        rows_adamw.apply_adamw_rows(weight, exp_avg, exp_avg_sq, row_steps, rows, grad, step, weight_rows=weight_rows,
                                    wide_rows=wide_rows, old_rows=old_rows, scratch=scratch,
                                    chunk_rows=chunk_rows or 1024, radial=radial)
        return
    if isinstance(rows, slice):
        first, last, _ = rows.indices(weight.shape[0])
        index, row_start, count = None, first, max(last - first, 0)
        counts = row_steps[first:first + count]
    else:
        index, row_start, count = rows.contiguous(), 0, rows.numel()
        counts = torch.index_select(row_steps, 0, index)
    if grad.shape[0] != count:
        raise ValueError(f"the gradient has {grad.shape[0]} rows for {count} rows to update")
    if radial is not None and (radial.shape != (count,) or radial.dtype != torch.float32):
        raise ValueError(f"the radial coefficients must be float32 of shape ({count},), got "
                         f"{radial.dtype} {tuple(radial.shape)}")
    if count == 0:
        return
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    old_weight, old_exp_avg, old_exp_avg_sq, old_counts = old_rows if old_rows is not None else (None,) * 4
    if old_counts is not None:
        old_counts.copy_(counts)
    new_counts = counts + 1
    beta1, beta2 = step.betas
    exponent = new_counts.to(torch.float64)
    step_size = (step.lr / (1 - beta1 ** exponent)).to(torch.float32)
    correction2 = torch.sqrt(1 - beta2 ** exponent).to(torch.float32)
    torch.ops.pfc.apply_adamw_rows(weight, exp_avg, exp_avg_sq, index, row_start, grad, step.found_inf,
                                   old_weight, old_exp_avg, old_exp_avg_sq, step_size, correction2,
                                   float(1 - step.lr * step.weight_decay), float(beta1), float(beta2),
                                   float(step.eps), step.rounding, int(step.seed), step.unscale,
                                   None if radial is None else radial.contiguous())
    if step.found_inf is not None:
        new_counts = torch.where(step.found_inf != 0, counts, new_counts)
    if index is None:
        counts.copy_(new_counts)
    else:
        row_steps.index_copy_(0, index, new_counts)


def _kernel_can_take(weight, exp_avg, exp_avg_sq, old_rows) -> bool:
    """Whether the kernel handles these tensors: storage types float32/bf16/fp16, row-major rows,
    and the three old-row blocks (when given) with one row stride."""
    blocks = [] if old_rows is None else [block for block in old_rows[:3] if block is not None]
    tensors = [weight, exp_avg, exp_avg_sq, *blocks]
    row_major = all(t.dtype in (torch.float32, torch.bfloat16, torch.float16) and t.dim() == 2 and t.stride(-1) == 1
                    for t in tensors)
    complete = old_rows is None or len(blocks) == 3
    return row_major and complete and len({block.stride(0) for block in blocks}) <= 1


@torch.library.custom_op("pfc::apply_adamw_rows",
                         mutates_args=("weight", "exp_avg", "exp_avg_sq", "old_weight", "old_exp_avg", "old_exp_avg_sq"))
def _apply_adamw_rows_op(weight: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                         rows: torch.Tensor | None, row_start: int, grad: torch.Tensor, found_inf: torch.Tensor | None,
                         old_weight: torch.Tensor | None, old_exp_avg: torch.Tensor | None,
                         old_exp_avg_sq: torch.Tensor | None, step_size: torch.Tensor, correction2: torch.Tensor,
                         decay: float, beta1: float, beta2: float, eps: float, rounding: str, seed: int,
                         unscale: torch.Tensor | None = None, radial: torch.Tensor | None = None) -> None:
    """Rows ``rows`` (or ``[row_start, row_start + n)``) of ``weight``, ``exp_avg``, ``exp_avg_sq``
    updated from ``grad [n, D]`` in one kernel (module docstring), ``step_size``/``correction2``
    ``[n]`` fp32 the rows' bias corrections, ``decay`` = 1 − lr·wd; the old values into the
    ``old_*`` blocks when given; ``unscale`` and ``radial`` as for ``pfc::apply_rows``."""
    from pfc.head.kernels import _adamw_triton_kernels as kernels   # imports triton

    kernels.launch_adamw_rows(weight, exp_avg, exp_avg_sq, rows, row_start, grad, found_inf, old_weight, old_exp_avg,
                              old_exp_avg_sq, step_size, correction2, decay, beta1, beta2, eps, seed,
                              _store_mode(weight.dtype, rounding), _store_mode(exp_avg.dtype, rounding),
                              triton_interpreted(), unscale, radial)


@_apply_adamw_rows_op.register_fake
def _(weight, exp_avg, exp_avg_sq, rows, row_start, grad, found_inf, old_weight, old_exp_avg, old_exp_avg_sq,
      step_size, correction2, decay, beta1, beta2, eps, rounding, seed, unscale=None, radial=None) -> None:
    return None


@declare_cost("pfc::apply_adamw_rows")
def _apply_adamw_rows_cost(args, kwargs, out) -> KernelCost:
    """Per value: read w, m, v, g; write w, m, v and the old values asked for; per row the id and
    the two corrections (and the radial coefficient)."""
    weight, exp_avg, exp_avg_sq, rows, _, grad, found_inf, old_weight, old_exp_avg, old_exp_avg_sq = args[:10]
    values = grad.numel()
    moving = (weight, exp_avg, exp_avg_sq)
    read = values * (sum(t.element_size() for t in moving) + grad.element_size())
    read += (rows.numel() * rows.element_size() if rows is not None else 0) + 8 * grad.shape[0]
    read += 4 if found_inf is not None else 0
    unscale = args[18] if len(args) > 18 else kwargs.get("unscale")
    radial = args[19] if len(args) > 19 else kwargs.get("radial")
    read += (4 if unscale is not None else 0) + (radial.numel() * radial.element_size() if radial is not None else 0)
    written = values * sum(t.element_size() for t in moving)
    written += sum(values * t.element_size() for t in (old_weight, old_exp_avg, old_exp_avg_sq) if t is not None)
    flops = (_ADAMW_FLOPS_PER_VALUE + (2 if radial is not None else 0)) * values
    return KernelCost(flops=flops, bytes_read=read, bytes_written=written, launches=1)
