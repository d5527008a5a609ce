"""The training data pipeline: webdataset shards → per-rank batches of aligned faces.

    loader = make_loader("data/shards", batch_size=128, rank=r, world_size=N, num_workers=4,
                         seed=0, epoch=e)
    for images, labels in loader:      # float32 [b, 3, H, W] in [-1, 1] (channels-last), int64 [b]
        ...
    len(loader)                          # batches per rank this epoch, the same on every rank
    loader.stats                         # {"skipped": corrupt samples/tar errors skipped so far}

Equal batch counts (a rank that runs out first would hang the collectives): which positions of
the epoch each rank and worker reads is the epoch plan, :mod:`pfc.data.plan` (the shards in an
order drawn from (seed, epoch), ``B = num_samples // (world_size · batch_size)`` batches per
rank, split among its DataLoader workers in whole batches); every worker yields exactly its
batch quota, so ``len(loader) = B`` on every rank. A worker reads its range shard by shard
(skipping, without decoding, the samples before its start inside the first shard); when corrupt
samples or a damaged tar leave it short, it tops up its quota with the positions that follow its
range (cyclically, around again if need be) — those are then seen twice in that epoch, the price
of keeping the counts equal; only data with no readable sample at all is an error. Within a
worker, samples pass a seeded shuffle buffer; horizontal flips are drawn from (seed, epoch,
rank, worker).

Work split: DataLoader workers read, shuffle, decode (simplejpeg, straight into a batch buffer in
shared memory that is reused once the consumer is done with it: the hand-off to the main
process copies nothing, see :mod:`pfc.data.handoff`) and draw the flips; they hand
over uint8 [b, H, W, 3] batches with a flip mask. The flip and the conversion to float happen
where the batch is consumed (on ``device`` when given): workers move a quarter of the bytes and
do nothing but parse and decode.

Corrupt samples (undecodable or wrong-size JPEG, missing member, non-integer label, unreadable
tar) are skipped with a warning naming the shard and key and counted in ``loader.stats``; a label
outside [0, num_classes) is a data error and raises :class:`pfc.errors.DataError`, as do a
missing or malformed manifest and data with no readable sample at all.
"""
from __future__ import annotations

import functools
import itertools
import logging
import os
import random
import signal
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import simplejpeg
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pfc.data.handoff import BatchBuffers, ReceivedBatches, release
from pfc.data.manifest import read_manifest, shard_urls
from pfc.data.plan import batches_per_rank, epoch_shard_order, shard_pieces, worker_range
from pfc.data.tarstream import TarDamage, iter_samples
from pfc.errors import DataError

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Pipeline stages (generators), each usable alone.

class SkipCounter:
    """Counts skipped samples; ``take()`` returns and resets the count since the last call."""

    def __init__(self):
        self.pending = 0

    def skip(self, url: str, key: str | None, reason: str) -> None:
        """Log and count one skipped sample (``key`` None: the unreadable rest of a shard)."""
        if key is None:
            logger.warning("skipping the rest of shard %s: %s", url, reason)
        else:
            logger.warning("skipping sample %s of shard %s: %s", key, url, reason)
        self.pending += 1

    def take(self) -> int:
        count, self.pending = self.pending, 0
        return count


def read_pieces(urls: list[str], pieces, counter: SkipCounter) -> Iterator[dict]:
    """Raw samples ({"__key__", "__url__", "jpg": bytes, "cls": bytes, ...}) of each
    (shard, skip, take) piece, read with :mod:`pfc.data.tarstream` from streams webdataset's ``gopen``
    opens; a shard that cannot be opened or read further is reported to ``counter`` and left."""
    import webdataset as wds

    for shard, skip, take in pieces:
        url = urls[shard]
        try:
            with wds.gopen(url) as stream:
                for index, sample in enumerate(iter_samples(stream, url, skip)):
                    if index >= take:
                        break
                    yield sample
        except (TarDamage, OSError, ValueError, UnicodeDecodeError) as exc:
            counter.skip(url, None, f"{type(exc).__name__}: {exc}")


