"""Training checkpoints: atomic on disk, resumable on any world size, loaded without arbitrary pickles.

    path = save_checkpoint(output_dir, step, state, keep_last=3)     # every rank calls it
    path = find_latest(output_dir)                                    # newest *complete* checkpoint
    info = load_checkpoint(path, state)                               # every rank calls it

Layout of one checkpoint (a directory ``OUTPUT/checkpoint-00000120``)::

    pfc_checkpoint.json   manifest, written last: format, step, world size, num_classes,
                          embedding size, progress, resolved config, and every file with its size
    state/                torch.distributed.checkpoint (DCP): head rows, optimizers, schedulers, RNG
    engine/               DeepSpeed's own checkpoint of the backbone engine (only with DeepSpeed)

**Resharding.** Rank r owns rows ``[class_start, class_start + num_local)`` of the
``num_classes × D`` center matrix (and of every optimizer state of the same shape, e.g. the
momentum). These rows are saved as DCP chunks with their *explicit* global row offset, so the
DCP metadata describes exactly which rows each file holds; on load every rank asks for its own
row range under the current partition and DCP reads the overlapping parts of the saved chunks.
(``DTensor`` with ``Shard(0)`` is not used: it assumes torch.chunk's split, which differs from
the head's partition when ``num_classes % world_size != 0`` and silently loads wrong rows.)

**Atomicity.** All ranks write into ``OUTPUT/.tmp-checkpoint-STEP``; when every rank has
finished, rank 0 writes the manifest (with the size of every file), fsyncs, and renames the
directory to its final name. A crash at any moment leaves either no new directory or a
complete one, and the previous checkpoints untouched. Old checkpoints are first renamed to a
hidden name and then deleted, so a half-deleted one is never taken for a checkpoint.
:func:`validate_checkpoint` rejects a directory whose files are missing or truncated.

**Safe loading.** Tensors are read by DCP with ``torch.load(weights_only=True)``; the
non-tensor values (param groups, scheduler fields, RNG tuples) with ``weights_only=True`` too;
DCP's ``.metadata`` pickle is read with an unpickler that only admits DCP's metadata classes.

Every function that touches a process group is collective: all ranks call it, and an error on
any rank is raised on every rank (never a hang).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    create_default_local_load_plan,
    create_default_local_save_plan,
)
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, WriteItem, WriteItemType, TensorWriteData
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from pfc.distributed.collectives import get_rank, get_world_size, is_distributed

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "pfc_checkpoint.json"
STATE_DIR = "state"
ENGINE_DIR = "engine"
ENGINE_TAG = "engine"
CHECKPOINT_PREFIX = "checkpoint-"
_TMP_PREFIX = ".tmp-" + CHECKPOINT_PREFIX
_DELETE_PREFIX = ".delete-" + CHECKPOINT_PREFIX
_NAME_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, incomplete, corrupt, or for another model."""


@dataclasses.dataclass
class TrainingState:
    """Everything a checkpoint saves and restores; the objects are updated in place on load.

    - ``head``: a PartialFC-like module (``weight`` [num_local, D], ``class_start``,
      ``num_local``, ``num_classes``, ``embedding_size``). Its state tensors and the
      ``head_optimizer`` state tensors of ``head.weight``'s shape are row-sharded (resharded on
      load), the rest is replicated.
    - ``backbone``: the bare module (not the DDP wrapper), with ``backbone_optimizer``.
    - ``deepspeed_engine``: a :class:`pfc.train.runners.deepspeed.DeepSpeedBackbone`; when set, the
      backbone and its optimizer are saved by DeepSpeed's own (collective)
      ``save_checkpoint(dir, tag)`` / ``load_checkpoint(dir, tag)`` and ``backbone`` /
      ``backbone_optimizer`` are ignored.
    - ``schedulers``: name → any object with ``state_dict()``/``load_state_dict()`` (LR
      schedulers, a GradScaler). A LambdaLR keeps its current lambda objects on load, so the
      schedule follows the current config (e.g. a longer ``max_steps``); its counters are restored.
    - ``progress`` (step, epoch, position in the epoch, …) and ``config`` (the resolved
      configuration): JSON-ready dicts, written into the manifest, returned by :func:`load_checkpoint`.
    """

    head: torch.nn.Module
    head_optimizer: torch.optim.Optimizer
    backbone: torch.nn.Module | None = None
    backbone_optimizer: torch.optim.Optimizer | None = None
    schedulers: dict[str, Any] = dataclasses.field(default_factory=dict)
    progress: dict[str, Any] = dataclasses.field(default_factory=dict)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    deepspeed_engine: Any = None


