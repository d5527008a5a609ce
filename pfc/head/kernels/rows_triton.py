"""The row update and rounding as Triton kernels (:mod:`pfc.head.kernels.rows`), registered as the
custom ops ``pfc::apply_rows`` and ``pfc::round_into``.

``pfc::apply_rows`` is one kernel per call for everything the torch path does in about ten
passes per chunk: it gathers the weight and momentum rows by index (or a contiguous range),
widens them to fp32 in registers (with ``radial = c [n]`` the gradient is ``g − c·w`` from
the row it loaded: the center gradient's radial term, which the head's backward then leaves
out; then times the 0-d ``unscale`` when given: a loss scale's inverse), computes
``d = g + wd·w; v = μ·v + d; w = w − lr·v`` (the operations of ``torch.optim.SGD``, each
rounded to fp32; on a GPU the compiler may fuse a multiply and an add into one FMA, rounded
once: results then differ from torch's by a rounding of a product, ≤ 2⁻²⁴ relative to it),
writes the rows' old values for the rollback, and rounds the new ones into their storage
types (nearest, or stochastic with Philox bits keyed by ``step.seed`` at each value's (row,
column)) before scattering them back, unless the 0-d ``found_inf`` on the device is nonzero
(then nothing is written but the old values).
``pfc::round_into`` rounds an fp32 tensor stochastically into bf16/fp16 in one pass (the torch
path: ~17 elementwise passes), its key drawn from the caller's generator on the device.

Importing this module does not import ``triton``: the kernels (:mod:`._rows_triton_kernels`)
load when first launched. The ops' fake implementations let fake tensors (the planner's
simulated GPU, ``meta``) through without launching anything, and each op declares its cost
(:mod:`pfc.head.kernels.costs`). float64 rows (a reference type, not a GPU storage type) and rows
whose last dimension is strided go to the torch path.
"""
from __future__ import annotations

import torch

from pfc.head.kernels import triton_interpreted
from pfc.head.kernels.costs import KernelCost, declare_cost
from pfc.head.kernels.rows import RowStep
from pfc.head.rounding import check_rounding, is_narrow
from pfc.head.scratch import ScratchBlocks

_AS_IS, _NEAREST, _STOCHASTIC = 0, 1, 2   # _rows_triton_kernels.STORE_*
_SGD_FLOPS_PER_VALUE = 6                  # three multiply-adds


def apply_rows(weight: torch.Tensor, momentum: torch.Tensor | None, rows: slice | torch.Tensor,
               grad: torch.Tensor, step: RowStep, *, weight_rows: torch.Tensor | None = None,
               wide_rows: torch.Tensor | None = None,
               old_rows: tuple[torch.Tensor, torch.Tensor | None] | None = None,
               scratch: ScratchBlocks | None = None, chunk_rows: int | None = None,
               radial: torch.Tensor | None = None) -> None:
    """:func:`pfc.head.kernels.rows_torch.apply_rows` as one kernel (module docstring): the same
    arguments; ``weight_rows``, ``wide_rows``, ``scratch`` and ``chunk_rows`` are not needed (the
    kernel gathers and widens the rows itself, and covers them all in one launch). ``radial``
    (``c [n]``, fp32): the gradient is ``grad − c·w``, computed in the kernel from the row it
    loads (one FMA per value on a GPU, no pass over the gradient)."""
    check_rounding(step.rounding)
    if not _kernel_can_take(weight, momentum, old_rows):
        from pfc.head.kernels import rows_torch
        rows_torch.apply_rows(weight, momentum, rows, grad, step, weight_rows=weight_rows, wide_rows=wide_rows,
                              old_rows=old_rows, scratch=scratch, chunk_rows=chunk_rows or 1024, radial=radial)
        return
    if isinstance(rows, slice):
        first, last, _ = rows.indices(weight.shape[0])
        index, row_start = None, first
        if grad.shape[0] != max(last - first, 0):
            raise ValueError(f"the gradient has {grad.shape[0]} rows for {max(last - first, 0)} rows to update")
    else:
        index, row_start = rows.contiguous(), 0
        if grad.shape[0] != index.numel():
            raise ValueError(f"the gradient has {grad.shape[0]} rows for {index.numel()} rows to update")
    if radial is not None and (radial.shape != (grad.shape[0],) or radial.dtype != torch.float32):
        raise ValueError(f"the radial coefficients must be float32 of shape ({grad.shape[0]},), got "
                         f"{radial.dtype} {tuple(radial.shape)}")
    if grad.shape[0] == 0:
        return
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    old_weight, old_momentum = old_rows if old_rows is not None else (None, None)
    use_momentum = momentum is not None and step.momentum != 0
    torch.ops.pfc.apply_rows(weight, momentum, index, row_start, grad, step.found_inf, old_weight,
                             old_momentum if momentum is not None else None, float(step.lr),
                             float(step.momentum) if use_momentum else 0.0, float(step.weight_decay),
                             step.rounding, int(step.seed), step.unscale,
                             None if radial is None else radial.contiguous())


