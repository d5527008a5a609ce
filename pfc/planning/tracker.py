"""Memory by category, tracked at the dispatcher: every storage an op creates, until it is freed.

    tracker = MemoryTracker()
    with tracker:
        tracker.label = "activations"            # what new storages are, from now on
        ...                                      # any torch code, real or fake tensors
        tracker.tag(head.weight, "centers")      # a storage known by identity: fixed for good
    tracker.peak_bytes, tracker.peak_categories()   # the high-water mark and what it was made of
    tracker.phase = "head"                   # optional: high-water marks per phase as well
    tracker.phase_peaks()                    # phase → bytes by category at that phase's mark

A storage counts once (views share it) from the op that created it until Python frees it
(a weak reference's callback), rounded up to the CUDA caching allocator's 512-byte blocks. The
category of a new storage is ``label`` at its creation, or ``label(tensor)`` when ``label`` is a
function (shape rules); :meth:`tag` overrides it by identity; a storage handed to a collective
becomes a communication buffer unless tagged. At each new high-water mark the live storages are
snapshotted (lazily, at the first free after it), so the categories of the peak are the
categories of the storages live at that moment, including tags given later (a gradient is
tagged once it is accumulated). The same is kept per ``phase`` (a name the caller sets): the
planner extrapolates each phase's mark in the class count (see :mod:`pfc.planning.plan`).

The same tracker runs over the simulated rank (fake CUDA) and over a real CPU run, which is how
the simulation is validated (tests/test_plan.py).
"""
from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pfc.torch_private import uncoalesced_rows

CATEGORIES = ("centers", "momentum", "sampled rows", "logits and head scratch", "backbone parameters",
              "gradients", "optimizer state", "activations", "communication buffers", "other")
COMMUNICATION = "communication buffers"
ALLOCATOR_BLOCK = 512


@dataclass
class _Record:
    nbytes: int
    label: str
    fixed: bool = False
    origin: str = ""     # the op and shape that created it


def _rounded(nbytes: int) -> int:
    return -(-nbytes // ALLOCATOR_BLOCK) * ALLOCATOR_BLOCK


class MemoryTracker(TorchDispatchMode):
    """See the module docstring."""

    def __init__(self):
        super().__init__()
        self.label: Union[str, Callable[[torch.Tensor], str]] = "other"
        self.current_bytes = 0
        self._live: dict[int, tuple[weakref.ref, _Record]] = {}
        self._phase = "setup"
        self._phase_peak: dict[str, int] = {}
        self._snapshots: dict[str, list[_Record]] = {}
        self._dirty: str | None = None   # the phase whose new mark is not snapshotted yet

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, name: str) -> None:
        if self._dirty is not None:
            self._take_snapshot()
        self._phase = name
        if self.current_bytes > self._phase_peak.get(name, -1):
            self._phase_peak[name] = self.current_bytes
            self._dirty = name

    @property
    def peak_bytes(self) -> int:
        """The high-water mark of everything tracked so far."""
        return max(self._phase_peak.values(), default=0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        collective = func.namespace in ("c10d", "_c10d_functional")
        for tensor in tree_flatten(out)[0] + (tree_flatten((args, kwargs))[0] if collective else []):
            if isinstance(tensor, torch.Tensor):
                record = self._track(tensor, func)
                if collective and record is not None and not record.fixed:
                    record.label = COMMUNICATION
        return out

    def _track(self, tensor: torch.Tensor, func=None) -> _Record | None:
        if tensor.is_sparse:  # a sparse COO tensor: its indices and values are storages
            for part in uncoalesced_rows(tensor) or ():
                self._track(part)
            return None
        storage = tensor.untyped_storage()
        key = id(storage)
        known = self._live.get(key)
        if known is not None:
            return known[1]
        label = self.label(tensor) if callable(self.label) else self.label
        origin = f"{func._overloadpacket.__name__ if func else '?'} {list(tensor.shape)} {tensor.dtype}"
        record = _Record(_rounded(storage.nbytes()), label, origin=origin)
        self._live[key] = (weakref.ref(storage, lambda _, key=key: self._free(key)), record)
        self.current_bytes += record.nbytes
        if self.current_bytes > self._phase_peak.get(self._phase, -1):
            self._phase_peak[self._phase] = self.current_bytes
            self._dirty = self._phase
        return record

    def _free(self, key: int) -> None:
        if self._dirty is not None:
            self._take_snapshot()
        _, record = self._live.pop(key)
        self.current_bytes -= record.nbytes

    def _take_snapshot(self) -> None:
        self._snapshots[self._dirty] = [record for _, record in self._live.values()]
        self._dirty = None

    def tag(self, tensor: torch.Tensor | None, category: str) -> None:
        """Fix the category of ``tensor``'s storage (tracked now if it was not yet)."""
        if tensor is None:
            return
        record = self._track(tensor)
        if record is not None:
            record.label, record.fixed = category, True

    def phase_peaks(self) -> dict[str, dict[str, int]]:
        """Per phase: bytes by category at its high-water mark (every category, zeros included)."""
        if self._dirty is not None:
            self._take_snapshot()
        return {phase: _by_category(records) for phase, records in self._snapshots.items()}

    def peak_categories(self) -> dict[str, int]:
        """Bytes by category at the overall high-water mark."""
        peaks = self.phase_peaks()
        return max(peaks.values(), key=lambda categories: sum(categories.values()),
                   default=_by_category([]))

    def largest_at_peak(self, count: int = 10) -> list[tuple[int, str, str]]:
        """The ``count`` largest storages live at the overall high-water mark: (bytes, category, origin)."""
        peaks = self.phase_peaks()
        if not peaks:
            return []
        phase = max(peaks, key=lambda name: sum(peaks[name].values()))
        records = sorted(self._snapshots[phase], key=lambda record: -record.nbytes)[:count]
        return [(record.nbytes, record.label, record.origin) for record in records]

    def current_categories(self) -> dict[str, int]:
        """Bytes by category live now."""
        return _by_category(record for _, record in self._live.values())


def _by_category(records) -> dict[str, int]:
    totals = Counter({name: 0 for name in CATEGORIES})
    for record in records:
        totals[record.label] += record.nbytes
    return dict(totals)
