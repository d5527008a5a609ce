"""Which centers a rank samples each step (Partial FC), drawn in O(S) work, without a generator
or a host sync.

Every step each rank keeps all its positives (the classes of the gathered labels it owns) and
draws the rest of a static number S of centers uniformly without replacement from its other
``C_r`` classes, looking at no more than S + B of them:

1. a keyed pseudo-random permutation π of ``[0, C_r)`` (:func:`swap_or_not`) is evaluated at
   the positions ``0 … S−1``: S distinct candidates;
2. the candidates that are positives are dropped (a binary search in the sorted labels); of the
   rest the first ``S − P`` in permutation order are kept, P the number of distinct positives.
   At most P of the S candidates are positives, so at least ``S − P`` remain: the count is
   always exact, and the kept ones are the first ``S − P`` non-positives of a uniform shuffle,
   i.e. a uniform draw without replacement from the non-positives;
3. the kept candidates and the distinct positives, padded with a sentinel to the static length
   S + B, are sorted: the first S entries are the sorted sample.

Work: S·R int32 operations for π (R rounds, :func:`swap_or_not_rounds`), S binary searches
among B labels, a sort of B and one of S + B entries (radix sorts on a GPU); never a pass over
all ``C_r`` classes. Integer arithmetic only (wrapping),
so the sample is a pure function of ``(key, class_start, num_local, labels)`` with the same bits
on every device type; ``kernels="triton"`` computes π in one Triton kernel
(:mod:`pfc.head.kernels.permutation`, bit for bit the same) instead of 15·R torch ops.

SplitMix64 (:func:`hashed_scores`) also seeds the centers' initial values off the CPU
(:func:`hashed_normal`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB          # SplitMix64's finaliser
_ROUND_MUL1, _ROUND_MUL2 = 0x85EBCA6B, 0xC2B2AE35   # the round function's (MurmurHash3's 32-bit finaliser)
# swap_or_not computes in int32 (a CPU vectorises it; the same bits on every device)
MAX_DOMAIN = (1 << 31) - 1


def sample_size(sample_rate: float, num_local: int, num_rows: int) -> int:
    """Centers a rank samples per step: ``max(⌈ρ·C_r⌉, min(B, C_r))``, enough for every positive
    whatever the labels (a static shape: no host read of the labels)."""
    return max(math.ceil(sample_rate * num_local - 1e-9), min(num_rows, num_local))


def sample_classes(labels: torch.Tensor, class_start: int, num_local: int, sample_rate: float, key: int = 0,
                   *, kernels: str = "torch"):
    """Choose this rank's centers for one step and remap the labels to them, without a host sync.

    ``labels`` are the gathered global labels ``[B]``. Returns ``(index, target)``: ``index`` the
    sorted local rows sampled (``None`` when ρ = 1), ``target[i]`` the position of row i's class
    in the sampled set, or −1 when another rank owns it. Every local positive is kept; the number
    sampled is :func:`sample_size`, the rest drawn uniformly without replacement from the other
    local classes by the permutation :func:`swap_or_not` keyed by ``(key, class_start)`` (the
    module docstring: O(S + B log B) work, the same bits on every device). ``kernels``
    (``"torch"`` or ``"triton"``, the head's :attr:`PartialFC.kernels`) says which computes it.
    """
    local = labels - class_start
    owned = (local >= 0) & (local < num_local)
    if sample_rate >= 1.0:
        return None, torch.where(owned, local, -1)
    num_sample = sample_size(sample_rate, num_local, labels.shape[0])
    if num_sample >= num_local:
        index = torch.arange(num_local, device=labels.device)
    else:
        candidates = swap_or_not(num_sample, num_local, permutation_key(key, class_start), labels.device, kernels)
        index = _merge_positives(candidates, torch.where(owned, local, num_local), num_local)
    return index, torch.where(owned, torch.searchsorted(index, local.clamp(0, num_local - 1)), -1)


def _merge_positives(candidates: torch.Tensor, positives: torch.Tensor, num_local: int) -> torch.Tensor:
    """The sorted union (int64) of the distinct positives (``positives [B]``: local rows,
    ``num_local`` for a label owned elsewhere) and the first ``S − P`` candidates (int32) that
    are not positives, S = ``len(candidates)``, P the distinct positives (≤ S by
    :func:`sample_size`). Sorted in int32 (values ≤ ``num_local`` < 2^31): half the bytes."""
    count = candidates.shape[0]
    if positives.shape[0] == 0:
        return candidates.sort().values.long()
    positives = positives.int().sort().values
    first = positives != torch.cat([positives.new_full((1,), -1), positives[:-1]])
    distinct = torch.where(first, positives, num_local)           # each positive once, then sentinels
    num_positives = (distinct < num_local).sum()
    at = torch.searchsorted(positives, candidates).clamp_(max=positives.shape[0] - 1)
    fresh = positives.gather(0, at) != candidates
    kept = fresh & (fresh.cumsum(0) + num_positives <= count)
    merged = torch.cat([torch.where(kept, candidates, num_local), distinct])
    return merged.sort().values[:count].long()


def swap_or_not_rounds(domain: int) -> int:
    """Rounds R of :func:`swap_or_not` on ``[0, domain)``: ``4·⌈log2 domain⌉``, at least 32.

    A round moves each point, with probability ½, to a partner placed uniformly by the round's
    pivot, so a point keeps its place through all rounds with probability 2^−R, and a pair of
    points keeps its distance with the same probability. Mixing the whole permutation needs at
    least ``2·log2 domain`` rounds (each round adds at most ``domain/2 + log2 domain`` random
    bits; a permutation has ``log2 domain!`` ≈ ``domain·log2 domain``); R is twice that
    (76 rounds at 500k classes a rank, 88 at 3.6M), about Ethereum's 90 for its validator
    shuffle. The statistical tests (tests/test_sampling.py) check marginal and pairwise
    inclusion frequencies against the exact ones.
    """
    return 4 * max(8, (domain - 1).bit_length())


def permutation_key(key: int, class_start: int) -> int:
    """The 63-bit key of a rank's permutation: SplitMix64 of ``key + (class_start + 1)·φ``, so
    ranks with equal shard sizes draw different rows."""
    return _mix64((key + (class_start + 1) * _GOLDEN) & _MASK64) >> 1


def round_keys(key: int, domain: int, rounds: int) -> list[tuple[int, int]]:
    """``(pivot, salt)`` of each round for the 63-bit ``key``: ``pivot = (m(2i+1) >> 1) mod domain``,
    ``salt`` the low 32 bits of ``m(2i+2)`` as a signed int32, ``m(j) = SplitMix64(key + j·φ)``."""
    return [((_mix64((key + (2 * i + 1) * _GOLDEN) & _MASK64) >> 1) % domain,
             _signed32(_mix64((key + (2 * i + 2) * _GOLDEN) & _MASK64) & 0xFFFFFFFF)) for i in range(rounds)]


def swap_or_not(count: int, domain: int, key: int, device, kernels: str = "torch") -> torch.Tensor:
    """``π(0), …, π(count − 1)`` (int32 ``[count]``) for a keyed permutation π of ``[0, domain)``:
    the swap-or-not shuffle (Hoang, Morris, Rogaway, CRYPTO 2012), a bijection on any domain size
    with a fixed number of rounds (:func:`swap_or_not_rounds`) and no cycle walking.

    Round i with ``(p, salt)`` from :func:`round_keys`: ``x' = (p − x) mod domain`` (an
    involution pairing x with x'); ``x ← x'`` when the sign bit of ``h(max(x, x'))`` is set,
    ``h(v) = (u ⊕ (u ≫ 16))·c2``, ``u = v·c1 + salt``, in wrapping int32 (≫ arithmetic; c1, c2
    MurmurHash3's 32-bit constants): both members of a pair see the same bit, so the round is a
    bijection. Integer arithmetic only: every device gives the same bits.
    ``kernels="triton"``: one Triton kernel (:func:`pfc.head.kernels.permutation.swap_or_not_op`),
    else 15 elementwise torch ops a round. ``key`` must lie in ``[0, 2^63)`` (:func:`permutation_key`),
    ``domain`` in ``[1, 2^31)``.
    """
    if kernels not in ("torch", "triton"):
        raise ValueError(f"kernels={kernels!r} is not 'torch' or 'triton' (resolve 'auto' with "
                         "pfc.head.kernels.resolve_kernels)")
    if not 0 <= key < 1 << 63:
        raise ValueError(f"swap_or_not key {key} outside [0, 2^63)")
    if not 1 <= domain <= MAX_DOMAIN:
        raise ValueError(f"swap_or_not domain {domain} outside [1, 2^31): a rank holds at most 2^31 - 1 classes")
    if not 0 <= count <= domain:
        raise ValueError(f"swap_or_not count {count} outside [0, domain={domain}]")
    rounds = swap_or_not_rounds(domain)
    if kernels == "triton":
        from pfc.head.kernels.permutation import swap_or_not_op

        return swap_or_not_op(count, domain, key, rounds, torch.device(device))
    x = torch.arange(count, device=device, dtype=torch.int32)
    partner, mixed, shifted = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    for pivot, salt in round_keys(key, domain, rounds):     # no allocation in the loop
        torch.sub(x, pivot, out=partner).neg_()
        torch.bitwise_right_shift(partner, 31, out=shifted)
        partner.add_(shifted.bitwise_and_(domain))                 # + domain where negative
        torch.maximum(x, partner, out=mixed)
        mixed.mul_(_signed32(_ROUND_MUL1)).add_(salt)
        mixed.bitwise_xor_(torch.bitwise_right_shift(mixed, 16, out=shifted))
        mixed.mul_(_signed32(_ROUND_MUL2))
        torch.bitwise_right_shift(mixed, 31, out=shifted)           # −1 where x swaps, else 0
        x.bitwise_xor_(partner.bitwise_xor_(x).bitwise_and_(shifted))  # a blend: cheaper than where
    return x


def _mix64(z: int) -> int:
    """SplitMix64's finaliser on an unsigned 64-bit Python int."""
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _signed32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


def _splitmix64_(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors, in place (wrapping arithmetic; logical shifts by
    masking)."""
    shifted = torch.empty_like(z)
    for shift, factor in ((30, _signed(_MIX1)), (27, _signed(_MIX2)), (31, None)):
        torch.bitwise_right_shift(z, shift, out=shifted).bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(shifted)
        if factor is not None:
            z.mul_(factor)
    return z


def hashed_scores(key: int, first: int, count: int, device) -> torch.Tensor:
    """``count`` pseudo-random int64 scores for ids ``first …``, a pure function of ``(key, id)``:
    SplitMix64 of ``key + id·φ``. Made on ``device`` from nothing but an ``arange`` (no generator)."""
    ids = torch.arange(first, first + count, device=device, dtype=torch.int64)
    return _splitmix64_(ids.mul_(_signed(_GOLDEN)).add_(_signed(key % (1 << 64))))


def hashed_normal(seed: int, first_row: int, rows: int, dim: int, device) -> torch.Tensor:
    """``[rows, dim]`` standard normal values for global rows ``first_row …`` (Box–Muller on two
    24-bit uniforms from :func:`hashed_scores`); the same values on every device and world size."""
    keys = np.random.SeedSequence([seed, 1]).generate_state(2, dtype=np.uint64)
    radius_bits, angle_bits = (hashed_scores(int(key), first_row * dim, rows * dim, device) for key in keys)
    radius = torch.sqrt(-2.0 * torch.log(_unit_interval(radius_bits)))
    return (radius * torch.cos(2.0 * math.pi * _unit_interval(angle_bits))).reshape(rows, dim)


def _unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """Uniform fp32 values in (0, 1) from the top 24 bits of int64 scores."""
    return (((bits >> 40) & ((1 << 24) - 1)).to(torch.float32) + 0.5) * 2.0 ** -24
