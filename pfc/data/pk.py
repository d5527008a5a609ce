"""P×K batches (``sampler="pk"``): K images of each of b/K identities per rank batch, read at
random through the per-sample index.

The triplet term (:class:`pfc.head.regularizers.AngularTriplet`) needs rows that share a class in
the gathered batch, which uniformly shuffled batches over many identities almost never have.
Which rows make each batch is the plan of :mod:`pfc.data.pk_plan` (equal batch counts on every
rank, each identity about as often as its share of the data, reproducible per (seed, epoch) and
from any batch on); this module reads them: the rows of the index
(:mod:`pfc.data.sample_index`) give each sample's shard, byte offset and size, and the JPEG is
decoded straight from the memory-mapped shard into the batch buffer of the zero-copy hand-off
(:mod:`pfc.data.handoff`), by the DataLoader workers, the same way as the shuffle sampler's.

Local shards only (they are memory-mapped): a shard set at URLs or behind ``pipe:`` cannot be
read at random and raises :class:`pfc.errors.DataError` up front, as do a missing or stale index.
A sample that does not decode is skipped (with a warning, counted in ``loader.stats``) and
replaced by the identity's next image, so the batch keeps K images of each identity; an identity
none of whose images decodes is a :class:`pfc.errors.DataError` (``tools/pack_shards.py verify``
finds such data before a run).
"""
from __future__ import annotations

import mmap
from collections import OrderedDict
from typing import Iterator

import numpy as np

from pfc.data.augment import PK_STREAM, augment_batch
from pfc.data.handoff import BatchBuffers
from pfc.data.manifest import is_url, manifest_source, read_manifest
from pfc.data.pk_plan import PKPlan
from pfc.data.plan import batches_per_rank, resumed_role
from pfc.data.sample_index import open_index
from pfc.data.samples import SkipCounter, decode_into
from pfc.errors import ConfigError, DataError

OPEN_SHARDS = 64   # memory maps a worker keeps open (each holds a file descriptor)


def check_sampler(sampler: str, root_or_manifest: str, batch_size: int, k: int) -> None:
    """Before the manifest is read: ConfigError for an unknown sampler or a K that does not divide
    the batch; DataError for a P×K loader over a dataset at a URL."""
    if sampler not in ("shuffle", "pk"):
        raise ConfigError(f"sampler {sampler!r} is not one of shuffle, pk")
    if sampler != "pk":
        return
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"pk_k must be an integer >= 1, got {k!r}")
    if batch_size % k:
        raise ConfigError(f"--sampler pk needs batch_size divisible by pk_k: batch_size {batch_size} is not a "
                          f"multiple of pk_k {k}")
    if is_url(str(root_or_manifest)):
        raise DataError(_NOT_LOCAL.format(where=root_or_manifest))


_NOT_LOCAL = ("--sampler pk reads samples at random from memory-mapped local shards, but {where} is a URL; "
              "copy the shards to a local disk (and build their index: tools/pack_shards.py index DIR) "
              "or use --sampler shuffle")


def check_pk_data(root_or_manifest: str, manifest: dict, urls: list[str], batch_size: int, k: int) -> None:
    """DataError, before any worker starts, for shards not on a local disk, a missing or stale
    index, or fewer identities with samples than a batch holds (b/K)."""
    remote = next((url for url in urls if is_url(url)), None)
    if remote is not None:
        raise DataError(_NOT_LOCAL.format(where=remote))
    index = open_index(root_or_manifest, manifest, urls)
    present = int(np.count_nonzero(index.class_sizes()))
    if present < batch_size // k:
        raise DataError(f"{manifest_source(root_or_manifest)}: {present} identities have samples, fewer than "
                        f"the {batch_size // k} (batch_size / pk_k) of a P×K batch")


class ShardMaps:
    """Memory maps of local shards, opened on first use; the least recently used closes past
    :data:`OPEN_SHARDS` (a view handed out keeps its map alive until it is dropped)."""

    def __init__(self, urls: tuple[str, ...]):
        self.urls = urls
        self.maps: OrderedDict[int, mmap.mmap] = OrderedDict()

    def member(self, shard: int, offset: int, size: int) -> memoryview:
        """The ``size`` bytes at ``offset`` of shard ``shard`` (zero-copy); DataError past its end."""
        mapped = self.maps.get(shard)
        if mapped is None:
            with open(self.urls[shard], "rb") as stream:
                mapped = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
            self.maps[shard] = mapped
            if len(self.maps) > OPEN_SHARDS:
                self.maps.popitem(last=False)
        self.maps.move_to_end(shard)
        if offset + size > len(mapped):
            raise DataError(f"the index points past the end of shard {self.urls[shard]}; rebuild the index")
        return memoryview(mapped)[offset:offset + size]


