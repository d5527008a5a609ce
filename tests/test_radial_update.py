"""The center gradient's radial term added in the row update (``apply_rows(..., radial=c)``): the
update from ``grad`` and ``c`` equals the update from ``grad − c·w`` (the head's addcmul) up to
FMA rounding, with and without loss scaling, for fp32 and fp16 storage; the head's backward with
the Triton kernels and the update by chunk hands the term over instead of running the addcmul
(and keeps it with MHE), its declared cost, and the head trained either way.

The bound: the fused gradient ``g − c·w`` may be one FMA (rounded once) where the addcmul rounds
the product and the sum (twice): they differ by at most one rounding of the product,
2⁻²⁴·|c·w| (either may be the fused one: torch's CPU addcmul fuses too, in places). Multiplied by the
unscale and fed through ``v = μ·v + d`` and ``w = w − lr·v`` it moves the fp32 results by at most
that much again (|unscale|·2⁻²⁴·|c·w|, times lr for the weights), plus one fp32 rounding of each
result that the difference may flip: :func:`_radial_bound`. A round to nearest into fp16 may
flip with it, by one fp16 spacing.
"""
from __future__ import annotations

import pytest
import torch

from pfc.head.kernels.costs import declared_cost
from pfc.head.kernels.rows import RowStep, counter_seed, radial_gradient, row_kernels
from tests.dispatch import RecordedOps
from tests.triton_interpret import kernels, triton_interpreter  # noqa: F401  (fixtures)

ROWS, DIM, LR, MOMENTUM, DECAY = 40, 48, 0.1, 0.9, 5e-4


