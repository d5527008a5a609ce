"""Save and restore a :class:`pfc.train.state.TrainState`: atomic, resumable on any world size.

    path = save_checkpoint(output_dir, state, keep_last=3)      # every rank calls it
    path = select_checkpoint("auto", output_dir)                 # newest complete, undamaged one
    info = load_checkpoint(path, state)                          # every rank calls it

The head's rows and their optimizer state are saved with their global row range and resharded
on load (:mod:`pfc.train.checkpoint.dcp_planner`); the directory is published atomically
(:mod:`pfc.train.checkpoint.store`); the backbone's parts are the runner's
(:class:`pfc.train.runners.base.BackboneRunner`), so this module knows no engine.

Every function here is collective: all ranks call it, and an error on any rank is raised on
every rank (:func:`pfc.distributed.agree.run_on_every_rank`), never a hang. The content checks
are split over the ranks: at the save each rank computes the CRC-32 of the files it wrote, at a
load each rank checks about 1/N of the bytes (:func:`verify_checkpoint`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from pfc.distributed.agree import agree_on_error, broadcast_object, run_on_every_rank, run_on_rank_zero
from pfc.distributed.collectives import all_gather_objects, get_rank, get_world_size
from pfc.errors import CheckpointError
from pfc.train.checkpoint import dcp_planner, store
from pfc.train.checkpoint.rng import rng_state, set_rng_state
from pfc.train.state import TrainState

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` restored: the manifest's step, progress and config, the world
    size that saved it, whether this rank's RNG states were restored (only when the saved world
    size equals the current one) and whether the backbone optimizer state was."""

    path: Path
    step: int
    progress: dict[str, Any]
    config: dict[str, Any]
    saved_world_size: int
    rng_restored: bool
    backbone_optimizer_restored: bool = True


def _row_shard_or_value(value, head, per_row: bool = False):
    """Wrap tensors with the head weight's shape as :class:`RowShard` (they are per-class rows),
    and with ``per_row`` (an optimizer's per-row state, e.g. AdamW's step counts) any tensor whose
    first dimension is the head's rows."""
    if isinstance(value, torch.Tensor) and (value.shape == head.weight.shape or (
            per_row and value.dim() >= 1 and value.shape[0] == head.weight.shape[0])):
        return dcp_planner.RowShard(value.detach(), int(head.class_start), int(head.num_classes))
    return value


def _state_tree(state: TrainState, rank: int) -> dict[str, Any]:
    head = state.head
    head_optimizer = state.head_optimizer.state_dict()
    per_row = set(getattr(state.head_optimizer, "ROW_STATES", ()))
    head_optimizer["state"] = {str(key): {name: _row_shard_or_value(value, head, name in per_row)
                                          for name, value in entry.items()}
                               for key, entry in head_optimizer["state"].items()}
    return {
        "head": {name: _row_shard_or_value(value, head) for name, value in head.state_dict().items()},
        "head_optimizer": head_optimizer,
        "schedulers": {name: scheduler.state_dict() for name, scheduler in state.schedulers.items()},
        "rng": {f"rank{rank}": rng_state()},
        **state.runner.checkpoint_state(),
    }


def _checksum_written_files(tmp: Path, rank: int, world_size: int, group=None) -> dict[str, str]:
    """Collective: the CRC-32 of every file under ``tmp``, each DCP file computed by the rank
    that wrote it (its bytes are likely still in that node's page cache), the other files
    (DCP's metadata, an engine's) split evenly; every rank returns the whole mapping."""
    where = f"checksumming checkpoint files in {tmp}"
    sizes = run_on_rank_zero(lambda: store.file_sizes(tmp), where, group)
    owners = {name: dcp_planner.writer_rank(Path(name).name) if name.startswith(store.STATE_DIR + "/") else None
              for name in sizes}
    mine = [name for name, owner in owners.items() if owner == rank]
    others = {name: size for name, size in sizes.items() if owners[name] is None or owners[name] >= world_size}
    mine += store.balanced_shares(others, world_size)[rank]
    checksums = run_on_every_rank(lambda: store.checksum_files(tmp, mine), where, group)
    return {name: value for part in all_gather_objects(checksums, group) for name, value in part.items()}


