"""Rounding fp32 values into a narrower storage type: to nearest, or stochastically (unbiased).

    round_into(out_bf16, x_fp32, "stochastic", generator)     # out = SR(x), E[out] = x
    round_into(out_fp16, x_fp32, "nearest")                   # out = RNE(x), torch's own cast

Stochastic rounding (SR) of ``x`` between its two neighbours ``lo ≤ x < hi`` in the target type
returns ``hi`` with probability ``(x − lo)/(hi − lo)`` and ``lo`` otherwise, so ``E[SR(x)] = x``:
an update much smaller than the type's spacing still moves a value by the right amount on
average, where round-to-nearest drops it every time (the reason narrow class centers can be
trained with it). Values the type holds exactly come back unchanged, with no random draw mattering.

- bfloat16 is the upper half of a float32's bits: SR adds a uniform random integer in
  ``[0, 2¹⁶)`` to the float32 bit pattern and clears the low 16 bits. A carry out of the low
  half is exactly "round the magnitude up" (into the exponent too, which is the next bfloat16);
  the sign bit is untouched, so negative values round symmetrically. Exact for every finite
  float32, subnormals included.
- float16 has its own exponent range, so SR works on values: with ``spacing`` the float16
  spacing at ``|x|`` (``2^(e−10)`` for ``2^e ≤ |x| < 2^(e+1)``, read from the float32 exponent bits; at least ``2^−24``, the
  subnormal spacing), ``q = |x|/spacing`` (exact: a power-of-two scale), ``lo = floor(q)``, and
  the result is ``sign(x)·(lo + [u < q − lo])·spacing`` with ``u`` uniform on ``[0, 1)`` in steps
  of ``2^−24``. Exact for every ``|x| ≥ 2^−14`` (the fraction ``q − lo`` has at most 13 bits); below
  it the probability is off by at most ``2^−24`` of one subnormal spacing.

Special values: ±inf stays ±inf and NaN stays NaN (its payload is not kept). A finite value
beyond the type's largest finite value rounds to ±inf as round-to-nearest would (SR: ±inf with
the probability of rounding up past the largest finite value; float16 65504 < |x| < 65536
gives 65504 or inf, |x| ≥ 65536 inf; bfloat16 only within one spacing of 3.39e38). The centers
and momentum of a face-recognition head stay many orders of magnitude inside these ranges.

Random numbers come from the caller's ``torch.Generator`` on ``x``'s device (nothing is made on
the CPU and copied); scratch blocks may be passed in to reuse memory across calls.
"""
from __future__ import annotations

import torch

from pfc.head.scratch import ScratchBlocks

ROUNDINGS = ("stochastic", "nearest")

_LOW_HALF = 1 << 16                     # the bfloat16 bits dropped from a float32 pattern
_HIGH_HALF = -(1 << 16)                 # 0xFFFF0000 as an int32: keeps sign, exponent, 7 mantissa bits
_FP16_MANTISSA_BITS = 10
_FP16_MIN_SPACING_EXP = -24             # float16 subnormal spacing 2^-24
_UNIFORM_STEPS = 1 << 24                # float16: u in steps of 2^-24


