"""Preemption, time-based checkpoints and output-folder ownership, as a cluster would treat a run.

Black box where it matters: SIGTERM goes to the ``torchrun`` agent (as SLURM and Kubernetes send
it), with DataLoader workers running, on one node with 2 ranks and on two agents joined as two
nodes by the c10d rendezvous; the run must leave a complete checkpoint of the step it reached and
``--resume auto`` must continue from that step. Every wait has a timeout and every process tree
started here is killed in a ``finally``.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from pfc.distributed.fault import StepGuard, StopSignals
from pfc.errors import ConfigError
from pfc.train.checkpoint import checkpoint_path, find_latest, list_checkpoints, validate_checkpoint
from tests.distributed import run_ranks
from tests.train_fixtures import make_config, write_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--monitor-interval=0.5"]


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("shards")), num_classes=12, per_class=8, image_size=16)


def train_args(data: str, output, *extra: str) -> list[str]:
    return ["launch/train.py", "--data", data, "--output", str(output), "--network", "tiny",
            "--embedding_size", "16", "--batch_size", "4", "--warmup_steps", "0", "--log_every", "1",
            "--margin.s", "16", *extra]


# ---------------------------------------------------------------------------------------------
# helpers for processes started here

def wait_until(condition, timeout: float, what: str, alive=()) -> None:
    """Poll ``condition()`` until true; fail after ``timeout`` s or when a process of ``alive`` ended."""
    deadline = time.monotonic() + timeout
    while not condition():
        ended = [process.args for process in alive if process.poll() is not None]
        assert not ended, f"{what}: a process ended first"
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.1)


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL ``process`` and every process below it (workers, loader workers), if still there."""
    try:
        tree = psutil.Process(process.pid).children(recursive=True) + [psutil.Process(process.pid)]
    except psutil.NoSuchProcess:
        tree = []
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


@contextlib.contextmanager
def started(commands: list[list[str]], logs: list, stagger=None):
    """Start each command (output to its log file); on leaving, kill what is left of every tree.
    ``stagger(i)`` runs after command i started (e.g. wait until it listens)."""
    processes = []
    handles = [open(log, "w") for log in logs]
    try:
        for index, (command, handle) in enumerate(zip(commands, handles)):
            processes.append(subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=handle, stderr=subprocess.STDOUT))
            if stagger is not None:
                stagger(index)
        yield processes
    finally:
        for process in processes:
            kill_tree(process)
        for handle in handles:
            handle.close()


