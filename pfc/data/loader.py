"""The training data pipeline: webdataset shards → per-rank batches of aligned faces.

    loader = make_loader("data/shards", batch_size=128, rank=r, world_size=N, num_workers=4,
                         seed=0, epoch=e, start_batch=0)
    for images, labels in loader:      # float32 [b, 3, H, W] in [-1, 1] (channels-last), int64 [b]
        ...
    len(loader)                          # batches it yields: B − start_batch, the same on every rank
    loader.stats                         # {"skipped": corrupt samples/tar errors skipped so far}

Equal batch counts (a rank that runs out first would hang the collectives): which positions of
the epoch each rank and worker reads is the epoch plan, :mod:`pfc.data.plan` (the shards in an
order drawn from (seed, epoch), ``B = num_samples // (world_size · batch_size)`` batches per
rank, split among its DataLoader workers in whole batches); every worker yields exactly its
batch quota, so every rank yields B batches per epoch. A worker reads its range shard by shard in
one pass, a shuffle window (``shuffle_buffer_size`` samples, rounded up to whole batches) at a
time, and cuts each window, permuted, into batches (:func:`pfc.data.plan.window_order`: the
permutation and the flips depend on (seed, epoch, rank, worker, window) only).

Resuming mid-epoch: ``start_batch=N`` yields exactly the batches N, N+1, … that the loader
started at 0 yields there (same samples, order, labels and flips; same ``num_workers``), without
opening the shards before the shuffle window of batch N or decoding any sample of an earlier
batch: the members in front of the start are passed over from their tar headers (a mapped shard
seeks). When corrupt samples (undecodable or wrong-size JPEG, missing member, non-integer label,
unreadable tar) leave a batch short, it takes replacements from the positions that follow its
worker's range, from an offset given by the batch index (cyclically, around again if need be):
those samples are then seen twice in that epoch, the price of keeping the counts equal. So a
batch's content is a function of the plan and the bytes on disk alone, corrupt samples
included, and a resume reproduces it as long as the shards are unchanged. Only data with no
readable sample at all is an error.

P×K batches (``sampler="pk"``, for the angular triplet): :mod:`pfc.data.pk`, the same length,
hand-off and resume guarantees, from local shards read at random through their per-sample index.

Work split: DataLoader workers read, decode (simplejpeg, straight into a batch buffer in shared
memory that is reused once the consumer is done with it: the hand-off to the main process copies
nothing, see :mod:`pfc.data.handoff`) and pick the flips; they hand over uint8 [b, H, W, 3]
batches with a flip mask. The flip and the conversion to float happen where the batch is
consumed (on ``device`` when given): workers move a quarter of the bytes and do nothing but
parse and decode — and, when an ``augmentation`` is on, augment each decoded image in place
(:mod:`pfc.data.augment`: crops, blur, colour, grey, drawn from the sample's position in the
epoch, so a resume or another worker count gives each sample the same pixels).

Corrupt samples are skipped with a warning naming the shard and key (an unreadable tar: the
shard, once per worker) and counted in ``loader.stats`` (each lost position the batches met,
replacement candidates included); a label outside [0, num_classes) is a data error and raises
:class:`pfc.errors.DataError`, as do a missing or malformed manifest and data with no readable
sample at all.
"""
from __future__ import annotations

import functools
import itertools
import os
import signal
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pfc.data.augment import SHUFFLE_STREAM, Augmentation, augment_batch
from pfc.data.handoff import BatchBuffers, ReceivedBatches, release
from pfc.data.manifest import read_manifest, shard_urls
from pfc.data.pk import check_pk_data, check_sampler, pk_worker_batches
from pfc.data.plan import (batches_per_rank, epoch_shard_order, resumed_role, top_up_start, window_batches,
                           window_order, worker_range)
from pfc.data.samples import SkipCounter, fill_batch
from pfc.data.tarstream import read_positions
from pfc.errors import DataError


# ---------------------------------------------------------------------------------------------
# Pipeline stages, each usable alone: read positions, decode into a batch (pfc.data.samples), one worker's epoch.

