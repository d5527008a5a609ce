"""Row-sparse AdamW on the class centers (pfc.head.adamw): float64 references from the formulas,
torch.optim.AdamW where every row is sampled, narrow storage, skips, the rollback and the config."""
import math

import pytest
import torch

from pfc.head.adamw import SparseRowAdamW
from pfc.head.margins import CosFace
from pfc.head.partial_fc import PartialFC, init_centers
from tests.distributed import run_ranks
from tests.reference import reference_adamw_rows, reference_loss, relative_error

CLASSES, DIM, BATCH, SEED, STEPS = 120, 16, 3, 5, 8
FREQUENT = (5, 64, 100)                    # a label every step: on different shards at 2 and 3 ranks
HYPER = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def _margin():
    return CosFace(s=16.0, m=0.2)


def _batch(step: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s global batch: features and labels, the FREQUENT classes among them."""
    generator = torch.Generator().manual_seed(1000 + step)
    count = world_size * BATCH
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    labels[:len(FREQUENT)] = torch.tensor(FREQUENT)
    return torch.randn(count, DIM, generator=generator), labels


def _train_head(rank: int, world_size: int, in_backward: bool) -> dict:
    head = PartialFC(CLASSES, DIM, margin=_margin(), sample_rate=0.2, seed=SEED)
    optimizer = head.adamw(**HYPER, update_in_backward=in_backward)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    sampled = []
    for step in range(STEPS):
        features, labels = _batch(step, world_size)
        head.set_iteration(step)
        head(features[mine], labels[mine]).backward()
        if not in_backward:
            optimizer.step()
            optimizer.zero_grad()
        sampled.append(head.last_sample[0] + head.class_start)
    state = optimizer.state[head.weight]
    return dict(class_start=head.class_start, sampled=sampled, weight=head.weight.detach().clone(),
                exp_avg=state["exp_avg"].clone(), exp_avg_sq=state["exp_avg_sq"].clone(),
                row_steps=state["row_steps"].clone(), updates=optimizer.updates)


def _assemble(per_rank: list[dict], key: str) -> torch.Tensor:
    return torch.cat([r[key] for r in sorted(per_rank, key=lambda r: r["class_start"])])


def _on_two_ranks(rank: int, world_size: int, output_dir: str) -> dict:
    """The head trained with backward + step(); an AdamW state saved and continued (one group)."""
    return {"train": _train_head(rank, world_size, in_backward=False),
            "resume": _save_and_continue(rank, world_size, output_dir)}


def _on_three_ranks(rank: int, world_size: int, output_dir: str) -> dict:
    """The head trained with the update in the backward; the two ranks' checkpoint resumed."""
    return {"train": _train_head(rank, world_size, in_backward=True),
            "resume": _load_and_continue(rank, world_size, output_dir)}


@pytest.fixture(scope="module")
def on_ranks(tmp_path_factory):
    """Results of 2 and 3 gloo ranks (one process group each: spawning is the slow part)."""
    output_dir = str(tmp_path_factory.mktemp("adamw_checkpoints"))
    two = run_ranks(_on_two_ranks, 2, output_dir, timeout=300)
    return {2: two, 3: run_ranks(_on_three_ranks, 3, output_dir, timeout=300), "output_dir": output_dir}


@pytest.mark.parametrize("world_size", [2, 3])
def test_rows_sampled_at_different_rates_follow_the_float64_row_sparse_adamw(on_ranks, world_size):
    """Through the head (sampled softmax, ρ = 0.2; 2 ranks: backward + step(), 3 ranks: the update
    in the backward): each step's sampled rows take the update of a float64 reference written from
    the formulas, with each row's own step count in its bias correction; rows never sampled keep
    their initial values and zero state bit for bit."""
    per_rank = [result["train"] for result in on_ranks[world_size]]
    weight = init_centers(CLASSES, DIM, 0, CLASSES, SEED).double()
    exp_avg, exp_avg_sq = torch.zeros_like(weight), torch.zeros_like(weight)
    steps = torch.zeros(CLASSES, dtype=torch.int64)
    for step in range(STEPS):
        features, labels = _batch(step, world_size)
        rows = torch.cat([r["sampled"][step] for r in per_rank])
        subset = weight[rows].clone().requires_grad_()
        reference_loss(features.double(), torch.searchsorted(rows, labels), subset, _margin()).backward()
        reference_adamw_rows(weight, exp_avg, exp_avg_sq, steps, rows, subset.grad, **HYPER)

    counts = _assemble(per_rank, "row_steps")
    assert torch.equal(counts.long(), steps)
    assert all(counts[c] == STEPS for c in FREQUENT)
    assert {0, 1, 2} <= set(counts.tolist())          # some rows rarely sampled, some never
    assert relative_error(_assemble(per_rank, "weight"), weight) < 1e-5
    assert relative_error(_assemble(per_rank, "exp_avg"), exp_avg) < 1e-5
    assert relative_error(_assemble(per_rank, "exp_avg_sq"), exp_avg_sq) < 1e-5
    never = counts == 0
    assert torch.equal(_assemble(per_rank, "weight")[never], init_centers(CLASSES, DIM, 0, CLASSES, SEED)[never])
    assert not _assemble(per_rank, "exp_avg")[never].any() and not _assemble(per_rank, "exp_avg_sq")[never].any()
    assert all(r["updates"] == STEPS for r in per_rank)


@pytest.mark.parametrize("dim", [64, 6])
def test_a_dense_gradient_on_every_row_equals_torch_adamw_bit_for_bit(dim):
    torch.manual_seed(0)
    start = torch.randn(10, dim)
    mine, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ours = SparseRowAdamW([mine], lr=1e-2, weight_decay=0.1, chunk_rows=3)
    reference = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1)
    for step in range(5):
        grad = torch.randn_like(mine)
        mine.grad, theirs.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
        assert torch.equal(mine, theirs), step
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ours.state[mine][name], reference.state[theirs][name]), (step, name)
    assert ours.state[mine]["row_steps"].tolist() == [5] * 10


