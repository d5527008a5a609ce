"""The private torch internals pfc uses, all of them, each with what it relies on and what
happens without it. Nothing else in pfc touches a private torch name (the DCP internals of the
checkpoint planner excepted: :mod:`pfc.train.checkpoint.dcp_planner` lists those).

- ``torch._C._storage_Use_Count(storage._cdata)`` (:func:`storage_use_count`): the reference
  count of an untyped storage, i.e. how many tensors and storage handles share its memory.
  :class:`pfc.head.scratch.Workspace` reuses the center-gradient memory of the last backward only
  when nothing but the workspace holds it any more. It relies on the count being exact for
  storages made by ``new_empty`` (checked with torch 2.13, the version tested here). Missing
  (a renamed binding): the function returns None and the workspace never recycles: a fresh
  gradient block every backward, slower by its page faults, the same results.
- ``Tensor._indices()`` / ``Tensor._values()`` of a sparse COO tensor (:func:`uncoalesced_rows`):
  its indices and values as stored, without the coalescing that the public ``indices()`` /
  ``values()`` require. The row-sparse center optimizers (:mod:`pfc.head.row_optimizer`) use them
  for a gradient whose rows are already sorted and distinct (the head's, after autograd drops its coalesced flag), which
  then needs no copy. It relies on them returning the stored tensors themselves, not copies.
  Missing: the function returns None and the optimizer coalesces (one sort and copy of the
  gradient, the same values).
- ``torch.UntypedStorage._new_shared(nbytes)`` (:func:`new_shared_storage_maker`): an untyped storage
  in shared memory, made directly in a DataLoader worker so that a decoded batch crosses to the
  consumer without a copy (:class:`pfc.data.handoff.BatchBuffers`). It relies on the storage
  being shareable with the consumer by its handle, as torch's own DataLoader does. Missing: the
  buffers are plain tensors, and the DataLoader moves each batch through its own shared-memory
  copy (about 9 page faults per image more, the same pixels).
- ``torch._fused_sgd_`` (:func:`fused_sgd_`): torch's fused SGD kernel (what ``SGD(fused=True)``
  runs), one pass over weights, gradient and momentum with a ``found_inf`` skip read on the
  device. :class:`pfc.head.optim.SparseRowSGD` updates each chunk of rows with it. It relies on
  the kernel computing ``torch.optim.SGD``'s arithmetic (bit for bit on the CPU over whole
  vectors; its scalar tail may fuse a multiply-add; on CUDA as ``SGD(fused=True)``) and skipping
  when ``found_inf`` is 1. Missing (or on the ``meta`` device, where it has no kernel): the same
  update op by op, the skip by ``torch.where`` (four passes instead of one, the loop's arithmetic).
"""
from __future__ import annotations

import torch


def storage_use_count(storage: torch.UntypedStorage) -> int | None:
    """How many holders ``storage`` has; None where this torch does not tell."""
    counter = getattr(torch._C, "_storage_Use_Count", None)
    return None if counter is None else counter(storage._cdata)


def uncoalesced_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(rows [n], values [n, …])`` of a sparse COO tensor over dim 0 as stored (unsorted and
    possibly repeated rows included); None where this torch does not offer them."""
    indices, values = getattr(grad, "_indices", None), getattr(grad, "_values", None)
    if indices is None or values is None:
        return None
    return indices()[0], values()


def new_shared_storage_maker():
    """``torch.UntypedStorage._new_shared`` (``nbytes → storage in shared memory``); None where
    this torch does not offer it."""
    return getattr(torch.UntypedStorage, "_new_shared", None)


def fused_sgd_(weight: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor | None, *, lr: float,
               momentum_factor: float, weight_decay: float, found_inf: torch.Tensor | None = None) -> None:
    """``d = grad + weight_decay·w; v = momentum_factor·v + d; w = w − lr·v`` in place on contiguous
    tensors (``momentum`` None: ``w = w − lr·d``), unless ``found_inf`` (a 0-d float32 tensor on
    the tensors' device) is 1: then both stay as they are."""
    fused = getattr(torch, "_fused_sgd_", None)
    if fused is not None and weight.device.type != "meta":
        fused([weight], [grad], [] if momentum is None else [momentum], weight_decay=weight_decay,
              momentum=momentum_factor if momentum is not None else 0.0, lr=lr, dampening=0.0, nesterov=False,
              maximize=False, is_first_step=False, found_inf=found_inf)
        return
    step = torch.add(grad, weight, alpha=weight_decay)
    new_momentum = step if momentum is None else (momentum * momentum_factor).add_(step)
    new_weight = torch.add(weight, new_momentum, alpha=-lr)
    skip = None if found_inf is None else found_inf == 1
    for stored, new in ((momentum, new_momentum), (weight, new_weight)):
        if stored is not None:
            stored.copy_(new if skip is None else torch.where(skip, stored, new))
