"""PartialFC with centers stored in bf16 / fp16, on real gloo groups, against the float64 reference.

Tolerance: the head computes in fp32 on the *stored* (rounded) centers (on the CPU the chunk's
rows are upcast and multiplied in fp32, pfc/head/gemm.py), so the float64 reference evaluated at
the rounded centers must match as tightly as the fp32 head does (1e-5) for the loss and x.grad,
and for weight.grad up to its own rounding to the storage type (autograd stores it so); against the unrounded fp32
centers the difference is the rounding itself (≈ 2⁻⁹ relative per weight), which the second check
bounds loosely to show the reference test is not vacuous.
"""
import pytest
import torch

from pfc.head.margins import ArcFace, CosFace
from pfc.head.partial_fc import PartialFC, init_centers
from tests.distributed import run_ranks
from tests.reference import reference_loss, relative_error

NUM_CLASSES, DIM, BATCH, SEED = 23, 16, 6, 7
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
GRAD_ROUNDING = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -10}
MARGINS = {"arc": lambda: ArcFace(s=64.0, m=0.5), "cos": lambda: CosFace(s=30.0, m=0.35)}


def _data(world_size):
    generator = torch.Generator().manual_seed(SEED)
    labels = torch.randint(0, NUM_CLASSES, (world_size * BATCH,), generator=generator)
    labels[:2] = torch.tensor([0, NUM_CLASSES - 1])
    features = torch.randn(world_size * BATCH, DIM, generator=generator)
    return features, labels


def _storage_worker(rank, world_size):
    features, labels = _data(world_size)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    results = []
    for dtype_name, margin_name in CASES:
        margin = MARGINS[margin_name]
        x = features[rows].clone().requires_grad_()
        head = PartialFC(NUM_CLASSES, DIM, margin=margin(), sample_rate=1.0, seed=SEED, chunk_rows=5,
                         dtype=DTYPES[dtype_name])
        assert head.weight.dtype == DTYPES[dtype_name]
        loss = head(x, labels[rows])
        loss.backward()
        assert loss.dtype == torch.float32 and x.grad.dtype == torch.float32
        results.append(dict(loss=loss.item(), x_grad=x.grad, weight_grad=head.weight.grad.float(),
                            class_start=head.class_start, num_local=head.num_local))
    return results


CASES = [("bf16", "arc"), ("bf16", "cos"), ("fp16", "arc")]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_narrow_storage_equals_float64_reference_at_the_stored_centers(world_size):
    per_rank = run_ranks(_storage_worker, world_size, timeout=300)
    fp32_centers = init_centers(NUM_CLASSES, DIM, 0, NUM_CLASSES, SEED)
    features, labels = _data(world_size)
    for case, (dtype_name, margin_name) in enumerate(CASES):
        stored = fp32_centers.to(DTYPES[dtype_name]).double().requires_grad_()
        features64 = features.double().requires_grad_()
        expected = reference_loss(features64, labels, stored, MARGINS[margin_name]())
        expected.backward()
        unrounded = reference_loss(features.double(), labels, fp32_centers.double(), MARGINS[margin_name]())
        for rank in range(world_size):
            got = per_rank[rank][case]
            where = f"{dtype_name} {margin_name} rank {rank}/{world_size}"
            assert got["loss"] == pytest.approx(expected.item(), rel=1e-5), where
            assert got["loss"] == pytest.approx(unrounded.item(), rel=2e-2), where
            rows = slice(rank * BATCH, (rank + 1) * BATCH)
            assert relative_error(got["x_grad"], world_size * features64.grad[rows]) < 1e-5, where
            own = slice(got["class_start"], got["class_start"] + got["num_local"])
            # autograd stores weight.grad in the parameter's type: rounded once (≤ 2⁻⁹ resp. 2⁻¹¹
            # relative per element; update_in_backward hands the optimizer the fp32 gradient instead)
            assert relative_error(got["weight_grad"], stored.grad[own]) < GRAD_ROUNDING[dtype_name], where


def test_a_cuda_build_that_refuses_an_fp32_accumulator_beside_narrow_operands_gets_the_two_op_addmm(monkeypatch):
    import pfc.head.gemm as gemm
    from pfc.head.scratch import ScratchBlocks

    refused = []

    def old_addmm(*args, **kwargs):
        refused.append(1)
        raise RuntimeError("self and mat2 must have the same dtype, but got Float and BFloat16")

    plain_mm = torch.mm

    def mm_fp32(a, b, out_dtype=None, out=None):   # what mm(out_dtype=float32) computes, on the CPU
        return plain_mm(a.float(), b.float())

    monkeypatch.setattr(gemm, "_ADDMM_INTO_FP32", True)
    monkeypatch.setattr(gemm.torch, "addmm", old_addmm)
    monkeypatch.setattr(gemm.torch, "mm", mm_fp32)
    a, b = torch.randn(8, 4).to(torch.bfloat16), torch.randn(4, 3).to(torch.bfloat16)
    out = torch.randn(8, 3)
    expected = out + a.float() @ b.float()
    product = gemm.StorageGemm(torch.bfloat16, "cpu", ScratchBlocks())
    for _ in range(2):   # refused once, then not tried again
        out = expected - a.float() @ b.float()
        assert torch.equal(product.addmm_(out, a, b), expected)
    assert refused == [1]
