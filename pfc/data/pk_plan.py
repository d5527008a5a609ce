"""The P×K epoch plan: which identities and which of their samples make each rank's batch.

Pure arithmetic on (samples per identity, batch size b, K, world size N, seed, epoch): no I/O,
the same answer on every rank and worker, and any batch is computed on its own (a resumed run
starts at its position). Rows refer to the per-sample index (:mod:`pfc.data.sample_index`), in
which identity c owns rows ``[class_start[c], class_start[c+1])``.

With ``S`` samples, ``P = b / K`` identities per rank batch and ``B = S // (N·b)`` batches per
rank (the shuffle sampler's count, so an epoch is as long whatever the sampler):

* the identities are laid out along ``[0, S)`` in an order drawn from (seed, epoch), each
  taking as much room as it has samples;
* ``T = N·B·P`` identity slots sit evenly along it, ``S / T`` (≥ K) apart, from an offset drawn
  from (seed, epoch): identity c is met by ``⌊n_c·T/S⌋`` or ``⌈n_c·T/S⌉`` slots, about
  ``n_c / K`` visits per epoch, as often as its share of the data allows (computed in integers:
  everything is scaled by T, so there is no rounding);
* the N·B batches of the epoch take the slots column-wise: batch g holds slots
  ``g, g + N·B, g + 2·N·B, …`` (P of them, ``S/P`` samples apart, so distinct identities unless
  one identity holds a P-th of the data; a repeated identity is replaced by the next one in the
  epoch's order that the batch does not hold yet); the batches are put in an order drawn from
  (seed, epoch) and rank r takes batches ``[r·B, (r+1)·B)`` of it;
* the k-th visit of identity c in the epoch takes images ``k·K … k·K + K − 1`` (cyclically) of
  c's samples in an order drawn from (seed, epoch, c): over an epoch each image is used about
  once; an identity with fewer than K images gives all of them once and the rest drawn with
  replacement from them (seeded by the slot);
* flips are drawn per batch from (seed, epoch, rank, batch).

Each batch holds P groups of K rows, one group per identity, group after group.
"""
from __future__ import annotations

import numpy as np

_TAG = 0x504B   # "PK": keeps these streams apart from the shuffle plan's draws


class PKPlan:
    """The P×K plan of one epoch; :meth:`batch` gives the rows and labels of any rank batch."""

    def __init__(self, class_start: np.ndarray, batch_size: int, k: int, world_size: int, seed: int, epoch: int,
                 batches: int | None = None):
        """``batches``: per rank, B (default ``S // (N·b)``; the loader passes its own count, from
        the manifest, so that both samplers announce the same length)."""
        self.class_start = np.asarray(class_start, dtype=np.int64)
        self.sizes = np.diff(self.class_start)
        self.batch_size, self.k, self.seed, self.epoch = batch_size, k, seed, epoch
        self.identities_per_batch = batch_size // k
        total = int(self.class_start[-1])
        self.batches = total // (world_size * batch_size) if batches is None else batches   # per rank, B
        self.global_batches = world_size * self.batches         # N·B
        self.slots = self.global_batches * self.identities_per_batch
        rng = np.random.default_rng([seed, epoch, _TAG])
        self.order = rng.permutation(len(self.sizes))            # identity at each place of the layout
        # identity q of the layout spans [starts[q], ends[q]) · T in slot units scaled by S·T
        ends = np.cumsum(self.sizes[self.order])
        self.scaled_ends = ends * self.slots
        self.scaled_starts = self.scaled_ends - self.sizes[self.order] * self.slots
        self.total = total
        self.shift = int(rng.integers(0, max(total, 1)))         # in [0, S): the offset of slot 0, scaled
        self.batch_order = rng.permutation(self.global_batches)

    def place_of_slot(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(place in the layout, visit number of that identity) of each slot."""
        positions = self.shift + slots * self.total          # slot s sits at (shift + s·S) / T
        places = np.searchsorted(self.scaled_ends, positions, side="right")
        first = -(-(self.scaled_starts[places] - self.shift) // self.total)   # its identity's first slot
        return places, slots - np.maximum(first, 0)

    def global_batch(self, rank: int, index: int) -> int:
        """The epoch's global batch g in [0, N·B) that is rank ``rank``'s batch ``index``."""
        return int(self.batch_order[rank * self.batches + index])

    def batch(self, rank: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows int64 [b] of the index, labels int64 [b]) of rank ``rank``'s batch ``index``."""
        global_batch = self.global_batch(rank, index)
        slots = global_batch + self.global_batches * np.arange(self.identities_per_batch, dtype=np.int64)
        places, visits = self.place_of_slot(slots)
        held: set[int] = set()
        rows, labels = [], []
        for slot, place, visit in zip(slots.tolist(), places.tolist(), visits.tolist()):
            replaced = place in held
            while place in held or self.sizes[self.order[place]] == 0:
                place = (place + 1) % len(self.order)
            held.add(place)
            identity = int(self.order[place])
            rows.append(self.class_start[identity] + self.images(identity, -1 - slot if replaced else visit))
            labels.append(np.full(self.k, identity, dtype=np.int64))
        return np.concatenate(rows), np.concatenate(labels)

    def images(self, identity: int, visit: int) -> np.ndarray:
        """K sample numbers within ``identity`` for its ``visit``-th visit of the epoch (a negative
        visit: a stand-in for a repeated identity, drawn from the visit number)."""
        size, k = int(self.sizes[identity]), self.k
        if visit < 0 or size < k:
            rng = np.random.default_rng([self.seed, self.epoch, _TAG, identity, visit & 0xFFFFFFFFFFFF])
            if size >= k:
                return rng.choice(size, k, replace=False)
            return np.concatenate([rng.permutation(size), rng.integers(0, size, k - size)])
        order = np.random.default_rng([self.seed, self.epoch, _TAG, identity]).permutation(size)
        return order[(visit * k + np.arange(k)) % size]

    def flips(self, rank: int, index: int) -> np.ndarray:
        """A horizontal flip per slot of the batch (probability 1/2)."""
        return np.random.default_rng([self.seed, self.epoch, _TAG, rank, index]).random(self.batch_size) < 0.5