def check_rounding(rounding: str) -> None:
    """ValueError unless ``rounding`` is ``"stochastic"`` or ``"nearest"``."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding {rounding!r} is not one of {', '.join(ROUNDINGS)}")


def is_narrow(dtype: torch.dtype) -> bool:
    """Whether values are rounded when stored in ``dtype`` (bfloat16, float16)."""
    return dtype in (torch.bfloat16, torch.float16)


def round_into(out: torch.Tensor, x: torch.Tensor, rounding: str = "nearest",
               generator: torch.Generator | None = None, scratch: ScratchBlocks | None = None) -> torch.Tensor:
    """Write ``x`` (float32, same shape as ``out``) into ``out`` rounded to ``out.dtype``; returns ``out``.

    ``rounding``: ``"nearest"`` (round half to even, torch's cast) or ``"stochastic"`` (module
    docstring; needs ``generator``, on ``x``'s device, for a reproducible draw). ``out`` of a
    wide type (float32, float64) is a plain copy either way. ``scratch``: blocks reused across
    calls for the random numbers and temporaries (fresh memory costs page faults on the CPU).
    ``x`` is not modified.
    """
    check_rounding(rounding)
    if rounding == "nearest" or not is_narrow(out.dtype):
        return out.copy_(x)
    if x.dtype != torch.float32:
        raise ValueError(f"stochastic rounding takes float32 values, got {x.dtype}")
    x = x.contiguous()
    blocks = scratch if scratch is not None else ScratchBlocks()
    if out.dtype == torch.bfloat16:
        return _stochastic_bfloat16(out, x, generator, blocks)
    return _stochastic_float16(out, x, generator, blocks)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (float32) stochastically rounded to ``dtype`` as a new tensor (see :func:`round_into`)."""
    return round_into(torch.empty_like(x, dtype=dtype), x, "stochastic", generator)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a ``[rows, last dim]`` matrix (a view; ``x`` is contiguous)."""
    return x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)


def _pairwise_noise(x: torch.Tensor, high: int, generator, scratch: ScratchBlocks) -> torch.Tensor:
    """Uniform integers in ``[0, high)`` (``high`` a power of two), one per element of ``x``, as
    ``row[i] XOR column[j]`` over the ``[rows, last dim]`` view: a fresh uniform draw per row and
    per column. Each element is uniform and any two elements are independent (a 2-universal
    hash), so each value's rounding is exactly unbiased and every variance of a sum of roundings
    is that of fully independent ones; it draws ``rows + columns`` numbers instead of
    ``rows · columns`` (the CPU generator costs ~20 ns a number, a cast ~1 ns a value) and
    writes the block in one broadcast pass."""
    matrix = _rows(x)
    rows, columns = matrix.shape
    noise = scratch.get("rounding_noise", rows, matrix.new_empty((0, columns), dtype=torch.int32))
    row_draw = torch.empty((rows, 1), dtype=torch.int32, device=x.device).random_(0, high, generator=generator)
    column_draw = torch.empty((1, columns), dtype=torch.int32, device=x.device).random_(0, high, generator=generator)
    return torch.bitwise_xor(row_draw, column_draw, out=noise).view(x.shape)


def _stochastic_bfloat16(out, x, generator, scratch):
    bits = _pairwise_noise(x, _LOW_HALF, generator, scratch)  # uniform over the 2^16 dropped patterns
    bits.add_(x.view(torch.int32)).bitwise_and_(_HIGH_HALF)  # a carry rounds the magnitude up
    rounded = bits.view(torch.float32)
    # a NaN pattern may have carried into inf or wrapped its sign: min(max(rounded, x), rounded)
    # is NaN exactly where x is (both propagate NaN) and leaves every other value as it is, in
    # one clamp against tensor bounds
    torch.clamp(rounded, min=x, max=rounded, out=rounded)
    return out.copy_(rounded)                               # exact: the low half is zero


def _stochastic_float16(out, x, generator, scratch):
    magnitude = x.abs()
    # 2^e ≤ |x| < 2^(e+1) with e = the biased float32 exponent − 127 (float32 subnormals, e = −127,
    # land on the clamp below; inf and NaN on a huge spacing, through which they pass unchanged)
    exponent = x.view(torch.int32).bitwise_right_shift(23).bitwise_and_(0xFF)
    # the float16 spacing at |x|: 2^(e − 10), never below the subnormal spacing 2^-24, made from
    # its float32 bit pattern (biased exponent << 23)
    exponent.sub_(127 + _FP16_MANTISSA_BITS).clamp_(min=_FP16_MIN_SPACING_EXP).add_(127).bitwise_left_shift_(23)
    spacing = exponent.view(torch.float32)
    scaled = magnitude.div_(spacing)                        # exact: a power-of-two scale
    low = torch.floor(scaled)
    fraction = scaled.sub_(low).mul_(_UNIFORM_STEPS)        # exact: at most 13 bits below the point
    uniform = _pairwise_noise(x, _UNIFORM_STEPS, generator, scratch).to(torch.float32)  # u·2^24, u on [0, 1)
    low.add_(uniform.lt_(fraction)).mul_(spacing)           # lo or lo + 1, back to the value (exact)
    # ±inf and NaN come through the arithmetic as they are (inf·spacing, NaN everywhere)
    return out.copy_(low.copysign_(x))                      # exact, or ±inf past 65504
