"""The packer's output folder: where it may be, who writes it, which packing plan it holds.

    refuse_output_inside("data/shards", source.read_folders)   # ConfigError: OUT in what is read
    with output_lock("data/shards"):                  # one packer at a time (DataError otherwise)
        claim_output("data/shards", fingerprint)      # new, or a re-run of the same plan

The lock is ``fcntl.flock`` on ``OUT/.pack/lock``, held for the whole pack; the file records the
holder's PID for the message a second packer gets. The kernel drops a flock when its holder exits,
however it dies (``kill -9`` included), so a stale lock file never blocks the next run. On NFS,
Linux maps flock to POSIX byte-range locks, which work across clients when the server supports
locking.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os

from pfc.data import manifest as manifest_io
from pfc.errors import ConfigError, DataError
from pfc.files import write_atomic

STATE_DIR = ".pack"
LOCK_NAME = "lock"


def refuse_output_inside(out_dir: str, read_folders) -> None:
    """ConfigError when ``out_dir`` (which need not exist) is, or lies inside, one of the folders
    ``read_folders`` (real paths) a source reads: its shards would be packed as a class next time."""
    folders = set(read_folders)
    probe = os.path.realpath(out_dir)
    while probe not in folders:
        parent = os.path.dirname(probe)
        if parent == probe:
            return
        probe = parent
    raise ConfigError(f"output folder {out_dir} lies inside the source folder {probe} that is being "
                      f"packed; choose an output folder outside it")


@contextlib.contextmanager
def output_lock(out_dir: str):
    """Hold the packing lock of ``out_dir`` (created if missing) for the ``with`` block; DataError at
    once, naming the holder's PID, when another process holds it."""
    state_dir = os.path.join(out_dir, STATE_DIR)
    os.makedirs(state_dir, exist_ok=True)
    path = os.path.join(state_dir, LOCK_NAME)
    with open(path, "a+", encoding="ascii") as stream:
        try:
            fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stream.seek(0)
            holder = stream.read().strip() or "unknown"
            raise DataError(f"{out_dir} is being written by another packer (PID {holder}, lock {path}); "
                            f"wait for it to finish or pack into another folder") from None
        except OSError as exc:
            raise DataError(f"cannot lock {path} ({exc}); the file system of {out_dir} must "
                            f"support flock") from None
        stream.seek(0)
        stream.truncate()
        stream.write(f"{os.getpid()}\n")
        stream.flush()
        yield   # closing the file releases the lock


def claim_output(out_dir: str, fingerprint: str) -> None:
    """Make ``out_dir`` this packing plan's: new (the plan is recorded) or of the same plan (a
    re-run); DataError when it holds shards of another plan or of an unknown run."""
    state_dir = os.path.join(out_dir, STATE_DIR)
    os.makedirs(state_dir, exist_ok=True)
    plan_path = os.path.join(state_dir, "plan.json")
    if os.path.exists(plan_path):
        with open(plan_path) as stream:
            previous = json.load(stream).get("fingerprint")
        if previous != fingerprint:
            raise DataError(f"{out_dir} holds shards of a different packing run (other source, seed, "
                            f"shard size, image size or landmarks); pack into an empty directory")
        return
    stray = [name for name in os.listdir(out_dir) if name.endswith(".tar") or name == manifest_io.MANIFEST_NAME]
    if stray:
        raise DataError(f"{out_dir} already holds {stray[0]} from an unknown run; pack into an empty directory")
    write_atomic(plan_path, json.dumps({"fingerprint": fingerprint}).encode())