def finished(process: subprocess.Popen, timeout: float, log) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{process.args[:6]} did not end within {timeout:.0f} s:\n"
                             f"{open(log).read()[-3000:]}") from None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def trained_steps(output) -> int:
    path = os.path.join(output, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as handle:
        return sum(1 for line in handle if line.strip())


def descendants_alive(processes) -> list[int]:
    pids = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            pids += [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    return pids


# ---------------------------------------------------------------------------------------------
# 1. SIGTERM to torchrun with loader workers

@pytest.mark.timeout(300)
def test_sigterm_to_torchrun_with_loader_workers_checkpoints_and_resume_auto_continues(shard_set, tmp_path):
    output, log, resume_log = tmp_path / "run", tmp_path / "torchrun.log", tmp_path / "resume.log"
    command = TORCHRUN + ["--standalone", "--nproc_per_node=2"] + train_args(
        shard_set, output, "--num_workers", "2", "--max_steps", "100000")
    with started([command], [log]) as (agent,):
        wait_until(lambda: trained_steps(output) >= 2, 120, "the first logged steps", alive=[agent])
        workers = [child for child in psutil.Process(agent.pid).children(recursive=True)
                   if child.parent().pid != agent.pid]
        assert workers, "the ranks run no loader workers"
        agent.send_signal(signal.SIGTERM)            # what SLURM / Kubernetes do
        status = finished(agent, 60, log)            # well inside torchrun's 30 s + the step
    text = log.read_text()
    # torch's agent ends in SignalException after the ranks stopped cleanly (the README says so)
    assert status == 1 and "SignalException" in text, (status, text[-3000:])
    assert "DataLoader worker" not in text, text[-3000:]
    match = re.search(r"stopped at step (\d+): stop requested by a signal; checkpoint ", text)
    assert match, text[-3000:]
    step = int(match.group(1))
    assert find_latest(output) == checkpoint_path(output, step)
    manifest = validate_checkpoint(checkpoint_path(output, step))     # complete: every file, its size
    assert manifest["progress"]["step"] == step
    assert not [p for p in os.listdir(output) if p.startswith(".tmp-")]

    resume = TORCHRUN + ["--standalone", "--nproc_per_node=2"] + train_args(
        shard_set, output, "--num_workers", "2", "--max_steps", str(step + 2), "--resume", "auto")
    with started([resume], [resume_log]) as (agent,):
        assert finished(agent, 180, resume_log) == 0, resume_log.read_text()[-3000:]
    text = resume_log.read_text()
    assert f"resumed from {checkpoint_path(output, step)} at step {step} " in text, text[-3000:]
    assert f"trained 2 steps ({step + 2} in all)" in text


# ---------------------------------------------------------------------------------------------
# 4. Two torchrun agents as two nodes (c10d rendezvous): SIGTERM to one, both resume

@pytest.mark.timeout(420)
def test_sigterm_to_one_of_two_nodes_checkpoints_every_rank_and_both_nodes_resume(shard_set, tmp_path):
    output = tmp_path / "run"

    def node_commands(port: int, run_id: str, *extra: str) -> list[list[str]]:   # the README's multi-node command
        command = TORCHRUN + ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                              f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={run_id}"]
        return [command + train_args(shard_set, output, "--num_workers", "1", *extra)] * 2

    port = free_port()
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    # node 0 first: it hosts the rendezvous store (the first agent to bind the endpoint does)
    host_first = (lambda index: wait_until(lambda: listening(port), 60, "the rendezvous store")
                  if index == 0 else None)
    with started(node_commands(port, "preempt", "--max_steps", "100000"), logs, host_first) as agents:
        wait_until(lambda: trained_steps(output) >= 2, 180, "the first logged steps", alive=agents)
        agents[0].send_signal(signal.SIGTERM)        # one node's agent only
        codes = [finished(agent, 90, log) for agent, log in zip(agents, logs)]
        assert not descendants_alive(agents)
    text = logs[0].read_text() + logs[1].read_text()
    assert codes[1] == 0, text[-4000:]               # the other node's rank ended cleanly
    match = re.search(r"stopped at step (\d+): stop requested by a signal; checkpoint ", text)
    assert match, text[-4000:]
    step = int(match.group(1))
    assert validate_checkpoint(checkpoint_path(output, step))["world_size"] == 2
    assert find_latest(output) == checkpoint_path(output, step)

    port = free_port()
    logs = [tmp_path / "resume0.log", tmp_path / "resume1.log"]
    with started(node_commands(port, "preempt-resume", "--max_steps", str(step + 2), "--resume", "auto"), logs,
                 host_first) as agents:
        codes = [finished(agent, 180, log) for agent, log in zip(agents, logs)]
    text = logs[0].read_text() + logs[1].read_text()
    assert codes == [0, 0], text[-4000:]
    assert f"resumed from {checkpoint_path(output, step)} at step {step} " in text, text[-4000:]
    assert f"trained 2 steps ({step + 2} in all)" in text


# ---------------------------------------------------------------------------------------------
# Signals and the per-step decision

def a_loader_worker(ready) -> None:
    from pfc.data.loader import ignore_stop_signals

    ignore_stop_signals(0, rank_pid=os.getppid())
    ready.set()
    time.sleep(60)


def test_a_loader_worker_ignores_outside_stop_signals_and_ends_when_its_rank_asks():
    import multiprocessing

    context = multiprocessing.get_context("fork")      # as DataLoader starts its workers here
    ready = context.Event()
    worker = context.Process(target=a_loader_worker, args=(ready,), daemon=True)
    worker.start()
    try:
        assert ready.wait(30)
        for name in ("TERM", "INT", "TERM"):          # from another process: torchrun, SLURM, a terminal
            subprocess.run(["kill", f"-{name}", str(worker.pid)], check=True, timeout=30)
        time.sleep(0.5)
        assert worker.is_alive()
        worker.terminate()                              # SIGTERM from the rank: DataLoader's shutdown fallback
        worker.join(10)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()
            worker.join(10)


def test_repeated_sigterm_is_one_stop_and_a_second_sigint_interrupts():
    stop = StopSignals()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)         # SLURM's own copy after torchrun's: no interrupt
        assert stop.requested and stop.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)          # another kind: noted, nothing more
        assert stop.signal_name == "SIGTERM"
    except KeyboardInterrupt as exc:
        pytest.fail(f"a repeated SIGTERM interrupted the run: {exc}")
    finally:
        stop.restore()
    stop = StopSignals()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()


