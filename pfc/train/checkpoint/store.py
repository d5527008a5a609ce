"""Checkpoint directories on disk: naming, atomic publication, validation, pruning.

Layout of one checkpoint (a directory ``OUTPUT/checkpoint-00000120``)::

    pfc_checkpoint.json   manifest, written last: format, step, world size, num_classes,
                          embedding size, engine, progress, resolved config, every file with its size
    state/                torch.distributed.checkpoint (DCP): head rows, optimizers, schedulers, RNG
    engine/               the backbone engine's own files (DeepSpeed), when it keeps any

**Atomicity.** All ranks write into ``OUTPUT/.tmp-checkpoint-STEP``; when every rank has
finished, rank 0 writes the manifest (with the size of every file), fsyncs, and renames the
directory to its final name (:func:`publish`). A crash at any moment leaves either no new
directory or a complete one, and the previous checkpoints untouched. Old checkpoints are first
renamed to a hidden name and then deleted, so a half-deleted one is never taken for a
checkpoint. :func:`validate_checkpoint` rejects a directory whose files are missing or truncated.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from pfc.errors import CheckpointError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "pfc_checkpoint.json"
STATE_DIR = "state"
ENGINE_DIR = "engine"
CHECKPOINT_PREFIX = "checkpoint-"
_TMP_PREFIX = ".tmp-" + CHECKPOINT_PREFIX
_DELETE_PREFIX = ".delete-" + CHECKPOINT_PREFIX
_NAME_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    """The final directory of the checkpoint of ``step`` in ``output_dir``."""
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_sizes(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.stat().st_size
            for path in sorted(root.rglob("*")) if path.is_file() and path.name != MANIFEST_NAME}


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories in ``output_dir`` (complete or not), oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _NAME_PATTERN.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def validate_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the checkpoint at ``path``; CheckpointError if it is missing, from another
    format version, or any recorded file is absent or has a different size (truncated)."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: no {MANIFEST_NAME} (interrupted save?)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable {MANIFEST_NAME}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != "pfc-checkpoint":
        raise CheckpointError(f"checkpoint {path}: {MANIFEST_NAME} is not a pfc checkpoint manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format version {manifest.get('version')} "
                              f"is not supported (expected {FORMAT_VERSION})")
    for name, size in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupt: file {name} is missing")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(f"checkpoint {path} is corrupt: file {name} has {actual} bytes, "
                                  f"expected {size} (truncated?)")
    return manifest


def find_latest(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``output_dir`` (None when there is none).

    Incomplete or corrupt ones are skipped with a warning naming the reason.
    """
    for path in reversed(list_checkpoints(output_dir)):
        try:
            validate_checkpoint(path)
        except CheckpointError as exc:
            logger.warning("skipping checkpoint: %s", exc)
            continue
        return path
    return None


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Path | None:
    """``""`` → None (fresh start); ``"auto"`` → :func:`find_latest` (None when there is none);
    anything else is a checkpoint path, which must be complete (CheckpointError otherwise)."""
    if not resume:
        return None
    if resume == "auto":
        return find_latest(output_dir)
    validate_checkpoint(resume)
    return Path(resume)


def _remove_checkpoint_dir(path: Path) -> None:
    """Hide ``path`` under a name no reader considers, then delete it."""
    hidden = path.with_name(_DELETE_PREFIX + path.name[len(CHECKPOINT_PREFIX):] + f".{os.getpid()}")
    os.rename(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def _prune(output_dir: Path, keep_last: int) -> None:
    complete = [path for path in list_checkpoints(output_dir) if (path / MANIFEST_NAME).is_file()]
    for path in complete[:-keep_last] if keep_last > 0 else []:
        _remove_checkpoint_dir(path)
    for stale in output_dir.glob(_DELETE_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def temporary_path(output_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before :func:`publish` renames it."""
    return Path(output_dir) / f"{_TMP_PREFIX}{step:08d}"


def prepare(output_dir: Path, step: int) -> bool:
    """Rank 0, before a save: True when a complete checkpoint of ``step`` exists already;
    otherwise an empty temporary directory (with ``state/``) is made ready."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if (checkpoint_path(output_dir, step) / MANIFEST_NAME).is_file():
        return True
    tmp = temporary_path(output_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / STATE_DIR).mkdir(parents=True)
    return False


def publish(output_dir: Path, step: int, manifest: dict[str, Any], keep_last: int) -> Path:
    """Rank 0, after every rank has written: add the file sizes to ``manifest``, write it, fsync,
    rename the temporary directory to its final name and prune to the newest ``keep_last``."""
    tmp, final = temporary_path(output_dir, step), checkpoint_path(output_dir, step)
    for written in (tmp / ENGINE_DIR).rglob("*"):  # DCP fsyncs its files, an engine may not
        if written.is_file():
            with open(written, "rb+") as stream:
                os.fsync(stream.fileno())
    manifest = {**manifest, "format": "pfc-checkpoint", "version": FORMAT_VERSION, "files": _file_sizes(tmp)}
    partial = tmp / (MANIFEST_NAME + ".partial")
    with open(partial, "w") as stream:
        json.dump(manifest, stream, indent=1, sort_keys=True)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(partial, tmp / MANIFEST_NAME)
    _fsync_dir(tmp)
    if final.exists():  # an incomplete directory of the same step from an earlier crash
        _remove_checkpoint_dir(final)
    os.rename(tmp, final)
    _fsync_dir(output_dir)
    _prune(output_dir, keep_last)
    return final