_NEARLY_FULL = 1 << 20   # bytes free at a failure below which the disk is taken as full (a short write
                         # inside torch's writer loses the OSError: "unexpected pos …")


def _discard_failed_save(exc: Exception, output_dir: Path, step: int, rank: int, group=None
                         ) -> CheckpointError | None:
    """Collective, after a save failed on every rank: remove its temporary directory (rank 0);
    when the disk is full, the CheckpointError that says so (the same on every rank), else None
    (the caller re-raises the failure as it is)."""
    tmp, message = store.temporary_path(output_dir, step), None
    if rank == 0:
        try:
            free = shutil.disk_usage(output_dir).free
        except OSError:
            free = None
        if dcp_planner.is_disk_full(exc) or (free is not None and free < _NEARLY_FULL):
            message = (f"saving checkpoint {store.checkpoint_path(output_dir, step)} failed: the disk is full "
                       f"(ENOSPC: no space left on the file system of {output_dir}; "
                       f"{'unknown' if free is None else free} bytes free when the save failed); nothing was "
                       f"written, the previous checkpoints are kept. Cause: {exc}")
    run_on_every_rank(lambda: rank == 0 and store.discard(tmp), f"removing {tmp}", group)
    message = broadcast_object(message, group)
    return CheckpointError(message) if message else None


