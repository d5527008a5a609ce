"""Checkpoint directories on disk: naming, atomic publication, validation, pruning.

Layout of one checkpoint (a directory ``OUTPUT/checkpoint-00000120``)::

    pfc_checkpoint.json   manifest, written last: format, step, world size, num_classes,
                          embedding size, engine, progress, resolved config, every file with its
                          size and its CRC-32
    state/                torch.distributed.checkpoint (DCP): head rows, optimizers, schedulers, RNG
    engine/               the backbone engine's own files (DeepSpeed), when it keeps any

**Atomicity.** All ranks write into ``OUTPUT/.tmp-checkpoint-STEP``; when every rank has
finished, rank 0 writes the manifest (with the size of every file), fsyncs, and renames the
directory to its final name (:func:`publish`). A crash at any moment leaves either no new
directory or a complete one, and the previous checkpoints untouched. Old checkpoints are first
renamed to a hidden name and then deleted, so a half-deleted one is never taken for a
checkpoint. :func:`validate_checkpoint` rejects a directory whose files are missing, truncated
or damaged (their CRC-32 differs from the one recorded at the save).

**Content checks.** Each file's CRC-32 (``zlib.crc32``, streamed; about 1 GB/s on one core) is
computed at the save by the rank that wrote it (see :func:`pfc.train.checkpoint.save_load.
save_checkpoint`) and recorded in the manifest under ``checksums``. A CRC detects accidental
damage (flipped bits, a block of zeros, a file overwritten in place), not a deliberate edit: whoever
can change a file can change the manifest too. Manifests from before the checksums (no
``checksums`` key, same format version) are still accepted with the size check only.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zlib
from pathlib import Path
from typing import Any, Iterable

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
CHECKSUM_KIND = "crc32"
_READ_BLOCK = 1 << 20


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


def file_sizes(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.stat().st_size
            for path in sorted(root.rglob("*")) if path.is_file() and path.name != MANIFEST_NAME}


def file_checksum(path: str | os.PathLike) -> str:
    """``"crc32:XXXXXXXX"``: the CRC-32 of the file's bytes, read in 1 MiB blocks."""
    value, block = 0, bytearray(_READ_BLOCK)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as stream:
        while count := stream.readinto(block):
            value = zlib.crc32(view[:count], value)
    return f"{CHECKSUM_KIND}:{value:08x}"


def checksum_files(root: str | os.PathLike, names: Iterable[str]) -> dict[str, str]:
    """:func:`file_checksum` of each relative name under ``root``."""
    return {name: file_checksum(Path(root) / name) for name in names}


def balanced_shares(sizes: dict[str, int], count: int) -> list[list[str]]:
    """The names of ``sizes`` split into ``count`` lists of about equal total size (largest
    file first to the least loaded list): the files each rank reads to check a checkpoint."""
    shares: list[list[str]] = [[] for _ in range(count)]
    loads = [0] * count
    for name in sorted(sizes, key=lambda key: (-sizes[key], key)):
        least = loads.index(min(loads))
        shares[least].append(name)
        loads[least] += sizes[name]
    return shares


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


def validate_checkpoint(path: str | os.PathLike, check_content: bool = True) -> dict[str, Any]:
    """The manifest of the checkpoint at ``path``; CheckpointError if it is missing, from another
    format version, any recorded file is absent or has a different size (truncated), or, with
    ``check_content``, any file's CRC-32 differs from the recorded one (damaged in place).

    One process reads every file for the content check; collective callers split the files
    over their ranks instead (:func:`verify_content` on a :func:`balanced_shares` share).
    """
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
    if not isinstance(manifest.get("files", {}), dict) or not isinstance(manifest.get("checksums", {}), dict):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST_NAME} has malformed 'files' or 'checksums'")
    for name, size in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupt: file {name} is missing")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(f"checkpoint {path} is corrupt: file {name} has {actual} bytes, "
                                  f"expected {size} (truncated?)")
    if check_content:
        verify_content(path, manifest, manifest.get("files", {}))
    return manifest


