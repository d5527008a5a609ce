import math

import pytest
import torch

from pfc.head.optim import SparseRowSGD
from tests.distributed import run_ranks
from tests.triton_interpret import kernels, triton_interpreter  # noqa: F401  (fixtures)


def _pair(rows=10, dim=6, seed=0):
    torch.manual_seed(seed)
    start = torch.randn(rows, dim)
    return torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())


@pytest.mark.parametrize("rows, dim, exact", [(10, 64, True), (7, 6, False)])
def test_dense_gradient_matches_torch_sgd_bit_for_bit_over_whole_vectors(rows, dim, exact):
    # rows of 64 values: every chunk is a whole number of the fused kernel's vectors; rows of 6
    # end chunks inside a vector, where the kernel's scalar tail may fuse a multiply-add
    mine, theirs = _pair(rows=rows, dim=dim)
    ours = SparseRowSGD([mine], lr=0.1, momentum=0.9, weight_decay=5e-4, chunk_rows=3)
    reference = torch.optim.SGD([theirs], lr=0.1, momentum=0.9, weight_decay=5e-4)
    for step in range(4):
        grad = torch.randn_like(mine)
        mine.grad, theirs.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
        for a, b in ((mine, theirs), (ours.state[mine]["momentum_buffer"], reference.state[theirs]["momentum_buffer"])):
            if exact:
                assert torch.equal(a, b), step
            else:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_sparse_gradient_touches_only_its_rows():
    param, _ = _pair()
    optimizer = SparseRowSGD([param], lr=0.1, momentum=0.9, weight_decay=5e-4, chunk_rows=2)
    optimizer.state[param]["momentum_buffer"].normal_()  # untouched rows must keep any state
    before_weight = param.detach().clone()
    before_buffer = optimizer.state[param]["momentum_buffer"].clone()
    rows = torch.tensor([1, 4, 7])
    values = torch.randn(3, param.shape[1])
    param.grad = torch.sparse_coo_tensor(rows[None], values, param.shape, check_invariants=True)
    optimizer.step()
    untouched = torch.tensor([r for r in range(param.shape[0]) if r not in rows.tolist()])
    assert torch.equal(param[untouched], before_weight[untouched])
    assert torch.equal(optimizer.state[param]["momentum_buffer"][untouched], before_buffer[untouched])
    # touched rows follow the dense formula
    step = values + 5e-4 * before_weight[rows]
    buffer = 0.9 * before_buffer[rows] + step
    assert torch.allclose(optimizer.state[param]["momentum_buffer"][rows], buffer)
    assert torch.allclose(param[rows], before_weight[rows] - 0.1 * buffer)


def test_uncoalesced_sparse_gradients_are_summed():
    param, reference = _pair()
    optimizer = SparseRowSGD([param], lr=0.5, momentum=0.0)
    rows = torch.tensor([[2, 2, 5]])
    values = torch.ones(3, param.shape[1])
    param.grad = torch.sparse_coo_tensor(rows, values, param.shape, check_invariants=True)
    optimizer.step()
    assert torch.allclose(param[2], reference[2] - 1.0)
    assert torch.allclose(param[5], reference[5] - 0.5)


def test_state_dict_round_trip_and_narrow_momentum():
    param, _ = _pair()
    optimizer = SparseRowSGD([param], lr=0.1, momentum_dtype=torch.bfloat16)
    assert optimizer.state[param]["momentum_buffer"].dtype == torch.bfloat16
    param.grad = torch.randn_like(param)
    optimizer.step()
    saved = optimizer.state_dict()
    restored = SparseRowSGD([param], lr=0.3, momentum_dtype=torch.bfloat16)
    restored.load_state_dict(saved)
    assert restored.param_groups[0]["lr"] == 0.1
    assert restored.state[param]["momentum_buffer"].dtype == torch.bfloat16
    assert torch.equal(restored.state[param]["momentum_buffer"], optimizer.state[param]["momentum_buffer"])


