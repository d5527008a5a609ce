"""Rounding fp32 into bf16/fp16: exact values stay exact, special values pass, stochastic rounding is
unbiased; each test runs with the torch path and with the Triton kernel (interpreted on the CPU)."""
from __future__ import annotations

import math

import pytest
import torch

from pfc.head.kernels.rows import row_kernels
from tests.triton_interpret import kernels, triton_interpreter  # noqa: F401  (fixtures)

NARROW = [torch.bfloat16, torch.float16]


def _round_into(kernels, out, x, rounding="nearest", generator=None):
    return row_kernels(kernels).round_into(out, x, rounding, generator)


def _stochastic_round(kernels, x, dtype, generator):
    return _round_into(kernels, torch.empty_like(x, dtype=dtype), x, "stochastic", generator)


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _spacing_above(value: torch.Tensor) -> torch.Tensor:
    """The distance from each positive ``value`` (bf16/fp16) to the next larger value of its type, in float64."""
    bits = value.view(torch.int16).clone() + 1
    return bits.view(value.dtype).double() - value.double()


@pytest.mark.parametrize("dtype", NARROW)
def test_values_the_type_holds_come_back_unchanged(dtype, kernels):
    values = torch.randn(64, 33, generator=_generator(1)).mul_(torch.logspace(-6, 4, 33)).to(dtype)
    values[0, :4] = torch.tensor([0.0, -0.0, 1.0, -2.5])
    exact = values.float()
    rounded = _stochastic_round(kernels, exact, dtype, _generator(2))
    assert torch.equal(rounded.view(torch.int16), values.view(torch.int16))   # bit for bit, −0 included


@pytest.mark.parametrize("dtype", NARROW)
def test_infinities_and_nan_pass_and_overflow_becomes_infinite(dtype, kernels):
    special = torch.tensor([math.inf, -math.inf, math.nan, -math.nan, 1e39 if dtype == torch.bfloat16 else 1e6])
    # NaN patterns whose payload sits in the dropped bits, or would carry past the exponent
    odd_nans = torch.tensor([0x7F800001, 0x7FFFFFFF, -1, -8388607], dtype=torch.int32).view(torch.float32)
    for rounding in ("stochastic", "nearest"):
        out = _round_into(kernels, torch.empty(5, dtype=dtype), special, rounding, _generator())
        assert out[0].item() == math.inf and out[1].item() == -math.inf
        assert math.isnan(out[2].item()) and math.isnan(out[3].item()) and out[4].item() == math.inf
        assert torch.isnan(_round_into(kernels, torch.empty(4, dtype=dtype), odd_nans, rounding, _generator())).all()


@pytest.mark.parametrize("dtype", NARROW)
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(dtype, kernels):
    """Each value x between neighbours lo < hi is rounded N times (the rows of a [N, K] tensor draw
    independently: see rounding._pairwise_noise; the Triton kernel draws per value). The result is
    lo or hi, and the share of hi estimates p = (x − lo)/(hi − lo) with standard deviation sqrt(p(1−p)/N) ≤ 1/(2·sqrt N): a
    6-sigma bound, 6/(2·sqrt 4096) ≈ 0.047, fails by chance with probability ~2e-9 per value."""
    samples = 4096
    low = (torch.linspace(0.5, 3.0, 40) * torch.tensor([1e-3, 1.0, 300.0]).repeat_interleave(40 // 3 + 1)[:40]).to(dtype)
    if dtype == torch.float16:
        low[:3] = torch.tensor([2.0 ** -24, 3 * 2.0 ** -24, 2.0 ** -14], dtype=dtype)   # subnormal and the smallest normal
    spacing = _spacing_above(low)
    fraction = torch.rand(40, generator=_generator(3), dtype=torch.float64)
    x = (low.double() + fraction * spacing).float()
    fraction = (x.double() - low.double()) / spacing               # exact target after the float32 cast
    rounded = _stochastic_round(kernels, x.expand(samples, 40).contiguous(), dtype, _generator(4)).double()
    up = rounded == (low.double() + spacing)
    assert ((rounded == low.double()) | up).all()
    share = up.double().mean(dim=0)
    assert (share - fraction).abs().max() < 6 / (2 * math.sqrt(samples))
    bias = (rounded.mean(dim=0) - x.double()) / spacing
    assert bias.abs().max() < 6 / (2 * math.sqrt(samples))


def test_negative_values_round_symmetrically(kernels):
    x = torch.full((2048, 8), 1.0 + 0.3 * 2 ** -7)
    up = _stochastic_round(kernels, x, torch.bfloat16, _generator(5)).float()
    down = _stochastic_round(kernels, -x, torch.bfloat16, _generator(5)).float()
    assert torch.equal(down, -up)


@pytest.mark.parametrize("dtype", NARROW)
def test_the_same_seed_rounds_the_same(dtype, kernels):
    x = torch.randn(100, 17, generator=_generator(6))
    first = _stochastic_round(kernels, x, dtype, _generator(7))
    assert torch.equal(first, _stochastic_round(kernels, x, dtype, _generator(7)))
    assert not torch.equal(first, _stochastic_round(kernels, x, dtype, _generator(8)))


@pytest.mark.parametrize("dtype", NARROW)
def test_nearest_is_torchs_own_cast(dtype, kernels):
    x = torch.randn(50, 9, generator=_generator(9))
    assert torch.equal(_round_into(kernels, torch.empty(50, 9, dtype=dtype), x, "nearest"), x.to(dtype))


def test_unknown_rounding_is_refused(kernels):
    with pytest.raises(ValueError, match="rounding 'up' is not one of stochastic, nearest"):
        _round_into(kernels, torch.empty(2, dtype=torch.bfloat16), torch.zeros(2), "up")
