"""torch.distributed.checkpoint (DCP) with explicit row ranges: the head's rows resharded exactly.

    tree, rows = row_shard_items({"head": {"weight": RowShard(local, class_start, num_classes)}, …})
    save_tree(tree, rows, directory, group)                            # collective
    metadata = read_metadata(directory)                                # safe unpickling
    tree = load_tree(directory, metadata, row_sharded, parts, rank, class_start, num_local, group)

Rank r owns rows ``[class_start, class_start + num_local)`` of the ``num_classes × D`` center
matrix (and of every optimizer state of the same shape, e.g. the momentum). These rows are
saved as DCP chunks with their *explicit* global row offset, so DCP's metadata says exactly
which rows each file holds; on load every rank asks for its own row range under the current
partition and DCP reads the overlapping parts of the saved chunks. (``DTensor`` with
``Shard(0)`` is not used: it assumes torch.chunk's split, which differs from the head's
partition when ``num_classes % world_size != 0`` and silently loads wrong rows.)

Tensors are read by DCP with ``torch.load(weights_only=True)``, the non-tensor values (param
groups, scheduler fields, RNG tuples) with ``weights_only=True`` too, and DCP's ``.metadata``
pickle with an unpickler that admits exactly the (module, name) pairs DCP's metadata is made of
(found by saving checkpoints and listing the globals their ``.metadata`` names) and refuses
dotted names (with protocol ≥ 4 ``find_class`` walks them through attributes:
``torch.distributed.checkpoint.metadata.os.system``).

DCP reports failures as ``CheckpointException``, a ``BaseException`` (``except Exception``
misses it): :func:`save_tree`, :func:`load_tree` and :func:`read_full_tensors` turn it into a
CheckpointError with each failing rank's cause (DCP raises it on every rank alike).

This is the only module of pfc that touches DCP internals; what it relies on (torch 2.13):
- ``_nested_dict.flatten_state_dict`` and ``_traverse.set_element``: DCP's flattening of nested
  state dicts into dotted names, and setting a value at such a path;
- ``DefaultSavePlanner``/``DefaultLoadPlanner`` attributes ``state_dict``, ``original_state_dict``,
  ``mappings``, ``metadata``, ``is_coordinator`` and the helpers
  ``create_default_local_save_plan``/``create_default_local_load_plan`` and
  ``planner_helpers.create_read_items_for_chunk_list``;
- ``Metadata.planner_data`` (flattened name → nested path) and ``storage_meta.load_id``, which
  ``FileSystemReader.read_metadata`` sets and its reads check;
- ``FileSystemWriter``'s file names: rank r of the save writes ``__r_N.distcp``, the coordinator
  ``.metadata`` (:func:`writer_rank`);
- ``api.CheckpointException.failures``: rank → (exception, traceback).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    create_default_local_load_plan,
    create_default_local_save_plan,
)
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from pfc.errors import CheckpointError


@contextlib.contextmanager
def _single_process_quiet():
    """Silence DCP's warning that it runs in one process (a world of size 1 is legitimate here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


@dataclasses.dataclass
class RowShard:
    """Rows ``[row_start, row_start + local.shape[0])`` of a ``[num_rows, …]`` matrix held by this rank."""

    local: torch.Tensor
    row_start: int
    num_rows: int


def row_shard_items(tree: dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple[int, int]]]:
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
            raise CheckpointError(f"cannot unpickle {read_item.dest_index.fqn!r} with weights-only loading (its "
                                  f"content is damaged, or it names a global that is not allowed): "
                                  f"{_short(exc)}") from exc
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)


_DTYPE_NAMES = frozenset(name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype))


class _MetadataUnpickler(pickle.Unpickler):
    """Admits exactly the globals DCP's ``.metadata`` file is made of (torch 2.13), nothing by
    module and no dotted name."""

    _ALLOWED = frozenset({
        *(("torch.distributed.checkpoint.metadata", name) for name in (
            "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
            "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
        *(("torch", name) for name in _DTYPE_NAMES),
    })

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED and "." not in name:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}: a checkpoint's metadata "
                                     "may only name DCP's metadata classes")


class _SafeFileSystemReader(dcp.FileSystemReader):
    """DCP reader whose metadata is unpickled by :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError, ValueError, IndexError,
                KeyError) as exc:
            raise CheckpointError(f"cannot read checkpoint metadata {path}: {exc}") from exc
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"cannot read checkpoint metadata {path}: it holds a {type(metadata).__name__}, "
                                  "not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _placeholders(metadata, row_sharded: set[str], parts: set[str], rank: int, class_start: int,
                  num_local: int) -> dict[str, Any]:
    """A nested state dict shaped like the saved one, with empty tensors to load into; the
    row-sharded ones hold this rank's rows ``[class_start, class_start + num_local)``."""
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
            local = torch.empty((num_local, *stored.size[1:]), dtype=stored.properties.dtype)
            value = RowShard(local, class_start, int(stored.size[0]))
        else:
            value = torch.empty(stored.size, dtype=stored.properties.dtype)
        set_element(tree, path, value)
    return tree


