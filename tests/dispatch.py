"""What torch dispatches, recorded for tests that count ops or read a custom op's arguments.

    with RecordedOps() as recorded:
        ...
    recorded.names              # ["aten::mm", "pfc::apply_rows", ...], views left out
    recorded.of("pfc::apply_rows")   # [(args, kwargs), ...] of each call

    per_chunk = record_update_chunks(monkeypatch)   # the ops of each UpdateInBackward.chunk call
"""
from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class RecordedOps(TorchDispatchMode):
    """Every op dispatched inside the mode except views (a view launches nothing), in order, as
    ``(name, args, kwargs)``."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not func.is_view:
            self.calls.append((func._name, args, kwargs))
        return func(*args, **kwargs)

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]

    def of(self, name: str) -> list[tuple[tuple, dict]]:
        """``(args, kwargs)`` of each call of the op ``name`` (e.g. ``"pfc::apply_rows"``)."""
        return [(args, kwargs) for called, args, kwargs in self.calls if called == name]


def record_update_chunks(monkeypatch) -> list[list[str]]:
    """From now on (for the test), the names of the ops each
    :meth:`pfc.head.update_in_backward.UpdateInBackward.chunk` call dispatches, one list per call."""
    from pfc.head.update_in_backward import UpdateInBackward

    per_chunk: list[list[str]] = []
    chunk = UpdateInBackward.chunk

    def recorded(self, *args, **kwargs):
        with RecordedOps() as ops:
            chunk(self, *args, **kwargs)
        per_chunk.append(ops.names)

    monkeypatch.setattr(UpdateInBackward, "chunk", recorded)
    return per_chunk