def _case(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(ROWS, DIM, generator=generator).to(dtype)
    momentum = torch.randn(ROWS, DIM, generator=generator)
    rows = torch.tensor([0, 3, 17, 18, 39, 7])
    grad = torch.randn(rows.numel(), DIM, generator=generator)
    radial = torch.rand(rows.numel(), generator=generator) * 4 - 1   # the radial term as large as the rest
    return weight, momentum, rows, grad, radial


def _update(name, weight, momentum, rows, grad, unscale, radial=None):
    weight, momentum = weight.clone(), momentum.clone()
    step = RowStep(lr=LR, momentum=MOMENTUM, weight_decay=DECAY, rounding="nearest", seed=counter_seed(1),
                   unscale=unscale)
    extra = {} if radial is None else {"radial": radial}
    row_kernels(name).apply_rows(weight, momentum, rows, grad, step, **extra)
    return weight, momentum


def _radial_bounds(product: torch.Tensor, step: torch.Tensor, momentum: torch.Tensor, weight: torch.Tensor):
    """(momentum, weights): one rounding of the largest |c·w| (unscaled), plus a flipped fp32
    rounding of each intermediate (the gradient term, ``v``) the difference passes through;
    the weights get lr times the momentum's and a flipped rounding of their own."""
    ulp = 2.0 ** -24
    momentum_bound = ulp * (product.abs().max().item() + 2 * step.abs().max().item() + 2 * momentum.abs().max().item())
    return momentum_bound, LR * momentum_bound + ulp * weight.float().abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("unscale", [None, 2.0 ** -16])
def test_the_radial_term_in_the_update_equals_the_addcmul_then_the_update_up_to_fma_rounding(
        kernels, dtype, unscale):
    """``unscale`` multiplies the whole gradient, the radial term included (it comes from the same
    scaled backward): the scaled gradient and a coefficient scaled alike give the update of the
    unscaled ones."""
    weight, momentum, rows, grad, radial = _case(dtype)
    scale = 1.0 if unscale is None else 1 / unscale
    factor = torch.tensor(unscale) if unscale is not None else None
    reference_grad = (grad * scale).addcmul(weight[rows].float(), (radial * scale)[:, None], value=-1.0)
    expected_weight, expected_momentum = _update(kernels, weight, momentum, rows, reference_grad, factor)
    fused_weight, fused_momentum = _update(kernels, weight, momentum, rows, grad * scale, factor, radial * scale)
    product = radial[:, None] * weight[rows].float()   # unscaled: |unscale·(scale·c)·w|
    momentum_bound, weight_bound = _radial_bounds(product, reference_grad / scale, expected_momentum,
                                                  expected_weight)
    assert (fused_momentum - expected_momentum).abs().max() <= momentum_bound
    if dtype == torch.float32:
        assert (fused_weight - expected_weight).abs().max() <= weight_bound
    else:   # a flipped round to nearest: one fp16 spacing, on few values
        spacing = 2.0 ** (torch.floor(torch.log2(expected_weight.float().abs())) - 10)
        assert ((fused_weight.float() - expected_weight.float()).abs() <= spacing).all()
    without_radial, _ = _update(kernels, weight, momentum, rows, grad * scale, factor)
    assert not torch.equal(without_radial, fused_weight)   # the term took part


def test_radial_coefficients_of_the_wrong_shape_are_refused(kernels):
    weight, momentum, rows, grad, radial = _case(torch.float32)
    with pytest.raises(ValueError, match=r"radial coefficients .*\(6,\)"):
        _update(kernels, weight, momentum, rows, grad, None, radial[:4])


def test_float64_rows_on_the_triton_path_add_the_radial_term_in_torch(triton_interpreter):
    """float64 rows go to the torch path (not a GPU storage type): the term is added there."""
    weight, momentum, rows, grad, radial = _case(torch.float64)
    momentum, grad = momentum.double(), grad.double()
    expected = _update("torch", weight, momentum, rows, radial_gradient(weight, rows, grad, radial), None)
    got = _update("triton", weight, momentum, rows, grad, None, radial)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_the_declared_cost_counts_the_coefficients_and_one_multiply_add_per_value():
    from torch._subclasses.fake_tensor import FakeTensorMode

    count, dim = 300, 512
    with FakeTensorMode(), RecordedOps() as recorded:
        weight = torch.empty(10_000, dim, dtype=torch.float16, device="cuda")
        momentum = torch.empty(10_000, dim, dtype=torch.float16, device="cuda")
        rows = torch.empty(count, dtype=torch.int64, device="cuda")
        grad = torch.empty(count, dim, device="cuda")
        step = RowStep(lr=0.1, momentum=0.9, weight_decay=5e-4, seed=1)
        row_kernels("triton").apply_rows(weight, momentum, rows, grad, step)
        row_kernels("triton").apply_rows(weight, momentum, rows, grad, step,
                                         radial=torch.empty(count, device="cuda"))
    plain, fused = (declared_cost("pfc::apply_rows")(*call, None) for call in recorded.of("pfc::apply_rows"))
    assert fused.bytes_read == plain.bytes_read + count * 4 and fused.bytes_written == plain.bytes_written
    assert fused.flops == plain.flops + 2 * count * dim and fused.launches == plain.launches == 1


# ------------------------------------------------------------------------------ the head

NUM_CLASSES, HEAD_DIM, BATCH = 61, 16, 6


def _radial_arguments(recorded: RecordedOps) -> list:
    """The ``radial`` argument of every ``pfc::apply_rows`` call."""
    return [args[14] if len(args) > 14 else kwargs.get("radial") for args, kwargs in recorded.of("pfc::apply_rows")]


def _head_step(name, mhe=None):
    from pfc.head.partial_fc import PartialFC

    head = PartialFC(NUM_CLASSES, HEAD_DIM, sample_rate=0.5, seed=3, chunk_rows=8, kernels=name, mhe=mhe)
    optimizer = head.optimizer(lr=0.5, momentum=0.9, weight_decay=0.01, update_in_backward=True)
    data = torch.Generator().manual_seed(5)
    loss = head(torch.randn(BATCH, HEAD_DIM, generator=data), torch.randint(0, NUM_CLASSES, (BATCH,), generator=data))
    with RecordedOps() as ops:
        loss.backward()
    optimizer.step()
    return head.weight.detach(), ops


def test_the_triton_head_updating_by_chunk_hands_the_radial_term_to_the_update_instead_of_an_addcmul(
        triton_interpreter):
    """By chunk (no MHE) the backward runs no addcmul and every chunk's update gets its ``c``; with
    MHE (the update after the loop) and on the torch path the addcmul stays; the rows end up as
    the torch path's (fp32: within 1e-6 of the largest value, the bound above and the FMA
    roundings of the update itself)."""
    from pfc.head.regularizers import MHE

    fused_weight, fused = _head_step("triton")
    assert "aten::addcmul_" not in fused.names
    assert len(_radial_arguments(fused)) == 4 and all(c is not None and c.dtype == torch.float32 for c in _radial_arguments(fused))
    torch_weight, on_torch = _head_step("torch")
    assert on_torch.names.count("aten::addcmul_") == 4   # ⌈31 sampled rows / 8⌉ chunks
    assert (fused_weight - torch_weight).abs().max() <= 1e-6 * torch_weight.abs().max()
    _, with_mhe = _head_step("triton", MHE(weight=0.1))
    assert with_mhe.names.count("aten::addcmul_") == 4 and _radial_arguments(with_mhe) == [None]
