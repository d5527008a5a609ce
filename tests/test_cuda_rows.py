"""On one CUDA device: the row update's Triton kernels compiled and run for real against the torch
path (the CPU tests run them in Triton's interpreter, which checks neither the compiler's FMA
contraction nor the device's integer and float conversions).

Marked ``cuda`` and skipped without a CUDA device (``pytest -m cuda``; ``make gpu-check``).
``PFC_CUDA_TESTS_DEVICE=cpu`` runs the same tests on the CPU with the kernels interpreted (a dry run
of the tests' logic; tests/conftest.py sets ``TRITON_INTERPRET=1`` there).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from pfc.head.kernels.rows import RowStep, counter_seed, row_kernels
from tests.dispatch import record_update_chunks

DEVICE = os.environ.get("PFC_CUDA_TESTS_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")]
CLASSES, DIM, SAMPLED = 20_000, 128, 3_000


def _rows_and_grad(seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(CLASSES, generator=generator)[:SAMPLED].sort().values.to(DEVICE)
    return rows, torch.randn(SAMPLED, DIM, generator=generator).to(DEVICE)


def _update(name, dtype, rows, grad, found_inf=None, rounding="nearest", old_rows=None):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(CLASSES, DIM, generator=generator).to(DEVICE, dtype)
    momentum = torch.randn(CLASSES, DIM, generator=generator).to(DEVICE, dtype)
    start = weight.clone(), momentum.clone()
    rng = torch.Generator(device=DEVICE).manual_seed(2)
    step = RowStep(lr=0.1, momentum=0.9, weight_decay=5e-4, rounding=rounding, found_inf=found_inf, generator=rng,
                   seed=counter_seed(3))
    row_kernels(name).apply_rows(weight, momentum, rows, grad, step, old_rows=old_rows)
    return (weight, momentum), start


def test_compiled_fp32_update_equals_torch_within_fma_rounding_and_touches_only_its_rows():
    rows, grad = _rows_and_grad()
    (weight, momentum), start = _update("torch", torch.float32, rows, grad)
    (fused_weight, fused_momentum), _ = _update("triton", torch.float32, rows, grad)
    # three multiply-adds, each possibly one FMA: one rounding of a product apart (see test_row_kernels)
    for ours, theirs in ((fused_weight, weight), (fused_momentum, momentum)):
        assert (ours - theirs).abs().max().item() <= 4 * 2.0 ** -24 * theirs.abs().max().item()
    untouched = torch.ones(CLASSES, dtype=torch.bool, device=DEVICE)
    untouched[rows] = False
    assert torch.equal(fused_weight[untouched], start[0][untouched])
    assert torch.equal(fused_momentum[untouched], start[1][untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_update_skips_on_the_device_and_writes_the_old_rows(dtype):
    rows, grad = _rows_and_grad(1)
    old = (torch.empty(SAMPLED, DIM, dtype=dtype, device=DEVICE), torch.empty(SAMPLED, DIM, dtype=dtype, device=DEVICE))
    (weight, momentum), start = _update("triton", dtype, rows, grad, torch.ones((), device=DEVICE), "stochastic", old)
    assert torch.equal(weight, start[0]) and torch.equal(momentum, start[1])
    assert torch.equal(old[0], start[0][rows]) and torch.equal(old[1], start[1][rows])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_stochastic_rounding_keeps_updates_far_below_the_spacing(dtype):
    """As tests/test_optim.py: 200 updates of 0.01 spacing move the mean by 2 spacings (6 σ bound),
    round-to-nearest loses them all."""
    from pfc.head.optim import SparseRowSGD

    spacing = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    for rounding in ("stochastic", "nearest"):
        param = torch.nn.Parameter(torch.ones(256, 64, dtype=dtype, device=DEVICE))
        optimizer = SparseRowSGD([param], lr=1.0, momentum=0.0, rounding=rounding, seed=5, kernels="triton")
        for _ in range(200):
            optimizer.update_rows(param, slice(0, 256), torch.full((256, 64), -0.01 * spacing, device=DEVICE))
        moved = param.detach().double() - 1.0
        if rounding == "nearest":
            assert torch.equal(moved, torch.zeros_like(moved))
            continue
        bound = 6 * spacing * math.sqrt(200 * 0.01 * 0.99 / moved.numel())
        assert abs(moved.mean().item() - 2 * spacing) < bound


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_round_into_keeps_nan_inf_signed_zero_and_overflows_as_nearest(dtype):
    patterns = torch.tensor([0x7F800001, 0x7FFFFFFF, -1, -8388607, 0x7FC00000], dtype=torch.int32)
    big = 1e39 if dtype == torch.bfloat16 else 1e6
    values = torch.cat([patterns.view(torch.float32), torch.tensor([1.0, -2.5, math.inf, -math.inf, -0.0, big])])
    values = values.to(DEVICE)
    for seed in range(20):
        out = row_kernels("triton").round_into(torch.empty(values.shape, dtype=dtype, device=DEVICE), values,
                                               "stochastic", torch.Generator(device=DEVICE).manual_seed(seed))
        assert torch.isnan(out[:5]).all()
        assert torch.equal(out[5:].float().cpu(), torch.tensor([1.0, -2.5, math.inf, -math.inf, -0.0, math.inf]))
        assert torch.signbit(out[9]).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_with_triton_kernels_on_the_device_updates_one_kernel_per_chunk_like_torch(dtype, monkeypatch):
    from pfc.head.partial_fc import PartialFC

    ops = []
    results = {}
    for name in ("torch", "triton"):
        if name == "triton":
            ops = record_update_chunks(monkeypatch)
        head = PartialFC(5_000, DIM, sample_rate=0.2, seed=3, chunk_rows=256, dtype=dtype, device=DEVICE,
                         kernels=name)
        optimizer = head.optimizer(lr=0.5, momentum=0.9, weight_decay=5e-4, update_in_backward=True)
        data = torch.Generator().manual_seed(4)
        for step in range(3):
            head.set_iteration(step)
            x = torch.randn(64, DIM, generator=data).to(DEVICE)
            head(x, torch.randint(0, 5_000, (64,), generator=data).to(DEVICE)).backward()
        results[name] = head.weight.detach().float(), optimizer.state[head.weight]["momentum_buffer"].float()
    assert ops and all(chunk_ops == ["pfc::apply_rows"] for chunk_ops in ops), ops[:3]
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -5
    for ours, theirs in zip(results["triton"], results["torch"]):
        assert (ours - theirs).abs().max().item() <= tolerance * theirs.abs().max().item()


def test_compiled_radial_term_equals_the_addcmul_then_the_update_within_one_rounding_of_the_product():
    """The kernel's ``g − c·w`` (one FMA once compiled) against the head's addcmul handed over:
    the bound of tests/test_radial_update.py (one rounding of |c·w|, flipped fp32 roundings)."""
    rows, grad = _rows_and_grad(4)
    radial = torch.rand(SAMPLED, generator=torch.Generator().manual_seed(5)).to(DEVICE) * 4 - 1
    weight = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    reference_grad = grad.addcmul(weight[rows], radial[:, None], value=-1.0)
    (expected_weight, expected_momentum), _ = _update("triton", torch.float32, rows, reference_grad)
    generator = torch.Generator().manual_seed(1)
    fused_weight = torch.randn(CLASSES, DIM, generator=generator).to(DEVICE)
    fused_momentum = torch.randn(CLASSES, DIM, generator=generator).to(DEVICE)
    step = RowStep(lr=0.1, momentum=0.9, weight_decay=5e-4, rounding="nearest", seed=counter_seed(3))
    row_kernels("triton").apply_rows(fused_weight, fused_momentum, rows, grad, step, radial=radial)
    ulp = 2.0 ** -24
    product = (radial[:, None] * weight[rows]).abs().max().item()
    momentum_bound = ulp * (product + 2 * reference_grad.abs().max().item()
                            + 2 * expected_momentum.abs().max().item())
    assert (fused_momentum - expected_momentum).abs().max().item() <= momentum_bound
    assert (fused_weight - expected_weight).abs().max().item() <= \
        0.1 * momentum_bound + ulp * expected_weight.abs().max().item()
