"""Row-sparse SGD for the class centers.

Partial FC touches only the sampled rows of the center matrix each step. ``SparseRowSGD``
updates exactly those rows (weights and momentum of every other row stay bit-identical) and
never materialises a dense gradient; its work and memory traffic scale with the sampled rows.
What it shares with :class:`pfc.head.adamw.SparseRowAdamW` is :mod:`pfc.head.row_optimizer`
(whose names this module also exports, as before the split). The seam through which the head's
backward applies it instead of returning the rows' gradient
(``PartialFC.optimizer(update_in_backward=True)``) is :mod:`pfc.head.update_in_backward`.
"""
from __future__ import annotations

import torch

from pfc.head.kernels.rows import RowStep
from pfc.head.rounding import is_narrow
from pfc.head.row_optimizer import CENTER_OPTIMIZERS, CenterOptimizer, OldRows, RowUpdate, SparseRowOptimizer

__all__ = ["SparseRowSGD", "SparseRowOptimizer", "RowUpdate", "OldRows", "CenterOptimizer", "CENTER_OPTIMIZERS"]


class SparseRowSGD(SparseRowOptimizer):
    """SGD with momentum and weight decay, applied row by row to the rows that have a gradient.

    For every row ``j`` present in ``p.grad`` (a sparse COO tensor over rows, or dense = all rows):

        d_j = grad_j + weight_decay · w_j
        v_j = momentum · v_j + d_j           (v starts at 0, as torch.optim.SGD's first step)
        w_j = w_j − lr · v_j

    Each chunk is one pass of torch's fused SGD kernel. With a dense gradient the result is
    bit-identical to ``torch.optim.SGD(lr, momentum, weight_decay=weight_decay)`` on the CPU when
    the row width D is a multiple of 16 (128, 512, ...: every chunk is whole vectors); otherwise
    the kernel's scalar tail may round a multiply-add once instead of twice (within an ulp), and
    results then depend on where chunks end. On CUDA the arithmetic is ``SGD(fused=True)``'s.
    Duplicate rows in an uncoalesced sparse gradient (gradient accumulation) are summed first.
    The momentum buffer is allocated eagerly as
    ``state[p]["momentum_buffer"]`` (dense, same shape as ``p``).

    Storage types: the parameter's dtype is the weights' storage (float32, or bfloat16 / float16
    for narrow class centers), ``momentum_dtype`` the momentum's (default: the parameter's). The
    update is computed in float32 (float64 for a float64 parameter) chunk by chunk: the rows are
    gathered, widened, updated with the formulas above, and written back rounded into their
    storage types (:mod:`pfc.head.rounding`): ``rounding="stochastic"`` (default; unbiased, so
    updates below the type's spacing are kept on average) or ``"nearest"``. float32 storage
    keeps the in-place float32 arithmetic bit for bit. The random numbers of stochastic
    rounding come from a generator on the parameter's device seeded by ``(seed, rank, update,
    parameter)``, ``update`` the optimizer's own counter (:attr:`updates`, in its state dict):
    a run resumed from a checkpoint rounds as the uninterrupted run would.

    Skipping without a host sync: ``optimizer.found_inf``, when set to a 0-d tensor on the
    parameters' device, makes every update leave the rows (weights and momentum) unchanged
    where it is nonzero, decided on the device: each chunk's update is one pass of torch's fused
    SGD kernel, which takes it as its ``found_inf`` (as torch's fused optimizers do under
    GradScaler; narrow storage then rounds the unchanged values back to themselves, exactly);
    the caller clears it (None).

    Loss scaling (fp16, :class:`pfc.train.runners.ddp.DDPRunner`): ``optimizer.grad_unscale``,
    when set to a 0-d float32 tensor on the parameters' device (the inverse of the loss scale),
    multiplies every gradient in the compute type inside the update, so a narrow gradient (stored
    in the parameter's type, scaled) is unscaled without underflowing in its own type (exact for
    a power-of-two scale); :meth:`nonfinite_gradients` is the overflow check that goes with it
    (one read of the stored gradients, on the device). The caller clears it (None).

    :meth:`update_rows` applies the same update to given rows and their gradient directly: the
    head calls it inside its backward when built with
    ``PartialFC.optimizer(update_in_backward=True)`` (no gradient stored, ``p.grad`` stays None),
    with a bit-identical result for float32 storage (D a multiple of 16, see above; the update in
    the backward works in the head's chunks). For narrow storage the two differ by
    rounding: ``p.grad`` is stored in the parameter's type (autograd rounds the head's gradient to
    it), while the backward hands its float32 gradient over directly.

    ``kernels``: the implementation of the row update (:mod:`pfc.head.kernels.rows`): ``"torch"``
    (the reference; each chunk as described above) or ``"triton"`` (one kernel per call that
    gathers, widens, updates, rounds and scatters; its stochastic rounding draws from Philox keyed
    by the same ``(seed, rank, update, parameter)`` instead of the generator), or ``"auto"``
    (:func:`pfc.head.kernels.resolve_kernels` on the parameters' device), resolved once into
    :attr:`kernels`. ``PartialFC.optimizer`` passes the head's own choice.

    No method reads a tensor value on the host for the head's gradients: a sparse gradient that
    reaches the parameter flagged coalesced (the head's) while ``p.grad`` is None is noted on its
    way in (a gradient hook) and used as it is; any other sparse gradient is checked (one host
    read) and coalesced when needed.
    """

    ROW_STATES = ("momentum_buffer",)

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 momentum_dtype: torch.dtype | None = None, chunk_rows: int = 1024,
                 rounding: str = "stochastic", seed: int = 0, kernels: str = "torch"):
        if not lr >= 0:
            raise ValueError(f"learning rate {lr} must be >= 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum {momentum} outside [0, 1)")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay {weight_decay} must be >= 0")
        if momentum_dtype is not None and not momentum_dtype.is_floating_point:
            raise ValueError(f"momentum_dtype {momentum_dtype} is not a floating-point type")
        self.momentum_dtype = momentum_dtype
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay), chunk_rows=chunk_rows,
                         rounding=rounding, seed=seed, kernels=kernels)

    def _init_row_states(self, param: torch.Tensor, group: dict) -> None:
        if group["momentum"]:
            self.state[param]["momentum_buffer"] = torch.zeros_like(
                param, dtype=self.momentum_dtype or param.dtype, memory_format=torch.contiguous_format)

    def _start(self, param, index, update, skip) -> RowUpdate:
        group = next(g for g in self.param_groups if any(p is param for p in g["params"]))
        buffer = self.state[param].get("momentum_buffer")
        narrow = is_narrow(param.dtype) or (buffer is not None and is_narrow(buffer.dtype))
        step = RowStep(lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"],
                       rounding=self.rounding, found_inf=self._skip_mask(skip, param.device),
                       generator=self._rounding_stream(param, index, update, narrow),
                       seed=self._philox_seed(index, update), unscale=self.grad_unscale)
        return RowUpdate(step, {"momentum_buffer": buffer})

    def apply_rows(self, param, rows, grad, update: RowUpdate, weight_rows=None, wide_rows=None, old_rows=None,
                   chunk_rows=None, radial=None) -> None:
        """Apply the update ``update`` (from :meth:`start_update`; no count taken) to ``rows`` (a
        slice or row ids) of ``param`` and its momentum from ``grad`` with the chosen implementation
        (:mod:`pfc.head.kernels.rows`: one Triton kernel, or torch chunk by chunk, ``chunk_rows``,
        default :attr:`chunk_rows`); what :class:`pfc.head.update_in_backward.UpdateInBackward` calls. ``weight_rows`` holds
        ``param[rows]`` (row ids only; else gathered), ``wide_rows`` optionally the same values in
        the compute type (narrow storage: spares the widening copy; overwritten), ``old_rows``
        receives the values before the update; ``radial`` (``c [n]`` fp32): the gradient is
        ``grad − c·w`` (:func:`pfc.head.kernels.rows.radial_gradient`; in the Triton kernel)."""
        extra = {} if radial is None else {"radial": radial}
        self.row_kernels.apply_rows(param, update.buffer, rows, grad, update.step, weight_rows=weight_rows,
                                    wide_rows=wide_rows, old_rows=old_rows, scratch=self._scratch,
                                    chunk_rows=chunk_rows or self.chunk_rows, **extra)
