"""Checkpoint faults: a crafted pickle runs nothing, damaged content is found (and skipped by
``--resume auto``), every checkpoint damaged stops the run, a full disk is named and leaves nothing.

Crafted files carry a payload that would create a marker file; each test asserts the refusal
names the global and that the marker does not exist. Black box where it matters: the trainer
is run as ``launch/train.py`` (one process) or under ``torchrun`` (2 ranks) on files on disk.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import uuid

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
from pfc.train.checkpoint.store import MANIFEST_NAME, file_checksum
from tests.distributed import run_ranks
from tests.test_checkpoint import build_state, global_matrices, set_version
from tests.train_fixtures import write_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# every module the metadata reader resolves a global in, and the modules the old allow-list admitted whole
READER_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem", "torch",
                  "torch.serialization", "pathlib")
CRAFTED_GLOBALS = [(module, "os.system") for module in READER_MODULES] + [
    ("torch.distributed.checkpoint.planner", "torch.os.system"),
    ("torch.distributed.checkpoint.metadata", "Metadata.__init__"),
    ("os", "system"), ("posix", "system"), ("subprocess", "getoutput"), ("builtins", "eval"), ("builtins", "exec"),
]


def crafted_pickle(module: str, name: str, marker, stack_global: bool) -> bytes:
    """A protocol-4 pickle calling ``module.name(argument)`` (GLOBAL or STACK_GLOBAL opcode); the
    argument creates ``marker``: a shell command, or Python code for eval/exec."""
    argument = (f"open({str(marker)!r}, 'w')" if name in ("eval", "exec") else f"touch {marker}").encode()

    def text(value: bytes) -> bytes:  # SHORT_BINUNICODE
        return b"\x8c" + bytes([len(value)]) + value

    lookup = (text(module.encode()) + text(name.encode()) + b"\x93" if stack_global
              else b"c" + module.encode() + b"\n" + name.encode() + b"\n")
    return b"\x80\x04" + lookup + text(argument) + b"\x85R."


def replace_file(checkpoint, name: str, data: bytes) -> None:
    """Write ``data`` to a checkpoint's file and record its size and checksum in the manifest, as
    an attacker who controls the directory would."""
    (checkpoint / name).write_bytes(data)
    manifest_path = checkpoint / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][name] = len(data)
    manifest["checksums"][name] = file_checksum(checkpoint / name)
    manifest_path.write_text(json.dumps(manifest))


def flip_bytes(path, count: int = 64) -> None:
    """Damage ``path`` in place: ``count`` bytes in its middle inverted, the size unchanged."""
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    for index in range(start, min(start + count, len(data))):
        data[index] ^= 0xFF
    path.write_bytes(bytes(data))


def distcp_files(checkpoint) -> list:
    return sorted((checkpoint / "state").glob("*.distcp"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One single-process checkpoint (step 1) of the small test state."""
    root = tmp_path_factory.mktemp("saved")
    state = build_state()
    set_version(state, 1)
    return save_checkpoint(root, state)