@dataclasses.dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` restored: the manifest's step, progress, config, whether
    this rank's RNG states were restored (only when the saved world size equals the current) and
    whether the backbone optimizer state was (see :func:`load_checkpoint`)."""

    path: Path
    step: int
    progress: dict[str, Any]
    config: dict[str, Any]
    saved_world_size: int
    rng_restored: bool
    backbone_optimizer_restored: bool = True


# --------------------------------------------------------------------------------------------
# collective error handling


def _agree(error: str | None, group=None) -> None:
    """Raise CheckpointError on every rank when any rank passes an error message."""
    if is_distributed(group) and get_world_size(group) > 1:
        errors: list[str | None] = [None] * get_world_size(group)
        dist.all_gather_object(errors, error, group=group)
    else:
        errors = [error]
    for rank, message in enumerate(errors):
        if message:
            prefix = f"rank {rank}: " if len(errors) > 1 else ""
            raise CheckpointError(prefix + message)


def _broadcast_from_zero(value, group=None):
    """Rank 0's ``value`` on every rank (a picklable object)."""
    if not (is_distributed(group) and get_world_size(group) > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return box[0]


def _run_collectively(fn, group=None):
    """Run ``fn()`` on every rank; an exception on any rank becomes a CheckpointError on all."""
    result, error = None, None
    try:
        result = fn()
    except CheckpointError as exc:  # reported to every rank by _agree
        error = str(exc)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    _agree(error, group)
    return result


@contextlib.contextmanager
def _single_process_quiet():
    """Silence DCP's warning that it runs in one process (a world of size 1 is legitimate here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


# --------------------------------------------------------------------------------------------
# row-sharded tensors in DCP


@dataclasses.dataclass
class RowShard:
    """Rows ``[row_start, row_start + local.shape[0])`` of a ``[num_rows, …]`` matrix held by this rank."""

    local: torch.Tensor
    row_start: int
    num_rows: int


def _row_shard_items(tree: dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple[int, int]]]:
    """``tree`` with every :class:`RowShard` replaced by its local tensor, and the flattened DCP
    names of those tensors mapped to ``(row_start, num_rows)``."""
    flat, _ = flatten_state_dict(tree)
    rows = {fqn: (value.row_start, value.num_rows) for fqn, value in flat.items() if isinstance(value, RowShard)}
    return _unwrap_rows(tree), rows


def _unwrap_rows(tree):
    if isinstance(tree, RowShard):
        return tree.local
    if isinstance(tree, dict):
        return {key: _unwrap_rows(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_unwrap_rows(value) for value in tree]
    return tree


def _row_chunk(local: torch.Tensor, row_start: int) -> ChunkStorageMetadata:
    offsets = (row_start,) + (0,) * (local.dim() - 1)
    return ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=local.size())


class _RowShardSavePlanner(DefaultSavePlanner):
    """DCP save planner that writes each row-sharded tensor as one chunk at its global row offset.

    ``rows`` maps a flattened name to ``(row_start, num_rows)``; the tensor in the state dict
    holds the rows ``[row_start, row_start + len)`` of a ``[num_rows, …]`` matrix.
    """

    def __init__(self, rows: dict[str, tuple[int, int]]):
        # Replicated values are written by rank 0: buffers such as BatchNorm statistics may differ
        # between ranks, and rank 0's are the ones DDP broadcasts.
        super().__init__(dedup_save_to_lowest_rank=True)
        self.rows = rows

    def create_local_plan(self) -> SavePlan:
        plain = {fqn: value for fqn, value in self.state_dict.items() if fqn not in self.rows}
        plan = create_default_local_save_plan(plain, self.is_coordinator)
        items = list(plan.items)
        for fqn, (row_start, num_rows) in self.rows.items():
            local = self.state_dict[fqn]
            chunk = _row_chunk(local, row_start)
            items.append(WriteItem(
                index=MetadataIndex(fqn, chunk.offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties.create_from_tensor(local),
                                            size=torch.Size((num_rows, *local.shape[1:]))),
            ))
        self.plan = dataclasses.replace(plan, items=items, planner_data=self.mappings)
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> Any:
        if index.fqn in self.rows:
            return self.state_dict[index.fqn]
        return super().lookup_object(index)


class _RowShardLoadPlanner(DefaultLoadPlanner):
    """DCP load planner: each row-sharded tensor reads its rows from the overlapping saved chunks
    (DCP's resharding); non-tensor values are unpickled with ``weights_only=True``."""

    def __init__(self, rows: dict[str, tuple[int, int]], flatten_state_dict: bool = True):
        super().__init__(flatten_state_dict=flatten_state_dict)
        self.rows = rows

    def create_local_plan(self) -> LoadPlan:
        plain = {fqn: value for fqn, value in self.state_dict.items() if fqn not in self.rows}
        plan = create_default_local_load_plan(plain, self.metadata, True)
        items = list(plan.items)
        for fqn, (row_start, num_rows) in self.rows.items():
            local = self.state_dict[fqn]
            expected = (num_rows, *local.shape[1:])
            stored = self.metadata.state_dict_metadata.get(fqn)
            if stored is None or isinstance(stored, BytesStorageMetadata):
                raise CheckpointError(f"checkpoint has no row-sharded tensor {fqn!r}")
            if tuple(stored.size) != expected:
                raise CheckpointError(f"{fqn}: checkpoint holds shape {tuple(stored.size)}, "
                                      f"the model expects {expected}")
            items.extend(create_read_items_for_chunk_list(fqn, stored, [_row_chunk(local, row_start)]))
        return dataclasses.replace(plan, items=items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        if index.fqn in self.rows:
            return self.state_dict[index.fqn]
        return super().lookup_tensor(index)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"refusing to unpickle {read_item.dest_index.fqn!r}: {exc}") from exc
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only the classes that DCP's ``.metadata`` file is made of."""

    _ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                        "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint._extension")
    _ALLOWED = {("torch", "Size"), ("torch", "device"), ("torch.serialization", "_get_layout"),
                ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                ("pathlib", "PureWindowsPath")}

    def find_class(self, module: str, name: str):
        if module in self._ALLOWED_MODULES or (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch":
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class _SafeFileSystemReader(dcp.FileSystemReader):
    """DCP reader whose metadata is unpickled by :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError) as exc:
            raise CheckpointError(f"cannot read checkpoint metadata {path}: {exc}") from exc
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# --------------------------------------------------------------------------------------------
# state dictionaries of the parts


def _head_shape(head) -> tuple[int, int]:
    return int(head.num_classes), int(head.embedding_size)


def _row_shard_or_value(value, head):
    """Wrap tensors with the head weight's shape as :class:`RowShard` (they are per-class rows)."""
    if isinstance(value, torch.Tensor) and value.shape == head.weight.shape:
        return RowShard(value.detach(), int(head.class_start), int(head.num_classes))
    return value


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_meta": (str(numpy_state[0]), int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, position, has_gauss, cached = state["numpy_meta"]
    np.random.set_state((kind, state["numpy_keys"].numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _saveable_state(state: TrainingState, rank: int) -> dict[str, Any]:
    head = state.head
    head_optimizer = state.head_optimizer.state_dict()
    head_optimizer["state"] = {str(key): {name: _row_shard_or_value(value, head) for name, value in entry.items()}
                               for key, entry in head_optimizer["state"].items()}
    tree: dict[str, Any] = {
        "head": {name: _row_shard_or_value(value, head) for name, value in head.state_dict().items()},
        "head_optimizer": head_optimizer,
        "schedulers": {name: scheduler.state_dict() for name, scheduler in state.schedulers.items()},
        "rng": {f"rank{rank}": _rng_state()},
    }
    if state.deepspeed_engine is None:
        if state.backbone is not None:
            tree["backbone"] = state.backbone.state_dict()
        if state.backbone_optimizer is not None:
            optimizer = state.backbone_optimizer.state_dict()
            optimizer["state"] = {str(key): value for key, value in optimizer["state"].items()}
            tree["backbone_optimizer"] = optimizer
    return tree


def _with_int_keys(optimizer_state: dict) -> dict:
    """Optimizer state keys are parameter indices; DCP stores them as strings."""
    return {**optimizer_state, "state": {int(key): value for key, value in optimizer_state.get("state", {}).items()}}


# --------------------------------------------------------------------------------------------
# directory handling


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


# --------------------------------------------------------------------------------------------
# save and load


def save_checkpoint(output_dir: str | os.PathLike, step: int, state: TrainingState, keep_last: int = 3,
                    group=None) -> Path:
    """Write the checkpoint of ``step`` to ``output_dir/checkpoint-STEP`` and keep the newest ``keep_last``.

    Collective: every rank of ``group`` calls it with its own shard of the head. The directory
    must be visible to every rank (one node, or a shared file system). When a complete
    checkpoint of ``step`` already exists it is kept and nothing is written. Returns the path.
    """
    output_dir = Path(output_dir)
    rank, world_size = get_rank(group), get_world_size(group)
    final = checkpoint_path(output_dir, step)
    tmp = output_dir / f"{_TMP_PREFIX}{step:08d}"
    head = state.head

    def prepare() -> bool:
        if rank != 0:
            return False
        output_dir.mkdir(parents=True, exist_ok=True)
        if (final / MANIFEST_NAME).is_file():
            return True
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / STATE_DIR).mkdir(parents=True)
        return False

    exists = _broadcast_from_zero(_run_collectively(prepare, group), group)
    if exists:
        return final

    def check_visible() -> None:
        if not (tmp / STATE_DIR).is_dir():
            raise CheckpointError(f"{tmp} is not visible on this rank: the output directory must be "
                                  "on a file system that all ranks share")

    _run_collectively(check_visible, group)

    tree, rows = _run_collectively(lambda: _row_shard_items(_saveable_state(state, rank)), group)
    try:
        with _single_process_quiet():
            dcp.save(tree, storage_writer=dcp.FileSystemWriter(tmp / STATE_DIR, thread_count=1),
                     planner=_RowShardSavePlanner(rows), process_group=group)
    except Exception as exc:  # DCP raises on every rank when any rank fails
        raise CheckpointError(f"saving checkpoint {final} failed: {exc}") from exc
    if state.deepspeed_engine is not None:
        _run_collectively(lambda: state.deepspeed_engine.save_checkpoint(tmp / ENGINE_DIR, ENGINE_TAG), group)

    def publish() -> None:
        if rank != 0:
            return
        row_sharded = sorted(rows)
        num_classes, embedding_size = _head_shape(head)
        manifest = {
            "format": "pfc-checkpoint", "version": FORMAT_VERSION, "step": int(step),
            "world_size": world_size, "num_classes": num_classes, "embedding_size": embedding_size,
            "engine": "deepspeed" if state.deepspeed_engine is not None else "ddp",
            "row_sharded": row_sharded, "progress": state.progress, "config": state.config,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": _file_sizes(tmp),
        }
        for written in (tmp / ENGINE_DIR).rglob("*"):  # DCP fsyncs its files, DeepSpeed does not
            if written.is_file():
                with open(written, "rb+") as stream:
                    os.fsync(stream.fileno())
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

    _run_collectively(publish, group)
    return final


def _placeholders(metadata, manifest: dict, head, rank: int, parts: set[str]) -> dict[str, Any]:
    """A nested state dict shaped like the saved one, with empty tensors to load into; the
    row-sharded ones hold this rank's rows under the head's current partition."""
    row_sharded = set(manifest.get("row_sharded", ()))
    tree: dict[str, Any] = {}
    for fqn, stored in metadata.state_dict_metadata.items():
        path = metadata.planner_data[fqn]
        if path[0] not in parts:
            continue
        if path[0] == "rng" and path[1] != f"rank{rank}":
            continue
        if isinstance(stored, BytesStorageMetadata):
            value: Any = None
        elif fqn in row_sharded:
            local = torch.empty((int(head.num_local), *stored.size[1:]), dtype=stored.properties.dtype)
            value = RowShard(local, int(head.class_start), int(stored.size[0]))
        else:
            value = torch.empty(stored.size, dtype=stored.properties.dtype)
        set_element(tree, path, value)
    return tree


def read_checkpoint_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's DCP state as full (unsharded) tensors, by flattened name
    (``head.weight`` is the whole ``num_classes × D`` matrix). One process; for inspection,
    conversion and tests. The DeepSpeed engine part is not included."""
    path = Path(path)
    manifest = validate_checkpoint(path)
    row_sharded = set(manifest.get("row_sharded", ()))
    metadata = _SafeFileSystemReader(path / STATE_DIR).read_metadata()
    flat, rows = {}, {}
    for fqn, stored in metadata.state_dict_metadata.items():
        if isinstance(stored, BytesStorageMetadata):
            continue
        flat[fqn] = torch.empty(stored.size, dtype=stored.properties.dtype)
        if fqn in row_sharded:
            rows[fqn] = (0, int(stored.size[0]))
    planner = _RowShardLoadPlanner(rows, flatten_state_dict=False)
    try:
        with _single_process_quiet():
            dcp.load(flat, storage_reader=_SafeFileSystemReader(path / STATE_DIR), planner=planner, no_dist=True)
    except Exception as exc:
        raise CheckpointError(f"reading checkpoint {path} failed: {exc}") from exc
    return flat


def _deepspeed_module_weights(path: Path) -> dict[str, torch.Tensor]:
    """The backbone weights from DeepSpeed's model-states file (read with ``weights_only=True``)."""
    files = sorted((path / ENGINE_DIR / ENGINE_TAG).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"checkpoint {path} has no DeepSpeed model states under {ENGINE_DIR}/{ENGINE_TAG}")
    try:
        payload = torch.load(files[0], map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {files[0]}: {exc}") from exc
    if not isinstance(payload, dict) or "module" not in payload:
        raise CheckpointError(f"{files[0]} holds no 'module' weights")
    return payload["module"]


def load_checkpoint(path: str | os.PathLike, state: TrainingState, group=None) -> LoadedCheckpoint:
    """Restore ``state`` in place from the checkpoint at ``path``, resharding the head's rows.

    Collective. The head's rows and their optimizer state are re-partitioned by the head's
    current partition, whatever world size saved them; schedulers, progress and config are
    restored as saved; RNG states only when the saved world size equals the current one.
    The backbone:

    - DDP checkpoint → DDP run: weights and optimizer state, any world size;
    - DeepSpeed → DeepSpeed, same world size: DeepSpeed's own load (weights, ZeRO optimizer
      partitions, engine state);
    - DeepSpeed → DeepSpeed on another world size, DDP → DeepSpeed, DeepSpeed → DDP: the weights
      only (ZeRO-1/2 optimizer partitions cannot be re-partitioned by DeepSpeed, and the two
      engines' optimizer states have different layouts); the backbone optimizer starts fresh
      and ``backbone_optimizer_restored`` is False. DeepSpeed bf16 weights are bf16.

    Raises CheckpointError (on every rank) when the checkpoint is incomplete, corrupt, or made
    for another ``num_classes`` or embedding size.
    """
    path = Path(path)
    rank, world_size = get_rank(group), get_world_size(group)
    head = state.head
    manifest = _run_collectively(lambda: validate_checkpoint(path), group)

    num_classes, embedding_size = _head_shape(head)
    problems = []
    if manifest["num_classes"] != num_classes:
        problems.append(f"num_classes={manifest['num_classes']} but the model has num_classes={num_classes}")
    if manifest["embedding_size"] != embedding_size:
        problems.append(f"embedding_size={manifest['embedding_size']} but the model has "
                        f"embedding_size={embedding_size}")
    _agree(f"checkpoint {path}: " + "; ".join(problems) if problems else None, group)
    saved_engine = manifest.get("engine", "ddp")
    engine = "deepspeed" if state.deepspeed_engine is not None else "ddp"
    same_world = manifest["world_size"] == world_size

    reader = _SafeFileSystemReader(path / STATE_DIR)
    metadata = _run_collectively(reader.read_metadata, group)
    parts = {"head", "head_optimizer", "schedulers", "rng"}
    if saved_engine == "ddp":
        parts |= {"backbone", "backbone_optimizer"} if engine == "ddp" else {"backbone"}
    tree, rows = _row_shard_items(_placeholders(metadata, manifest, head, rank, parts))
    try:
        with _single_process_quiet():
            dcp.load(tree, storage_reader=_SafeFileSystemReader(path / STATE_DIR),
                     planner=_RowShardLoadPlanner(rows), process_group=group)
    except Exception as exc:  # DCP raises on every rank when any rank fails
        raise CheckpointError(f"loading checkpoint {path} failed: {exc}") from exc

    def restore() -> tuple[bool, bool]:
        head.load_state_dict(tree["head"])
        state.head_optimizer.load_state_dict(_with_int_keys(tree["head_optimizer"]))
        for name, scheduler in state.schedulers.items():
            if name not in tree.get("schedulers", {}):
                raise CheckpointError(f"checkpoint {path} has no state for scheduler {name!r}")
            saved = dict(tree["schedulers"][name])
            if "lr_lambdas" in saved:  # LambdaLR: keep the current schedule objects (config may extend it)
                saved["lr_lambdas"] = scheduler.state_dict()["lr_lambdas"]
            scheduler.load_state_dict(saved)
        optimizer_restored = False
        if engine == "ddp":
            weights = tree.get("backbone") if saved_engine == "ddp" else _deepspeed_module_weights(path)
            if state.backbone is not None:
                state.backbone.load_state_dict(weights)
            if state.backbone_optimizer is not None and saved_engine == "ddp":
                state.backbone_optimizer.load_state_dict(_with_int_keys(tree["backbone_optimizer"]))
                optimizer_restored = True
        elif saved_engine == "ddp":
            state.deepspeed_engine.load_module_weights(tree["backbone"])
        rng = tree.get("rng", {}).get(f"rank{rank}")
        if rng is not None and same_world:
            _set_rng_state(rng)
            return True, optimizer_restored
        return False, optimizer_restored

    rng_restored, optimizer_restored = _run_collectively(restore, group)
    if engine == "deepspeed" and saved_engine == "deepspeed":
        _run_collectively(lambda: state.deepspeed_engine.load_checkpoint(
            path / ENGINE_DIR, ENGINE_TAG, module_only=not same_world), group)
        optimizer_restored = same_world
    if not optimizer_restored and rank == 0 and (state.backbone_optimizer is not None or engine == "deepspeed"):
        logger.warning("checkpoint %s (%s, %d ranks) resumed on %s with %d ranks: backbone weights restored, "
                       "its optimizer state starts fresh", path, saved_engine, manifest["world_size"], engine,
                       world_size)
    return LoadedCheckpoint(path=path, step=int(manifest["step"]), progress=manifest.get("progress", {}),
                            config=manifest.get("config", {}), saved_world_size=int(manifest["world_size"]),
                            rng_restored=bool(rng_restored), backbone_optimizer_restored=bool(optimizer_restored))