def test_the_update_in_the_backward_equals_backward_then_step():
    results = []
    for in_backward in (False, True):
        head = PartialFC(40, DIM, margin=_margin(), sample_rate=0.3, seed=SEED, chunk_rows=4)
        optimizer = head.adamw(**HYPER, update_in_backward=in_backward)
        for step in range(3):
            features, labels = _batch(step, 1)
            head.set_iteration(step)
            head(features, labels % 40).backward()
            optimizer.step()
            optimizer.zero_grad()
        results.append([head.weight.detach().clone(), *optimizer.row_states(head.weight).values()])
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def _constant_gradient_run(centers: torch.dtype, moments: torch.dtype, rounding: str, steps: int = 40):
    """``steps`` updates of 64 × 64 centers all at 1.5 (on the bf16 grid) by a gradient of 1 everywhere,
    lr 1e-4 (0.0128 of bf16's spacing 2⁻⁷ at 1.5); returns the optimizer and its parameter."""
    param = torch.nn.Parameter(torch.full((64, 64), 1.5, dtype=centers))
    optimizer = SparseRowAdamW([param], lr=1e-4, weight_decay=0.0, moment_dtype=moments, rounding=rounding, seed=3,
                               chunk_rows=16)
    for _ in range(steps):
        param.grad = torch.ones_like(param)
        optimizer.step()
    return optimizer, param