def test_crafted_payload_runs_when_unpickled_plainly(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(crafted_pickle("torch.distributed.checkpoint.metadata", "os.system", marker, True))
    assert marker.exists()     # the files below are live exploits, not inert bytes


@pytest.mark.parametrize("stack_global", [False, True], ids=["GLOBAL", "STACK_GLOBAL"])
@pytest.mark.parametrize("module,name", CRAFTED_GLOBALS, ids=[f"{m}.{n}" for m, n in CRAFTED_GLOBALS])
def test_crafted_metadata_global_is_refused_and_runs_nothing(saved, tmp_path, module, name, stack_global):
    checkpoint = tmp_path / saved.name
    shutil.copytree(saved, checkpoint)
    marker = tmp_path / "marker"
    replace_file(checkpoint, "state/.metadata", crafted_pickle(module, name, marker, stack_global))
    refused = f"refusing to unpickle global {module}.{name}"
    with pytest.raises(CheckpointError, match=refused.replace(".", r"\.")):
        read_checkpoint_tensors(checkpoint)
    with pytest.raises(CheckpointError, match=refused.replace(".", r"\.")):
        load_checkpoint(checkpoint, build_state())
    assert not marker.exists()


def test_manifest_without_checksums_loads_with_the_size_check_only(saved, tmp_path):
    checkpoint = tmp_path / saved.name
    shutil.copytree(saved, checkpoint)
    manifest = json.loads((checkpoint / MANIFEST_NAME).read_text())
    del manifest["checksums"]                          # as written before the checksums
    (checkpoint / MANIFEST_NAME).write_text(json.dumps(manifest))
    state = build_state(seed=4)
    assert load_checkpoint(checkpoint, state).step == 1
    assert torch.equal(state.head.weight.detach(), global_matrices(1)[0])

    flip_bytes(distcp_files(checkpoint)[0])          # undetectable by sizes: DCP's own failure, made clear
    validate_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match="loading checkpoint state from .* failed: .*content is damaged"):
        load_checkpoint(checkpoint, build_state())


def test_damaged_content_is_named_and_auto_falls_back(tmp_path):
    state = build_state()
    for version in (1, 2, 3):
        set_version(state, version)
        save_checkpoint(tmp_path, state)
    flip_bytes(distcp_files(checkpoint_path(tmp_path, 3))[0])
    newest = checkpoint_path(tmp_path, 3)
    damaged = rf"checkpoint {newest} is damaged: the content of state/__0_0\.distcp changed after the save"
    for check in (validate_checkpoint, read_checkpoint_tensors, lambda path: load_checkpoint(path, build_state()),
                  lambda path: select_checkpoint(str(path), tmp_path)):
        with pytest.raises(CheckpointError, match=damaged):
            check(newest)
    assert find_latest(tmp_path) == checkpoint_path(tmp_path, 2)

    flip_bytes(checkpoint_path(tmp_path, 2) / "state" / ".metadata", count=8)
    (checkpoint_path(tmp_path, 1) / MANIFEST_NAME).write_text("{")
    assert find_latest(tmp_path) is None
    with pytest.raises(CheckpointError, match=r"none of the 3 checkpoints in .* can be used") as raised:
        select_checkpoint("auto", tmp_path)
    for step in (1, 2, 3):
        assert str(checkpoint_path(tmp_path, step)) in str(raised.value)
    assert select_checkpoint("auto", tmp_path / "nothing") is None     # no checkpoint at all: a fresh start


# ---------------------------------------------------------------- a full disk (a real tmpfs)

@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(directory, leave: int) -> None:
    """Fill the file system of ``directory`` up to ``leave`` bytes."""
    descriptor = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        written = 0
        while True:
            try:
                written += os.write(descriptor, b"\0" * 4096)
            except OSError:
                break
        os.ftruncate(descriptor, max(0, written - leave))
    finally:
        os.close(descriptor)


def save_on_full_disk(rank: int, world_size: int, output_dir: str) -> dict:
    import torch.distributed as dist

    from pathlib import Path

    output = Path(output_dir) / "run"
    state = build_state()
    set_version(state, 1)
    save_checkpoint(output, state)
    if rank == 0:
        fill_disk(Path(output_dir), leave=16 * 1024)
    dist.barrier()
    set_version(state, 2)
    try:
        save_checkpoint(output, state)
        error = None
    except CheckpointError as exc:
        error = str(exc)
    return {"error": error, "listing": sorted(os.listdir(output))}


def test_full_disk_is_named_on_every_rank_and_leaves_nothing(small_disk):
    results = run_ranks(save_on_full_disk, 2, str(small_disk), timeout=180)
    output = small_disk / "run"
    for result in results:
        assert result["error"] is not None, "the save on a full disk did not fail"
        assert "the disk is full (ENOSPC" in result["error"] and str(output) in result["error"], result["error"]
        assert result["listing"] == ["checkpoint-00000001"]
    assert results[0]["error"] == results[1]["error"]
    assert list_checkpoints(output) == [checkpoint_path(output, 1)]
    validate_checkpoint(checkpoint_path(output, 1))            # untouched, content included
    assert torch.equal(read_checkpoint_tensors(checkpoint_path(output, 1))["head.weight"], global_matrices(1)[0])


