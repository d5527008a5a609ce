"""Host synchronisations: where the host waits for a tensor's value, counted.

On a GPU, reading a device tensor's value (``.item()``, ``float()``, ``bool()``, ``int()``, an
``if`` on a tensor, ``.tolist()``, ``.cpu()``, ``.numpy()``) stalls the host until the device has
caught up, and the next kernels are queued late. A steady-state training step should make none.

    with HostSyncCounter() as counter:
        train_step(...)
    assert counter.count == 0, counter.report()

:class:`HostSyncCounter` counts, in this process and while active, every ``aten._local_scalar_dense``
(what ``item``/``float``/``bool``/``int`` run) and every call of ``Tensor.tolist``, ``Tensor.cpu``,
``Tensor.numpy`` and ``Tensor.to`` from another device to the CPU (these do not go through the dispatcher, so they
are wrapped while the counter is active). On a CPU-only run every tensor counts, since each would be a
device tensor on a GPU. The one exception is :func:`read_host`: a read of a tensor that lives on the
host by design (a flag all-reduced over a CPU process group); it refuses any tensor not on the CPU,
so it cannot hide a device sync on a GPU.
"""
from __future__ import annotations

import contextlib
import threading
import traceback
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_WRAPPED = ("tolist", "cpu", "numpy", "to")
_state = threading.local()


def _exempt() -> bool:
    return getattr(_state, "exempt", 0) > 0


@contextlib.contextmanager
def _exempting():
    _state.exempt = getattr(_state, "exempt", 0) + 1
    try:
        yield
    finally:
        _state.exempt -= 1


def read_host(tensor: torch.Tensor) -> list:
    """The values of a host (CPU) tensor as a Python list, not counted as a host sync.

    For tensors that live on the host by design (e.g. control flags all-reduced over a CPU gloo
    group); raises ValueError for a tensor on any other device, whose read would stall the host.
    """
    if tensor.device.type != "cpu":
        raise ValueError(f"read_host is for host tensors; this one is on {tensor.device} "
                         "(reading it would synchronise with the device)")
    with _exempting():
        return tensor.tolist()


def _towards_cpu(args, kwargs) -> bool:
    """Whether a ``Tensor.to(*args, **kwargs)`` call moves the tensor to the CPU."""
    target = kwargs.get("device")
    for arg in args:
        if isinstance(arg, (str, torch.device)):
            target = arg
        elif isinstance(arg, torch.Tensor):
            target = arg.device
    return target is not None and torch.device(target).type == "cpu"


class HostSyncCounter(TorchDispatchMode):
    """Counts host reads of tensor values while active (see the module docstring).

    ``count`` is the total; ``kinds`` counts by kind ("item", "tolist", "cpu", "numpy", "to");
    ``sites`` counts by the innermost pfc source line that caused them (``report()`` lists them).
    """

    def __init__(self):
        super().__init__()
        self.kinds: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()
        self._originals: dict[str, object] = {}

    @property
    def count(self) -> int:
        return sum(self.kinds.values())

    def _record(self, kind: str) -> None:
        if _exempt():
            return
        self.kinds[kind] += 1
        frames = [frame for frame in traceback.extract_stack()[:-2] if "/pfc/" in frame.filename
                  and not frame.filename.endswith("host_syncs.py")]
        site = f"{frames[-1].filename.split('/pfc/')[-1]}:{frames[-1].lineno}" if frames else "outside pfc"
        self.sites[f"{kind} at {site}"] += 1

    def report(self) -> str:
        """One line per site: ``count × kind at file:line``."""
        return "; ".join(f"{count} × {site}" for site, count in self.sites.most_common()) or "no host sync"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self._record("item")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        counter = self
        for name in _WRAPPED:
            original = getattr(torch.Tensor, name)
            self._originals[name] = original

            def wrapper(tensor, *args, _name=name, _original=original, **kwargs):
                if _name != "to" or (tensor.device.type != "cpu" and _towards_cpu(args, kwargs)):
                    counter._record(_name)
                with _exempting():  # .to/.cpu may dispatch a copy; count the call once
                    return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, wrapper)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        self._originals = {}
        return super().__exit__(*exc)
