"""fp16 loss scaling (DDPRunner with a GradScaler) with class centers stored in fp32, bf16 or fp16.

The head's center gradients are stored in the centers' type; the runner unscales them in float32
inside the head's update (``SparseRowSGD.grad_unscale``) and checks them for an overflow itself
(``nonfinite_gradients``), which the scaler then sees (skip + back-off). On the CPU the backbone
computes in fp32 (autocast is CUDA-only in the runner) and the scaler is ``GradScaler("cpu")``.
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.distributed import run_ranks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCALE = 2.0 ** 8   # the tiny head's largest center gradient (~190) scaled stays finite in fp16
CLASSES, DIM, BATCH = 24, 16, 8


def make_runner(center_dtype: torch.dtype, scaler, grad_accumulation: int = 1):
    """A tiny backbone (fused SGD) under DDPRunner and a PartialFC head with ``center_dtype`` centers,
    its optimizer rounding to nearest (deterministic); the update in the backward when the runner
    allows it (no scaler, no accumulation: the head's float32 gradient as it is)."""
    from pfc.head.partial_fc import PartialFC
    from pfc.train.runners.ddp import DDPRunner

    torch.manual_seed(0)
    # no bias before BatchNorm: its gradient would be rounding noise, compared as such
    model = torch.nn.Sequential(torch.nn.Linear(6, DIM, bias=False), torch.nn.BatchNorm1d(DIM))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, fused=True)
    runner = DDPRunner(model, optimizer, grad_scaler=scaler, grad_accumulation=grad_accumulation)
    head = PartialFC(CLASSES, DIM, sample_rate=0.5, dtype=center_dtype, seed=1)
    head_optimizer = head.optimizer(lr=0.5, momentum=0.9, weight_decay=5e-4, rounding="nearest",
                                    update_in_backward=runner.head_update_in_backward)
    return runner, head, head_optimizer


def batches(rank: int = 0, count: int = 2):
    generator = torch.Generator().manual_seed(10 + rank)
    return [(torch.randn(BATCH, 6, generator=generator), torch.randint(0, CLASSES, (BATCH,), generator=generator))
            for _ in range(count)]


def train(runner, head, head_optimizer, steps) -> list[bool]:
    """Train on ``steps`` (each a list of micro-batches); whether each step was applied."""
    applied = []
    for iteration, micro_batches in enumerate(steps):
        head.set_iteration(iteration)
        for number, (images, labels) in enumerate(micro_batches):
            runner.forward_backward(images, labels, head, number == len(micro_batches) - 1)
        runner.gradients_finite()
        applied.append(bool(runner.step(head_optimizer, torch.tensor(0.0))))
    return applied


def state(runner, head, head_optimizer) -> list[torch.Tensor]:
    """The backbone's weights, the centers and their momentum, as float64 copies."""
    return [t.detach().double().clone() for t in
            [*runner.model.parameters(), head.weight, head_optimizer.state[head.weight]["momentum_buffer"]]]


def assert_within_rounding(got: list, want: list, initial: list, dtype: torch.dtype) -> None:
    """``got`` (a scaled step's :func:`state`) equals ``want`` (the unscaled one's) within 1e-4 of
    how far each tensor moved from ``initial``, 8 float32 ulps of the value and, for the centers
    and their momentum, 4 ulps of their storage type."""
    for number, (a, b, start) in enumerate(zip(got, want, initial)):
        moved = (b - start).abs().max()
        assert moved > 0
        storage = dtype if number >= len(got) - 2 else torch.float32        # centers and momentum last
        allowed = 1e-4 * moved + 8 * ulps(torch.float32, b) + 4 * ulps(storage, b)
        assert ((a - b).abs() <= allowed).all(), ((a - b).abs() / moved).max()


def poison_center_gradient(weight: torch.Tensor, position: int) -> None:
    """Put an inf at flat ``position`` of the stored center gradient (its values, when sparse): an fp16 overflow."""
    from pfc.torch_private import uncoalesced_rows

    gradient = weight.grad
    (uncoalesced_rows(gradient)[1] if gradient.is_sparse else gradient).view(-1)[position] = math.inf


def ulps(dtype: torch.dtype, reference: torch.Tensor) -> torch.Tensor:
    """The spacing of ``dtype`` at each value of ``reference`` (its subnormal spacing at least)."""
    info = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(reference.abs().clamp_min(info.smallest_normal)))
    return torch.exp2(exponent) * info.eps


# fp16 with gradient accumulation: autograd cannot add two fp16 sparse gradients on the CPU
# ("cadd_sparse" not implemented for 'Half', torch 2.13); a GPU run can
CASES = [("fp32", 1), ("bf16", 1), ("fp16", 1), ("fp32", 2), ("bf16", 2)]


