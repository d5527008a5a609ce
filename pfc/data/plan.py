"""The epoch plan: which positions of an epoch each rank and DataLoader worker reads.

Pure arithmetic on (shard sample counts, seed, epoch, rank, worker): no I/O, the same answer on
every rank, so that every rank yields the same number of batches (a rank that runs out first
would hang the collectives).

With N ranks, batch size b, W workers per rank and ``S = Σ counts`` samples:

* the shards are put in the order :func:`epoch_shard_order` draws from (seed, epoch), and their
  samples, shard after shard, form one sequence of positions ``0 … S−1``;
* every rank yields ``B = S // (N·b)`` batches (:func:`batches_per_rank`): rank r owns the
  positions ``[r·B·b, (r+1)·B·b)``; the last ``S − N·B·b < N·b`` positions are left out (other
  samples each epoch, as the shard order changes);
* worker w of a rank takes ``B // W`` whole batches of the rank's range, the first ``B % W``
  workers one more, contiguous in worker order (:func:`worker_range`);
* :func:`shard_pieces` turns a range of positions into (shard, samples to skip, samples to take)
  pieces, cyclically: a worker that must top up its quota past its range (corrupt samples) reads
  the positions that follow, around the sequence again if need be.

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
