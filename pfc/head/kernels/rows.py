"""The row update's seam: momentum SGD of some rows of the class centers, and rounding into storage.

    kernels = row_kernels(head.kernels)           # "torch" or "triton"
    kernels.apply_rows(weight, momentum, rows, grad, step, old_rows=(old_w, old_v))
    kernels.round_into(out_bf16, x_fp32, "stochastic", generator)

``apply_rows`` updates rows ``rows`` (a slice, or distinct row ids) of ``weight [C, D]`` and of
its momentum ``momentum [C, D]`` (or None) from their gradient ``grad [n, D]``, as
``torch.optim.SGD`` does, in the compute type (float32; float64 for float64 weights)::

    d = grad + weight_decay · w
    v = μ · v + d                 (μ = 0: v = d, the momentum buffer left alone)
    w = w − lr · v

(``grad`` first multiplied by ``step.unscale`` in the compute type when it is given: the
inverse of a loss scale; with ``radial=c [n]`` (fp32) the gradient is ``grad_j − c_j·w_j``, the
center gradient's radial term added from the rows' values before the update, before the
unscaling: :func:`radial_gradient`), then rounds ``w`` and ``v`` into their storage types
(float32: exact; bfloat16 / float16: to nearest, or stochastically, unbiased:
:mod:`pfc.head.rounding`). Where ``step.found_inf`` (a 0-d
float32 device tensor) is nonzero nothing changes, decided on the device. ``old_rows``, when
given, receives the rows' values before the update (weights, momentum), in the order of ``rows``:
what :class:`pfc.train.rollback.StepRollback` writes back when the guard skips the step.

Implementations (both keep every row that is not in ``rows`` bit-identical):

- ``"torch"`` (:mod:`pfc.head.kernels.rows_torch`): the reference and the CPU path. Chunk by chunk:
  gather, widen, torch's fused SGD (one pass), stochastic rounding as elementwise passes drawing
  from ``step.generator``, scatter.
- ``"triton"`` (:mod:`pfc.head.kernels.rows_triton`): one kernel for all of it, registered as the
  custom op ``pfc::apply_rows``; its random numbers come from Philox keyed by ``step.seed`` and
  each value's position (row id, column), so they do not depend on how the rows are chunked.
  ``round_into`` is the kernel ``pfc::round_into``.

Stochastic rounding draws other random numbers in the two implementations: they agree in
distribution (unbiased, reproducible from the seed), not bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass(frozen=True)
class RowStep:
    """One update's arithmetic and randomness, fixed when the update starts.

    ``lr``, ``momentum``, ``weight_decay``: the param group's at that moment; ``rounding``:
    ``"stochastic"`` or ``"nearest"`` (narrow storage only); ``found_inf``: a 0-d float32 tensor
    on the rows' device, nonzero = leave the rows unchanged, or None; ``generator``: the torch
    path's seeded stream for stochastic rounding (None when nothing rounds stochastically);
    ``seed``: the Triton path's Philox key for the same (a non-negative int below 2⁶³);
    ``unscale``: a 0-d float32 tensor on the rows' device that the gradient is multiplied by in
    the compute type before the update (the inverse of a loss scale: unscaling a narrow gradient
    in its own type could underflow), or None."""

    lr: float
    momentum: float
    weight_decay: float
    rounding: str = "stochastic"
    found_inf: torch.Tensor | None = None
    generator: torch.Generator | None = None
    seed: int = 0
    unscale: torch.Tensor | None = None


@dataclass(frozen=True)
class AdamWStep:
    """One AdamW update's arithmetic and randomness (:func:`pfc.head.kernels.rows_adamw.apply_adamw_rows`),
    fixed when the update starts: ``lr``, ``betas``, ``eps``, ``weight_decay`` the param group's at
    that moment; ``rounding``, ``found_inf``, ``generator``, ``seed``, ``unscale`` as in
    :class:`RowStep`."""

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    rounding: str = "stochastic"
    found_inf: torch.Tensor | None = None
    generator: torch.Generator | None = None
    seed: int = 0
    unscale: torch.Tensor | None = None


def counter_seed(*key: int) -> int:
    """The Philox key of the Triton path for ``key`` (e.g. (seed, rank, update, parameter)): 62
    bits from numpy's SeedSequence with bit 62 set, so that it is always passed as an int64."""
    low, high = np.random.SeedSequence([int(part) for part in key]).generate_state(2)
    return int((int(high) & 0x3FFFFFFF) << 32 | int(low)) | 1 << 62


def radial_gradient(weight: torch.Tensor, rows: slice | torch.Tensor, grad: torch.Tensor, radial: torch.Tensor,
                    weight_rows: torch.Tensor | None = None) -> torch.Tensor:
    """``grad_j − c_j·w_j`` (``c = radial [n]``) as a new tensor in ``grad``'s type, ``w_j`` the
    current values of ``rows`` of ``weight`` (``weight_rows`` when given: ``weight[rows]``),
    widened exactly: the addcmul the head's backward skips when the update adds the radial term
    (what the torch path does, and the Triton path for rows its kernel does not take)."""
    count = grad.shape[0]
    if radial.shape != (count,):
        raise ValueError(f"the radial coefficients have shape {tuple(radial.shape)}, not ({count},) for the "
                         f"gradient's {count} rows")
    if weight_rows is None:
        weight_rows = weight[rows] if isinstance(rows, slice) else torch.index_select(weight, 0, rows)
    return grad.addcmul(weight_rows.to(grad.dtype), radial.to(grad.dtype)[:, None], value=-1.0)


ApplyRows = Callable[..., None]
RoundInto = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class RowKernels:
    """The row update's implementation: ``apply_rows`` and ``round_into`` (module docstring), and
    AdamW's row update ``apply_adamw_rows`` (:mod:`pfc.head.kernels.rows_adamw`; Triton:
    :mod:`pfc.head.kernels.rows_adamw_triton`)."""

    name: str
    apply_rows: ApplyRows
    round_into: RoundInto
    apply_adamw_rows: ApplyRows


def row_kernels(name: str) -> RowKernels:
    """The row-update functions of the implementation ``name`` (``"torch"`` or ``"triton"``, a name
    :func:`pfc.head.kernels.resolve_kernels` returns). Importing the Triton one does not import
    ``triton``: its kernels are loaded when first launched."""
    if name == "torch":
        from pfc.head.kernels import rows_adamw, rows_torch
        from pfc.head.rounding import round_into
        return RowKernels("torch", rows_torch.apply_rows, round_into, rows_adamw.apply_adamw_rows)
    if name == "triton":
        from pfc.head.kernels import rows_adamw_triton, rows_triton
        return RowKernels("triton", rows_triton.apply_rows, rows_triton.round_into, rows_adamw_triton.apply_adamw_rows)
    raise ValueError(f"row kernels {name!r}: not 'torch' or 'triton' (resolve 'auto' with resolve_kernels first)")
