"""The Triton kernel of ``pfc::swap_or_not`` (:mod:`pfc.head.kernels.permutation`); imports
``triton``, so it is imported only when the kernel runs.

The points in wrapping int32 and the round keys in wrapping int64, with arithmetic right
shifts, as the torch path (:func:`pfc.head.sampling.swap_or_not`) computes them; logical shifts
are arithmetic ones masked.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

_BLOCK = 1024
# SplitMix64's φ and finaliser constants (signed int64), MurmurHash3's 32-bit ones for the
# round function (signed int32)
GOLDEN = tl.constexpr(-7046029254386353131)     # 0x9E3779B97F4A7C15
MIX1 = tl.constexpr(-4658895280553007687)       # 0xBF58476D1CE4E5B9
MIX2 = tl.constexpr(-7723592293110705685)       # 0x94D049BB133111EB
ROUND_MUL1 = tl.constexpr(-2048144789)          # 0x85EBCA6B
ROUND_MUL2 = tl.constexpr(-1028477387)          # 0xC2B2AE35


@triton.jit
def _mix64(z):
    """SplitMix64's finaliser (logical shifts: arithmetic ones masked)."""
    z = (z ^ ((z >> 30) & 0x3FFFFFFFF)) * MIX1
    z = (z ^ ((z >> 27) & 0x1FFFFFFFFF)) * MIX2
    return z ^ ((z >> 31) & 0x1FFFFFFFF)


@triton.jit(do_not_specialize=["count", "domain", "key"])   # a key or count of 1 stays a tensor
def _swap_or_not_kernel(out_ptr, count, domain, key, rounds, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = offsets.to(tl.int32)                       # count ≤ domain < 2^31
    n = domain.to(tl.int32)
    k = key.to(tl.int64)
    j = tl.full([], 1, tl.int64)                   # 2i + 1 in round i
    for _ in range(rounds):
        pivot = (((_mix64(k + j * GOLDEN) >> 1) & 0x7FFFFFFFFFFFFFFF) % domain.to(tl.int64)).to(tl.int32)
        salt = _mix64(k + (j + 1) * GOLDEN).to(tl.int32)   # the low 32 bits (a truncation)
        partner = pivot - x
        partner += (partner >> 31) & n
        h = tl.maximum(x, partner) * ROUND_MUL1 + salt
        h = (h ^ (h >> 16)) * ROUND_MUL2
        x = tl.where(h < 0, partner, x)
        j += 2
    tl.store(out_ptr + offsets, x, mask=offsets < count)


def launch_swap_or_not(out: torch.Tensor, domain: int, key: int, rounds: int) -> None:
    """Fill ``out`` (int32 ``[count]``) with ``π(0 … count−1)``, on ``out``'s device."""
    count = out.shape[0]
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        _swap_or_not_kernel[(triton.cdiv(count, _BLOCK),)](out, count, domain, key, rounds, BLOCK=_BLOCK)