def test_bad_hyper_parameters():
    param, _ = _pair()
    with pytest.raises(ValueError, match="momentum 1.0 outside"):
        SparseRowSGD([param], lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="learning rate -1"):
        SparseRowSGD([param], lr=-1)
    with pytest.raises(ValueError, match="kernels='cuda' is not one of auto, torch, triton"):
        SparseRowSGD([param], lr=0.1, kernels="cuda")
    assert SparseRowSGD([param], lr=0.1, kernels="auto").kernels == "torch"   # CPU tensors


def test_without_the_private_sparse_accessors_the_update_is_the_same(monkeypatch):
    """pfc.torch_private.uncoalesced_rows may find no ``_indices``/``_values`` in another
    torch: the optimizer then coalesces, with the same result bit for bit."""
    import pfc.head.row_optimizer

    results = []
    for private in (True, False):
        if not private:
            monkeypatch.setattr(pfc.head.row_optimizer, "uncoalesced_rows", lambda grad: None)
        param, _ = _pair(seed=3)
        optimizer = SparseRowSGD([param], lr=0.1, momentum=0.9, weight_decay=5e-4)
        values = torch.randn(3, param.shape[1], generator=torch.Generator().manual_seed(4))
        # sorted, distinct rows but not flagged coalesced: what autograd hands over from the head
        param.grad = torch.sparse_coo_tensor(torch.tensor([[1, 4, 7]]), values, param.shape, check_invariants=True)
        optimizer.step()
        results.append((param.detach().clone(), optimizer.state[param]["momentum_buffer"].clone()))
    assert all(torch.equal(a, b) for a, b in zip(*results))


# ------------------------------------------------------------------ narrow storage, rounding, skips

def test_found_inf_set_to_zero_keeps_float32_bit_identical_to_torch_sgd():
    mine, theirs = _pair(dim=64)
    ours = SparseRowSGD([mine], lr=0.1, momentum=0.9, weight_decay=5e-4, chunk_rows=3)
    reference = torch.optim.SGD([theirs], lr=0.1, momentum=0.9, weight_decay=5e-4)
    ours.found_inf = torch.zeros(())
    for _ in range(3):
        grad = torch.randn_like(mine)
        mine.grad, theirs.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
    assert torch.equal(mine, theirs)
    assert torch.equal(ours.state[mine]["momentum_buffer"], reference.state[theirs]["momentum_buffer"])


