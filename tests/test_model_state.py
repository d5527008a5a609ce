"""A skipped step leaves the whole model state as it was, and nothing non-finite is saved as good.

2 gloo ranks, the tiny network (BatchNorm everywhere) on the small shard set. A step is skipped
when the loss or a backbone gradient is not finite on any rank; the NaN is injected on rank 1 only.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch

from tests.data_fixtures import jpeg
from tests.distributed import run_ranks
from tests.train_fixtures import make_config, write_shards

NAN_STEP = 4       # the bad step of the full run
BAD_STEP = 1       # the bad step of the short runs (after one good step: momentum and statistics moved)


def write_pairs(root: str, num_classes: int = 12, per_class: int = 4, image_size: int = 16, num_pairs: int = 40,
                seed: int = 5) -> str:
    """A pairs list over images drawn like :func:`write_shards`' (a grey level per class): half
    same-class pairs, half different-class; returns the list's path."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    names = {}
    for label in range(num_classes):
        for number in range(per_class):
            pixels = np.full((image_size, image_size, 3), 20 * (label % 12), dtype=np.uint8)
            pixels += rng.integers(0, 40, size=pixels.shape, dtype=np.uint8)
            name = f"{label}_{number}.jpg"
            with open(os.path.join(root, name), "wb") as handle:
                handle.write(jpeg(pixels))
            names.setdefault(label, []).append(name)
    lines = []
    for pair in range(num_pairs):
        label = pair % num_classes
        if pair % 2 == 0:
            lines.append(f"{names[label][0]} {names[label][1 + pair % (per_class - 1)]} 1")
        else:
            lines.append(f"{names[label][0]} {names[(label + 5) % num_classes][pair % per_class]} 0")
    path = os.path.join(root, "pairs.txt")
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("shards")), num_classes=12, per_class=8, image_size=16)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(str(tmp_path_factory.mktemp("val")))


def bad_step_runs(rank: int, world_size: int, data: str, output: str) -> dict:
    """Runs with a checkpoint after every step and one bad step BAD_STEP on rank 1: a NaN forward
    (with and without gradient accumulation), or a NaN only in the gradient of one backbone weight
    (the loss finite on every rank, so the head has updated its rows inside its backward)."""
    from pfc.train import loop
    from pfc.train.runners.ddp import DDPRunner

    original = DDPRunner.forward_backward

    def bad_step(case):
        def forward_backward(self, images, labels, head, last_micro):
            if head.iteration != BAD_STEP or rank != 1:
                return original(self, images, labels, head, last_micro)
            if case == "nan forward":
                return original(self, images * math.nan, labels, head, last_micro)
            hook = next(self.model.parameters()).register_hook(lambda grad: grad * math.nan)
            try:
                return original(self, images, labels, head, last_micro)
            finally:
                hook.remove()
        return forward_backward

    results = {}
    for case, accumulation in (("nan forward", 1), ("nan forward", 2), ("nan backbone gradient", 1)):
        name = f"{case}, accumulation {accumulation}"
        DDPRunner.forward_backward = bad_step(case)
        try:
            result = loop.train(make_config(data, os.path.join(output, name), max_steps=BAD_STEP + 1, save_every=1,
                                            warmup_steps=0, grad_accumulation=accumulation, val_pairs=""))
        finally:
            DDPRunner.forward_backward = original
        results[name] = dataclasses.asdict(result)
    return results


def test_a_skipped_step_leaves_the_whole_model_state_as_it_was(shard_set, tmp_path):
    """The checkpoints before and after the skipped step hold the same parameters, BatchNorm
    running mean/var and num_batches_tracked, both optimizers' state and the centers with their
    momentum, bit for bit (before: the running statistics moved, to NaN on the bad rank). With a
    NaN only in one rank's backbone gradient the loss is finite everywhere and the head updates
    its sampled rows inside its backward: the step is still skipped on both ranks (before: the
    NaN gradient was averaged into every rank's weights) and the rows are put back."""
    from pfc.train.checkpoint import checkpoint_path, read_checkpoint_tensors

    results = run_ranks(bad_step_runs, 2, shard_set, str(tmp_path), timeout=300)
    for name in results[0]:
        assert [by_run[name]["skipped_steps"] for by_run in results] == [1, 1], name
        before = read_checkpoint_tensors(checkpoint_path(str(tmp_path / name), BAD_STEP))
        after = read_checkpoint_tensors(checkpoint_path(str(tmp_path / name), BAD_STEP + 1))
        keys = [key for key in before if not key.startswith("rng.")]
        assert any("running_var" in k for k in keys) and any("num_batches_tracked" in k for k in keys)
        assert {"head.weight", "head_optimizer.state.0.momentum_buffer"} <= set(keys)
        assert any(k.startswith("backbone_optimizer.state.") for k in keys)
        assert [k for k in keys if not torch.equal(before[k], after[k])] == [], name
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        loss = next(r["loss"] for r in records if r["step"] == BAD_STEP + 1)
        assert math.isfinite(loss) == (name == "nan backbone gradient, accumulation 1"), (name, loss)