def verify_content(path: str | os.PathLike, manifest: dict[str, Any], names: Iterable[str]) -> None:
    """CheckpointError naming the first of ``names`` whose CRC-32 differs from the manifest's
    (files without a recorded checksum, from a manifest older than the checksums, are skipped)."""
    recorded = manifest.get("checksums", {})
    for name in names:
        if name not in recorded:
            continue
        try:
            actual = file_checksum(Path(path) / name)
        except OSError as exc:
            raise CheckpointError(f"checkpoint {path}: cannot read {name}: {exc}") from exc
        if actual != recorded[name]:
            raise CheckpointError(f"checkpoint {path} is damaged: the content of {name} changed after the save "
                                  f"({actual}, recorded {recorded[name]})")


def newest_valid(output_dir: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """The newest checkpoint in ``output_dir`` that passes :func:`validate_checkpoint`, and the
    reasons the newer ones were skipped (one line each, naming the checkpoint)."""
    rejected = []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            validate_checkpoint(path)
        except CheckpointError as exc:
            logger.warning("skipping checkpoint: %s", exc)
            rejected.append(str(exc))
            continue
        return path, rejected
    return None, rejected


def all_damaged_error(output_dir: str | os.PathLike, rejected: list[str]) -> CheckpointError:
    """The error of ``--resume auto`` when ``output_dir`` holds checkpoints and none is usable."""
    return CheckpointError(f"resume auto: none of the {len(rejected)} checkpoints in {output_dir} can be used "
                           "(refusing to start over from step 0 beside them): " + "; ".join(rejected))


def find_latest(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete and undamaged checkpoint in ``output_dir`` (None when there is none).

    Incomplete, truncated or damaged ones are skipped with a warning naming each and the reason.
    """
    return newest_valid(output_dir)[0]


def set_aside(path: Path, why: str = "damaged") -> Path:
    """Rename the checkpoint ``path`` to ``checkpoint-STEP.WHY`` (``.WHY-N`` when taken), a name no
    reader considers ("damaged"; "superseded": newer than the one a run resumed from); returns
    the new path."""
    target, number = path.with_name(f"{path.name}.{why}"), 1
    while target.exists():
        target, number = path.with_name(f"{path.name}.{why}-{number}"), number + 1
    os.rename(path, target)
    logger.warning("checkpoint %s is %s: moved aside to %s", path, why, target.name)
    return target


def set_aside_newer(output_dir: str | os.PathLike, step: int) -> list[Path]:
    """Set aside (as "superseded") every checkpoint in ``output_dir`` newer than ``step``: a run
    resumed from an older checkpoint continues another trajectory, and its own saves at those
    steps must not be taken for the old ones (nor the old ones for its)."""
    return [set_aside(path, "superseded") for path in list_checkpoints(output_dir)
            if int(_NAME_PATTERN.match(path.name).group(1)) > step]


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
    otherwise an empty temporary directory (with ``state/``) is made ready. Temporary
    directories left by an interrupted save (any step) are removed first: one run saves into
    an output directory at a time."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if (checkpoint_path(output_dir, step) / MANIFEST_NAME).is_file():
        return True
    for stale in output_dir.glob(_TMP_PREFIX + "*"):
        discard(stale)
    (temporary_path(output_dir, step) / STATE_DIR).mkdir(parents=True)
    return False


def discard(tmp: Path) -> None:
    """Remove the temporary directory of a save that failed or was interrupted."""
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)


def publish(output_dir: Path, step: int, manifest: dict[str, Any], keep_last: int,
            checksums: dict[str, str] | None = None) -> Path:
    """Rank 0, after every rank has written: add the file sizes and checksums to ``manifest``
    (``checksums``: those the ranks computed of the files they wrote; any other file is
    checksummed here), write it, fsync, rename the temporary directory to its final name and
    prune to the newest ``keep_last``."""
    tmp, final = temporary_path(output_dir, step), checkpoint_path(output_dir, step)
    for written in (tmp / ENGINE_DIR).rglob("*"):  # DCP fsyncs its files, an engine may not
        if written.is_file():
            with open(written, "rb+") as stream:
                os.fsync(stream.fileno())
    sizes = file_sizes(tmp)
    known = {name: value for name, value in (checksums or {}).items() if name in sizes}
    known.update(checksum_files(tmp, [name for name in sizes if name not in known]))
    manifest = {**manifest, "format": "pfc-checkpoint", "version": FORMAT_VERSION, "files": sizes,
                "checksums": known}
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