def _small_steps(dtype, rounding, steps=200, fraction=0.01, rows=64, dim=64, kernels="torch"):
    """Centers at 1.0 moved ``steps`` times by ``fraction`` of the type's spacing above 1.0
    (lr 1, no momentum, no decay); returns (moved, expected move, spacing)."""
    spacing = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    param = torch.nn.Parameter(torch.ones(rows, dim, dtype=dtype))
    optimizer = SparseRowSGD([param], lr=1.0, momentum=0.0, rounding=rounding, seed=5, kernels=kernels)
    for _ in range(steps):
        optimizer.update_rows(param, slice(0, rows), torch.full((rows, dim), -fraction * spacing))
    return param.detach().double() - 1.0, steps * fraction * spacing, spacing


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_keeps_updates_far_below_the_spacing_and_nearest_loses_them(dtype, kernels):
    """200 updates of 0.01 × spacing move fp32 centers by 2 spacings. With stochastic rounding each
    update's rounding error e_t has mean 0 given the past and variance p(1−p)·s² (p = 0.01: the
    stored value is on the grid, so the new value sits p spacings above a grid point; the values
    stay in [1, 2), one spacing s). The errors are martingale differences and pairwise independent
    across elements (torch: the pairwise noise; Triton: Philox per value), so the mean move over
    n = 4096 elements has standard deviation
    s·sqrt(T·p(1−p)/n) ≈ 0.022·s; the test allows 6 of them (0.13·s, vs. the 2·s expected).
    Round-to-nearest sends 1 + 0.01·s back to 1 every time: nothing moves."""
    # the interpreted Triton kernel costs ~30 ms a launch: 20 updates of 0.1 × spacing over 8192
    # values, the same expected move and a bound as tight (sqrt(20·0.1·0.9/8192) ≈ 0.015·s)
    steps, fraction, rows = (200, 0.01, 64) if kernels == "torch" else (20, 0.1, 128)
    moved, expected, spacing = _small_steps(dtype, "stochastic", steps, fraction, rows, kernels=kernels)
    bound = 6 * spacing * math.sqrt(steps * fraction * (1 - fraction) / moved.numel())
    assert abs(moved.mean().item() - expected) < bound
    assert moved.std().item() > 0   # individual centers moved by whole spacings, differently
    lost, _, _ = _small_steps(dtype, "nearest", steps // 4, fraction, kernels=kernels)
    assert torch.equal(lost, torch.zeros_like(lost))


def _narrow_run(seed, steps, optimizer=None, param=None, start=0, kernels="torch"):
    generator = torch.Generator().manual_seed(11)
    if param is None:
        param = torch.nn.Parameter(torch.randn(20, 8, generator=generator).to(torch.bfloat16))
        optimizer = SparseRowSGD([param], lr=0.1, momentum=0.9, weight_decay=5e-4, chunk_rows=4, seed=seed,
                                 kernels=kernels)
    for step in range(start, steps):
        grads = torch.Generator().manual_seed(100 + step)
        rows = torch.randperm(20, generator=grads)[:7].sort().values
        values = torch.randn(7, 8, generator=grads).to(torch.bfloat16)   # autograd hands over the parameter's type
        param.grad = torch.sparse_coo_tensor(rows[None], values, param.shape, is_coalesced=True, check_invariants=False)
        optimizer.step()
    return param, optimizer


def test_bf16_rounding_is_reproducible_for_a_seed_and_across_a_resume(kernels):
    param, optimizer = _narrow_run(seed=1, steps=6, kernels=kernels)
    assert param.dtype == optimizer.state[param]["momentum_buffer"].dtype == torch.bfloat16
    again, _ = _narrow_run(seed=1, steps=6, kernels=kernels)
    other, _ = _narrow_run(seed=2, steps=6, kernels=kernels)
    assert torch.equal(param, again) and not torch.equal(param, other)
    half, half_optimizer = _narrow_run(seed=1, steps=3, kernels=kernels)
    saved = {k: v for k, v in half_optimizer.state_dict().items()}
    assert saved["updates"] == 3
    resumed = torch.nn.Parameter(half.detach().clone())
    fresh = SparseRowSGD([resumed], lr=0.1, momentum=0.9, weight_decay=5e-4, chunk_rows=4, seed=1, kernels=kernels)
    fresh.load_state_dict(saved)
    _narrow_run(seed=1, steps=6, optimizer=fresh, param=resumed, start=3)
    assert torch.equal(resumed, param)
    assert torch.equal(fresh.state[resumed]["momentum_buffer"], optimizer.state[param]["momentum_buffer"])


def test_bf16_update_in_fp32_matches_the_float32_formula_within_one_spacing(kernels):
    generator = torch.Generator().manual_seed(12)
    start = torch.randn(30, 16, generator=generator).to(torch.bfloat16)
    buffer = torch.randn(30, 16, generator=generator).to(torch.bfloat16)
    grad = torch.randn(30, 16, generator=generator).to(torch.bfloat16)
    for rounding in ("stochastic", "nearest"):
        param = torch.nn.Parameter(start.clone())
        optimizer = SparseRowSGD([param], lr=0.1, momentum=0.9, weight_decay=5e-4, rounding=rounding, kernels=kernels)
        optimizer.state[param]["momentum_buffer"].copy_(buffer)
        param.grad = grad.clone()
        optimizer.step()
        velocity = 0.9 * buffer.double() + grad.double() + 5e-4 * start.double()
        weight = start.double() - 0.1 * velocity
        spacing = 2.0 ** (torch.floor(torch.log2(weight.abs())) - 7)   # bf16 spacing at each value
        error = (param.detach().double() - weight).abs() / spacing
        assert error.max() <= (1.0 if rounding == "stochastic" else 0.5) + 1e-3, rounding
        v_spacing = 2.0 ** (torch.floor(torch.log2(velocity.abs())) - 7)
        v_error = (optimizer.state[param]["momentum_buffer"].double() - velocity).abs() / v_spacing
        assert v_error.max() <= 1.0 + 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_found_inf_and_skip_leave_rows_and_momentum_unchanged_without_a_host_sync(dtype, kernels):
    from pfc.host_syncs import HostSyncCounter

    param = torch.nn.Parameter(torch.randn(12, 5).to(dtype))
    optimizer = SparseRowSGD([param], lr=0.1, momentum=0.9, weight_decay=5e-4, chunk_rows=5, kernels=kernels)
    optimizer.state[param]["momentum_buffer"].normal_()
    before = param.detach().clone(), optimizer.state[param]["momentum_buffer"].clone()
    rows = torch.tensor([0, 3, 4, 9, 11])
    grad = torch.randn(5, 5)
    grad[1, 2] = math.nan
    param.grad = torch.sparse_coo_tensor(rows[None], grad.to(dtype), param.shape, is_coalesced=True,
                                         check_invariants=True)
    optimizer.found_inf = torch.ones(())
    with HostSyncCounter() as counter:
        optimizer.step()
        optimizer.update_rows(param, slice(2, 7), torch.randn(5, 5))
        optimizer.found_inf = None
        optimizer.update_rows(param, rows, grad, skip=torch.tensor(True))
    assert counter.count == 0, counter.report()
    assert torch.equal(param, before[0]) and torch.equal(optimizer.state[param]["momentum_buffer"], before[1])
    optimizer.update_rows(param, rows, torch.randn(5, 5), skip=torch.tensor(False))   # not skipped: rows move
    assert not torch.equal(param[rows], before[0][rows])


def test_state_dict_casts_each_buffer_from_the_saved_type_directly():
    """A float32 momentum saved beside bf16 centers loads into bf16 momentum, and a bf16 one into
    float32, without passing through the parameter's type on the way."""
    generator = torch.Generator().manual_seed(13)
    momentum = torch.randn(6, 4, generator=generator) * 1e-3
    wide = torch.nn.Parameter(torch.zeros(6, 4))
    wide_optimizer = SparseRowSGD([wide], lr=0.1)
    wide_optimizer.state[wide]["momentum_buffer"].copy_(momentum)
    narrow = torch.nn.Parameter(torch.zeros(6, 4, dtype=torch.bfloat16))
    narrow_optimizer = SparseRowSGD([narrow], lr=0.1, momentum_dtype=torch.float32)
    narrow_optimizer.load_state_dict(wide_optimizer.state_dict())
    assert torch.equal(narrow_optimizer.state[narrow]["momentum_buffer"], momentum)   # not rounded to bf16
    assert narrow_optimizer.updates == 0



def _distributed_bf16_worker(rank, world_size, steps):
    """Each rank holds its rows of a bf16 center matrix (C % N ≠ 0) and bf16 momentum; every step
    the float64 reference gradient of the full loss at the current (gathered) centers updates the
    sampled rows with stochastic rounding. A float64 SGD from the same start runs beside it."""
    import torch.distributed as dist

    from pfc.head.margins import ArcFace
    from pfc.head.partition import class_partition
    from tests.reference import reference_loss

    num_classes, dim, batch, lr, momentum, decay = 11, 8, 12, 0.5, 0.9, 5e-4
    part = class_partition(num_classes, world_size, rank)
    rows = slice(part.class_start, part.class_start + part.num_local)
    data = torch.Generator().manual_seed(21)
    start = (torch.randn(num_classes, dim, generator=data) * 0.1).to(torch.bfloat16).double()
    param = torch.nn.Parameter(start[rows].to(torch.bfloat16))
    optimizer = SparseRowSGD([param], lr=lr, momentum=momentum, weight_decay=decay, chunk_rows=2, seed=4)
    reference, velocity = start.clone(), torch.zeros_like(start)
    margin = ArcFace(s=16.0, m=0.3)
    for step in range(steps):
        features = torch.randn(batch, dim, generator=data, dtype=torch.float64)
        labels = torch.randint(0, num_classes, (batch,), generator=data)
        sampled = torch.randperm(num_classes, generator=data)[:7].sort().values   # the same on every rank
        gathered = torch.zeros(num_classes, dim)
        gathered[rows] = param.detach().float()
        dist.all_reduce(gathered)   # exact: one rank contributes each entry
        for centers, target in ((gathered.double(), None), (reference, velocity)):
            centers = centers.clone().requires_grad_()
            reference_loss(features, labels, centers, margin).backward()
            if target is None:
                local = sampled[(sampled >= part.class_start) & (sampled < part.class_start + part.num_local)]
                optimizer.update_rows(param, local - part.class_start, centers.grad[local].float())
            else:
                step_rows = centers.grad[sampled] + decay * reference[sampled]
                velocity[sampled] = momentum * velocity[sampled] + step_rows
                reference[sampled] -= lr * velocity[sampled]
    scale = reference[rows].abs().max().item()
    return {"weight_error": (param.detach().double() - reference[rows]).abs().max().item() / scale,
            "momentum_error": (optimizer.state[param]["momentum_buffer"].double() - velocity[rows]).abs().max().item()
                              / velocity[rows].abs().max().item(),
            "moved": (param.detach().double() - start[rows]).abs().max().item() / scale}


def test_two_rank_bf16_update_follows_a_float64_reference_within_bf16_tolerance():
    """bf16 keeps 8 significant bits (relative spacing ≤ 2⁻⁷); with stochastic rounding the error
    after T updates is a sum of T zero-mean rounding errors, each under one spacing: about
    sqrt(T)·2⁻⁸ ≈ 0.01 of the largest value for T = 6 (measured: 0.004–0.005), T·2⁻⁷ at worst.
    The bound, 3·2⁻⁷ ≈ 0.023, is far below the distance the centers move (about their size)."""
    for outcome in run_ranks(_distributed_bf16_worker, 2, 6):
        assert outcome["moved"] > 0.5
        assert outcome["weight_error"] < 3 * 2 ** -7, outcome
        assert outcome["momentum_error"] < 3 * 2 ** -7, outcome


def _bf16_head_steps(update_in_backward: bool, steps: int = 3, nan_at: int | None = None):
    """A bf16 head trained ``steps`` steps; a NaN in the features at step ``nan_at``. The step()
    path is told to skip by ``found_inf`` (what the trainer does); the backward path skips itself."""
    from pfc.head.partial_fc import PartialFC

    head = PartialFC(40, 8, sample_rate=0.5, seed=2, chunk_rows=4, dtype=torch.bfloat16)
    optimizer = head.optimizer(lr=0.5, momentum=0.9, weight_decay=0.01, update_in_backward=update_in_backward,
                               chunk_rows=2)
    data = torch.Generator().manual_seed(9)
    for step in range(steps):
        head.set_iteration(step)
        x = torch.randn(6, 8, generator=data)
        if step == nan_at:
            x[0, 0] = math.nan
        loss = head(x, torch.randint(0, 40, (6,), generator=data))
        loss.backward()
        optimizer.found_inf = (~torch.isfinite(loss)).float()
        optimizer.step()
        optimizer.found_inf = None
        optimizer.zero_grad()
    return head.weight.detach().clone(), optimizer.state[head.weight]["momentum_buffer"].clone()


def test_bf16_head_update_in_backward_agrees_with_backward_then_step_and_skips_a_non_finite_loss():
    """The step() path gets the gradient rounded to bf16 (autograd stores ``.grad`` in the
    parameter's type), the backward path the fp32 gradient, so they agree to bf16 precision, not
    bit for bit; a skipped step leaves both exactly where two steps put them."""
    weight, momentum = _bf16_head_steps(update_in_backward=False)
    fused_weight, fused_momentum = _bf16_head_steps(update_in_backward=True)
    assert weight.dtype == momentum.dtype == torch.bfloat16
    scale = weight.float().abs().max()
    assert (weight.float() - fused_weight.float()).abs().max() < 2 ** -5 * scale
    for fused in (False, True):   # a NaN at the last step leaves the state of the first two
        skipped = _bf16_head_steps(update_in_backward=fused, nan_at=2)
        two_steps = _bf16_head_steps(update_in_backward=fused, steps=2)
        assert torch.equal(skipped[0], two_steps[0]) and torch.equal(skipped[1], two_steps[1]), fused


# ------------------------------------------------------------------ the fused kernel and its edges

def test_without_the_fused_kernel_the_update_is_the_same_and_skips_alike(monkeypatch):
    start = torch.randn(9, 64)
    grads = [torch.randn(9, 64) for _ in range(3)]

    def run():
        param = torch.nn.Parameter(start.clone())
        optimizer = SparseRowSGD([param], lr=0.1, momentum=0.9, weight_decay=5e-4, chunk_rows=4)
        for step, grad in enumerate(grads):
            optimizer.found_inf = torch.tensor(float(step == 1))   # the middle step is skipped
            param.grad = grad.clone()
            optimizer.step()
        return param.detach(), optimizer.state[param]["momentum_buffer"]

    fused = run()
    monkeypatch.delattr(torch, "_fused_sgd_")
    assert all(torch.equal(a, b) for a, b in zip(fused, run()))


def test_momentum_set_to_zero_later_leaves_the_buffer_alone(kernels):
    param = torch.nn.Parameter(torch.randn(5, 16))
    optimizer = SparseRowSGD([param], lr=0.1, momentum=0.9, weight_decay=0.0, kernels=kernels)
    optimizer.param_groups[0]["momentum"] = 0.0          # e.g. a schedule
    before = param.detach().clone()
    grad = torch.randn(5, 16)
    param.grad = grad.clone()
    optimizer.step()
    torch.testing.assert_close(param.detach(), before - 0.1 * grad)
    assert torch.equal(optimizer.state[param]["momentum_buffer"], torch.zeros(5, 16))


def test_a_non_contiguous_gradient_is_read_as_its_values():
    mine, theirs = _pair(rows=16, dim=16)
    ours = SparseRowSGD([mine], lr=0.1, momentum=0.9, weight_decay=5e-4)
    reference = torch.optim.SGD([theirs], lr=0.1, momentum=0.9, weight_decay=5e-4)
    grad = torch.randn(16, 16).t()                     # a transposed view
    mine.grad, theirs.grad = grad, grad.contiguous()
    ours.step()
    reference.step()
    assert torch.equal(mine, theirs)


def test_update_rows_in_other_chunks_agrees_within_rounding_for_any_width():
    # the head updates its own chunks; step() the optimizer's: with D = 6 the fused kernel's
    # scalar tail falls at different places, so the two agree to rounding, not bit for bit
    start, grad = torch.randn(7, 6), torch.randn(7, 6)
    results = []
    for chunk_rows in (3, 7):
        param = torch.nn.Parameter(start.clone())
        optimizer = SparseRowSGD([param], lr=0.1, momentum=0.9, weight_decay=5e-4, chunk_rows=chunk_rows)
        optimizer.update_rows(param, slice(0, 7), grad)
        results.append(param.detach())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)