_DCP_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


def writer_rank(name: str) -> int | None:
    """The rank that wrote the DCP file ``name`` of a save (``.metadata``: the coordinator, 0;
    None for a name DCP does not write)."""
    if name == ".metadata":
        return 0
    match = _DCP_FILE.match(name)
    return int(match.group(1)) if match else None


def _short(error: BaseException) -> str:
    """One line for ``error``: its type and message, without torch.load's long advice."""
    if isinstance(error, CheckpointError):
        return str(error)
    text = str(error)
    if "WeightsUnpickler error:" in text:   # torch.load(weights_only=True): keep the reason only
        text = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n", 1)[0]
    text = " ".join(text.split())
    return f"{type(error).__name__}: {text[:300]}"


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error``, its causes, or the failures of a DCP ``CheckpointException`` among them
    are an OSError ENOSPC/EDQUOT, or carry its message (an error agreed between ranks does)."""
    seen, pending = set(), [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(current) or "Disk quota exceeded" in str(current):
            return True
        if isinstance(current, CheckpointException):
            pending.extend(failure for failure, _ in current.failures.values())
        pending.extend((current.__cause__, current.__context__))
    return False


def _dcp_error(exc: BaseException, what: str, reading: bool = False) -> CheckpointError:
    """CheckpointError ``"{what} failed: rank R: cause; …"`` from DCP's CheckpointException (or
    any exception raised inside DCP); ``reading``: a failure that is not pfc's own check is
    said to be what it most likely is, damaged content."""
    if isinstance(exc, CheckpointException):
        failures = [failure for _, (failure, _) in sorted(exc.failures.items())]
        causes = "; ".join(f"rank {rank}: {_short(failure)}" for rank, (failure, _) in sorted(exc.failures.items()))
    else:
        failures, causes = [exc], _short(exc)
    if reading and not all(isinstance(failure, CheckpointError) for failure in failures):
        causes = f"its content is damaged or unreadable: {causes}"
    if is_disk_full(exc):
        causes = f"the disk is full (ENOSPC): {causes}"
    return CheckpointError(f"{what} failed: {causes}")


def save_tree(tree: dict[str, Any], rows: dict[str, tuple[int, int]], directory: Path, group=None) -> None:
    """Collective: write ``tree`` (from :func:`row_shard_items`) into ``directory`` with DCP;
    replicated values are written once (by the lowest rank holding them)."""
    try:
        with _single_process_quiet():
            dcp.save(tree, storage_writer=dcp.FileSystemWriter(directory, thread_count=1),
                     planner=_RowShardSavePlanner(rows), process_group=group)
    except (Exception, CheckpointException) as exc:  # DCP raises on every rank when any rank fails
        raise _dcp_error(exc, f"saving checkpoint state into {directory}") from exc


def read_metadata(directory: Path):
    """DCP's metadata of the state in ``directory``, read with the safe unpickler."""
    return _SafeFileSystemReader(directory).read_metadata()


def load_tree(directory: Path, metadata, row_sharded: set[str], parts: set[str], rank: int, class_start: int,
              num_local: int, group=None) -> dict[str, Any]:
    """Collective: the saved tree's top-level ``parts`` as a nested dict, with this rank's rows
    ``[class_start, class_start + num_local)`` of every row-sharded tensor (names in
    ``row_sharded``) and only this rank's entry of the ``rng`` part."""
    tree, rows = row_shard_items(_placeholders(metadata, row_sharded, parts, rank, class_start, num_local))
    try:
        with _single_process_quiet():
            dcp.load(tree, storage_reader=_SafeFileSystemReader(directory), planner=_RowShardLoadPlanner(rows),
                     process_group=group)
    except (Exception, CheckpointException) as exc:  # DCP raises on every rank when any rank fails
        raise _dcp_error(exc, f"loading checkpoint state from {directory}", reading=True) from exc
    return tree


def read_full_tensors(directory: Path, row_sharded: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor of the state in ``directory`` as a full (unsharded) tensor, by flattened
    name. One process."""
    metadata = read_metadata(directory)
    flat, rows = {}, {}
    for fqn, stored in metadata.state_dict_metadata.items():
        if isinstance(stored, BytesStorageMetadata):
            continue
        flat[fqn] = torch.empty(stored.size, dtype=stored.properties.dtype)
        if fqn in row_sharded:
            rows[fqn] = (0, int(stored.size[0]))
    try:
        with _single_process_quiet():
            dcp.load(flat, storage_reader=_SafeFileSystemReader(directory),
                     planner=_RowShardLoadPlanner(rows, flatten_state_dict=False), no_dist=True)
    except (Exception, CheckpointException) as exc:
        raise _dcp_error(exc, f"reading checkpoint state from {directory}", reading=True) from exc
    return flat