def test_narrow_centers_and_moments_round_stochastically_without_bias_and_nearest_loses_the_updates():
    """bf16 centers, fp32 moments: every step moves a center by lr·m̂/(sqrt(v̂) + eps) ≈ 1e-4, far
    below the spacing s = 2⁻⁷; stochastic rounding keeps the 40 steps on average (the mean over
    n = 4096 centers is within 6 standard deviations s·sqrt(T·p(1 − p)/n), p = lr/s), rounding to
    nearest loses all of them. bf16 moments: the mean of m and v over the centers is the exact
    value within 6 standard deviations (an unbiased error e_t of variance ≤ s²/4 per step,
    decayed by β^(T−t): variance ≤ s²/(4n(1 − β²)) for the mean)."""
    steps, lr, spacing, n = 40, 1e-4, 2.0 ** -7, 4096
    _, param = _constant_gradient_run(torch.bfloat16, torch.float32, "stochastic", steps)
    weight, first, second = torch.full((1, 1), 1.5, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64), \
        torch.zeros(1, 1, dtype=torch.float64)
    counts = torch.zeros(1, dtype=torch.int64)
    for _ in range(steps):
        reference_adamw_rows(weight, first, second, counts, torch.tensor([0]), torch.ones(1, 1, dtype=torch.float64),
                             lr, (0.9, 0.999), 1e-8, 0.0)
    moved, expected = param.double() - 1.5, float(weight) - 1.5
    p = lr / spacing
    assert abs(moved.mean().item() - expected) < 6 * spacing * math.sqrt(steps * p * (1 - p) / n)
    assert moved.std().item() > 0
    _, nearest = _constant_gradient_run(torch.bfloat16, torch.float32, "nearest", steps)
    assert torch.equal(nearest, torch.full_like(nearest, 1.5))

    optimizer, narrow = _constant_gradient_run(torch.bfloat16, torch.bfloat16, "stochastic", steps)
    for name, exact, beta in (("exp_avg", first, 0.9), ("exp_avg_sq", second, 0.999)):
        value, stored = float(exact), optimizer.state[narrow][name]
        state_spacing = 2.0 ** (math.floor(math.log2(value)) - 7)
        bound = 6 * state_spacing / (2 * math.sqrt(n * (1 - beta ** 2)))
        assert stored.dtype == torch.bfloat16
        assert abs(stored.double().mean().item() - value) < bound, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_skip_leaves_rows_moments_and_step_counts_unchanged_without_a_host_sync(dtype):
    from pfc.host_syncs import HostSyncCounter

    param = torch.nn.Parameter(torch.randn(12, 5).to(dtype))
    optimizer = SparseRowAdamW([param], lr=0.1, chunk_rows=5)
    param.grad = torch.randn(12, 5).to(dtype)
    optimizer.step()                                    # some state to keep
    before = [param.detach().clone(), *(t.clone() for t in optimizer.row_states(param).values())]
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
    after = [param.detach(), *optimizer.row_states(param).values()]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    optimizer.update_rows(param, rows, torch.randn(5, 5), skip=torch.tensor(False))   # not skipped: rows move
    assert not torch.equal(param[rows], before[0][rows])
    assert optimizer.state[param]["row_steps"][rows].tolist() == [2] * 5


def test_the_rollback_puts_back_rows_moments_and_step_counts():
    from pfc.train.rollback import StepRollback

    head = PartialFC(40, DIM, margin=_margin(), sample_rate=0.3, seed=3, chunk_rows=4, dtype=torch.bfloat16)
    optimizer = head.adamw(lr=0.01, update_in_backward=True)
    rollback = StepRollback(torch.nn.BatchNorm1d(4), head, optimizer, head_update_in_backward=True)
    for step, skip in enumerate((False, True, False, True)):
        before = [head.weight.detach().clone(), *(t.clone() for t in optimizer.row_states(head.weight).values())]
        rollback.begin()
        head.set_iteration(step)
        features, labels = _batch(step, 1)
        head(features, labels % 40).backward()
        rollback.restore(torch.tensor(skip))
        after = [head.weight.detach(), *optimizer.row_states(head.weight).values()]
        assert all(torch.equal(a, b) for a, b in zip(after, before)) == skip, step
    rollback.close()
    assert int(optimizer.state[head.weight]["row_steps"].max()) == 2   # two steps kept


