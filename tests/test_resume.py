"""Training-level checkpoints: a stopped and resumed run equals a straight one; NaN skips and stop;
SIGKILL of a rank under torchrun with restarts.

2 gloo ranks, the tiny network on a small shard set, grad_accumulation=2 and an epoch boundary
inside the run. The stop comes from a real SIGTERM (handled by the trainer at the step boundary);
the resume runs in a new process group.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time

import psutil
import pytest
import torch

from pfc.train.checkpoint import (checkpoint_path, find_latest, list_checkpoints, read_checkpoint_tensors,
                            validate_checkpoint)
from tests.distributed import run_ranks
from tests.train_fixtures import make_config, sigterm_on_rank_zero_at_step, write_shards

TOTAL_STEPS, STOP_AT = 10, 3     # 6 steps per epoch: the run crosses an epoch, the stop is mid-epoch


def straight_and_stopped(rank: int, world_size: int, data: str, straight: str, stopped: str) -> dict:
    from pfc.train import loop as engine

    engine.train(make_config(data, straight))
    with sigterm_on_rank_zero_at_step(rank, STOP_AT):   # handled: the run stops after this step
        summary = engine.train(make_config(data, stopped))
    return dataclasses.asdict(summary)   # plain data across processes


def resume_and_nan(rank: int, world_size: int, data: str, stopped: str, nan_run: str, corrupt: str) -> dict:
    from pfc.train import loop as engine
    from pfc.train.checkpoint import CheckpointError
    from pfc.head.partial_fc import PartialFC

    try:
        engine.train(make_config(data, nan_run, resume=corrupt))
        corrupt_error = None
    except CheckpointError as exc:
        corrupt_error = str(exc)
    resumed = engine.train(make_config(data, stopped, resume="auto"))
    original = PartialFC.forward
    bad_iterations = {1, 4, 5, 6}

    def forward(self, x, labels):
        loss = original(self, x, labels)
        return loss * math.nan if rank == 1 and self.iteration in bad_iterations else loss

    PartialFC.forward = forward
    try:
        engine.train(make_config(data, nan_run, save_every=4, max_nonfinite_skips=3))
        nan_error = None
    except engine.NonFiniteLossError as exc:
        nan_error = str(exc)
    finally:
        PartialFC.forward = original
    return {"resumed": dataclasses.asdict(resumed), "nan_error": nan_error, "corrupt_error": corrupt_error}


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("shards")), num_classes=12, per_class=8, image_size=16)


def test_stopped_and_resumed_run_equals_straight_run_and_nan_steps_are_skipped(shard_set, tmp_path):
    straight, stopped, nan_run = (str(tmp_path / name) for name in ("straight", "stopped", "nan"))
    first = run_ranks(straight_and_stopped, 2, shard_set, straight, stopped, timeout=300)
    for summary in first:
        assert summary["steps"] == STOP_AT + 1 and "stop requested by a signal" in summary["stopped"]
    assert find_latest(stopped) == checkpoint_path(stopped, STOP_AT + 1)
    progress = json.loads((checkpoint_path(stopped, STOP_AT + 1) / "pfc_checkpoint.json").read_text())["progress"]
    assert progress == {"step": 4, "epoch": 0, "batch_in_epoch": 8, "skipped_steps": 0}

    corrupt = tmp_path / "corrupt" / "checkpoint-00000004"       # a copy with a truncated data file
    shutil.copytree(checkpoint_path(stopped, STOP_AT + 1), corrupt)
    data_file = next((corrupt / "state").glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:-1])

    second = run_ranks(resume_and_nan, 2, shard_set, stopped, nan_run, str(corrupt), timeout=300)  # a new group
    for result in second:   # --resume PATH of a truncated checkpoint: the same clear error on every rank
        assert "is corrupt" in result["corrupt_error"] and "truncated" in result["corrupt_error"]
    assert all(result["resumed"]["steps"] == TOTAL_STEPS for result in second)
    expected = read_checkpoint_tensors(checkpoint_path(straight, TOTAL_STEPS))
    actual = read_checkpoint_tensors(checkpoint_path(stopped, TOTAL_STEPS))
    weights = [key for key in expected if not key.startswith("rng.")]
    assert any(key.startswith("backbone.") for key in weights) and "head.weight" in weights
    for key in weights:
        assert torch.equal(expected[key], actual[key]), key      # bitwise: same arithmetic, same data

    for result in second:
        assert "3 consecutive non-finite losses (limit 3)" in result["nan_error"]
    manifest = json.loads((checkpoint_path(nan_run, 7) / "pfc_checkpoint.json").read_text())
    assert manifest["progress"]["skipped_steps"] == 4 and manifest["progress"]["step"] == 7
    before, after = read_checkpoint_tensors(checkpoint_path(nan_run, 4)), read_checkpoint_tensors(
        checkpoint_path(nan_run, 7))
    # skipped steps change no weight, no BatchNorm statistic and no optimizer state
    unchanged = [k for k in before if not k.startswith("rng.")]
    assert "head.weight" in unchanged and "head_optimizer.state.0.momentum_buffer" in unchanged
    assert any("running_mean" in k for k in unchanged)
    assert all(torch.equal(before[k], after[k]) for k in unchanged), [k for k in unchanged
                                                                       if not torch.equal(before[k], after[k])]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sigkill_under_torchrun_restarts_and_resumes(shard_set, tmp_path):
    output = tmp_path / "run"
    steps = 60
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--max-restarts=1", "--monitor-interval=0.5", "launch/train.py", "--data", shard_set,
               "--output", str(output), "--network", "tiny", "--embedding_size", "16", "--batch_size", "4",
               "--num_workers", "0", "--max_steps", str(steps), "--save_every", "5", "--warmup_steps", "0",
               "--log_every", "10", "--margin.s", "16"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    log_path = tmp_path / "torchrun.log"      # a file, not a pipe: the output may be long
    log = open(log_path, "w")
    agent = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not checkpoint_path(output, 5).exists():
            assert agent.poll() is None and time.monotonic() < deadline, "no first checkpoint"
            time.sleep(0.05)
        workers = [p for p in psutil.Process(agent.pid).children() if p.environ().get("LOCAL_RANK") == "1"]
        assert len(workers) == 1
        workers[0].kill()                                   # SIGKILL, mid-training
        agent.wait(timeout=240)
    finally:
        if agent.poll() is None:  # a hang: end the workers too, not only the agent
            for process in psutil.Process(agent.pid).children(recursive=True):
                process.kill()
            agent.kill()
        log.close()
        out = log_path.read_text()
    assert agent.returncode == 0, out[-4000:]
    assert f"trained {steps} steps" in out and "resumed from" in out, out[-4000:]
    checkpoints = list_checkpoints(output)
    assert checkpoints[-1] == checkpoint_path(output, steps)
    for path in checkpoints:
        validate_checkpoint(path)                           # none is corrupt


def resumed_from_an_earlier_checkpoint(rank: int, world_size: int, data: str, output: str) -> None:
    from pfc.train import loop

    loop.train(make_config(data, output, max_steps=4, save_every=2, lr=0.1))
    loop.train(make_config(data, output, max_steps=4, save_every=2, lr=0.05,
                           resume=str(checkpoint_path(output, 2))))


def test_resuming_an_earlier_checkpoint_sets_the_newer_ones_aside_and_saves_its_own(shard_set, tmp_path):
    output = str(tmp_path / "run")
    run_ranks(resumed_from_an_earlier_checkpoint, 2, shard_set, output, timeout=300)
    manifest = json.loads((checkpoint_path(output, 4) / "pfc_checkpoint.json").read_text())
    assert manifest["config"]["optim"]["lr"] == 0.05        # the resumed run's own step 4, not the old one
    old = tmp_path / "run" / "checkpoint-00000004.superseded"
    assert json.loads((old / "pfc_checkpoint.json").read_text())["config"]["optim"]["lr"] == 0.1
    assert find_latest(output) == checkpoint_path(output, 4)