@pytest.mark.parametrize(("name", "accumulation"), CASES)
def test_a_scaled_step_equals_the_unscaled_float32_update(name, accumulation):
    """Loss scaled by 2⁸, center gradients stored scaled in the centers' type and unscaled in
    float32 inside the update: the step equals the step without a scaler (the head's float32
    gradient handed to the update, or with accumulation its stored gradient) to within
    rounding: the head's backward is scale-equivariant to a few float32 ulps only (of the value,
    or 1e-4 of the update here), and a narrow gradient is rounded into its type (scaled, or not)
    before the update (a few ulps of the storage type)."""
    dtype = DTYPES[name]
    step = [batches(count=accumulation)]
    scaled = make_runner(dtype, torch.amp.GradScaler("cpu", init_scale=SCALE), accumulation)
    plain = make_runner(dtype, None, accumulation)
    initial = state(*plain)
    assert train(*scaled, step) == [True] and train(*plain, step) == [True]
    assert_within_rounding(state(*scaled), state(*plain), initial, dtype)
    assert scaled[0].grad_scaler.get_scale() == SCALE                 # no overflow: no back-off yet


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("where", ["centers", "backbone"])
def test_an_overflow_skips_backbone_and_centers_and_backs_off(name, where):
    """An inf in one center gradient (or one backbone gradient): neither the backbone nor the
    centers nor their momentum change, the scale halves; the next step trains."""
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    runner, head, head_optimizer = make_runner(DTYPES[name], scaler)
    images, labels = batches(count=1)[0]
    head.set_iteration(0)
    runner.forward_backward(images, labels, head, True)
    before = state(runner, head, head_optimizer)
    if where == "centers":
        poison_center_gradient(head.weight, 3)
    else:
        next(runner.model.parameters()).grad[0, 0] = math.inf
    assert not bool(runner.step(head_optimizer, torch.tensor(0.0)))
    assert all(torch.equal(a, b) for a, b in zip(before, state(runner, head, head_optimizer)))
    assert scaler.get_scale() == SCALE / 2
    assert head_optimizer.grad_unscale is None and head.weight.grad is None
    runner.forward_backward(images, labels, head, True)
    assert bool(runner.step(head_optimizer, torch.tensor(0.0)))
    after = state(runner, head, head_optimizer)
    assert not torch.equal(before[0], after[0]) and not torch.equal(before[-2], after[-2])


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_a_scaled_step_reads_no_device_value(name):
    """After the first step (the head validates its inputs), a scaled step (backward, unscaling,
    the head's check, its report to the scaler, both masked updates, the scale's update) makes no
    host synchronisation (on the CPU every tensor counts as a device tensor)."""
    from pfc.host_syncs import HostSyncCounter

    runner, head, head_optimizer = make_runner(DTYPES[name], torch.amp.GradScaler("cpu", init_scale=SCALE))
    first, second = [[batch] for batch in batches(count=2)]
    train(runner, head, head_optimizer, [first])
    head.check_inputs = False          # as the trainer after its first step
    head.set_iteration(1)
    found_inf = torch.tensor(0.0)
    with HostSyncCounter() as counter:
        runner.forward_backward(*second[0], head, True)
        runner.gradients_finite()
        applied = runner.step(head_optimizer, found_inf)
    assert counter.count == 0, counter.report()
    assert bool(applied)


def test_a_summed_center_gradient_that_overflows_in_fp16_is_an_overflow():
    """Two halves of a row's gradient, each finite in fp16, whose sum (rows given twice by
    gradient accumulation) is not: the check sees the summed gradient the update would use."""
    from pfc.head.optim import SparseRowSGD

    weight = torch.nn.Parameter(torch.zeros(4, 16, dtype=torch.float16))
    optimizer = SparseRowSGD([weight], lr=0.1)
    half = torch.full((1, 16), 40000.0, dtype=torch.float16)
    weight.grad = torch.sparse_coo_tensor(torch.tensor([[2, 2]]), torch.cat([half, half]), weight.shape,
                                          check_invariants=False)
    assert float(optimizer.nonfinite_gradients()) == 1.0
    weight.grad = torch.sparse_coo_tensor(torch.tensor([[2, 1]]), torch.cat([half, half]), weight.shape,
                                          check_invariants=False)
    assert float(optimizer.nonfinite_gradients()) == 0.0


def _two_ranks(rank: int, world_size: int, name: str):
    """On 2 gloo ranks (DDP backbone, sharded head), from the same start: one unscaled step, one
    scaled step, and two scaled steps of which rank 1 poisons the first with an inf in its own
    center gradient. Returns, per run, each step's outcome and scale and the final state."""
    from tests.test_fp16_scaling import batches, make_runner, poison_center_gradient, state

    runs = {}
    for run, scaled, steps, overflow_rank in (("plain", False, 1, None), ("scaled", True, 1, None),
                                              ("overflow", True, 2, 1)):
        scaler = torch.amp.GradScaler("cpu", init_scale=SCALE) if scaled else None
        runner, head, head_optimizer = make_runner(DTYPES[name], scaler)
        initial = state(runner, head, head_optimizer)
        applied, scales = [], []
        for iteration, (images, labels) in enumerate(batches(rank, steps)):
            head.set_iteration(iteration)
            before = state(runner, head, head_optimizer)
            runner.forward_backward(images, labels, head, True)
            if iteration == 0 and rank == overflow_rank:
                poison_center_gradient(head.weight, 0)
            applied.append(bool(runner.step(head_optimizer, torch.tensor(0.0))))
            scales.append(scaler.get_scale() if scaler is not None else None)
            unchanged = all(torch.equal(a, b) for a, b in zip(before, state(runner, head, head_optimizer)))
            assert unchanged == (not applied[-1])
        runs[run] = applied, scales, state(runner, head, head_optimizer), initial
    return runs


def test_two_ranks_train_as_unscaled_and_decide_each_skip_together():
    """Scaled fp16 centers on 2 ranks step as the unscaled run does (within rounding). An
    overflow of one rank's center gradient skips the step on every rank (the backbone stays
    replicated) and backs off every rank's scale alike; the next step applies."""
    ranks = run_ranks(_two_ranks, 2, "fp16", timeout=120)
    for runs in ranks:
        assert runs["plain"][0] == runs["scaled"][0] == [True] and runs["scaled"][1] == [SCALE]
        assert_within_rounding(runs["scaled"][2], runs["plain"][2], runs["plain"][3], torch.float16)
        assert runs["overflow"][0] == [False, True] and runs["overflow"][1] == [SCALE / 2, SCALE / 2]
    backbone = len(ranks[0]["overflow"][2]) - 2
    for run in ("scaled", "overflow"):
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][run][2][:backbone], ranks[1][run][2][:backbone]))