class WorkerEpoch:
    """One plan worker's batches of one epoch (see :mod:`pfc.data.plan`): its range of positions,
    read in one pass, a shuffle window at a time; :meth:`batches_from` starts at any local batch."""

    def __init__(self, spec: "LoaderSpec", worker: int, num_workers: int):
        self.spec, self.worker = spec, worker
        order = epoch_shard_order(len(spec.urls), spec.seed, spec.epoch)
        self.urls = [spec.urls[i] for i in order]
        self.counts = [spec.counts[i] for i in order]
        self.total = sum(self.counts)
        batches = batches_per_rank(self.total, spec.batch_size, spec.world_size)
        self.start, quota = worker_range(spec.rank, worker, num_workers, batches, spec.batch_size)
        self.batches = quota // spec.batch_size
        self.per_window = window_batches(spec.shuffle_buffer, spec.batch_size)
        self.counter = SkipCounter()

    def window(self, window: int) -> tuple[int, int, np.ndarray, np.ndarray | None]:
        """(first local batch, end local batch, permutation of its offsets, flip per slot) of a window."""
        spec = self.spec
        first, end = window * self.per_window, min((window + 1) * self.per_window, self.batches)
        order, flips = window_order(spec.seed, spec.epoch, spec.rank, self.worker, window,
                                    (end - first) * spec.batch_size, spec.augment)
        return first, end, order, flips

    def batches_from(self, first_batch: int, buffers: BatchBuffers) -> Iterator[tuple]:
        """(pixels handle, labels int64 [b], flips bool [b] or None, skipped since the last batch) of
        local batches ``first_batch …``: ``pixels`` is what ``buffers.acquire()`` hands out (see
        :mod:`pfc.data.handoff`). The small parts are arrays, which DataLoader pickles by value
        rather than putting each in a shared-memory segment of its own. Nothing of an earlier
        batch is decoded, and the samples of earlier batches in the first window are not read."""
        spec, size = self.spec, self.spec.batch_size
        first_window = first_batch // self.per_window
        window_start = self.start + first_window * self.per_window * size
        first, _, order, _ = self.window(first_window)
        passed = np.zeros(len(order), dtype=bool)
        passed[order[:(first_batch - first) * size]] = True   # slots of the batches before the start

        def wanted(position: int) -> bool:
            offset = position - window_start
            return offset >= len(passed) or not passed[offset]

        stream = read_positions(self.urls, self.counts, window_start, self.start + self.batches * size - window_start,
                                self.counter.shard_damage, wanted if first_batch > first else None)
        for window in range(first_window, -(-self.batches // self.per_window)):
            first, end, order, flips = self.window(window)
            samples = list(itertools.islice(stream, (end - first) * size))
            for batch in range(max(first, first_batch), end):
                slots = slice((batch - first) * size, (batch - first + 1) * size)
                pixels, handle = buffers.acquire()
                labels = np.empty(size, dtype=np.int64)
                fill_batch([samples[offset] for offset in order[slots]], pixels.numpy(), labels,
                           self.spec.num_classes, self.counter, lambda: self.top_ups(batch), self.total)
                if spec.augmentation is not None:   # each slot with the draws of the position it was planned for
                    positions = self.start + first * size + order[slots]
                    augment_batch(pixels.numpy(), positions, spec.augmentation, spec.seed, spec.epoch, SHUFFLE_STREAM)
                yield handle, labels, None if flips is None else flips[slots].copy(), self.counter.take()

    def top_ups(self, batch: int) -> Iterator[dict | None]:
        """Replacement candidates of local batch ``batch``: the positions from
        :func:`pfc.data.plan.top_up_start` on, around the epoch sequence without end."""
        start = top_up_start(self.start, self.batches * self.spec.batch_size, batch, self.spec.batch_size)
        while True:
            yield from read_positions(self.urls, self.counts, start, self.total, self.counter.shard_damage)


def to_float_images(pixels: torch.Tensor, device=None, flips: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [b, H, W, 3] → float32 [b, 3, H, W] in [-1, 1] (x / 127.5 − 1) on ``device``;
    image i mirrored left-right where ``flips[i]`` (bool [b]) is True.

    The result is a channels-last view of one contiguous [b, H, W, 3] buffer
    (``images.is_contiguous(memory_format=torch.channels_last)``): convolutions take it as is,
    and it saves a transposing copy; call ``.contiguous()`` for the NCHW layout.
    """
    if device is not None:
        pixels = pixels.to(device, non_blocking=True)   # uint8: a quarter of the float bytes
    images = pixels.to(torch.float32)
    if flips is not None and images.device.type == "cpu":
        # One image at a time, only the flipped ones: on a CPU a batched torch.where over
        # flip() costs ~5x the conversion itself.
        for index in flips.nonzero().flatten().tolist():
            images[index] = images[index].flip(1)
    elif flips is not None:
        flips = flips.to(images.device, non_blocking=True).view(-1, 1, 1, 1)
        images = torch.where(flips, images.flip(2), images)
    images.mul_(1.0 / 127.5).sub_(1.0)   # in place: no second batch-sized buffer
    return images.permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoaderSpec:
    """Everything a worker needs to produce its share of one epoch."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    num_classes: int
    image_size: tuple[int, int]
    batch_size: int
    rank: int
    world_size: int
    seed: int
    epoch: int
    augment: bool
    shuffle_buffer: int
    start_batch: int = 0
    sampler: str = "shuffle"
    pk_k: int = 4
    index_root: str = ""
    augmentation: Augmentation | None = None   # None: nothing besides the flip (an inactive one is None)


class ShardStream(IterableDataset):
    """One rank's stream of ready batches; each DataLoader worker produces its own slice."""

    def __init__(self, spec: LoaderSpec):
        super().__init__()
        self.spec = spec

    def batches(self) -> int:
        """Batches this rank yields per epoch (see :func:`pfc.data.plan.batches_per_rank`)."""
        return batches_per_rank(sum(self.spec.counts), self.spec.batch_size, self.spec.world_size)

    def __iter__(self):
        spec = self.spec
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)

        if spec.sampler == "pk":
            yield from pk_worker_batches(spec, worker, num_workers, info is not None)
            return
        role, first_batch = resumed_role(spec.start_batch, num_workers, worker)
        plan = WorkerEpoch(spec, role, num_workers)
        if first_batch < plan.batches:
            buffers = BatchBuffers((spec.batch_size, *spec.image_size, 3), info is not None, worker)
            yield from plan.batches_from(first_batch, buffers)


def ignore_stop_signals(worker_id: int, rank_pid: int) -> None:
    """DataLoader ``worker_init_fn``: the worker ignores SIGTERM and SIGINT, except from its rank.

    A scheduler's stop (SIGTERM to ``torchrun``, forwarded to each rank's whole process group)
    and a terminal's Ctrl-C (SIGINT to the foreground group) reach the workers too; a worker that
    died of it would make its rank fail ("DataLoader worker … is killed by signal") before the
    rank could checkpoint. The rank alone handles the stop and shuts its workers down: by closing
    the loader, or with SIGTERM from ``rank_pid`` itself (DataLoader's and multiprocessing's
    fallback at exit), which still ends the worker at once (exit code 0). Both signals are
    blocked and taken by a thread that reads who sent them; a worker whose rank is gone exits
    by itself (torch's watchdog, within seconds).
    """
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # threads started later inherit the mask
    threading.Thread(target=_exit_when_the_rank_asks, args=(stop_signals, rank_pid), daemon=True,
                     name="pfc-worker-signals").start()


def _exit_when_the_rank_asks(stop_signals: set, rank_pid: int) -> None:
    while True:
        if signal.sigwaitinfo(stop_signals).si_pid == rank_pid:
            os._exit(0)   # the rank is closing its loader: nothing of this worker is needed any more


def _as_is(batch):
    """DataLoader's collate step: none (its default would turn arrays into tensors)."""
    return batch


class FaceLoader:
    """Iterable of (images, labels) batches for one rank, from batch ``spec.start_batch`` of the
    epoch on; ``len()`` (the batches it yields: ``epoch_batches − start_batch``) is the same on
    every rank. ``stats["skipped"]`` accumulates the corrupt samples / tar errors skipped (all workers).
    """

    def __init__(self, spec: LoaderSpec, num_workers: int, prefetch_factor: int | None, device=None):
        self.spec = spec
        self.device = device
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.stats = {"skipped": 0}

    @property
    def epoch_batches(self) -> int:
        """Batches per rank in the whole epoch, B (:func:`pfc.data.plan.batches_per_rank`)."""
        return ShardStream(self.spec).batches()

    def __len__(self) -> int:
        return self.epoch_batches - self.spec.start_batch

    def __iter__(self):
        loader = DataLoader(ShardStream(self.spec), batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            worker_init_fn=functools.partial(ignore_stop_signals, rank_pid=os.getpid()))
        received = ReceivedBatches()
        for handle, labels, flips, skipped in loader:
            pixels, busy = received.open(handle)
            self.stats["skipped"] += int(skipped)
            labels = torch.from_numpy(labels)
            if self.device is not None:
                labels = labels.to(self.device, non_blocking=True)
            flips = torch.from_numpy(flips) if flips is not None else None
            images = to_float_images(pixels, self.device, flips)   # a copy: pixels are free again
            release(busy)
            yield images, labels


def make_loader(root_or_manifest: str, batch_size: int, rank: int, world_size: int, num_workers: int,
                seed: int, epoch: int, augment: bool = True, allow_pipe: bool = False,
                shuffle_buffer_size: int = 1000, prefetch_factor: int | None = 2, device=None,
                start_batch: int = 0, sampler: str = "shuffle", pk_k: int = 4,
                augmentation: Augmentation | None = None) -> FaceLoader:
    """The training batches of ``rank`` of ``world_size`` for one epoch (see the module docstring),
    from the rank's batch ``start_batch`` of the epoch on: exactly the batches the loader started
    at 0 yields from there (with the same ``num_workers``), without decoding the ones before.

    Yields (images float32 [batch_size, 3, H, W] in [-1, 1], labels int64 [batch_size]);
    ``len(loader) = B − start_batch`` with ``B = num_samples // (world_size · batch_size)``
    (``loader.epoch_batches``) on every rank. ``augment`` flips images horizontally with
    probability 1/2. Each worker shuffles its samples in windows of ``shuffle_buffer_size``
    samples rounded up to whole batches. Workers decode to uint8 and the float conversion runs
    where the batch is consumed, on ``device`` if given (a quarter of the bytes to move, and on a
    GPU the conversion is nearly free); images are channels-last views (see
    :func:`to_float_images`). Shard locations are local paths or URLs webdataset opens; ``pipe:`` URLs (shell commands) only with ``allow_pipe=True``. Raises DataError for a
    missing/malformed manifest, an empty shard list, a missing local shard or a dataset smaller
    than one batch per rank; ValueError for bad arguments (a caller's bug, e.g. ``start_batch > B``).
    ``sampler="pk"``: ``pk_k`` images of each of ``batch_size / pk_k`` identities (:mod:`pfc.data.pk`).
    ``augmentation``: crops, blur, colour and grey images besides the flip, drawn per image from
    (seed, epoch, its position) (:mod:`pfc.data.augment`); None or all probabilities 0: none.
    """
    for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1),
                             ("num_workers", num_workers, 0), ("shuffle_buffer_size", shuffle_buffer_size, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank!r} outside [0, {world_size})")
    if augmentation is not None and not isinstance(augmentation, Augmentation):
        raise ValueError(f"augmentation must be a pfc.data.augment.Augmentation or None, got {augmentation!r}")
    check_sampler(sampler, root_or_manifest, batch_size, pk_k)
    manifest = read_manifest(root_or_manifest, allow_pipe=allow_pipe)
    urls = shard_urls(root_or_manifest, manifest, allow_pipe=allow_pipe)
    if sampler == "pk":
        check_pk_data(root_or_manifest, manifest, urls, batch_size, pk_k)
    spec = LoaderSpec(urls=tuple(urls), counts=tuple(s["num_samples"] for s in manifest["shards"]),
                      num_classes=manifest["num_classes"], image_size=tuple(manifest["image_size"]),
                      batch_size=batch_size, rank=rank, world_size=world_size, seed=int(seed),
                      epoch=int(epoch), augment=bool(augment), shuffle_buffer=shuffle_buffer_size,
                      start_batch=start_batch, sampler=sampler, pk_k=pk_k, index_root=str(root_or_manifest),
                      augmentation=augmentation if augmentation is not None and augmentation.active else None)
    batches = batches_per_rank(manifest["num_samples"], batch_size, world_size)
    if batches == 0:
        raise DataError(f"{manifest['num_samples']} samples are fewer than one batch of {batch_size} "
                        f"per rank for {world_size} ranks")
    if not isinstance(start_batch, int) or not 0 <= start_batch <= batches:
        raise ValueError(f"start_batch {start_batch!r} outside [0, {batches}] (the batches per rank of an epoch)")
    return FaceLoader(spec, num_workers, prefetch_factor, device)