def round_into(out: torch.Tensor, x: torch.Tensor, rounding: str = "nearest",
               generator: torch.Generator | None = None, scratch: ScratchBlocks | None = None) -> torch.Tensor:
    """:func:`pfc.head.rounding.round_into` with stochastic rounding as one kernel; returns ``out``.
    The kernel's Philox key is drawn from ``generator`` (on ``x``'s device; the device's default
    generator when None) into a device tensor: reproducible from the generator's seed, no host
    sync. ``"nearest"`` and wide outputs are torch's own cast (one pass already)."""
    check_rounding(rounding)
    if rounding == "nearest" or not is_narrow(out.dtype):
        return out.copy_(x)
    if x.dtype != torch.float32:
        raise ValueError(f"stochastic rounding takes float32 values, got {x.dtype}")
    if out.shape != x.shape:
        raise ValueError(f"round_into: out {tuple(out.shape)} and x {tuple(x.shape)} differ in shape")
    key = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=x.device, generator=generator)
    target = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    torch.ops.pfc.round_into(target, x.contiguous(), key)
    return out if target is out else out.copy_(target)


def _kernel_can_take(weight, momentum, old_rows) -> bool:
    """Whether the kernel handles these tensors: storage types float32/bf16/fp16 and rows whose
    values are contiguous (else the torch path)."""
    tensors = [weight, momentum, *(old_rows or ())]
    return all(t is None or (t.dtype in (torch.float32, torch.bfloat16, torch.float16) and t.dim() == 2
                             and t.stride(-1) == 1) for t in tensors)


def _store_mode(dtype: torch.dtype, rounding: str) -> int:
    if not is_narrow(dtype):
        return _AS_IS
    return _STOCHASTIC if rounding == "stochastic" else _NEAREST


@torch.library.custom_op("pfc::apply_rows", mutates_args=("weight", "momentum", "old_weight", "old_momentum"))
def _apply_rows_op(weight: torch.Tensor, momentum: torch.Tensor | None, rows: torch.Tensor | None, row_start: int,
                   grad: torch.Tensor, found_inf: torch.Tensor | None, old_weight: torch.Tensor | None,
                   old_momentum: torch.Tensor | None, lr: float, momentum_factor: float, weight_decay: float,
                   rounding: str, seed: int, unscale: torch.Tensor | None = None,
                   radial: torch.Tensor | None = None) -> None:
    """Rows ``rows`` (or ``[row_start, row_start + n)``) of ``weight`` and ``momentum`` updated from
    ``grad [n, D]`` in one kernel (module docstring); ``momentum_factor`` 0 leaves ``momentum``
    unchanged; ``old_weight``/``old_momentum [n, D]`` receive the values before the update;
    ``unscale`` (0-d fp32) multiplies the widened gradient (a loss scale's inverse); ``radial``
    (``c [n]`` fp32) makes the gradient ``grad − c·w`` (before the unscaling)."""
    from pfc.head.kernels import _rows_triton_kernels as kernels   # imports triton

    kernels.launch_row_update(weight, momentum, rows, row_start, grad, found_inf, old_weight, old_momentum,
                              lr, momentum_factor, weight_decay, seed, _store_mode(weight.dtype, rounding),
                              _store_mode(momentum.dtype, rounding) if momentum is not None else _AS_IS,
                              momentum is not None and momentum_factor != 0, triton_interpreted(), unscale,
                              radial)


@_apply_rows_op.register_fake
def _(weight, momentum, rows, row_start, grad, found_inf, old_weight, old_momentum, lr, momentum_factor,
      weight_decay, rounding, seed, unscale=None, radial=None) -> None:
    return None


@declare_cost("pfc::apply_rows")
def _apply_rows_cost(args, kwargs, out) -> KernelCost:
    """Per value: read w, g (and v), write w (and v) and the old values asked for; the row ids once
    (and the radial coefficients, with one more multiply-add per value)."""
    weight, momentum, rows, _, grad, found_inf, old_weight, old_momentum, _, momentum_factor = args[:10]
    values = grad.numel()
    moving = [weight] + ([momentum] if momentum is not None and momentum_factor != 0 else [])
    read = values * (sum(t.element_size() for t in moving) + grad.element_size())
    if momentum is not None and old_momentum is not None and momentum_factor == 0:
        read += values * momentum.element_size()
    unscale = args[13] if len(args) > 13 else kwargs.get("unscale")
    read += (rows.numel() * rows.element_size() if rows is not None else 0) + (4 if found_inf is not None else 0)
    read += 4 if unscale is not None else 0
    radial = args[14] if len(args) > 14 else kwargs.get("radial")
    read += radial.numel() * radial.element_size() if radial is not None else 0
    flops = (_SGD_FLOPS_PER_VALUE + (2 if radial is not None else 0)) * values
    written = values * sum(t.element_size() for t in moving)
    written += sum(values * t.element_size() for t in (old_weight, old_momentum) if t is not None)
    return KernelCost(flops=flops, bytes_read=read, bytes_written=written, launches=1)


@torch.library.custom_op("pfc::round_into", mutates_args=("out",))
def _round_into_op(out: torch.Tensor, x: torch.Tensor, key: torch.Tensor) -> None:
    """``out`` (bf16/fp16, contiguous) = ``x`` (fp32, contiguous) rounded stochastically, Philox
    keyed by the int64 ``key[0]`` on the device."""
    from pfc.head.kernels import _rows_triton_kernels as kernels   # imports triton

    kernels.launch_round(out, x, key, triton_interpreted())


@_round_into_op.register_fake
def _(out, x, key) -> None:
    return None


@declare_cost("pfc::round_into")
def _round_into_cost(args, kwargs, out) -> KernelCost:
    """Read x and the key, write out; about ten integer and float operations per value."""
    target, x, key = args[:3]
    return KernelCost(flops=10 * x.numel(), bytes_read=x.nbytes + key.nbytes, bytes_written=target.nbytes)
