"""Fine-tuning: ``--init_backbone`` starts a run from saved weights with fresh centers, and
``--freeze_backbone_steps`` trains only the head first; a resume inside the frozen phase
continues it and never re-reads the weights file.

2 gloo ranks, the tiny network on the small shard set of the trainer tests, configs built by the
trainer's own command-line parsing (``load_config`` with the flags, as ``launch/train.py``).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from pfc.backbones import build_backbone
from pfc.errors import CheckpointError, ConfigError
from pfc.evaluation.export import save_backbone
from pfc.train.config import load_config
from pfc.train.schedule import LRSchedule
from tests.distributed import run_ranks
from tests.train_fixtures import sigterm_on_rank_zero_at_step, write_shards

IMAGE, EMBEDDING = 16, 16       # the trainer fixtures' shards and tiny network
FROZEN, TOTAL, STOP_AT = 4, 8, 1  # the stopped run checkpoints after step 2, inside the frozen phase


def pretrained(path: str, network: str = "tiny", embedding_size: int = EMBEDDING, image_size: int = IMAGE) -> dict:
    """Save a backbone.pt with weights no fresh run has (another seed, BatchNorm statistics that a
    training-mode forward would move) and return its state dict."""
    torch.manual_seed(11)
    model = build_backbone(network, embedding_size, 0.0, image_size)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    save_backbone(model, path, network=network, embedding_size=embedding_size, image_size=image_size)
    return {key: value.clone() for key, value in model.state_dict().items()}


def cli_config(data: str, output: str, *flags: str):
    """The trainer fixtures' config (tiny net, 2 ranks: 6 steps per epoch) with command-line flags on top."""
    return load_config(None, [f"--data={data}", f"--output={output}", "--network=tiny",
                              f"--embedding_size={EMBEDDING}", "--num_workers=0", "--batch_size=4",
                              "--grad_accumulation=2", "--sample_rate=0.5", "--margin.s=16", "--margin.m2=0.3",
                              f"--max_steps={TOTAL}", "--warmup_steps=1", "--log_every=1", "--seed=3", *flags])


def snapshots(state, record: dict) -> None:
    """Before each step: the backbone's state dict, the head's rows, the backbone optimizer's
    state and both learning rates."""
    optimizer = state.runner.optimizer
    record[state.step] = {
        "backbone": {key: value.detach().clone() for key, value in state.runner.model.state_dict().items()},
        "head": state.head.weight.detach().clone(),
        "momentum": [optimizer.state[p]["momentum_buffer"].clone() for p in optimizer.param_groups[0]["params"]],
        "lr": (optimizer.param_groups[0]["lr"], state.head_optimizer.param_groups[0]["lr"]),
    }


def fine_tune_runs(rank: int, world_size: int, data: str, runs: str, weights: str) -> dict:
    from pfc.train import loop

    record, original = {}, loop.train_step

    def train_step(state, *args, **kwargs):
        snapshots(state, record)
        return original(state, *args, **kwargs)

    flags = (f"--init_backbone={weights}", f"--freeze_backbone_steps={FROZEN}")
    loop.train_step = train_step
    try:
        straight = loop.train(cli_config(data, f"{runs}/straight", *flags))
    finally:
        loop.train_step = original
    with sigterm_on_rank_zero_at_step(rank, STOP_AT):
        stopped = loop.train(cli_config(data, f"{runs}/stopped", *flags))
    torch.distributed.barrier()
    if rank == 0:
        os.rename(weights, weights + ".gone")   # a resumed run must not need (or read) it
    torch.distributed.barrier()
    resumed = loop.train(cli_config(data, f"{runs}/stopped", *flags, "--resume=auto"))
    torch.distributed.barrier()
    if rank == 0:
        os.rename(weights + ".gone", weights)
    torch.distributed.barrier()
    errors = {}
    for name, flag in (("embedding", f"--embedding_size={EMBEDDING // 2}"), ("missing", "--init_backbone=nowhere.pt")):
        try:
            loop.train(cli_config(data, f"{runs}/{name}", *flags, flag))
        except (ConfigError, CheckpointError) as exc:
            errors[name] = (type(exc).__name__, str(exc), os.path.exists(f"{runs}/{name}"))
    return {"record": record, "steps": (straight.steps, stopped.steps, resumed.steps), "errors": errors,
            "head": {"straight": _head_rows(f"{runs}/straight"), "resumed": _head_rows(f"{runs}/stopped")}}


def _head_rows(output: str) -> torch.Tensor:
    from pfc.train.checkpoint import find_latest, read_checkpoint_tensors

    return read_checkpoint_tensors(find_latest(output))["head.weight"]


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    data = write_shards(str(tmp_path_factory.mktemp("shards")))
    folder = tmp_path_factory.mktemp("finetune")
    weights = str(folder / "backbone.pt")
    initial = pretrained(weights)
    results = run_ranks(fine_tune_runs, 2, data, str(folder / "runs"), weights, timeout=300)
    return {"initial": initial, "results": results, "runs": folder / "runs", "weights": weights}


