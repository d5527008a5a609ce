"""The head's steady-state step: no host sync, lean logits equal kept ones, both inter-class
filter conventions against the float64 reference, fake CUDA tensors; real gloo groups."""
import math

import pytest
import torch
import torch.nn.functional as F

from pfc.head.margins import ArcFace
from pfc.head.partial_fc import PartialFC, hashed_normal, init_centers
from pfc.head.regularizers import MHE
from pfc.host_syncs import HostSyncCounter
from tests.distributed import run_ranks
from tests.reference import reference_loss, reference_target_logit, relative_error

NUM_CLASSES, DIM, BATCH = 61, 16, 6


def _step_data(world_size, rank, step):
    generator = torch.Generator().manual_seed(100 + step)
    labels = torch.randint(0, NUM_CLASSES, (world_size * BATCH,), generator=generator)
    features = torch.randn(world_size * BATCH, DIM, generator=generator)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    return features[rows].clone().requires_grad_(), labels[rows].clone()


# --------------------------------------------------------------------------------- host syncs

def _sync_worker(rank, world_size, update_in_backward):
    counts = {}
    for name, mhe in (("plain", None), ("mhe", MHE(weight=0.1, unbiased=True))):
        head = PartialFC(NUM_CLASSES, DIM, sample_rate=0.3, chunk_rows=5, mhe=mhe, interclass_filter=0.5)
        optimizer = head.optimizer(update_in_backward=update_in_backward)
        for step in range(3):
            head.check_inputs = step == 0  # the trainer's pattern: checked on the first (and log) steps
            head.set_iteration(step)
            x, labels = _step_data(world_size, rank, step)
            with HostSyncCounter() as counter:
                loss = head(x, labels)
                loss.backward()
                stats = head.step_stats
            if step > 0:
                counts[f"{name} step {step}"] = (counter.count, counter.report())
            assert set(stats) >= {"loss", "ce", "accuracy"} and all(v.dim() == 0 for v in stats.values())
            if not update_in_backward:
                optimizer.step()
                optimizer.zero_grad()
        # check_inputs back on: today's clear error, on every rank
        head.check_inputs = True
        try:
            head(torch.randn(BATCH, DIM), torch.full((BATCH,), NUM_CLASSES if rank == 1 else 0))
            counts[f"{name} error"] = None
        except ValueError as error:
            counts[f"{name} error"] = str(error)
    return counts


@pytest.mark.parametrize("update_in_backward", [False, True])
def test_steady_state_head_step_makes_no_host_sync(update_in_backward):
    for counts in run_ranks(_sync_worker, 2, update_in_backward):
        for name, value in counts.items():
            if name.endswith("error"):
                assert value is not None and "failed on rank 1" in value and f"outside [0, {NUM_CLASSES})" in value
            else:
                assert value[0] == 0, (name, value[1])


# ------------------------------------------------------------------------------- lean logits

def _logits_worker(rank, world_size, sample_rate):
    outcome = {}
    for mode in ("keep", "recompute"):
        for fused in (False, True):
            head = PartialFC(NUM_CLASSES, DIM, margin=ArcFace(s=30.0, m=0.5), sample_rate=sample_rate, seed=3,
                             chunk_rows=4, mhe=MHE(weight=0.1), interclass_filter=0.3, logits=mode)
            optimizer = head.optimizer(lr=0.5, momentum=0.9, weight_decay=0.01, update_in_backward=fused)
            losses, grads = [], []
            for step in range(2):
                x, labels = _step_data(world_size, rank, step)
                head.set_iteration(step)
                loss = head(x, labels)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
                grads.append(x.grad)
            momentum = optimizer.state[head.weight]["momentum_buffer"].clone()
            outcome[mode, fused] = (head.weight.detach().clone(), momentum, losses, grads)
    return outcome


@pytest.mark.parametrize("world_size,sample_rate", [(2, 0.4), (3, 1.0)])
def test_recomputed_logits_give_the_results_of_kept_ones_bit_for_bit(world_size, sample_rate):
    for outcome in run_ranks(_logits_worker, world_size, sample_rate, timeout=300):
        for fused in (False, True):
            kept, recomputed = outcome["keep", fused], outcome["recompute", fused]
            assert torch.equal(kept[0], recomputed[0]) and torch.equal(kept[1], recomputed[1]), fused
            assert kept[2] == recomputed[2], fused
            assert all(torch.equal(a, b) for a, b in zip(kept[3], recomputed[3])), fused


def test_auto_recomputes_only_past_the_budget():
    head = PartialFC(1000, DIM, sample_rate=1.0, logits="auto", logits_budget=0.1)
    # kept logits: 1000 × B × 4 bytes against 0.1 × 1000 × 16 × 4 bytes of centers: keep up to B = 1
    assert head._keep_logits(1, None) and not head._keep_logits(2, None)
    assert PartialFC(1000, DIM, logits="keep")._keep_logits(10 ** 6, None)
    assert not PartialFC(1000, DIM, logits="recompute")._keep_logits(1, None)


# -------------------------------------------------------------------------- inter-class filter

