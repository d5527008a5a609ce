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
        assert summary["steps"] == STOP_AT + 1 and summary["stopped"] == "stop requested by a signal"
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


def logged_steps(output) -> list[int]:
    path = os.path.join(output, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line)["step"] for line in handle if line.endswith("\n")]


def tensorboard_steps(output) -> list[int]:
    """The steps of the train/loss scalars TensorBoard shows (events an earlier attempt purged hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars("train/loss")]


def torchrun_train(output, data: str, *extra: str, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            f"--max-restarts={restarts}", "--monitor-interval=0.5", "launch/train.py", "--data", data, "--output", str(output), "--network", "tiny",
            "--embedding_size", "16", "--batch_size", "4", "--num_workers", "0", "--warmup_steps", "0",
            "--log_every", "1", "--margin.s", "16", *extra]


def test_sigkill_under_torchrun_restarts_and_resumes_and_the_logs_hold_each_step_once(shard_set, tmp_path):
    """kill -9 of rank 1 after rank 0 logged a step past the last checkpoint: torchrun restarts the
    ranks, they resume from that checkpoint, and metrics.jsonl and TensorBoard hold every step once
    (before: the steps after the checkpoint twice); the summary counts the restarted attempt's
    steps. Then --resume from an earlier checkpoint: its steps are logged once too."""
    pytest.importorskip("tensorboard")
    output = tmp_path / "run"
    steps = 60
    command = torchrun_train(output, shard_set, "--max_steps", str(steps), "--save_every", "5", restarts=1)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    log_path = tmp_path / "torchrun.log"      # a file, not a pipe: the output may be long
    log = open(log_path, "w")
    agent = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:   # rank 1 frozen (SIGSTOP) once rank 0 logged a step past the newest checkpoint
            assert agent.poll() is None and time.monotonic() < deadline, "no step logged after a checkpoint"
            latest = find_latest(output)
            if latest is not None and max(logged_steps(output), default=0) > int(latest.name.split("-")[1]):
                workers = [p for p in psutil.Process(agent.pid).children() if p.environ().get("LOCAL_RANK") == "1"]
                assert len(workers) == 1
                workers[0].suspend()
                time.sleep(0.5)   # rank 0 waits for rank 1 in the step's collectives: nothing moves now
                latest = find_latest(output)
                resumed_at = int(latest.name.split("-")[1])
                if max(logged_steps(output)) > resumed_at:
                    break
                workers[0].resume()
            time.sleep(0.05)
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
    assert f"resumed from {latest} at step {resumed_at} " in out, out[-4000:]
    assert f"trained {steps - resumed_at} steps ({steps} in all)" in out, out[-4000:]
    checkpoints = list_checkpoints(output)
    assert checkpoints[-1] == checkpoint_path(output, steps)
    for path in checkpoints:
        validate_checkpoint(path)                           # none is corrupt
    assert logged_steps(output) == list(range(1, steps + 1))
    assert tensorboard_steps(output) == list(range(1, steps + 1))

    earlier = checkpoint_path(output, steps - 5)            # --resume from an earlier checkpoint
    result = subprocess.run(torchrun_train(output, shard_set, "--max_steps", str(steps), "--resume", str(earlier)),
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert f"trained 5 steps ({steps} in all)" in result.stdout, result.stdout[-4000:]
    assert logged_steps(output) == list(range(1, steps + 1))
    assert tensorboard_steps(output) == list(range(1, steps + 1))


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


def test_the_logs_a_resume_continues_keep_the_rows_up_to_its_step_and_lose_a_half_written_line(tmp_path):
    from pfc.train.metrics import trim_logs

    metrics, evals = tmp_path / "metrics.jsonl", tmp_path / "eval.jsonl"
    metrics.write_text("".join(json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in range(1, 8))
                       + '{"step": 8, "lo')                 # the last line of a process killed while writing
    evals.write_text("".join(json.dumps({"set": "pairs", "step": step, "accuracy": 0.5}) + "\n" for step in (2, 4, 6)))
    before = metrics.stat().st_ino
    kept = trim_logs(str(tmp_path), 4)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]
    assert metrics.read_text().endswith("\n") and metrics.stat().st_ino != before   # replaced whole, by a rename
    assert [row["step"] for row in kept] == [2, 4] == [json.loads(line)["step"] for line in evals.open()]
    assert sorted(os.listdir(tmp_path)) == ["eval.jsonl", "metrics.jsonl"]           # no temporary left
    unchanged = metrics.stat().st_ino
    assert [row["step"] for row in trim_logs(str(tmp_path), 10)] == [2, 4] and metrics.stat().st_ino == unchanged
    trim_logs(str(tmp_path), 0)                             # a restart before the first checkpoint: all of it
    assert metrics.read_text() == evals.read_text() == ""