def _equal(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def test_the_run_starts_from_the_saved_weights_with_fresh_centers(fine_tuned):
    for result in fine_tuned["results"]:
        start = result["record"][0]
        assert _equal(start["backbone"], fine_tuned["initial"])     # exactly those weights at step 0
    config = json.loads((fine_tuned["runs"] / "straight" / "config.json").read_text())
    assert config["backbone"]["init"] == fine_tuned["weights"]
    assert config["init_backbone"]["network"] == "tiny" and len(config["init_backbone"]["sha256"]) == 64


def test_frozen_steps_train_the_head_and_leave_the_backbone_and_its_optimizer_as_they_were(fine_tuned):
    for result in fine_tuned["results"]:
        record = result["record"]
        start, unfrozen, end = record[0], record[FROZEN], record[TOTAL - 1]
        assert _equal(unfrozen["backbone"], fine_tuned["initial"])   # weights and BatchNorm statistics
        assert all(torch.equal(a, b) for a, b in zip(start["momentum"], unfrozen["momentum"]))
        assert not torch.equal(start["head"], unfrozen["head"])     # the head trained
        assert all(record[step]["lr"][0] == 0.0 < record[step]["lr"][1] for step in range(FROZEN))
        # then the backbone trains, after its own warmup (1 step) from the unfrozen step on
        assert unfrozen["lr"][0] == pytest.approx(0.1) and not _equal(end["backbone"], fine_tuned["initial"])
        assert any(not torch.equal(a, b) for a, b in zip(unfrozen["momentum"], end["momentum"]))


def test_a_run_resumed_inside_the_frozen_phase_equals_the_straight_run_without_the_weights_file(fine_tuned):
    runs = fine_tuned["runs"]
    for result in fine_tuned["results"]:
        assert result["steps"] == (TOTAL, STOP_AT + 1, TOTAL)
        assert torch.equal(result["head"]["straight"], result["head"]["resumed"])
    straight = torch.load(runs / "straight" / "backbone.pt", weights_only=True)["state_dict"]
    resumed = torch.load(runs / "stopped" / "backbone.pt", weights_only=True)["state_dict"]
    assert _equal(straight, resumed)
    # the resumed run read the checkpoint, not the weights file (gone meanwhile), and keeps its record
    first = json.loads((runs / "straight" / "config.json").read_text())["init_backbone"]
    assert json.loads((runs / "stopped" / "config.json").read_text())["init_backbone"] == first


def test_weights_for_another_network_or_a_missing_file_stop_every_rank_before_anything_is_written(fine_tuned):
    for result in fine_tuned["results"]:
        kind, message, written = result["errors"]["embedding"]
        assert kind == "ConfigError" and not written
        assert f"holds a tiny with embedding_size {EMBEDDING} at 16x16 px" in message
        assert f"this run trains a tiny with embedding_size {EMBEDDING // 2}" in message
        assert "rank 0" in message and "rank 1" in message
        kind, message, written = result["errors"]["missing"]
        assert kind == "CheckpointError" and "nowhere.pt" in message and not written


def test_a_network_of_another_name_loads_only_when_its_weights_fit(tmp_path, monkeypatch):
    from pfc import backbones
    from pfc.train.finetune import load_init_backbone

    path = str(tmp_path / "backbone.pt")
    weights = pretrained(path)
    monkeypatch.setitem(backbones._REGISTRY, "tiny_alias", backbones._REGISTRY["tiny"])
    assert _equal(load_init_backbone(path, "tiny_alias", EMBEDDING, IMAGE).state_dict, weights)
    with pytest.raises(ConfigError, match=r"holds a tiny .* this run trains a iresnet18 with embedding_size 16 "):
        load_init_backbone(path, "iresnet18", EMBEDDING, IMAGE)
    with pytest.raises(ConfigError, match="at 16x16 px; this run trains a tiny with embedding_size 16 at 32x32 px"):
        load_init_backbone(path, "tiny", EMBEDDING, 32)
    run = tmp_path / "run"
    run.mkdir()
    os.replace(path, run / "backbone.pt")    # a training output folder names its backbone.pt
    assert _equal(load_init_backbone(str(run), "tiny", EMBEDDING, IMAGE).state_dict, weights)


def test_the_backbone_schedule_starts_after_the_frozen_steps():
    frozen = LRSchedule(10, warmup_steps=2, kind="poly", power=1.0, start_step=4)
    assert [frozen(step) for step in range(4)] == [0.0] * 4
    assert [frozen(step) for step in (4, 5, 6, 9)] == pytest.approx([0.5, 1.0, 1.0, 0.25])
    assert [LRSchedule(6, 2, "poly", 1.0)(step) for step in range(6)] == [frozen(step + 4) for step in range(6)]
    with pytest.raises(ValueError, match="after the first 9"):
        LRSchedule(10, warmup_steps=1, start_step=9)


def test_freeze_flags_and_their_limits():
    config = load_config(None, ["--init_backbone", "runs/old", "--freeze_backbone_steps", "3"])
    assert (config.backbone.init, config.backbone.freeze_steps) == ("runs/old", 3)
    with pytest.raises(ConfigError, match="'backbone.freeze_steps' must be ≥ 0"):
        load_config(None, ["--freeze_backbone_steps", "-1"])
    with pytest.raises(ConfigError, match="8 frozen steps and 2 warmup steps .* in a run of 10 steps"):
        load_config(None, ["--freeze_backbone_steps", "8", "--warmup_steps", "2", "--max_steps", "10"])