def repeat_passes(make_pass, where: str) -> Iterator:
    """Chain passes ``make_pass()``, ``make_pass()``, ... forever; DataError if a whole pass is empty
    (nothing readable anywhere, so no quota could ever be met)."""
    while True:
        produced = 0
        for item in make_pass():
            produced += 1
            yield item
        if produced == 0:
            raise DataError(f"{where}: no readable sample in the whole dataset")


def shuffle_buffer(items, buffer_size: int, rng: random.Random) -> Iterator:
    """Shuffle a stream through a buffer of ``buffer_size`` items (uniform pick, swap-remove)."""
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        buffer[index], item = item, buffer[index]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def _label(sample: dict, num_classes: int, counter: SkipCounter) -> int | None:
    url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
    if "jpg" not in sample or "cls" not in sample:
        counter.skip(url, key, f"members {sorted(k for k in sample if not k.startswith('__'))}, expected jpg and cls")
        return None
    text = bytes(sample["cls"])
    try:
        label = int(text)   # ASCII digits, surrounding whitespace allowed
    except ValueError:
        counter.skip(url, key, f"label {text[:20]!r} is not an integer")
        return None
    if not 0 <= label < num_classes:
        raise DataError(f"sample {key} of shard {url} has label {label} outside [0, {num_classes}); "
                         f"the shards do not match the manifest's num_classes")
    return label


def decode_into(sample: dict, out: np.ndarray, counter: SkipCounter) -> bool:
    """Decode the sample's JPEG (simplejpeg, RGB) straight into ``out`` [H, W, 3] uint8; False
    (and counted) when it does not decode or has another size."""
    url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
    try:
        decoded = simplejpeg.decode_jpeg(sample["jpg"], colorspace="RGB", buffer=out)
    except ValueError as exc:   # also: an image larger than ``out``
        counter.skip(url, key, f"JPEG does not decode at {out.shape[1]}x{out.shape[0]} ({exc})")
        return False
    if decoded.shape != out.shape:
        counter.skip(url, key, f"image is {decoded.shape[1]}x{decoded.shape[0]}, expected {out.shape[1]}x{out.shape[0]}")
        return False
    return True


