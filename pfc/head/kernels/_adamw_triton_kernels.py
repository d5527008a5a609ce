"""The Triton kernel of AdamW's row update (imported when first launched: it imports ``triton``).
Its launcher and custom op are :mod:`pfc.head.kernels.rows_adamw_triton`; the storing and the
widening it shares with the SGD kernel (:mod:`._rows_triton_kernels`).
"""
from __future__ import annotations

import triton
import triton.language as tl

from pfc.head.kernels._rows_triton_kernels import _store, _widen


@triton.jit(do_not_specialize=["num_rows", "row_start", "seed"])
def adamw_row_kernel(W, M, V, G, ROWS, FOUND_INF, OLD_W, OLD_M, OLD_V, UNSCALE, RADIAL, STEP_SIZE, CORRECTION2,
                     num_rows, row_start, D, w_stride, m_stride, v_stride, g_stride, old_stride,
                     decay, one_minus_beta1, beta2, one_minus_beta2, eps, seed,
                     HAS_ROWS: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_UNSCALE: tl.constexpr,
                     HAS_RADIAL: tl.constexpr, SAVE: tl.constexpr, W_MODE: tl.constexpr, M_MODE: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``[pid0·BLOCK_R, …)`` × columns ``[pid1·BLOCK_D, …)`` of AdamW's update: gather ``W``,
    ``M``, ``V`` rows (by ``ROWS`` or from ``row_start``), widen (the gradient ``G − c·w`` with
    HAS_RADIAL, then times ``UNSCALE``), then in fp32, in ``torch.optim.AdamW``'s order:
    ``w = w·decay; m = m + (1 − β1)(g − m); v = v·β2 + ((1 − β2)·g)·g;
    w = w + (−step_size·m) / (sqrt(v)/correction2 + eps)`` with the row's ``STEP_SIZE`` (lr/(1 − β1^t))
    and ``CORRECTION2`` (sqrt(1 − β2^t)); the old values to ``OLD_*`` (SAVE), the new ones rounded
    back unless ``FOUND_INF`` is nonzero. Random bits: Philox keyed by ``seed`` at counter
    ``row·D + column`` (words 1, 2, 3 for w, m, v)."""
    position = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    column = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_rows = position < num_rows
    mask = in_rows[:, None] & (column < D)[None, :]
    if HAS_ROWS:
        row = tl.load(ROWS + position, mask=in_rows, other=0).to(tl.int64)
    else:
        row = row_start + position.to(tl.int64)
    local = position.to(tl.int64)[:, None]
    w_at = W + row[:, None] * w_stride + column[None, :]
    m_at = M + row[:, None] * m_stride + column[None, :]
    v_at = V + row[:, None] * v_stride + column[None, :]
    stored_w = tl.load(w_at, mask=mask, other=0.0)
    stored_m = tl.load(m_at, mask=mask, other=0.0)
    stored_v = tl.load(v_at, mask=mask, other=0.0)
    if SAVE:
        old = local * old_stride + column[None, :]
        tl.store(OLD_W + old, stored_w, mask=mask)
        tl.store(OLD_M + old, stored_m, mask=mask)
        tl.store(OLD_V + old, stored_v, mask=mask)
    w = _widen(stored_w)
    m = _widen(stored_m)
    v = _widen(stored_v)
    g = _widen(tl.load(G + local * g_stride + column[None, :], mask=mask, other=0.0))
    if HAS_RADIAL:   # the radial term belongs to the (scaled) gradient: before the unscaling
        g = g - tl.load(RADIAL + position, mask=in_rows, other=0.0)[:, None] * w
    if HAS_UNSCALE:   # loaded once per column (the interpreter cannot broadcast a scalar load)
        g = g * tl.load(UNSCALE + column * 0)[None, :]
    step_size = tl.load(STEP_SIZE + position, mask=in_rows, other=0.0)[:, None]
    correction2 = tl.load(CORRECTION2 + position, mask=in_rows, other=1.0)[:, None]
    w = w * decay
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + (one_minus_beta2 * g) * g
    # correctly rounded division and root, as torch's (Triton's "/" is an approximate division on a GPU)
    w = w + tl.div_rn(-step_size * m, tl.div_rn(tl.sqrt_rn(v), correction2) + eps)
    if HAS_SKIP:
        mask = mask & (tl.load(FOUND_INF + column * 0) == 0)[None, :]
    noise_w = 0
    noise_m = 0
    noise_v = 0
    if W_MODE == 2 or M_MODE == 2:
        noise_w, noise_m, noise_v, _ = tl.randint4x(seed, row[:, None] * D + column[None, :])
    _store(w_at, w, noise_w, mask, W_MODE)
    _store(m_at, m, noise_m, mask, M_MODE)
    _store(v_at, v, noise_v, mask, M_MODE)


def launch_adamw_rows(weight, exp_avg, exp_avg_sq, rows, row_start, grad, found_inf, old_weight, old_exp_avg,
                      old_exp_avg_sq, step_size, correction2, decay, beta1, beta2, eps, seed, weight_mode,
                      moment_mode, interpreted, unscale=None, radial=None) -> None:
    """One launch of :func:`adamw_row_kernel` over the ``grad.shape[0]`` rows (tensors checked by the
    caller: row-major rows on one device; the old blocks, when given, share one row stride)."""
    num_rows, dim = grad.shape
    block_d = min(triton.next_power_of_2(dim), 1024)
    block_r = max(1, (16384 if interpreted else 1024) // block_d)
    grid = (triton.cdiv(num_rows, block_r), triton.cdiv(dim, block_d))
    dummy = grad   # any pointer, for the arguments a constexpr leaves unread
    save = old_weight is not None
    adamw_row_kernel[grid](
        weight, exp_avg, exp_avg_sq, grad, rows if rows is not None else dummy,
        found_inf if found_inf is not None else dummy,
        old_weight if save else dummy, old_exp_avg if save else dummy, old_exp_avg_sq if save else dummy,
        unscale if unscale is not None else dummy, radial if radial is not None else dummy, step_size, correction2,
        num_rows, row_start, dim, weight.stride(0), exp_avg.stride(0), exp_avg_sq.stride(0), grad.stride(0),
        old_weight.stride(0) if save else 0, decay, 1.0 - beta1, beta2, 1.0 - beta2, eps, seed,
        HAS_ROWS=rows is not None, HAS_SKIP=found_inf is not None, HAS_UNSCALE=unscale is not None,
        HAS_RADIAL=radial is not None, SAVE=save, W_MODE=weight_mode, M_MODE=moment_mode,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4, enable_fp_fusion=True)