def test_state_dict_round_trip_keeps_the_types_and_the_counts():
    param = torch.nn.Parameter(torch.randn(6, 4).to(torch.bfloat16))
    optimizer = SparseRowAdamW([param], lr=0.1, moment_dtype=torch.float32)
    param.grad = torch.sparse_coo_tensor(torch.tensor([[1, 4]]), torch.randn(2, 4).to(torch.bfloat16), param.shape)
    optimizer.step()
    restored = SparseRowAdamW([param], lr=0.3, moment_dtype=torch.float32)
    restored.load_state_dict(optimizer.state_dict())
    assert restored.param_groups[0]["lr"] == 0.1 and restored.updates == 1
    for name, tensor in optimizer.row_states(param).items():
        assert restored.state[param][name].dtype == tensor.dtype and torch.equal(restored.state[param][name], tensor)
    assert restored.state[param]["row_steps"].tolist() == [0, 1, 0, 0, 1, 0]


def test_bad_hyper_parameters_and_float16_moments_are_refused_by_name():
    param = torch.nn.Parameter(torch.zeros(2, 2))
    for options, message in [(dict(betas=(0.9, 1.0)), r"betas \(0.9, 1.0\) must be two numbers in \[0, 1\)"),
                             (dict(eps=0.0), "eps 0.0 must be > 0"), (dict(lr=-1.0), "learning rate -1.0"),
                             (dict(weight_decay=-0.1), "weight_decay -0.1 must be >= 0"),
                             (dict(moment_dtype=torch.float16), "second moment cannot be stored in float16")]:
        with pytest.raises(ValueError, match=message):
            SparseRowAdamW([param], **options)
    with pytest.raises(ValueError, match="float16"):
        SparseRowAdamW([torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float16))])


def test_config_chooses_the_centers_optimizer_its_lr_and_weight_decay_and_defaults_to_sgd():
    from pfc.errors import ConfigError
    from pfc.head.optim import SparseRowSGD
    from pfc.train.builders import build_head_optimizer
    from pfc.train.config import load_config

    def built(argv):
        config = load_config(None, ["--network", "tiny", "--embedding_size", "8", *argv])
        head = config.head.build(10, 8, seed=0)
        return build_head_optimizer(config, head, update_in_backward=False)

    default = built(["--lr", "0.2", "--weight_decay", "1e-3", "--momentum", "0.8"])
    assert type(default) is SparseRowSGD
    assert {k: default.param_groups[0][k] for k in ("lr", "weight_decay", "momentum")} == \
        dict(lr=0.2, weight_decay=1e-3, momentum=0.8)
    adamw = built(["--optimizer", "adamw", "--lr", "1e-3", "--weight_decay", "0.1", "--head.optimizer", "adamw"])
    assert type(adamw) is SparseRowAdamW
    group = adamw.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (1e-3, 0.1, (0.9, 0.999), 1e-8)
    own = built(["--head.optimizer", "adamw", "--head.lr", "0.01", "--head.weight_decay", "0",
                 "--head.betas", "0.8,0.95", "--head.eps", "1e-6", "--head.momentum_dtype", "fp32"])
    group = own.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (0.01, 0.0, (0.8, 0.95), 1e-6)
    sgd_own = built(["--head.lr", "0.5", "--head.weight_decay", "none"])
    assert (sgd_own.param_groups[0]["lr"], sgd_own.param_groups[0]["weight_decay"]) == (0.5, 5e-4)
    for argv, message in [(["--head.optimizer", "lamb"], "'head.optimizer': 'lamb' is not one of sgd, adamw"),
                          (["--head.optimizer", "adamw", "--head.center_dtype", "fp16"], "'head.momentum_dtype'"),
                          (["--head.optimizer", "adamw", "--head.betas", "0.9"], "'head.betas'"),
                          (["--head.lr", "0"], "'head.lr'"), (["--head.betas", "a,b"], "comma-separated numbers")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["--network", "tiny", *argv])


