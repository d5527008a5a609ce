"""Handing decoded batches from DataLoader workers to the main process without copies.

    buffers = BatchBuffers(shape, shared=True, worker=w)    # in the worker
    pixels, handle = buffers.acquire()                      # decode into pixels, yield handle
    received = ReceivedBatches()                            # in the consumer, one per iteration
    pixels, busy = received.open(handle)
    ...                                                     # copy the pixels out
    release(busy)                                           # the worker may reuse the buffer

DataLoader sends a tensor to the main process through shared memory: the worker copies it into
a fresh shared segment and passes its file descriptor, and the main process maps it. For
112x112 faces that cost ~9 page faults per image in the worker (a fresh segment per batch) plus
~380 µs per batch for passing and mapping the descriptor, against ~130 µs of work per image.
So a worker decodes into a few shared buffers of its own, each sent to the consumer once (with
the first batch that uses it) and afterwards named by its id; a buffer is reused once the
consumer has cleared its busy byte (one shared byte after the pixels, set by the worker when it
hands the buffer out). A consumer that never releases costs a fresh buffer per batch: the worker
keeps at most ``keep`` of them and tells the consumer which ones it has dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pfc.torch_private import new_shared_storage_maker


@dataclass
class SharedBatch:
    """What a worker yields for a batch in a reused shared buffer: the buffer's id, the buffers
    the consumer has not seen yet (id, pixels, busy byte) and the ids it may forget."""

    worker: int
    buffer_id: int
    new: list = field(default_factory=list)
    dropped: list = field(default_factory=list)


class BatchBuffers:
    """Where a producer decodes its batches: fresh plain memory (``shared=False``), or (for
    DataLoader workers) a pool of reused shared-memory buffers."""

    def __init__(self, shape: tuple[int, ...], shared: bool, worker: int = 0, keep: int = 4):
        self.shape, self.worker, self.keep = shape, worker, keep
        self.nbytes = math.prod(shape)
        self.pool: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.dropped: list[int] = []
        self.next_id = 0
        self.new_shared = new_shared_storage_maker() if shared else None

    def acquire(self) -> tuple[torch.Tensor, torch.Tensor | SharedBatch]:
        """(uint8 tensor of ``shape`` to decode into, what to yield for it: the tensor itself, or
        a :class:`SharedBatch` that the consumer opens with :meth:`ReceivedBatches.open`)."""
        if self.new_shared is None:
            pixels = torch.empty(self.shape, dtype=torch.uint8)
            return pixels, pixels
        for buffer_id, pixels, busy in self.pool:
            if busy.item() == 0:
                busy.fill_(1)
                return pixels, self._handle(buffer_id, [])
        block = torch.empty(0, dtype=torch.uint8).set_(self.new_shared(self.nbytes + 1))
        pixels, busy = block[:self.nbytes].view(self.shape), block[self.nbytes:]
        busy.fill_(1)
        buffer_id, self.next_id = self.next_id, self.next_id + 1
        self.pool.append((buffer_id, pixels, busy))
        if len(self.pool) > self.keep:   # the consumer keeps these busy: stop reusing the oldest
            self.dropped.append(self.pool.pop(0)[0])
        return pixels, self._handle(buffer_id, [(buffer_id, pixels, busy)])

    def _handle(self, buffer_id: int, new: list) -> SharedBatch:
        handle = SharedBatch(self.worker, buffer_id, new, self.dropped)
        self.dropped = []
        return handle


class ReceivedBatches:
    """The consumer's side: the shared buffers received so far, by (worker, id)."""

    def __init__(self):
        self.buffers: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def open(self, handle: torch.Tensor | SharedBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pixels, busy byte to :func:`release` once they are copied out, or None)."""
        if isinstance(handle, torch.Tensor):
            return handle, None
        for buffer_id, pixels, busy in handle.new:
            self.buffers[handle.worker, buffer_id] = (pixels, busy)
        for buffer_id in handle.dropped:
            self.buffers.pop((handle.worker, buffer_id), None)
        return self.buffers[handle.worker, handle.buffer_id]


def release(busy: torch.Tensor | None) -> None:
    """The consumer is done with a batch's pixels: its worker may decode into them again."""
    if busy is not None:
        busy.fill_(0)
