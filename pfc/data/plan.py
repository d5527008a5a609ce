"""The epoch plan: which positions of an epoch each rank and DataLoader worker reads, in which
order, and with which flips.

Pure arithmetic on (shard sample counts, seed, epoch, rank, worker, batch index): no I/O, the same
answer on every rank, so that every rank yields the same number of batches (a rank that runs out
first would hang the collectives), and so that any batch of the epoch can be produced without
the ones before it (a resumed run starts at its position instead of replaying the epoch).

With N ranks, batch size b, W workers per rank and ``S = Σ counts`` samples:

* the shards are put in the order :func:`epoch_shard_order` draws from (seed, epoch), and their
  samples, shard after shard, form one sequence of positions ``0 … S−1``;
* every rank yields ``B = S // (N·b)`` batches (:func:`batches_per_rank`): rank r owns the
  positions ``[r·B·b, (r+1)·B·b)``; the last ``S − N·B·b < N·b`` positions are left out (other
  samples each epoch, as the shard order changes);
* worker w of a rank takes ``B // W`` whole batches of the rank's range, the first ``B % W``
  workers one more, contiguous in worker order (:func:`worker_range`);
* a worker's range is cut into shuffle windows of ``window_batches`` whole batches
  (:func:`window_batches`); the positions of window k are permuted, and each slot given a flip,
  by a generator seeded with (seed, epoch, rank, worker, k) (:func:`window_order`); local batch j
  of the worker is its slice of the permuted window. So a batch's content depends on its own
  index only, never on the batches before it;
* the DataLoader takes batches from its workers in turn, so the rank's i-th batch is local batch
  ``i // W`` of worker ``i % W``; a loader resumed at batch N gives its k-th worker the part of
  worker ``(N + k) % W`` (:func:`resumed_role`), which keeps that order;
* :func:`shard_pieces` turns a range of positions into (shard, samples to skip, samples to take)
  pieces, cyclically: a batch that must replace corrupt samples reads the positions after its
  worker's range, from an offset of its own (:func:`top_up_start`), around the sequence again
  if need be.

So within one epoch no position is read by two ranks or two workers, and ``len(loader) = B`` on
every rank whatever the shard count, world size and worker count.
"""
from __future__ import annotations

import numpy as np


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard order of one epoch: a permutation drawn from (seed, epoch), identical on all ranks."""
    return list(np.random.default_rng([seed, epoch]).permutation(num_shards))


def batches_per_rank(num_samples: int, batch_size: int, world_size: int) -> int:
    """B = num_samples // (world_size · batch_size): full batches every rank yields per epoch."""
    return num_samples // (world_size * batch_size)


def worker_range(rank: int, worker: int, num_workers: int, batches: int, batch_size: int) -> tuple[int, int]:
    """(first position, number of samples) of one worker's slice of the epoch sequence.

    Rank r owns positions [r·B·b, (r+1)·B·b); worker w of W takes B // W batches (+1 for w < B % W)
    of it, contiguous, in worker order.
    """
    base, extra = divmod(batches, num_workers)
    first_batch = worker * base + min(worker, extra)
    count = base + (1 if worker < extra else 0)
    return (rank * batches + first_batch) * batch_size, count * batch_size


def shard_pieces(counts: list[int], start: int, length: int) -> list[tuple[int, int, int]]:
    """Cover positions [start, start + length) of the concatenation of shards with ``counts``
    samples, cyclically, as (shard index in ``counts``, samples to skip, samples to take)."""
    total = sum(counts)
    pieces: list[tuple[int, int, int]] = []
    if total == 0 or length <= 0:
        return pieces
    position = start % total
    offsets = np.cumsum([0] + counts)
    while length > 0:
        shard = int(np.searchsorted(offsets, position, side="right")) - 1
        skip = position - int(offsets[shard])
        take = min(counts[shard] - skip, length)
        pieces.append((shard, skip, take))
        length -= take
        position = (position + take) % total
    return pieces


def window_batches(shuffle_window: int, batch_size: int) -> int:
    """Whole batches per shuffle window: the fewest that hold ``shuffle_window`` samples (at least one)."""
    return max(1, -(-shuffle_window // batch_size))


def window_order(seed: int, epoch: int, rank: int, worker: int, window: int, size: int,
                 flip: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(permutation of the window's ``size`` offsets, a flip per slot (probability 1/2) or None),
    drawn from (seed, epoch, rank, worker, window) alone."""
    rng = np.random.default_rng([seed, epoch, rank, worker, window])
    order = rng.permutation(size)
    return order, (rng.random(size) < 0.5 if flip else None)


def resumed_role(start_batch: int, num_workers: int, loader_worker: int) -> tuple[int, int]:
    """(plan worker, its first local batch) that DataLoader worker ``loader_worker`` produces in a
    loader started at the rank's batch ``start_batch``.

    The rank's batch i is local batch ``i // W`` of plan worker ``i % W`` and the DataLoader
    serves its workers in turn from worker 0: so its k-th worker plays plan worker
    ``w = (start_batch + k) % W`` from the first local batch j with ``j·W + w >= start_batch``.
    """
    worker = (start_batch + loader_worker) % num_workers
    return worker, max(0, -(-(start_batch - worker) // num_workers))


def top_up_start(range_start: int, range_length: int, local_batch: int, batch_size: int) -> int:
    """The first position a worker's local batch ``local_batch`` reads (cyclically onward) to replace
    its corrupt samples: the same offset into what follows the worker's range as the batch has in
    the range, so batches short of samples do not all take the same replacements."""
    return range_start + range_length + local_batch * batch_size