def two_rank_runs(rank: int, world_size: int, data: str, timed: str, off: str) -> dict:
    """On 2 gloo ranks (one spawn for all): the guard's save flag, time-based checkpoints, no
    period at all, and a fresh run's claim on a folder holding another run's files."""
    from pfc.train.loop import train
    from pfc.train.output import claim_output
    from pfc.train.runtime import init_runtime

    guard = StepGuard()   # rank 0's clock says "save" at step 2 only; rank 1 never passes the flag
    decisions = [guard.control(save_due=rank == 0 and step == 2).save for step in range(4)]
    train(make_config(data, timed, save_every=0, save_every_minutes=0.001, keep_checkpoints=50, max_steps=10))
    train(make_config(data, off, save_every=0, save_every_minutes=0.0, max_steps=3))
    try:
        claim_output(make_config(data, timed, seed=4), init_runtime())
        claim = "claimed"
    except ConfigError as exc:
        claim = str(exc)
    return {"decisions": decisions, "claim": claim,
            "saved": [[int(path.name.split("-")[1]) for path in list_checkpoints(folder)] for folder in (timed, off)]}


@pytest.mark.timeout(300)
def test_save_every_minutes_is_rank_0s_decision_on_every_rank_and_writes_checkpoints(shard_set, tmp_path):
    timed, off = str(tmp_path / "timed"), str(tmp_path / "off")
    results = run_ranks(two_rank_runs, 2, shard_set, timed, off, timeout=240)
    for result in results:
        assert result["decisions"] == [False, False, True, False]
        saved, none = result["saved"]
        # 0.06 s: due within the 10 steps (each takes milliseconds, a save more), and always at the end
        assert len(saved) >= 2 and saved[-1] == 10, saved
        assert none == []                           # no period at all: no checkpoint (no stop either)
        # a fresh run into that folder: the same message on every rank
        assert f"checking the output folder failed on rank 0: output folder {timed} holds" in result["claim"]
    for step in results[0]["saved"][0]:
        validate_checkpoint(checkpoint_path(timed, step))


def test_every_recipe_saves_every_30_minutes_and_the_flat_name_works():
    from pfc.train.config import TrainConfig, load_config

    recipes = sorted(name for name in os.listdir(os.path.join(ROOT, "configs")) if name.endswith(".py"))
    assert recipes
    for name in recipes:
        assert load_config(os.path.join(ROOT, "configs", name)).checkpoint.every_minutes == 30, name
    assert TrainConfig().checkpoint.every_minutes == 30
    assert load_config(None, ["--save_every_minutes", "0.5"]).checkpoint.every_minutes == 0.5
    with pytest.raises(ConfigError, match="'checkpoint.every_minutes' must be ≥ 0"):
        load_config(None, ["--save_every_minutes", "-1"])
    assert load_config(None, ["--overwrite"]).overwrite is True


# ---------------------------------------------------------------------------------------------
# 3. Output-folder ownership

def snapshot(folder) -> dict:
    found = {}
    for directory, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, folder)] = handle.read()
    return found


def test_a_fresh_run_into_another_runs_folder_stops_unless_resumed_or_overwritten(shard_set, tmp_path,
                                                                                 monkeypatch, capsys):
    from pfc.train.loop import train

    output = str(tmp_path / "shared")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    train(make_config(shard_set, output, max_steps=2, warmup_steps=0, save_every=1))   # the first run
    (tmp_path / "shared" / "notes.txt").write_text("the user's own file")
    before = snapshot(output)
    assert {"config.json", "metrics.jsonl", "backbone.pt", "checkpoint-00000002/pfc_checkpoint.json"} <= set(before)

    with pytest.raises(ConfigError) as error:                                          # another fresh run
        train(make_config(shard_set, output, max_steps=3, seed=4, lr=0.05))
    message = str(error.value)
    assert f"output folder {output} holds another run's files" in message
    assert "--resume auto" in message and "--overwrite" in message and "--output" in message
    assert snapshot(output) == before                                                  # untouched
    with pytest.raises(ConfigError, match="contradict"):
        train(make_config(shard_set, output, resume="auto", overwrite=True))

    # a torchrun restart of the first run continues it, even when its command said --overwrite
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    capsys.readouterr()
    assert train(make_config(shard_set, output, max_steps=4, save_every=1, overwrite=True)).steps == 4
    assert f"resumed from {checkpoint_path(output, 2)} at step 2" in capsys.readouterr().out
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")

    # --overwrite: the previous run's files go, the user's stay, the new run owns the folder
    train(make_config(shard_set, output, max_steps=3, seed=4, overwrite=True))
    assert "removed the previous run's" in capsys.readouterr().out
    assert (tmp_path / "shared" / "notes.txt").read_text() == "the user's own file"
    assert [path.name for path in list_checkpoints(output)] == ["checkpoint-00000003"]
    assert json.loads((tmp_path / "shared" / "config.json").read_text())["seed"] == 4
    with open(os.path.join(output, "metrics.jsonl")) as handle:
        assert [json.loads(line)["step"] for line in handle] == [1, 2, 3]