# ------------------------------------------------------------------ checkpoints across world sizes

RESUME_CLASSES, RESUME_DIM = 11, 4     # 11 % 2 != 0 and 11 % 3 != 0


def _adamw_state(seed: int = 0):
    from pfc.head.margins import ArcFace
    from pfc.train.runners.ddp import DDPRunner
    from pfc.train.state import TrainState

    head = PartialFC(RESUME_CLASSES, RESUME_DIM, margin=ArcFace(s=8.0, m=0.3), seed=seed)
    optimizer = head.adamw(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    backbone = torch.nn.Linear(3, RESUME_DIM)
    runner = DDPRunner(backbone, torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9), wrap=False)
    return TrainState(runner=runner, head=head, head_optimizer=optimizer, schedulers={})


def _global_adamw_state() -> dict:
    """Centers, moments and step counts 0–3 that differ row by row (moments 0 where the count is)."""
    generator = torch.Generator().manual_seed(3)
    counts = (torch.arange(RESUME_CLASSES) % 4).to(torch.int32)
    seen = (counts > 0).float()[:, None]
    return dict(weight=torch.randn(RESUME_CLASSES, RESUME_DIM, generator=generator),
                exp_avg=0.01 * torch.randn(RESUME_CLASSES, RESUME_DIM, generator=generator) * seen,
                exp_avg_sq=1e-4 * torch.rand(RESUME_CLASSES, RESUME_DIM, generator=generator) * seen,
                row_steps=counts)


def _view(state) -> dict:
    head, optimizer = state.head, state.head_optimizer
    return {"class_start": head.class_start, "weight": head.weight.detach().clone(),
            **{name: tensor.clone() for name, tensor in optimizer.row_states(head.weight).items()}}