FILTER_THRESHOLD, FILTER_SCALE = 0.2, 30.0


def _filter_reference(features, labels, centers, mode):
    """float64: insightface's ``zero`` (filtered cosine × 0, a constant logit 0) or ``exclude``."""
    margin = ArcFace(s=FILTER_SCALE, m=0.5)
    cos = F.normalize(features, dim=1) @ F.normalize(centers, dim=1).t()
    rows = torch.arange(labels.numel())
    target = reference_target_logit(cos[rows, labels], margin)
    noisy = (cos > FILTER_THRESHOLD).scatter(1, labels[:, None], False).detach()
    logits = margin.s * cos.scatter(1, labels[:, None], target[:, None])
    logits = logits.masked_fill(noisy, -math.inf if mode == "exclude" else 0.0)
    return F.cross_entropy(logits, labels), int(noisy.sum())


def _filter_worker(rank, world_size, mode):
    results = {}
    for logits in ("keep", "recompute"):
        x, labels = _step_data(world_size, rank, 0)
        head = PartialFC(NUM_CLASSES, DIM, margin=ArcFace(s=FILTER_SCALE, m=0.5), chunk_rows=7, seed=4,
                         interclass_filter=FILTER_THRESHOLD, interclass_filter_mode=mode, logits=logits)
        loss = head(x, labels)
        loss.backward()
        results[logits] = dict(loss=loss.item(), x_grad=x.grad, weight_grad=head.weight.grad,
                               class_start=head.class_start, num_local=head.num_local)
    return results


@pytest.mark.parametrize("mode,world_size", [("exclude", 2), ("zero", 3)])
def test_interclass_filter_modes_equal_float64_reference(mode, world_size):
    per_rank = run_ranks(_filter_worker, world_size, mode, timeout=300)
    features = torch.cat([_step_data(world_size, rank, 0)[0].detach() for rank in range(world_size)]).double()
    labels = torch.cat([_step_data(world_size, rank, 0)[1] for rank in range(world_size)])
    features.requires_grad_()
    centers = init_centers(NUM_CLASSES, DIM, 0, NUM_CLASSES, 4).double().requires_grad_()
    expected, filtered = _filter_reference(features, labels, centers, mode)
    expected.backward()
    other_mode = "zero" if mode == "exclude" else "exclude"
    other, _ = _filter_reference(features.detach(), labels, centers.detach(), other_mode)
    assert filtered > 0 and abs(other.item() - expected.item()) > 1e-3  # the modes differ on this data
    for rank, results in enumerate(per_rank):
        for logits, got in results.items():
            where = f"{mode} {logits} rank {rank}/{world_size}"
            assert got["loss"] == pytest.approx(expected.item(), rel=1e-5), where
            rows = slice(rank * BATCH, (rank + 1) * BATCH)
            assert relative_error(got["x_grad"], world_size * features.grad[rows]) < 1e-5, where
            own = slice(got["class_start"], got["class_start"] + got["num_local"])
            assert relative_error(got["weight_grad"], centers.grad[own]) < 1e-5, where


# ------------------------------------------------------------------------------ CUDA readiness

def test_head_builds_samples_and_multiplies_on_fake_cuda_tensors_with_bf16_centers():
    """Under FakeTensorMode every tensor the head makes is a CUDA tensor made there (a CPU→CUDA
    copy raises on this CPU build), and the GEMMs take the out_dtype=fp32 path. (A whole step does
    not run there on this build: an in-place op on a view of a fake CUDA tensor, even
    ``x[0:5].mul_(2)``, and ``topk`` raise "not linked with support for cuda devices".)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pfc.head.gemm import StorageGemm
    from pfc.head.scratch import ScratchBlocks

    with FakeTensorMode(), torch.no_grad():  # autograd on a fake CUDA parameter aborts on this build
        head = PartialFC(5000, DIM, sample_rate=0.1, dtype=torch.bfloat16, device="cuda", check_inputs=False)
        assert head.weight.dtype == torch.bfloat16 and head.weight.device.type == "cuda"
        index = torch.randint(0, 5000, (500,), device="cuda")  # (topk has no fake CUDA kernel on this build)
        gemm = StorageGemm(torch.bfloat16, head.weight.device, ScratchBlocks())
        features = torch.randn(4 * BATCH, DIM, device="cuda")
        out = torch.empty(500, 4 * BATCH, device="cuda")
        rows = head.weight.index_select(0, index)
        assert gemm.mm(gemm.rows(rows), gemm.operand(features).t(), out=out).dtype == torch.float32


def test_hashed_normal_is_standard_normal_and_the_same_whatever_the_split():
    values = hashed_normal(3, 10, 400, 64, "cpu")
    assert abs(float(values.mean())) < 0.02 and abs(float(values.std()) - 1.0) < 0.02
    assert torch.equal(torch.cat([hashed_normal(3, 10, 150, 64, "cpu"), hashed_normal(3, 160, 250, 64, "cpu")]), values)
    assert not torch.equal(hashed_normal(4, 10, 400, 64, "cpu"), values)
