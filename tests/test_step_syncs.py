"""A steady-state training step makes no host synchronisation: the real trainer on 2 gloo ranks,
every step counted by :class:`pfc.host_syncs.HostSyncCounter` (on a CPU run every tensor counts
as a device tensor, so each count would stall a GPU's stream).

A step's count runs from one ``train_step`` call to the next: the step itself and the loop's work
after it (metrics, reviews, the next epoch's loader). The run's first step (the head validates
its inputs collectively) and log steps (the metrics and the guard's counts are read) may read
values; every other step must read none.

The head is issue 12's (``step_stats``, ``check_inputs``, one gather). Until its center optimizer
lands (a SparseRowSGD that skips on ``found_inf``, branch center-dtype), that optimizer's reads are
excluded here (``CENTER_OPTIMIZER_SITES``); with it every site but the loader's host tensors
(``HOST_BY_DESIGN``) must count 0 (checked with center-dtype merged).
"""
from __future__ import annotations

import functools
import math

import pytest

from tests.distributed import run_ranks
from tests.train_fixtures import make_config, write_shards

LOG_EVERY, STEPS = 4, 10   # 6 steps per epoch at grad_accumulation 2: the run crosses an epoch


@functools.cache
def center_optimizer_skips_on_device() -> bool:
    """Whether the head's SparseRowSGD takes ``found_inf`` (issue 12's center optimizer)."""
    import torch

    from pfc.head.optim import SparseRowSGD
    from pfc.train.runners.ddp import skips_on_device

    return skips_on_device(SparseRowSGD([torch.nn.Parameter(torch.zeros(1, 1))], lr=0.1))


# The loader's own host tensors (numpy views of its shared-memory pixel buffers, the CPU run's list
# of flipped images, DataLoader's seed at an epoch's start) are on the host by design: on a GPU none
# of them waits for the device. Their reads are not device syncs.
HOST_BY_DESIGN = ("at data/loader.py",)
# Until the center optimizer of issue 12 (branch center-dtype): its own reads (the update in the
# backward's loss check) and the host read of the mask in masked_step (stored gradients).
CENTER_OPTIMIZER_SITES = ("at head/optim.py", "at head/row_optimizer.py", "at train/runners/ddp.py")


def tolerated(site: str) -> bool:
    """A read that is not a device sync, or one issue 12's center optimizer removes (none once it is here)."""
    if any(part in site for part in HOST_BY_DESIGN):
        return True
    return not center_optimizer_skips_on_device() and any(part in site for part in CENTER_OPTIMIZER_SITES)


def counted_run(rank: int, world_size: int, data: str, output: str, overrides: dict) -> list[dict]:
    """Train with every step's host reads counted; returns one record per step."""
    from pfc.host_syncs import HostSyncCounter
    from pfc.train import loop

    steps, counter = [], HostSyncCounter()
    original_step, original_run = loop.train_step, loop._run

    def train_step(state, *args, **kwargs):
        steps.append({"step": state.step + 1, "sites": dict(counter.sites)})  # what came before this call
        return original_step(state, *args, **kwargs)

    def run(*args, **kwargs):
        with counter:
            result = original_run(*args, **kwargs)
        steps.append({"step": None, "sites": dict(counter.sites)})
        return result

    loop.train_step, loop._run = train_step, run
    try:
        loop.train(make_config(data, output, log_every=LOG_EVERY, max_steps=STEPS, save_every=0,
                               save_every_minutes=0, val_pairs="", **overrides))
    finally:
        loop.train_step, loop._run = original_step, original_run
    per_step = []
    for before, after in zip(steps, steps[1:]):
        sites = {site: count - before["sites"].get(site, 0) for site, count in after["sites"].items()
                 if count > before["sites"].get(site, 0)}
        per_step.append({"step": before["step"], "sites": sites})
    return per_step


FROZEN = 6   # the "frozen" run: steps 1-6 train the head only (fine-tuning), 7-10 everything


def both_runs(rank: int, world_size: int, data: str, output: str) -> dict:
    """The update of the centers inside the head's backward (grad_accumulation 1, the default
    path), the stored-gradient path (grad_accumulation 2, as with fp16 or DeepSpeed), and the
    first path with a frozen backbone for the first steps (``--freeze_backbone_steps``)."""
    runs = {accumulation: counted_run(rank, world_size, data, f"{output}/{accumulation}",
                                      {"grad_accumulation": accumulation})
            for accumulation in (1, 2)}
    runs["frozen"] = counted_run(rank, world_size, data, f"{output}/frozen",
                                 {"grad_accumulation": 1, "backbone.freeze_steps": FROZEN})
    return runs


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    data = write_shards(str(tmp_path_factory.mktemp("shards")), num_classes=12, per_class=8, image_size=16)
    return run_ranks(both_runs, 2, data, str(tmp_path_factory.mktemp("runs")), timeout=300)


@pytest.mark.parametrize("accumulation", [1, 2, "frozen"])
def test_a_steady_state_step_reads_no_device_value(counted, accumulation):
    for rank_steps in counted:
        steps = rank_steps[accumulation]
        assert [record["step"] for record in steps] == list(range(1, STEPS + 1))
        for record in steps:
            step, sites = record["step"], record["sites"]
            if step == 1 or step % LOG_EVERY == 0 or step == STEPS:
                continue                                   # the first step and log steps may read
            unexpected = {site: count for site, count in sites.items() if not tolerated(site)}
            assert not unexpected, f"step {step} synchronised with the device: {unexpected}"


