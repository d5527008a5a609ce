"""Which centers a rank samples each step (Partial FC), drawn without a generator or a host sync.

Every step each rank keeps all its positives (the classes of the gathered labels it owns) and
draws the rest of a static number of centers uniformly without replacement from its other
classes: the centers with the largest pseudo-random scores, SplitMix64 of ``(key, class id)``
(:func:`hashed_scores`), so the sample is a pure function of the key and the labels, the same on
every device type and world size. The same hash seeds the centers' initial values off the CPU
(:func:`hashed_normal`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

_SCORE_MAX = torch.iinfo(torch.int64).max
# the CPU prefilter keeps the scores above a threshold chosen so that fewer than the sample
# size pass with probability below about 1e-9 (6 standard deviations; else the full top-k)
_PREFILTER_SIGMAS = 6.0


def sample_size(sample_rate: float, num_local: int, num_rows: int) -> int:
    """Centers a rank samples per step: ``max(⌈ρ·C_r⌉, min(B, C_r))``, enough for every positive
    whatever the labels (a static shape: no host read of the labels)."""
    return max(math.ceil(sample_rate * num_local - 1e-9), min(num_rows, num_local))


def sample_classes(labels: torch.Tensor, class_start: int, num_local: int, sample_rate: float, key: int = 0):
    """Choose this rank's centers for one step and remap the labels to them, without a host sync.

    ``labels`` are the gathered global labels ``[B]``. Returns ``(index, target)``: ``index`` the
    sorted local rows sampled (``None`` when ρ = 1), ``target[i]`` the position of row i's class
    in the sampled set, or −1 when another rank owns it. Every local positive is kept; the number
    sampled is :func:`sample_size`, the rest drawn uniformly without replacement from the other
    local classes by the scores :func:`hashed_scores` of ``key`` (the same on every device).
    """
    local = labels - class_start
    owned = (local >= 0) & (local < num_local)
    if sample_rate >= 1.0:
        return None, torch.where(owned, local, -1)
    num_sample = sample_size(sample_rate, num_local, labels.shape[0])
    if num_sample >= num_local:
        index = torch.arange(num_local, device=labels.device)
    else:
        score = hashed_scores(key, class_start, num_local + 1, labels.device)
        # positives score above every draw: always taken; rows owned elsewhere mark the spare last slot
        score.index_fill_(0, torch.where(owned, local, num_local), _SCORE_MAX)
        index = largest_scores(score[:num_local], num_sample)
    return index, torch.where(owned, torch.searchsorted(index, local.clamp(0, num_local - 1)), -1)


def largest_scores(score: torch.Tensor, count: int) -> torch.Tensor:
    """The sorted positions of the ``count`` largest of ``score`` (int64 [n], distinct except
    for ties at the maximum, which must number at most ``count``).

    ``topk`` over all ``n`` scores, then a sort; on the CPU first a prefilter: the scores above a
    threshold that about ``count + 6σ`` of ``n`` uniform 64-bit scores pass (``nonzero``: sorted
    positions, a data-dependent size, free on the host), then the ``count``-th largest among them
    (``kthvalue``) keeps exactly the same positions, in order. About 3x faster at n = 500k,
    ``count`` = 50k; when fewer than ``count`` pass (p < 1e-9) or the result is not ``count``
    long, the plain ``topk`` decides.
    """
    total = score.numel()
    if score.device.type == "cpu" and 0 < count and count * 4 < total:
        fraction = count / total
        keep = min(1.0, fraction + _PREFILTER_SIGMAS * math.sqrt(fraction * (1 - fraction) / total) + 64 / total)
        threshold = max(-(1 << 63), int(round((1.0 - keep) * 2.0 ** 64)) - (1 << 63))
        candidates = torch.nonzero(score >= threshold).view(-1)
        if candidates.numel() >= count:
            candidate_scores = score[candidates]
            smallest_kept = torch.kthvalue(candidate_scores, candidates.numel() - count + 1).values
            index = candidates[candidate_scores >= smallest_kept]
            if index.numel() == count:
                return index
    return torch.topk(score, count, sorted=False).indices.sort().values


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _splitmix64_(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors, in place (wrapping arithmetic; logical shifts by
    masking)."""
    shifted = torch.empty_like(z)
    for shift, factor in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=shifted).bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(shifted)
        if factor is not None:
            z.mul_(factor)
    return z


def hashed_scores(key: int, first: int, count: int, device) -> torch.Tensor:
    """``count`` pseudo-random int64 scores for ids ``first …``, a pure function of ``(key, id)``:
    SplitMix64 of ``key + id·φ``. Made on ``device`` from nothing but an ``arange`` (no generator)."""
    ids = torch.arange(first, first + count, device=device, dtype=torch.int64)
    return _splitmix64_(ids.mul_(_GOLDEN).add_(_signed(key % (1 << 64))))


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