def assemble_batches(samples, quota: int, batch_size: int, image_size: tuple[int, int], num_classes: int,
                     flip: bool, rng: np.random.Generator, counter: SkipCounter, give_up_after: int,
                     shared: bool = False, worker: int = 0) -> Iterator[tuple]:
    """Decode raw samples into batches until ``quota`` good samples are out (corrupt ones are
    skipped). Yields (pixels, labels int64 ndarray [b], flips bool ndarray [b] or None, skipped
    since the previous batch): ``pixels`` is a uint8 tensor [b, H, W, 3], or with ``shared`` (in
    DataLoader worker ``worker``) a handle to a reused shared buffer that the consumer opens
    with :class:`pfc.data.handoff.ReceivedBatches` and releases once done (see :mod:`pfc.data.handoff`).
    The small parts are arrays, which DataLoader pickles by value rather than putting each in a
    shared-memory segment of its own. With ``flip``, ``flips`` marks the images (each with
    probability 1/2) that :func:`to_float_images` mirrors left-right where the batch is
    consumed. DataError after ``give_up_after`` bad samples in a row (nothing decodes)."""
    height, width = image_size
    if quota <= 0:
        return
    buffers = BatchBuffers((batch_size, height, width, 3), shared, worker)
    batch, handle = buffers.acquire()
    pixels = batch.numpy()
    labels = np.empty(batch_size, dtype=np.int64)
    filled = produced = bad_in_a_row = 0
    for sample in samples:
        label = _label(sample, num_classes, counter)
        if label is None or not decode_into(sample, pixels[filled], counter):
            bad_in_a_row += 1
            if bad_in_a_row > give_up_after:
                raise DataError(f"no readable sample in the whole dataset ({bad_in_a_row} bad in a row, "
                                f"last: {sample.get('__key__')} of {sample.get('__url__')})")
            continue
        bad_in_a_row = 0
        labels[filled] = label
        filled += 1
        produced += 1
        if filled == batch_size:
            flips = rng.random(batch_size) < 0.5 if flip else None
            yield handle, labels, flips, counter.take()
            batch, handle = buffers.acquire()
            pixels = batch.numpy()
            labels = np.empty(batch_size, dtype=np.int64)
            filled = 0
        if produced == quota:
            return


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
        start, quota = worker_range(spec.rank, worker, num_workers, self.batches(), spec.batch_size)
        if quota == 0:
            return
        order = epoch_shard_order(len(spec.urls), spec.seed, spec.epoch)
        urls = [spec.urls[i] for i in order]
        counts = [spec.counts[i] for i in order]
        # Own range first (shuffled), then — only if corrupt samples leave the quota short —
        # the positions after it, around the epoch sequence as often as needed.
        counter = SkipCounter()
        stream_seed = [spec.seed, spec.epoch, spec.rank, worker]
        total = sum(counts)
        own = read_pieces(urls, shard_pieces(counts, start, quota), counter)
        mixed = shuffle_buffer(own, spec.shuffle_buffer, random.Random(str(stream_seed)))
        top_up = repeat_passes(lambda: read_pieces(urls, shard_pieces(counts, start + quota, total), counter),
                               f"rank {spec.rank} worker {worker}")
        yield from assemble_batches(itertools.chain(mixed, top_up), quota, spec.batch_size, spec.image_size,
                                    spec.num_classes, spec.augment, np.random.default_rng(stream_seed),
                                    counter, give_up_after=total, shared=info is not None, worker=worker)


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
    """Iterable of (images, labels) batches for one rank; ``len()`` is the same on every rank.

    ``stats["skipped"]`` accumulates the corrupt samples / tar errors skipped (all workers).
    """

    def __init__(self, spec: LoaderSpec, num_workers: int, prefetch_factor: int | None, device=None):
        self.spec = spec
        self.device = device
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.stats = {"skipped": 0}

    def __len__(self) -> int:
        return ShardStream(self.spec).batches()

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
                shuffle_buffer_size: int = 1000, prefetch_factor: int | None = 2, device=None) -> FaceLoader:
    """The training batches of ``rank`` of ``world_size`` for one epoch (see the module docstring).

    Yields (images float32 [batch_size, 3, H, W] in [-1, 1], labels int64 [batch_size]);
    ``len(loader) = num_samples // (world_size · batch_size)`` on every rank. ``augment`` flips
    images horizontally with probability 1/2. Workers decode to uint8 and the float conversion
    runs where the batch is consumed, on ``device`` if given (a quarter of the bytes to move, and
    on a GPU the conversion is nearly free); images are channels-last views (see
    :func:`to_float_images`). Shard locations are local paths or URLs webdataset
    opens; ``pipe:`` URLs (shell commands) only with ``allow_pipe=True``. Raises DataError for a
    missing/malformed manifest, an empty shard list, a missing local shard or a dataset smaller
    than one batch per rank; ValueError for bad arguments (a caller's bug).
    """
    for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1),
                             ("num_workers", num_workers, 0), ("shuffle_buffer_size", shuffle_buffer_size, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank!r} outside [0, {world_size})")
    manifest = read_manifest(root_or_manifest, allow_pipe=allow_pipe)
    urls = shard_urls(root_or_manifest, manifest, allow_pipe=allow_pipe)
    spec = LoaderSpec(urls=tuple(urls), counts=tuple(s["num_samples"] for s in manifest["shards"]),
                      num_classes=manifest["num_classes"], image_size=tuple(manifest["image_size"]),
                      batch_size=batch_size, rank=rank, world_size=world_size, seed=int(seed),
                      epoch=int(epoch), augment=bool(augment), shuffle_buffer=shuffle_buffer_size)
    if batches_per_rank(manifest["num_samples"], batch_size, world_size) == 0:
        raise DataError(f"{manifest['num_samples']} samples are fewer than one batch of {batch_size} "
                        f"per rank for {world_size} ranks")
    return FaceLoader(spec, num_workers, prefetch_factor, device)
