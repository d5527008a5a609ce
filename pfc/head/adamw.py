"""Row-sparse AdamW for the class centers (insightface's ViT recipes train the centers with AdamW).

``SparseRowAdamW`` is :class:`pfc.head.optim.SparseRowSGD`'s sibling: the same chunks, storage
types and stochastic rounding, on-device skip, loss unscaling, update in the backward and old
rows for the rollback (:class:`pfc.head.row_optimizer.SparseRowOptimizer`), with AdamW's arithmetic and
a step count per row (:mod:`pfc.head.kernels.rows_adamw`).
"""
from __future__ import annotations

import torch

from pfc.head.kernels.rows import AdamWStep
from pfc.head.row_optimizer import RowUpdate, SparseRowOptimizer
from pfc.head.rounding import is_narrow


class SparseRowAdamW(SparseRowOptimizer):
    """AdamW applied row by row to the rows that have a gradient ("lazy" AdamW).

    For every row ``j`` present in ``p.grad`` (a sparse COO tensor over rows, or dense = all rows),
    with ``t_j`` the row's own step count::

        t_j ← t_j + 1
        w_j ← w_j − lr·wd·w_j
        m_j ← β1·m_j + (1 − β1)·g_j
        v_j ← β2·v_j + (1 − β2)·g_j²
        w_j ← w_j − lr · (m_j / (1 − β1^t_j)) / (sqrt(v_j / (1 − β2^t_j)) + eps)

    ``torch.optim.AdamW``'s formula (decoupled weight decay scaled by lr; β, eps, wd defaults its
    own), operation by operation: with a dense gradient on every row every step the result is
    ``torch.optim.AdamW``'s (float32, the CPU; tested). The bias correction is per row, so a row
    sampled for the first time at step 1000 takes a first step of the right size (a global count
    would divide its one-sample moments by 1 − β^1000 ≈ 1 and shrink its update by sqrt(1 − β2)).

    Lazy, unlike dense AdamW: a row that is not sampled (Partial FC's negatives left out at
    ρ < 1) gets nothing, neither weight decay nor the decay of its moments, and its count does
    not move. Dense AdamW would decay every center every step and keep moving unsampled rows with
    their stale momentum (zero gradient, ``m`` decaying): updates the sampled-softmax gradient did
    not ask for. Lazy AdamW is what ``torch.optim.SparseAdam`` and TF's LazyAdam do for sparse
    rows; at ρ = 1 every row is sampled every step and the two are the same. ``docs/benchmarks.md``
    compares their learning at ρ = 1 and ρ = 0.1.

    State per parameter ``[C, D]``: ``exp_avg`` and ``exp_avg_sq`` (``m``, ``v``), stored in
    ``moment_dtype`` (default: the parameter's type), and ``row_steps`` (int32 ``[C]``). Narrow
    moments are rounded as the centers are (``rounding``: stochastic by default, unbiased). bfloat16
    holds ``v`` well: it has float32's exponent range (a gradient of 1e-20 still squares to a
    normal number), and ``sqrt(v)`` halves the relative rounding error of its 8 bits. float16 does
    not: ``g²`` falls below its smallest subnormal (6e-8) for ``|g| < 2.4e-4``, typical center
    gradients, so ``v`` would round to 0 and the update blow up to ``lr·m/eps``: a float16
    ``moment_dtype`` (or float16 centers without one) is refused.

    Everything else (``found_inf``, ``grad_unscale``, :meth:`update_rows`, the update in the head's
    backward, :meth:`keep_old_rows`, the seeded rounding streams, ``kernels``) is as
    :class:`pfc.head.optim.SparseRowSGD` documents it; a skipped update leaves weights, moments
    and counts unchanged. ``kernels="triton"``: one Triton kernel per call
    (:mod:`pfc.head.kernels.rows_adamw_triton`, ``pfc::apply_adamw_rows``; tested in Triton's
    interpreter against the torch path and compiled for sm_90/sm_70; not yet run on a GPU).
    """

    ROW_STATES = ("exp_avg", "exp_avg_sq", "row_steps")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, moment_dtype: torch.dtype | None = None, chunk_rows: int = 1024,
                 rounding: str = "stochastic", seed: int = 0, kernels: str = "torch"):
        if not lr >= 0:
            raise ValueError(f"learning rate {lr} must be >= 0")
        if len(betas) != 2 or not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"betas {tuple(betas)} must be two numbers in [0, 1)")
        if not eps > 0:
            raise ValueError(f"eps {eps} must be > 0")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay {weight_decay} must be >= 0")
        if moment_dtype is not None and not moment_dtype.is_floating_point:
            raise ValueError(f"moment_dtype {moment_dtype} is not a floating-point type")
        self.moment_dtype = moment_dtype
        super().__init__(params, dict(lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps,
                                      weight_decay=weight_decay),
                         chunk_rows=chunk_rows, rounding=rounding, seed=seed, kernels=kernels)

    def _init_row_states(self, param: torch.Tensor, group: dict) -> None:
        dtype = self.moment_dtype or param.dtype
        if dtype == torch.float16:
            raise ValueError("AdamW's second moment cannot be stored in float16: g² of a gradient below 2.4e-4 "
                             "rounds to 0 there; store the moments in bfloat16 or float32 (moment_dtype; the "
                             "trainer's head.momentum_dtype)")
        if param.dim() != 2:
            raise ValueError(f"SparseRowAdamW updates the rows of a matrix, got a {param.dim()}-d parameter")
        state = self.state[param]
        state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.contiguous_format)
        state["row_steps"] = torch.zeros(param.shape[0], dtype=torch.int32, device=param.device)

    def _start(self, param, index, update, skip) -> RowUpdate:
        group = next(g for g in self.param_groups if any(p is param for p in g["params"]))
        states = {name: self.state[param][name] for name in self.ROW_STATES}
        narrow = is_narrow(param.dtype) or is_narrow(states["exp_avg"].dtype)
        step = AdamWStep(lr=group["lr"], betas=tuple(group["betas"]), eps=group["eps"],
                         weight_decay=group["weight_decay"], rounding=self.rounding,
                         found_inf=self._skip_mask(skip, param.device),
                         generator=self._rounding_stream(param, index, update, narrow),
                         seed=self._philox_seed(index, update), unscale=self.grad_unscale)
        return RowUpdate(step, states)

    def apply_rows(self, param, rows, grad, update: RowUpdate, weight_rows=None, wide_rows=None, old_rows=None,
                   chunk_rows=None, radial=None) -> None:
        """Apply the update ``update`` (from :meth:`start_update`; no count taken) to ``rows`` (a
        slice or row ids) of ``param``, its moments and its step counts from ``grad``, chunk by
        chunk (:func:`pfc.head.kernels.rows_adamw.apply_adamw_rows`; the arguments as
        :meth:`pfc.head.optim.SparseRowSGD.apply_rows` takes them; ``old_rows``: ``(weights,
        exp_avg, exp_avg_sq, row_steps)`` blocks)."""
        states = update.states
        self.row_kernels.apply_adamw_rows(param, states["exp_avg"], states["exp_avg_sq"], states["row_steps"],
                                          rows, grad, update.step, weight_rows=weight_rows, wide_rows=wide_rows,
                                          old_rows=old_rows, scratch=self._scratch,
                                          chunk_rows=chunk_rows or self.chunk_rows, radial=radial)