def test_log_steps_read_the_metrics(counted):
    """The counter sees the reads that are allowed: a log step reads the summed metrics."""
    for rank_steps in counted:
        log_step = next(record for record in rank_steps[1] if record["step"] == LOG_EVERY)
        assert any("train/metrics.py" in site for site in log_step["sites"]), log_step


# ---------------------------------------------------------------------------------------------
# The pieces of the device-side guard, in one process

def tiny_runner(optimizer_name: str = "sgd", scaler=None, in_backward: bool = False):
    import torch

    from pfc.head.partial_fc import PartialFC
    from pfc.train.runners.ddp import DDPRunner

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8))
    if optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, fused=True)
    runner = DDPRunner(model, optimizer, grad_clip=1.0, grad_scaler=scaler, wrap=False)
    head = PartialFC(11, 8, sample_rate=0.5)
    head_optimizer = head.optimizer(lr=0.1, update_in_backward=in_backward and runner.head_update_in_backward)
    return runner, head, head_optimizer


def snapshot(runner, head, head_optimizer, optimizer_state: bool = True) -> list:
    """Copies of the backbone's state, the centers, their momentum and (``optimizer_state``) the
    backbone optimizer's state."""
    import torch

    optimizers = (head_optimizer, runner.optimizer) if optimizer_state else (head_optimizer,)
    state = [value for optimizer in optimizers for per_param in optimizer.state.values()
             for value in per_param.values() if isinstance(value, torch.Tensor)]
    return [tensor.detach().clone() for tensor in [*runner.model.state_dict().values(), head.weight, *state]]


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_a_masked_step_changes_nothing_and_the_next_step_is_a_first_step(optimizer_name):
    """found_inf = 1 on the first step: weights, optimizer states (fused SGD's momentum included,
    primed with zeros) unchanged; the next, finite step equals an unskipped first step."""
    import torch

    inputs = torch.randn(4, 6), torch.randint(0, 11, (4,))
    skipped = tiny_runner(optimizer_name)
    before = snapshot(*skipped, optimizer_state=False)   # AdamW makes its (zero) state at its first step
    skipped[0].forward_backward(*inputs, skipped[1], True)
    assert not bool(skipped[0].step(skipped[2], torch.tensor(1.0)))
    skipped[0].model.load_state_dict(dict(zip(skipped[0].model.state_dict(), before)))  # BN: the rollback's job
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(*skipped, optimizer_state=False)))
    straight = tiny_runner(optimizer_name)
    for runner, head, head_optimizer in (skipped, straight):
        head.set_iteration(0)                                     # the same sample of centers
        runner.forward_backward(*inputs, head, True)
        runner.gradients_finite()
        assert bool(runner.step(head_optimizer, torch.tensor(0.0)))
    assert all(torch.equal(a, b) for a, b in zip(snapshot(*straight), snapshot(*skipped)))


def test_fp16_scaling_skips_an_overflow_on_the_device_and_backs_off():
    import torch

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    runner, head, head_optimizer = tiny_runner(scaler=scaler)
    inputs = torch.randn(4, 6), torch.randint(0, 11, (4,))
    runner.forward_backward(*inputs, head, True)
    assert runner.gradients_finite() is None                     # the scaler's to check
    weights = [p.detach().clone() for p in runner.model.parameters()] + [head.weight.detach().clone()]
    next(runner.model.parameters()).grad[0, 0] = math.inf       # an fp16 overflow
    assert not bool(runner.step(head_optimizer, torch.tensor(0.0)))
    assert all(torch.equal(a, b) for a, b in zip(weights, [*runner.model.parameters(), head.weight]))
    assert scaler.get_scale() == 2.0 ** 7
    runner.forward_backward(*inputs, head, True)
    assert bool(runner.step(head_optimizer, torch.tensor(0.0)))
    assert not torch.equal(weights[0], next(runner.model.parameters()))


def test_the_rollback_restores_under_the_device_mask_only():
    """Skipped: everything as before the step. Kept: everything as a step without any rollback
    (the centers' rows updated in the backward included, bit for bit)."""
    import torch

    from pfc.train.rollback import StepRollback

    runner, head, head_optimizer = tiny_runner(in_backward=True)
    twin = tiny_runner(in_backward=True)                          # the same step, no rollback
    rollback = StepRollback(runner.model, head, head_optimizer, head_update_in_backward=True)
    inputs = torch.randn(4, 6), torch.randint(0, 11, (4,))
    for skip in (True, False, False):
        before = snapshot(runner, head, head_optimizer)
        rollback.begin()
        head.set_iteration(0)
        runner.forward_backward(*inputs, head, True)             # moves BN statistics and the sampled centers
        runner.step(head_optimizer, torch.tensor(float(skip)))
        rollback.restore(torch.tensor(skip))
        after = snapshot(runner, head, head_optimizer)
        if skip:
            assert all(torch.equal(a, b) for a, b in zip(before, after))
            continue
        twin[1].set_iteration(0)
        twin[0].forward_backward(*inputs, twin[1], True)
        twin[0].step(twin[2], torch.tensor(0.0))
        assert all(torch.equal(a, b) for a, b in zip(snapshot(*twin), after))
        assert not torch.equal(before[7], after[7])               # the centers moved
    rollback.close()