def save_checkpoint(output_dir: str | os.PathLike, state: TrainState, keep_last: int = 3, group=None) -> Path:
    """Write the checkpoint of ``state.step`` to ``output_dir/checkpoint-STEP``, keep the newest
    ``keep_last``; returns its path.

    Collective: every rank of ``group`` calls it with its own shard of the head. The directory
    must be visible to every rank (one node, or a shared file system). When a complete
    checkpoint of this step already exists it is kept and nothing is written. A failure (a full
    disk included) raises CheckpointError on every rank, leaves no temporary directory and the
    previous checkpoints as they were.
    """
    output_dir, step = Path(output_dir), state.step
    rank, world_size = get_rank(group), get_world_size(group)
    where = f"saving checkpoint {store.checkpoint_path(output_dir, step)}"
    tmp = store.temporary_path(output_dir, step)
    try:
        if run_on_rank_zero(lambda: store.prepare(output_dir, step), where, group):
            return store.checkpoint_path(output_dir, step)

        def check_visible() -> None:
            if not (tmp / store.STATE_DIR).is_dir():
                raise CheckpointError(f"{tmp} is not visible on this rank: the output directory must be "
                                      "on a file system that all ranks share")

        run_on_every_rank(check_visible, where, group)
        tree, rows = run_on_every_rank(lambda: dcp_planner.row_shard_items(_state_tree(state, rank)), where, group)
        dcp_planner.save_tree(tree, rows, tmp / store.STATE_DIR, group)
        run_on_every_rank(lambda: state.runner.save_engine_state(tmp / store.ENGINE_DIR), where, group)
        checksums = _checksum_written_files(tmp, rank, world_size, group)
        head = state.head
        manifest = {"step": int(step), "world_size": world_size, "num_classes": int(head.num_classes),
                    "embedding_size": int(head.embedding_size), "engine": state.runner.engine,
                    "row_sharded": sorted(rows), "progress": state.progress(), "config": state.config,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        published = run_on_rank_zero(lambda: store.publish(output_dir, step, manifest, keep_last, checksums),
                                     where, group)
    except (ValueError, RuntimeError) as exc:  # agreed by run_on_every_rank or DCP: raised on every rank alike
        disk_full = _discard_failed_save(exc, output_dir, step, rank, group)
        if disk_full is not None:
            raise disk_full from exc
        raise
    return published


def verify_checkpoint(path: str | os.PathLike, group=None) -> dict[str, Any]:
    """Collective: the manifest of the checkpoint at ``path`` after checking it is complete (every
    rank) and undamaged (each rank reads about 1/N of its bytes and compares their CRC-32 with
    the manifest's); CheckpointError on every rank otherwise."""
    path = Path(path)
    rank, world_size = get_rank(group), get_world_size(group)
    where = f"checking checkpoint {path}"
    manifest = run_on_every_rank(lambda: store.validate_checkpoint(path, check_content=False), where, group)
    share = store.balanced_shares(manifest.get("files", {}), world_size)[rank]
    run_on_every_rank(lambda: store.verify_content(path, manifest, share), where, group)
    return manifest


def select_checkpoint(request: str, output_dir: str | os.PathLike, group=None) -> Path | None:
    """Collective: the checkpoint a resume request names, checked by :func:`verify_checkpoint`.

    ``""`` → None; a path → that checkpoint (CheckpointError when it is incomplete or damaged);
    ``"auto"`` → the newest usable checkpoint in ``output_dir``, skipping damaged ones with a
    warning naming each; None when there is no checkpoint; CheckpointError listing every one
    and why when there are some and none is usable (never a silent start from step 0).

    The damaged checkpoints newer than the chosen one are renamed ``checkpoint-STEP.damaged``
    (kept for inspection, never chosen again): the resumed run saves those steps anew, and a
    save keeps an existing checkpoint of its step.
    """
    if not request:
        return None
    if request != "auto":
        verify_checkpoint(request, group)
        return Path(request)
    rank = get_rank(group)
    listed = run_on_rank_zero(lambda: [str(p) for p in store.list_checkpoints(output_dir)],
                              f"listing checkpoints in {output_dir}", group)
    rejected, skipped = [], []
    for path in reversed(listed):
        try:
            verify_checkpoint(path, group)
        except CheckpointError as exc:  # raised on every rank alike: every rank moves on together
            rejected.append(str(exc))
            skipped.append(Path(path))
            if rank == 0:
                logger.warning("resume auto: skipping checkpoint %s: %s", path, exc)
            continue
        run_on_rank_zero(lambda: [store.set_aside(damaged) for damaged in skipped],
                          f"setting damaged checkpoints in {output_dir} aside", group)
        return Path(path)
    if rejected:
        raise store.all_damaged_error(output_dir, rejected)
    return None


def _check_model(path: Path, manifest: dict[str, Any], head) -> CheckpointError | None:
    problems = []
    if manifest["num_classes"] != head.num_classes:
        problems.append(f"num_classes={manifest['num_classes']} but the model has num_classes={head.num_classes}")
    if manifest["embedding_size"] != head.embedding_size:
        problems.append(f"embedding_size={manifest['embedding_size']} but the model has "
                        f"embedding_size={head.embedding_size}")
    return CheckpointError(f"checkpoint {path}: " + "; ".join(problems)) if problems else None


def _restore_schedulers(path: Path, saved: dict[str, Any], schedulers: dict[str, Any]) -> None:
    for name, scheduler in schedulers.items():
        if name not in saved:
            raise CheckpointError(f"checkpoint {path} has no state for scheduler {name!r}")
        state = dict(saved[name])
        if "lr_lambdas" in state:  # LambdaLR: keep the current schedule objects (config may extend it)
            state["lr_lambdas"] = scheduler.state_dict()["lr_lambdas"]
        scheduler.load_state_dict(state)


def _storage_casts(metadata, state: TrainState) -> list[str]:
    """``"centers float32 → bfloat16"`` for each of the head's row tensors (centers, momentum,
    AdamW's moments) that the checkpoint stores in another type than the model now does."""
    head, optimizer = state.head, state.head_optimizer
    current = {"head.weight": ("centers", head.weight.dtype)}
    names = {"momentum_buffer": "momentum", "exp_avg": "first moment", "exp_avg_sq": "second moment"}
    for index, param in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        for name, what in names.items():
            buffer = optimizer.state.get(param, {}).get(name)
            if param is head.weight and isinstance(buffer, torch.Tensor):
                current[f"head_optimizer.state.{index}.{name}"] = (what, buffer.dtype)
    notes = []
    for fqn, (what, dtype) in current.items():
        saved = getattr(getattr(metadata.state_dict_metadata.get(fqn), "properties", None), "dtype", None)
        if saved is not None and saved != dtype:
            notes.append(f"{what} {str(saved).removeprefix('torch.')} → {str(dtype).removeprefix('torch.')}")
    return notes


def load_checkpoint(path: str | os.PathLike, state: TrainState, group=None, check_content: bool = True
                    ) -> LoadedCheckpoint:
    """Restore ``state``'s objects in place from the checkpoint at ``path``; its position is
    returned in ``progress`` (the caller decides how to continue, e.g. on another world size).

    Collective. The head's rows and their optimizer state are re-partitioned by the head's
    current partition, whatever world size saved them; schedulers are restored as saved; RNG
    states only when the saved world size equals the current one; the backbone as its runner
    decides (:meth:`~pfc.train.runners.base.BackboneRunner.restore`: from the same engine its
    optimizer state too, from the other engine the weights only). The centers and their momentum
    load into the types the model stores them in now (``center_dtype``: an fp32 checkpoint into
    bf16 centers and back), rounded to nearest, with a one-line note on rank 0.

    Raises CheckpointError (on every rank) when the checkpoint is incomplete, damaged (its
    files' CRC-32 are checked unless ``check_content`` is False: the caller has just run
    :func:`verify_checkpoint`), refers to a global its metadata may not, or is made for another
    ``num_classes`` or embedding size.
    """
    path = Path(path)
    rank, world_size, head = get_rank(group), get_world_size(group), state.head
    where = f"loading checkpoint {path}"
    manifest = verify_checkpoint(path, group) if check_content else run_on_every_rank(
        lambda: store.validate_checkpoint(path, check_content=False), where, group)
    agree_on_error(_check_model(path, manifest, head), where, group)
    saved_engine = manifest.get("engine", "ddp")
    same_world = manifest["world_size"] == world_size
    metadata = run_on_every_rank(lambda: dcp_planner.read_metadata(path / store.STATE_DIR), where, group)
    parts = {"head", "head_optimizer", "schedulers", "rng"} | state.runner.parts_to_load(saved_engine)
    tree = dcp_planner.load_tree(path / store.STATE_DIR, metadata, set(manifest.get("row_sharded", ())), parts,
                                 rank, int(head.class_start), int(head.num_local), group)

    def restore() -> tuple[bool, bool]:
        head.load_state_dict(tree["head"])
        optimizer = tree["head_optimizer"]
        state.head_optimizer.load_state_dict({**optimizer, "state": {int(key): value for key, value
                                                                     in optimizer.get("state", {}).items()}})
        _restore_schedulers(path, tree.get("schedulers", {}), state.schedulers)
        optimizer_restored = state.runner.restore(tree, path / store.ENGINE_DIR, saved_engine, same_world)
        rng = tree.get("rng", {}).get(f"rank{rank}")
        if rng is not None and same_world:
            set_rng_state(rng)
        return rng is not None and same_world, optimizer_restored

    rng_restored, optimizer_restored = run_on_every_rank(restore, where, group)
    casts = _storage_casts(metadata, state)
    if casts and rank == 0:
        logger.warning("checkpoint %s: the head's storage types changed, cast on load (rounded to nearest): %s",
                       path, "; ".join(casts))
    if not optimizer_restored and rank == 0:
        logger.warning("checkpoint %s (%s, %d ranks) resumed on %s with %d ranks: backbone weights restored, "
                       "its optimizer state starts fresh", path, saved_engine, manifest["world_size"],
                       state.runner.engine, world_size)
    return LoadedCheckpoint(path=path, step=int(manifest["step"]), progress=manifest.get("progress", {}),
                            config=manifest.get("config", {}), saved_world_size=int(manifest["world_size"]),
                            rng_restored=bool(rng_restored), backbone_optimizer_restored=bool(optimizer_restored))


def read_checkpoint_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's state as full (unsharded) tensors, by flattened name
    (``head.weight`` is the whole ``num_classes × D`` matrix). One process; for inspection,
    conversion and tests. An engine's own files (DeepSpeed) are not included. CheckpointError
    when the checkpoint is incomplete or damaged, or its metadata names a global it may not."""
    path = Path(path)
    manifest = store.validate_checkpoint(path)
    return dcp_planner.read_full_tensors(path / store.STATE_DIR, set(manifest.get("row_sharded", ())))