# ---------------------------------------------------------------- the command line, black box

TRAIN_ARGS = ["--network", "tiny", "--embedding_size", "16", "--batch_size", "4", "--num_workers", "0",
              "--save_every", "2", "--warmup_steps", "0", "--log_every", "10", "--margin.s", "16"]


def train(data: str, output, *extra: str, ranks: int = 0, timeout: float = 240) -> subprocess.CompletedProcess:
    """``launch/train.py`` in one process (``ranks=0``) or under torchrun with ``ranks`` ranks."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                if ranks else [sys.executable])
    command = launcher + ["launch/train.py", "--data", data, "--output", str(output), *TRAIN_ARGS, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, TORCHELASTIC_RESTART_COUNT="0")
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-rank run of 4 steps with checkpoints at steps 2 and 4, and its data."""
    root = tmp_path_factory.mktemp("trained")
    data = write_shards(str(root / "shards"), num_classes=12, per_class=8, image_size=16)
    done = train(data, root / "run", "--max_steps", "4", ranks=2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [p.name for p in list_checkpoints(root / "run")] == ["checkpoint-00000002", "checkpoint-00000004"]
    return data, root / "run"


def copy_run(trained, tmp_path):
    data, run = trained
    output = tmp_path / f"run-{uuid.uuid4().hex[:6]}"
    shutil.copytree(run, output)
    return data, output


def test_cli_crafted_metadata_is_refused_on_resume_path_and_auto(trained, tmp_path):
    data, output = copy_run(trained, tmp_path)
    marker = tmp_path / "marker"
    newest = checkpoint_path(output, 4)
    replace_file(newest, "state/.metadata",
                 crafted_pickle("torch.distributed.checkpoint.metadata", "os.system", marker, True))
    for resume in (str(newest), "auto"):
        done = train(data, output, "--max_steps", "6", "--resume", resume)
        assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
        assert "refusing to unpickle global torch.distributed.checkpoint.metadata.os.system" in done.stderr
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        assert not marker.exists()


def test_cli_damaged_checkpoint_is_named_and_auto_falls_back_or_stops(trained, tmp_path):
    data, output = copy_run(trained, tmp_path)
    newest = checkpoint_path(output, 4)
    flip_bytes(distcp_files(newest)[0])

    done = train(data, output, "--max_steps", "6", "--resume", str(newest), ranks=2)
    assert done.returncode != 0
    for rank in (0, 1):       # the same clear error on every rank, no traceback of DCP's
        assert f"error (rank {rank}): " in done.stderr and f"checkpoint {newest} is damaged" in done.stderr, \
            done.stderr[-3000:]
    assert "CheckpointException" not in done.stderr and "IndexError" not in done.stderr

    done = train(data, output, "--max_steps", "6", "--resume", "auto", ranks=2)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"skipping checkpoint {newest}" in done.stderr
    assert f"resumed from {checkpoint_path(output, 2)}" in done.stdout
    assert (output / "checkpoint-00000004.damaged").is_dir()        # kept aside for inspection
    assert [p.name for p in list_checkpoints(output)] == [f"checkpoint-0000000{s}" for s in (2, 4, 6)]
    for path in list_checkpoints(output):
        validate_checkpoint(path)                                   # step 4 written anew

    for path in list_checkpoints(output):
        flip_bytes(distcp_files(path)[-1])
    done = train(data, output, "--max_steps", "8", "--resume", "auto")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert "none of the 3 checkpoints" in done.stderr and "refusing to start over from step 0" in done.stderr
    for step in (2, 4, 6):
        assert f"checkpoint {checkpoint_path(output, step)} is damaged" in done.stderr