class PKWorkerEpoch:
    """One DataLoader worker's P×K batches of one epoch: the rank's batches ``i ≡ role (mod W)``."""

    def __init__(self, spec, index, plan: PKPlan, role: int, num_workers: int):
        self.spec, self.index, self.plan = spec, index, plan
        self.role, self.num_workers = role, num_workers
        self.maps = ShardMaps(spec.urls)

    def batches_from(self, first_local: int, buffers: BatchBuffers, counter, decode_into) -> Iterator[tuple]:
        """(pixels handle, labels int64 [b], flips or None, skipped) of the rank's batches
        ``j·W + role`` for ``j >= first_local``, like the shuffle sampler's worker."""
        spec = self.spec
        for batch in range(first_local * self.num_workers + self.role, self.plan.batches, self.num_workers):
            rows, labels = self.plan.batch(spec.rank, batch)
            pixels, handle = buffers.acquire()
            images = pixels.numpy()
            places = zip(rows.tolist(), labels.tolist(), self.index.shard[rows].tolist(),
                         self.index.offset[rows].tolist(), self.index.size[rows].tolist())
            for slot, (row, identity, shard, offset, size) in enumerate(places):
                if not decode_into(self._sample(shard, offset, size), images[slot], counter):
                    self._replace(row, identity, images[slot], counter, decode_into)
            if spec.augmentation is not None:   # keyed by the slot of the plan's global batch
                keys = self.plan.global_batch(spec.rank, batch) * spec.batch_size + np.arange(spec.batch_size)
                augment_batch(images, keys, spec.augmentation, spec.seed, spec.epoch, PK_STREAM)
            flips = self.plan.flips(spec.rank, batch) if spec.augment else None
            yield handle, labels, flips, counter.take()

    def _sample(self, shard: int, offset: int, size: int) -> dict:
        """The sample (as the decoder takes it) whose JPEG is at ``offset`` of shard ``shard``."""
        return {"__url__": self.spec.urls[shard], "__key__": f"@{offset}", "jpg": self.maps.member(shard, offset, size)}

    def _replace(self, row: int, identity: int, out: np.ndarray, counter, decode_into) -> None:
        """Decode into ``out`` the first readable image of ``identity`` after sample ``row``."""
        first, size = int(self.index.class_start[identity]), int(self.plan.sizes[identity])
        for attempt in range(1, size):
            current = first + (row - first + attempt) % size
            sample = self._sample(int(self.index.shard[current]), int(self.index.offset[current]),
                                  int(self.index.size[current]))
            if decode_into(sample, out, counter):
                return
        raise DataError(f"identity {identity} has no readable image ({size} in the index); "
                        f"check the data with tools/pack_shards.py verify")


def pk_worker_batches(spec, loader_worker: int, num_workers: int, in_worker: bool) -> Iterator[tuple]:
    """The batches DataLoader worker ``loader_worker`` of ``num_workers`` yields in a P×K loader
    started at the rank's batch ``spec.start_batch`` (:func:`pfc.data.plan.resumed_role` keeps the
    rank's batch order: the DataLoader takes its workers' batches in turn); ``in_worker``: in a
    DataLoader worker process (batch buffers in shared memory)."""
    index = open_index(spec.index_root, read_manifest(spec.index_root), list(spec.urls))
    role, first_local = resumed_role(spec.start_batch, num_workers, loader_worker)
    plan = PKPlan(index.class_start, spec.batch_size, spec.pk_k, spec.world_size, spec.seed, spec.epoch,
                  batches_per_rank(sum(spec.counts), spec.batch_size, spec.world_size))
    if first_local * num_workers + role < plan.batches:
        buffers = BatchBuffers((spec.batch_size, *spec.image_size, 3), in_worker, loader_worker)
        yield from PKWorkerEpoch(spec, index, plan, role, num_workers).batches_from(
            first_local, buffers, SkipCounter(), decode_into)
