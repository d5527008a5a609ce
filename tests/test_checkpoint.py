"""Checkpoint save/load: resharding N → M ranks with C % N != 0, atomicity, corruption, safe loading."""
from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from pfc.train.checkpoint import (
    CheckpointError,
    checkpoint_path,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint_tensors,
    select_checkpoint,
    save_checkpoint,
    validate_checkpoint,
)
from pfc.head.partial_fc import PartialFC
from pfc.train.checkpoint.store import file_checksum
from pfc.head.margins import ArcFace
from pfc.train.runners.ddp import DDPRunner
from pfc.train.state import TrainState
from tests.distributed import run_ranks

NUM_CLASSES, EMBEDDING = 11, 4      # 11 % 2 != 0 and 11 % 3 != 0


def global_matrices(version: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full center matrix and its momentum at checkpoint ``version`` (distinct rows, exact floats)."""
    base = torch.arange(NUM_CLASSES * EMBEDDING, dtype=torch.float32).reshape(NUM_CLASSES, EMBEDDING)
    return base * version + 0.25, -base * version - 0.5


def build_state(num_classes: int = NUM_CLASSES, embedding: int = EMBEDDING, seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    head = PartialFC(num_classes, embedding, margin=ArcFace(s=8.0, m=0.3), seed=seed)
    head_optimizer = head.optimizer(lr=0.1)
    backbone = torch.nn.Linear(3, embedding)
    backbone_optimizer = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(backbone_optimizer, step_size=2, gamma=0.5)
    runner = DDPRunner(backbone, backbone_optimizer, wrap=False)   # the test averages nothing: one batch per rank
    return TrainState(runner=runner, head=head, head_optimizer=head_optimizer, schedulers={"backbone": scheduler})


def set_version(state: TrainState, version: int) -> None:
    """Put global matrix ``version`` into this rank's rows; one optimizer step on the backbone."""
    head = state.head
    weight, momentum = global_matrices(version)
    rows = slice(head.class_start, head.class_start + head.num_local)
    with torch.no_grad():
        head.weight.copy_(weight[rows])
    state.head_optimizer.state[head.weight]["momentum_buffer"].copy_(momentum[rows])
    state.runner.model(torch.full((2, 3), float(version))).sum().backward()
    state.runner.optimizer.step()
    state.schedulers["backbone"].step()
    state.step, state.epoch, state.batch_in_epoch = version, 0, version


def local_view(state: TrainState) -> dict:
    head = state.head
    return {
        "class_start": head.class_start,
        "weight": head.weight.detach().clone(),
        "momentum": state.head_optimizer.state[head.weight]["momentum_buffer"].clone(),
        "backbone": {k: v.clone() for k, v in state.runner.model.state_dict().items()},
        "backbone_momentum": [state.runner.optimizer.state[p]["momentum_buffer"].clone()
                              for p in state.runner.model.parameters()],
        "lr": state.runner.optimizer.param_groups[0]["lr"],
        "scheduler": state.schedulers["backbone"].state_dict(),
    }


GLOBAL_BATCH = 6   # divisible by 1, 2 and 3 ranks


def next_step_loss(state: TrainState, rank: int, world_size: int) -> float:
    """Loss of one more step on a fixed global batch, split evenly over the ranks."""
    generator = torch.Generator().manual_seed(123)
    inputs = torch.randn(GLOBAL_BATCH, 3, generator=generator)
    labels = torch.tensor([0, 5, 6, 10, 3, 7])        # on both sides of every shard boundary
    rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    with torch.no_grad():
        return float(state.head(state.runner.model(inputs[rows]), labels[rows]))


def random_draws() -> tuple:
    return torch.rand(3).tolist(), float(np.random.rand()), random.random()


def save_on_ranks(rank: int, world_size: int, output_dir: str) -> dict:
    state = build_state()
    for version in (1, 2, 3):
        set_version(state, version)
        save_checkpoint(output_dir, state, keep_last=2)
    saved = local_view(state)
    saved["next_loss"] = next_step_loss(state, rank, world_size)
    after_save = random_draws()
    info = load_checkpoint(checkpoint_path(output_dir, 3), state)
    return {"saved": saved, "after_save": after_save, "after_load": random_draws(),
            "rng_restored": info.rng_restored, "checkpoints": [p.name for p in list_checkpoints(output_dir)]}


def load_on_ranks(rank: int, world_size: int, output_dir: str) -> dict:
    wrong = build_state(num_classes=NUM_CLASSES + 1)
    try:
        load_checkpoint(find_latest(output_dir), wrong)
        wrong_error = None
    except CheckpointError as exc:
        wrong_error = str(exc)
    state = build_state(seed=7)
    info = load_checkpoint(find_latest(output_dir), state)
    return {"view": local_view(state), "next_loss": next_step_loss(state, rank, world_size), "step": info.step,
            "progress": info.progress, "rng_restored": info.rng_restored, "wrong_error": wrong_error}


def assemble(views: list[dict], key: str) -> torch.Tensor:
    return torch.cat([view[key] for view in sorted(views, key=lambda v: v["class_start"])])


def test_reshard_two_ranks_to_one_and_three(tmp_path):
    output_dir = str(tmp_path)
    saved = run_ranks(save_on_ranks, 2, output_dir)
    weight, momentum = global_matrices(3)
    assert torch.equal(assemble([r["saved"] for r in saved], "weight"), weight)
    assert saved[0]["checkpoints"] == ["checkpoint-00000002", "checkpoint-00000003"]   # keep_last=2
    for result in saved:   # same world size: every RNG continues exactly
        assert result["rng_restored"] and result["after_load"] == result["after_save"]

    loaded = run_ranks(load_on_ranks, 3, output_dir)
    views = [r["view"] for r in loaded]
    assert [v["weight"].shape[0] for v in sorted(views, key=lambda v: v["class_start"])] == [4, 4, 3]
    assert torch.equal(assemble(views, "weight"), weight)
    assert torch.equal(assemble(views, "momentum"), momentum)
    for result in loaded:
        assert result["step"] == 3 and result["progress"]["batch_in_epoch"] == 3
        assert not result["rng_restored"]
        assert result["next_loss"] == pytest.approx(saved[0]["saved"]["next_loss"], rel=1e-6)
        assert "num_classes=11 but the model has num_classes=12" in result["wrong_error"]
        for key in ("backbone", "backbone_momentum", "lr", "scheduler"):
            expected, actual = saved[0]["saved"][key], result["view"][key]
            if key == "backbone":
                assert all(torch.equal(expected[k], actual[k]) for k in expected)
            elif key == "backbone_momentum":
                assert all(torch.equal(e, a) for e, a in zip(expected, actual))
            else:
                assert actual == expected

    tensors = read_checkpoint_tensors(find_latest(output_dir))
    assert torch.equal(tensors["head.weight"], weight)
    assert torch.equal(tensors["head_optimizer.state.0.momentum_buffer"], momentum)

    single = build_state(seed=5)              # one process, no process group
    load_checkpoint(find_latest(output_dir), single)
    assert torch.equal(single.head.weight.detach(), weight)
    assert torch.equal(single.head_optimizer.state[single.head.weight]["momentum_buffer"], momentum)
    assert next_step_loss(single, 0, 1) == pytest.approx(saved[0]["saved"]["next_loss"], rel=1e-6)


def test_truncated_checkpoint_is_detected_and_auto_falls_back(tmp_path):
    state = build_state()
    for version in (1, 2):
        set_version(state, version)
        save_checkpoint(tmp_path, state)
    (tmp_path / ".tmp-checkpoint-00000009").mkdir()              # an interrupted save
    (tmp_path / "checkpoint-00000008" / "state").mkdir(parents=True)   # a directory with no manifest
    newest = checkpoint_path(tmp_path, 2)
    data_file = next((newest / "state").glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:-10])

    with pytest.raises(CheckpointError, match=r"distcp has \d+ bytes, expected \d+ \(truncated\?\)"):
        validate_checkpoint(newest)
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(newest, build_state())
    with pytest.raises(CheckpointError, match="truncated"):
        select_checkpoint(str(newest), tmp_path)
    assert find_latest(tmp_path) == checkpoint_path(tmp_path, 1)
    assert select_checkpoint("", tmp_path) is None
    assert select_checkpoint("auto", tmp_path / "empty") is None

    fresh = build_state(seed=3)
    info = load_checkpoint(find_latest(tmp_path), fresh)
    assert info.step == 1 and torch.equal(fresh.head.weight.detach(), global_matrices(1)[0])

    # a later save with the same step as an incomplete directory replaces it
    set_version(state, 8)
    save_checkpoint(tmp_path, state, keep_last=5)
    assert find_latest(tmp_path) == checkpoint_path(tmp_path, 8)
    assert select_checkpoint("auto", tmp_path) == checkpoint_path(tmp_path, 8)
    # what auto skipped on its way is set aside, never chosen again
    set_version(state, 9)
    save_checkpoint(tmp_path, state, keep_last=5)
    damaged = checkpoint_path(tmp_path, 9) / "state" / "__0_0.distcp"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    assert select_checkpoint("auto", tmp_path) == checkpoint_path(tmp_path, 8)
    assert (tmp_path / "checkpoint-00000009.damaged").is_dir() and not checkpoint_path(tmp_path, 9).exists()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_loading_refuses_arbitrary_pickles(tmp_path):
    state = build_state()
    set_version(state, 1)
    path = save_checkpoint(tmp_path, state)
    manifest = json.loads((path / "pfc_checkpoint.json").read_text())
    metadata = path / "state" / ".metadata"
    metadata.write_bytes(pickle.dumps(_Exploit()))
    manifest["files"]["state/.metadata"] = metadata.stat().st_size
    manifest["checksums"]["state/.metadata"] = file_checksum(metadata)      # a consistent forgery
    (path / "pfc_checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="refusing to unpickle global (posix|os).system"):
        load_checkpoint(path, build_state())


def test_embedding_size_mismatch_is_a_clear_error(tmp_path):
    state = build_state()
    set_version(state, 1)
    path = save_checkpoint(tmp_path, state)
    with pytest.raises(CheckpointError, match="embedding_size=4 but the model has embedding_size=5"):
        load_checkpoint(path, build_state(embedding=5))