def nan_run_and_reference(rank: int, world_size: int, data: str, pairs: str, injected: str, reference: str) -> dict:
    """The same run twice: with a NaN forward at step NAN_STEP on rank 1, and with step NAN_STEP
    not run at all on any rank (its batches consumed, the network and the head never called)."""
    from pfc.train import loop
    from pfc.train.runners.ddp import DDPRunner

    original = DDPRunner.forward_backward

    def nan_forward(self, images, labels, head, last_micro):
        if head.iteration == NAN_STEP and rank == 1:
            images = images * math.nan
        return original(self, images, labels, head, last_micro)

    def never_run(self, images, labels, head, last_micro):
        if head.iteration == NAN_STEP:
            return torch.tensor(math.nan)
        return original(self, images, labels, head, last_micro)

    results = {}
    for name, forward_backward, output in (("injected", nan_forward, injected), ("reference", never_run, reference)):
        DDPRunner.forward_backward = forward_backward
        try:
            results[name] = dataclasses.asdict(loop.train(make_config(data, output, val_pairs=pairs, max_steps=12)))
        finally:
            DDPRunner.forward_backward = original
    return results


def test_a_nan_forward_on_one_rank_equals_never_running_that_step(shard_set, pairs, tmp_path):
    """One NaN forward at step 4 on rank 1: the run ends with the weights and BatchNorm statistics
    of the same run in which step 4 never ran (bit for bit: finite), and verifies well above
    chance (before: every running statistic NaN, accuracy 0.5000 ± 0.0000)."""
    injected, reference = tmp_path / "injected", tmp_path / "reference"
    results = run_ranks(nan_run_and_reference, 2, shard_set, pairs, str(injected), str(reference), timeout=300)
    for result in results:
        assert result["injected"]["skipped_steps"] == result["reference"]["skipped_steps"] == 1
    saved = torch.load(injected / "backbone.pt", weights_only=True)["state_dict"]
    expected = torch.load(reference / "backbone.pt", weights_only=True)["state_dict"]
    assert any("running_var" in key for key in saved)
    for key, value in saved.items():
        assert torch.equal(value, expected[key]), key
        assert not value.is_floating_point() or bool(torch.isfinite(value).all()), key
    final = results[0]["injected"]["eval"][0]
    assert final["accuracy"] >= 0.9 and final["accuracy"] == results[0]["reference"]["eval"][0]["accuracy"]


def diverging_runs(rank: int, world_size: int, data: str, output: str) -> dict:
    """Runs that diverge: what each raised, per rank. "inf center" puts an inf into a center of
    rank 1 before step 3, as an applied step with a huge update would."""
    from pfc.head.partial_fc import PartialFC
    from pfc.train import loop

    runs = {"lr 1e6": dict(lr=1e6, save_every=2, max_nonfinite_skips=3),
            "inf center": dict(save_every=1, max_nonfinite_skips=3),
            "lr 1e38, no checkpoints, no stop": dict(lr=1e38, save_every=0, save_every_minutes=0,
                                                     max_nonfinite_skips=0)}
    original = PartialFC.set_iteration

    def set_iteration(self, iteration):
        if iteration == 3 and rank == 1:
            with torch.no_grad():
                self.weight[0, 0] = math.inf
        original(self, iteration)

    errors = {}
    for name, overrides in runs.items():
        PartialFC.set_iteration = set_iteration if name == "inf center" else original
        try:
            loop.train(make_config(data, os.path.join(output, name), val_pairs="", warmup_steps=0, **overrides))
            errors[name] = None
        except Exception as exc:
            errors[name] = (type(exc).__name__, str(exc))
        finally:
            PartialFC.set_iteration = original
    return errors


def test_a_diverged_run_never_saves_a_non_finite_state(shard_set, tmp_path):
    """--lr 1e6: the checkpoint called "the last good state" is finite (before: NaN running
    statistics); an inf center on one rank: the next save is refused on every rank with a clear
    error naming the rank and the tensor, and the earlier checkpoints stay; --lr 1e38 without
    checkpoints: the final save of backbone.pt refuses the non-finite model likewise."""
    from pfc.train.checkpoint import list_checkpoints, read_checkpoint_tensors

    results = run_ranks(diverging_runs, 2, shard_set, str(tmp_path), timeout=300)
    for rank, errors in enumerate(results):
        kind, message = errors["lr 1e6"]
        assert kind == "NonFiniteLossError" and "the last good state is in the checkpoint" in message
        for name in ("inf center", "lr 1e38, no checkpoints, no stop"):
            kind, message = errors[name]
            assert kind == "NonFiniteStateError", (rank, name, message)
            assert "inf/NaN in head.weight" in message and "refusing to save a non-finite model" in message
        assert ("the finiteness check before saving the checkpoint of step 4 failed on rank 1: inf/NaN in head.weight"
                in errors["inf center"][1])
        assert "before the final save of backbone.pt" in errors["lr 1e38, no checkpoints, no stop"][1]
    assert list_checkpoints(str(tmp_path / "lr 1e6"))
    assert len(list_checkpoints(str(tmp_path / "inf center"))) == 3   # steps 1-3, written before the inf
    for name in ("lr 1e6", "inf center"):
        for checkpoint in list_checkpoints(str(tmp_path / name)):
            tensors = read_checkpoint_tensors(checkpoint)
            bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
            assert bad == [], (checkpoint, bad)
    assert not (tmp_path / "lr 1e38, no checkpoints, no stop" / "backbone.pt").exists()