def _continue(state, rank: int, world_size: int, steps: int = 2) -> dict:
    """``steps`` steps of the head (ρ = 1) on fixed global batches split over the ranks."""
    for step in range(steps):
        generator = torch.Generator().manual_seed(50 + step)
        features = torch.randn(6, RESUME_DIM, generator=generator)
        labels = torch.tensor([0, 5, 6, 10, 3, 7])          # on both sides of every shard boundary
        rows = slice(rank * 6 // world_size, (rank + 1) * 6 // world_size)
        state.head(features[rows], labels[rows]).backward()
        state.head_optimizer.step()
        state.head_optimizer.zero_grad()
    return _view(state)


def _save_and_continue(rank: int, world_size: int, output_dir: str) -> dict:
    from pfc.train.checkpoint import save_checkpoint

    state = _adamw_state()
    rows = slice(state.head.class_start, state.head.class_start + state.head.num_local)
    with torch.no_grad():
        for name, value in _global_adamw_state().items():
            target = state.head.weight if name == "weight" else state.head_optimizer.state[state.head.weight][name]
            target.copy_(value[rows])
    state.head_optimizer.updates, state.step = 7, 3
    state.runner.model(torch.ones(2, 3)).sum().backward()   # the backbone's optimizer gets a state to save
    state.runner.optimizer.step()
    save_checkpoint(output_dir, state)
    return _continue(state, rank, world_size)


def _load_and_continue(rank: int, world_size: int, output_dir: str) -> dict:
    from pfc.train.checkpoint import find_latest, load_checkpoint

    state = _adamw_state(seed=9)
    load_checkpoint(find_latest(output_dir), state)
    return {"loaded": _view(state), "updates": state.head_optimizer.updates,
            "continued": _continue(state, rank, world_size)}


def test_adamw_state_saved_by_two_ranks_resumes_on_three_and_one_as_the_uninterrupted_run(on_ranks):
    from pfc.train.checkpoint import find_latest, load_checkpoint, read_checkpoint_tensors

    output_dir = on_ranks["output_dir"]
    straight = [result["resume"] for result in on_ranks[2]]
    expected = {key: _assemble(straight, key) for key in ("weight", "exp_avg", "exp_avg_sq", "row_steps")}
    assert torch.equal(expected["row_steps"], _global_adamw_state()["row_steps"] + 2)
    saved = read_checkpoint_tensors(find_latest(output_dir))
    assert saved["head_optimizer.state.0.row_steps"].dtype == torch.int32

    on_three = [result["resume"] for result in on_ranks[3]]
    single = _adamw_state(seed=9)                   # one process, no process group
    load_checkpoint(find_latest(output_dir), single)
    on_one = [{"loaded": _view(single), "updates": single.head_optimizer.updates,
               "continued": _continue(single, 0, 1)}]
    for resumed in (on_three, on_one):
        assert all(r["updates"] == 7 for r in resumed)
        loaded = [r["loaded"] for r in resumed]
        for key, value in _global_adamw_state().items():
            assert torch.equal(_assemble(loaded, key), value), key
        continued = [r["continued"] for r in resumed]
        assert torch.equal(_assemble(continued, "row_steps"), expected["row_steps"])
        for key in ("weight", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(_assemble(continued, key), expected[key], rtol=1e-5, atol=1e-7)


def test_a_state_saved_by_the_other_center_optimizer_is_refused_by_name():
    param = torch.nn.Parameter(torch.randn(4, 3))
    sgd = PartialFC(4, 3).optimizer(lr=0.1)
    with pytest.raises(ValueError, match="holds momentum_buffer, not exp_avg, exp_avg_sq, row_steps"):
        SparseRowAdamW([param]).load_state_dict(sgd.state_dict())


def test_a_loss_scaled_gradient_with_its_unscale_gives_the_unscaled_update_bit_for_bit():
    """fp16 loss scaling: ``grad_unscale`` multiplies the gradient in fp32 inside the update (a
    power of two: exact), so the moments see the true gradient, not 1024 times it."""
    start, grad = torch.randn(6, 8), torch.randn(6, 8)
    results = []
    for scale in (1.0, 1024.0):
        param = torch.nn.Parameter(start.clone())
        optimizer = SparseRowAdamW([param], lr=0.01, weight_decay=0.1)
        optimizer.grad_unscale = None if scale == 1.0 else torch.tensor(1 / scale)
        param.grad = grad * scale
        optimizer.step()
        results.append([param.detach().clone(), *optimizer.row_states(param).values()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_the_trainer_trains_and_resumes_with_adamw_centers_in_the_backward_and_by_step(tmp_path, monkeypatch):
    """``--head.optimizer adamw`` end to end in one process: the update in the backward
    (grad_accumulation 1) and by ``step()`` (accumulation 2), a checkpoint and its resume."""
    from pfc.train import loop
    from tests.train_fixtures import make_config, write_shards

    data = write_shards(str(tmp_path / "data"), num_classes=6, per_class=4)
    head = {"head.optimizer": "adamw", "head.lr": 0.01, "head.weight_decay": 0.05, "optimizer": "adamw",
            "lr": 1e-3, "save_every": 2, "max_steps": 2, "warmup_steps": 0}
    seen = []
    original = loop.build_train_state

    def build(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(loop, "build_train_state", build)
    for accumulation in (1, 2):
        output = str(tmp_path / f"run{accumulation}")
        first = loop.train(make_config(data, output, grad_accumulation=accumulation, **head))
        again = loop.train(make_config(data, output, grad_accumulation=accumulation, resume="auto",
                                       **{**head, "max_steps": 3}))
        assert first.steps == 2 and again.steps == 3 and math.isfinite(again.final_loss)
    assert len(seen) == 4
    for state in seen:
        assert type(state.head_optimizer) is SparseRowAdamW
        assert state.head_optimizer.param_groups[0]["weight_decay"] == 0.05
        assert int(state.head_optimizer.state[state.head.weight]["row_steps"].max()) >= 2
