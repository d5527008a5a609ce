"""AdamW's row update in torch (:class:`pfc.head.adamw.SparseRowAdamW`): the reference and the CPU
path (``kernels="triton"``: one kernel, :mod:`pfc.head.kernels.rows_adamw_triton`).

    apply_adamw_rows(weight, exp_avg, exp_avg_sq, row_steps, rows, grad, step, old_rows=(w, m, v, t))

For every row ``j`` of ``rows`` (a slice, or distinct row ids) and its gradient ``g_j`` (first
``g_j − c_j·w_j`` with ``radial = c``, then times ``step.unscale`` in the compute type), in the
compute type (float32; float64 for float64 weights)::

    t_j ← t_j + 1                                        (row_steps: int32, one count per row)
    w_j ← w_j · (1 − lr·wd)                              (decoupled weight decay)
    m_j ← m_j + (1 − β1)·(g_j − m_j)                     (= β1·m_j + (1 − β1)·g_j, as lerp)
    v_j ← β2·v_j + (1 − β2)·g_j²
    w_j ← w_j − lr/(1 − β1^t_j) · m_j / (sqrt(v_j)/sqrt(1 − β2^t_j) + eps)

``torch.optim.AdamW``'s single-tensor arithmetic, operation by operation (the bias corrections
in float64 from the row's own count, then rounded to the compute type, as torch rounds its
Python-float scalars), so that a dense gradient on every row gives its result. The new values
are rounded into their storage types (:func:`pfc.head.rounding.round_into`: the moments, then
the weights, drawing from ``step.generator`` in that order); ``row_steps`` is exact. Where
``step.found_inf`` (a 0-d float32 device tensor) is nonzero, every value (weights, moments,
counts) is left as it was (``torch.where`` on the device: no host sync). ``old_rows``, when
given, receives the rows' values before the update (weights, moments, counts), in the order of
``rows``: what :class:`pfc.train.rollback.StepRollback` writes back when the guard skips the step.
Rows not in ``rows`` are untouched: no decay, no moment decay, no count ("lazy" AdamW).
"""
from __future__ import annotations

import torch

from pfc.head.kernels.rows import AdamWStep, radial_gradient
from pfc.head.kernels.rows_torch import compute_dtype
from pfc.head.rounding import round_into
from pfc.head.scratch import ScratchBlocks


def apply_adamw_rows(weight: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                     row_steps: torch.Tensor, rows: slice | torch.Tensor, grad: torch.Tensor, step: AdamWStep, *,
                     weight_rows: torch.Tensor | None = None, wide_rows: torch.Tensor | None = None,
                     old_rows: tuple[torch.Tensor | None, ...] | None = None,
                     scratch: ScratchBlocks | None = None, chunk_rows: int = 1024,
                     radial: torch.Tensor | None = None) -> None:
    """Update ``rows`` of ``weight [C, D]``, ``exp_avg``, ``exp_avg_sq`` (``[C, D]``, their storage
    types) and ``row_steps [C]`` (int32) from ``grad [n, D]`` (module docstring), ``chunk_rows``
    rows at a time.

    ``weight_rows`` (row ids only): ``weight[rows]`` already gathered, overwritten with the new
    values; ``wide_rows``: the same values in the compute type (narrow storage; read only);
    ``old_rows``: ``(weights, exp_avg, exp_avg_sq, row_steps)`` blocks of ``n`` rows receiving the
    values before the update; ``scratch``: blocks the stochastic rounding reuses; ``radial``:
    ``c [n]``, the gradient taken as ``grad − c·w`` (:func:`pfc.head.kernels.rows.radial_gradient`).
    """
    scratch = scratch if scratch is not None else ScratchBlocks()
    states = (exp_avg, exp_avg_sq, row_steps)
    if isinstance(rows, slice):
        first, last, _ = rows.indices(weight.shape[0])
        count = max(last - first, 0)
    else:
        first, count = 0, rows.numel()
    if grad.shape[0] != count:
        raise ValueError(f"the gradient has {grad.shape[0]} rows for {count} rows to update")
    if radial is not None:
        grad = radial_gradient(weight, rows, grad, radial, weight_rows)
    for start in range(0, count, chunk_rows):
        here = slice(start, min(start + chunk_rows, count))
        if isinstance(rows, slice):
            where = slice(first + here.start, first + here.stop)
            live = [tensor[where] for tensor in (weight, *states)]   # views: written in place
        else:
            index = rows[here]
            gathered_weight = weight_rows[here] if weight_rows is not None else torch.index_select(weight, 0, index)
            live = [gathered_weight, *(torch.index_select(tensor, 0, index) for tensor in states)]
        if old_rows is not None:
            for block, values in zip(old_rows, live):
                if block is not None:
                    block[here].copy_(values)
        new = adamw_values(*live, grad[here], step, None if wide_rows is None else wide_rows[here])
        for target, values in zip((live[1], live[2], live[0]), (new[1], new[2], new[0])):   # moments, then weights
            round_into(target, values, step.rounding, step.generator, scratch)
        live[3].copy_(new[3])
        if not isinstance(rows, slice):
            for tensor, values in zip((weight, *states), live):
                tensor.index_copy_(0, index, values)


def adamw_values(weight: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, row_steps: torch.Tensor,
                 grad: torch.Tensor, step: AdamWStep, wide_weight: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The new ``(weights, exp_avg, exp_avg_sq, row_steps)`` of ``n`` rows (module docstring) as new
    tensors in the compute type (the counts int32); the arguments are left as they are.
    ``wide_weight``: ``weight`` already in the compute type (narrow storage)."""
    compute = compute_dtype(weight.dtype)
    w = wide_weight if wide_weight is not None and wide_weight.dtype == compute else weight.to(compute)
    g = grad.to(compute)
    if step.unscale is not None:
        g = g * step.unscale.to(compute)
    beta1, beta2 = step.betas
    counts = row_steps + 1
    exponent = counts.to(torch.float64)
    step_size = (step.lr / (1 - beta1 ** exponent)).to(compute)[:, None]
    correction2_sqrt = torch.sqrt(1 - beta2 ** exponent).to(compute)[:, None]
    new_w = w * (1 - step.lr * step.weight_decay) if step.weight_decay != 0 else w.clone()
    new_m = torch.lerp(exp_avg.to(compute), g, 1 - beta1)
    new_v = (exp_avg_sq.to(compute) * beta2).addcmul_(g, g, value=1 - beta2)
    denominator = (new_v.sqrt() / correction2_sqrt).add_(step.eps)
    new_w.add_(new_m * -step_size / denominator)   # addcdiv's order: (value · m) / denominator, then the sum
    if step.found_inf is not None:
        skip = step.found_inf != 0
        new_w = torch.where(skip, w, new_w)
        new_m = torch.where(skip, exp_avg.to(compute), new_m)
        new_v = torch.where(skip, exp_avg_sq.to(compute), new_v)
        counts = torch.where(skip, row_steps, counts)
    return new_w, new_m, new_v, counts.to(row_steps.dtype)
