"""A GPU rank of an N-GPU job, faked on a CPU-only torch build.

    device = sim_device()                     # torch.device("simgpu", 0)
    with fake_process_group(world_size=8), fake_tensor_mode(), FakeGpu() as fake:
        ...   # build the trainer's state on ``device``, run its steps
    fake.findings     # what the step did that a GPU run would pay for

Under ``FakeTensorMode`` tensors carry shapes, dtypes and devices but no values and no memory,
so a 1B-class head costs nothing. The device is not ``cuda``: on a CPU build, fake CUDA tensors
work forward, but autograd aborts the process (``AccumulateGrad`` asks for a CUDA device guard:
"PyTorch is not linked with support for cuda devices", a C++ abort, not an exception). So the
simulated GPU is torch's PrivateUse1 backend set up as a pure-Python device named ``simgpu``
(:mod:`pfc.planning.sim_device`, with autocast for bf16/fp16), which has the guard autograd needs; its
tensors exist only as fake tensors. :class:`FakeGpu` (a dispatch mode above the fake mode)
stands in for what fake tensors cannot do and records each one with the pfc source line that
caused it:

- a CPU tensor copied to the device (``.to(device)``, ``copy_`` from CPU) or a CPU tensor (not
  a 0-d scalar) meeting a device one in an op: a **device placement** finding;
- a random fill the fake device cannot seed: left as it is (values do not matter here);
- an op whose output size depends on values (``nonzero``, ``unique``, a boolean-mask index): a
  **data-dependent size**, which on a GPU is a host synchronisation; the size is taken at its
  upper bound (every element selected), so memory is over- rather than under-estimated;
- host tensors made from Python values (``torch.tensor([...])``: control flags, counts) stay real
  tensors, and ops on real host tensors only run for real, so the host's logic sees true values;
- a device tensor made from host values (a flag tensor) keeps them through copies and in-place
  collectives (every rank is taken to hold the same), and a read returns them;
- a read of another fake value (``item``/``float``/``bool``, counted by :class:`pfc.host_syncs.HostSyncCounter`):
  answered with a plausible value so the step goes on as a healthy step would: 1.0 for a float,
  0 for an integer (no error flag, a label in range), and for a bool True when it comes from
  ``isfinite``/``all`` and False when it comes from ``any``/a comparison (no rank failed).
- ``torch.Generator(device=...)`` cannot be made for the fake device: while active, such a
  generator is a CPU one and random ops on the device ignore it (the sample's values do not matter).

Private torch internals used here, all of them (checked with torch 2.13): ``FakeTensorMode``
(``torch._subclasses.fake_tensor``), the fake process group (``torch.testing._internal.
distributed.fake_pg.FakeStore``, backend ``"fake"``), ``TorchDispatchMode``
(``torch.utils._python_dispatch``), ``torch.utils.weak.WeakIdKeyDictionary`` and the Python
PrivateUse1 backend (``torch.utils.backend_registration._setup_privateuseone_for_python_backend``,
marked experimental).
"""
from __future__ import annotations

import traceback
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from pfc.planning.sim_device import SIM_DEVICE_TYPE

aten = torch.ops.aten
_TRUE_PRODUCERS = {"isfinite", "all", "logical_and", "eq", "le", "ge"}
_FALSE_PRODUCERS = {"any", "ne", "gt", "lt", "isnan", "isinf", "logical_or"}
_DYNAMIC_SIZE = {aten.nonzero.default, aten._unique2.default, aten.unique_dim.default,
                 aten.unique_consecutive.default, aten.masked_select.default}


def pfc_site() -> str:
    """The innermost pfc source line of the current stack (``file:line``), else "outside pfc"."""
    frames = [frame for frame in traceback.extract_stack()[:-2]
              if "/pfc/" in frame.filename and "/pfc/planning/" not in frame.filename
              and not frame.filename.endswith("host_syncs.py")]
    return f"{frames[-1].filename.split('/pfc/')[-1]}:{frames[-1].lineno}" if frames else "outside pfc"


class _CpuGeneratorForSimGpu(torch.Generator):
    """Stands in for ``torch.Generator`` while :class:`FakeGpu` is active."""

    def __new__(cls, device="cpu"):
        if torch.device(device).type == SIM_DEVICE_TYPE:
            return torch._C.Generator("cpu")
        return torch._C.Generator(device)


class FakeGpu(TorchDispatchMode):
    """See the module docstring; ``findings`` counts ``"kind at file:line"``, ``by_phase`` the
    same per phase name given by :meth:`set_phase` (default "setup")."""

    def __init__(self):
        super().__init__()
        self.findings: Counter[str] = Counter()
        self.by_phase: dict[str, Counter[str]] = {}
        self.phase = "setup"
        self._producer = WeakIdKeyDictionary()
        self._values = WeakIdKeyDictionary()   # device tensors made from host values: those values
        self._generator = None

    def set_phase(self, phase: str) -> None:
        self.phase = phase

    def _record(self, kind: str) -> None:
        site = f"{kind} at {pfc_site()}"
        self.findings[site] += 1
        self.by_phase.setdefault(self.phase, Counter())[site] += 1

    def __enter__(self):
        from torch._subclasses.fake_tensor import FakeTensor

        # a fake tensor's own tolist reads element by element; this one reads nothing, and a
        # HostSyncCounter entered later wraps it and counts one read, as on a GPU
        self._generator, self._tolist = torch.Generator, (torch.Tensor.tolist, FakeTensor.__dict__.get("tolist"))
        torch.Generator = _CpuGeneratorForSimGpu
        fake = self

        def tolist(tensor):
            if not isinstance(tensor, FakeTensor):
                return self._tolist[0](tensor)
            known = fake._values.get(tensor)
            if known is not None and len(known) == tensor.numel():
                return _nested(known, tensor.shape)
            return _nested([fake._plausible_value(tensor)] * tensor.numel(), tensor.shape)

        torch.Tensor.tolist = tolist
        if self._tolist[1] is not None:
            del FakeTensor.tolist
        return super().__enter__()

    def __exit__(self, *exc):
        from torch._subclasses.fake_tensor import FakeTensor

        torch.Generator, torch.Tensor.tolist = self._generator, self._tolist[0]
        if self._tolist[1] is not None:
            FakeTensor.tolist = self._tolist[1]
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _on_host_for_real(args, kwargs):
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():   # host-side flags and counts: computed for real
                return func(*args, **kwargs)
        if func is aten._local_scalar_dense.default:
            known = self._values.get(args[0])
            return known[0] if known is not None and len(known) == 1 else self._plausible_value(args[0])
        if func in (aten._to_copy.default, aten.copy_.default) and self._host_to_device(func, args, kwargs):
            self._record("CPU tensor copied to the GPU")
        if func in _KEEPS_VALUES and isinstance(args[0], torch.Tensor) and args[0].numel() <= 64:
            source = args[0] if func is not aten.copy_.default else args[1]
            known = self._values.get(source) if isinstance(source, FakeTensorType()) else _host_values(source)
            out = func(*args, **kwargs)
            if known is not None:
                self._values[out] = known
            return out
        if func._overloadpacket.__name__ in _FUSED_OPTIMIZERS:
            # in place on existing tensors; no fake kernel exists (nothing to allocate); the work
            # counter above this mode charges them (pfc.planning.work)
            return None
        if func in _DYNAMIC_SIZE:
            self._record(f"data-dependent size ({func._overloadpacket.__name__})")
            return self._upper_bound(func, args)
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) and _has_bool_index(args[1]):
            self._record("data-dependent size (boolean-mask index)")
            indices = [_mask_positions(index) if index is not None and index.dtype == torch.bool else index
                       for index in args[1]]
            return func(args[0], _expand_mask_indices(indices), *args[2:], **kwargs)
        args, kwargs = self._meet_on_device(func, args, kwargs)
        if kwargs.get("generator") is not None and _on_device(args, kwargs):
            kwargs = {**kwargs, "generator": None}  # a CPU stand-in (see _CpuGeneratorForSimGpu)
        out = func(*args, **kwargs)
        self._note_producer(func, out)
        return out

    def _note_producer(self, func, out) -> None:
        if isinstance(out, torch.Tensor) and out.dtype == torch.bool and out.numel() <= 64:
            self._producer[out] = func._overloadpacket.__name__

    def _plausible_value(self, tensor: torch.Tensor):
        if tensor.dtype == torch.bool:
            return self._producer.get(tensor, "") not in _FALSE_PRODUCERS
        if tensor.dtype.is_floating_point:
            return 1.0
        return 0

    @staticmethod
    def _host_to_device(func, args, kwargs) -> bool:
        if func is aten.copy_.default:
            return args[0].device.type == SIM_DEVICE_TYPE and args[1].device.type == "cpu" and args[1].dim() > 0
        target = kwargs.get("device")
        return target is not None and torch.device(target).type == SIM_DEVICE_TYPE and args[0].device.type == "cpu"

    def _meet_on_device(self, func, args, kwargs):
        """A CPU tensor (not a 0-d scalar) beside a device tensor: recorded, and replaced by an
        empty device tensor of its shape so the step can go on."""
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        device = next((t.device for t in tensors if t.device.type == SIM_DEVICE_TYPE), None)
        if device is None or not any(t.device.type == "cpu" and t.dim() > 0 for t in tensors):
            return args, kwargs
        if func.namespace in ("c10d", "_c10d_functional"):
            return args, kwargs  # a collective over a CPU (gloo) group beside a CUDA one: by design
        self._record(f"CPU tensor meets a GPU tensor in {func._overloadpacket.__name__}")

        def to_device(value):
            if isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dim() > 0:
                return torch.empty(value.shape, dtype=value.dtype, device=device)
            return value

        return tree_map(to_device, args), tree_map(to_device, kwargs)

    @staticmethod
    def _upper_bound(func, args):
        tensor = args[0]
        device = tensor.device
        if func is aten.nonzero.default:
            return torch.empty((tensor.numel(), tensor.dim()), dtype=torch.int64, device=device)
        if func is aten.masked_select.default:
            return torch.empty((torch.broadcast_shapes(tensor.shape, args[1].shape).numel(),), dtype=tensor.dtype,
                               device=device)
        flat = torch.empty((tensor.numel(),), dtype=tensor.dtype, device=device)
        inverse = torch.empty(tensor.shape, dtype=torch.int64, device=device)
        counts = torch.empty((tensor.numel(),), dtype=torch.int64, device=device)
        return flat, inverse, counts


_FUSED_OPTIMIZERS = {"_fused_sgd_", "_fused_adam_", "_fused_adamw_", "_fused_adagrad_"}
_KEEPS_VALUES = {aten._to_copy.default, aten.clone.default, aten.copy_.default, aten.detach.default,
                 aten.alias.default, aten.view.default, aten._unsafe_view.default, aten.lift_fresh.default}


def FakeTensorType():
    from torch._subclasses.fake_tensor import FakeTensor

    return FakeTensor


def _nested(flat: list, shape) -> list:
    """``flat`` as nested lists of ``shape`` (what ``tolist`` returns)."""
    if len(shape) == 0:
        return flat[0]
    step = len(flat) // shape[0] if shape[0] else 0
    return [_nested(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def _host_values(tensor):
    """The values of a real host tensor (small), else None."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and not isinstance(tensor, FakeTensorType()):
        with unset_fake_temporarily():
            return tensor.reshape(-1).tolist()
    return None


def _on_host_for_real(args, kwargs) -> bool:
    """Whether an op only involves real host tensors (the control flags made from Python values:
    ``torch.tensor([...])`` lifts a real tensor); those run for real, so the host logic that reads
    them (an all-reduced error flag, a batch size that must match) sees true values."""
    from torch._subclasses.fake_tensor import FakeTensor

    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    device = kwargs.get("device")
    return (bool(tensors) and not any(isinstance(t, FakeTensor) or t.device.type != "cpu" for t in tensors)
            and (device is None or torch.device(device).type == "cpu"))


def _on_device(args, kwargs) -> bool:
    device = kwargs.get("device")
    if device is not None:
        return torch.device(device).type == SIM_DEVICE_TYPE
    return any(isinstance(t, torch.Tensor) and t.device.type == SIM_DEVICE_TYPE for t in tree_flatten(args)[0])


def _has_bool_index(indices) -> bool:
    return any(index is not None and index.dtype in (torch.bool, torch.uint8) for index in indices)


def _mask_positions(mask: torch.Tensor) -> list[torch.Tensor]:
    """The positions of an all-true ``mask``: one index tensor per mask dimension."""
    return [torch.empty((mask.numel(),), dtype=torch.int64, device=mask.device) for _ in range(mask.dim())]


def _expand_mask_indices(indices) -> list:
    expanded = []
    for index in indices:
        expanded.extend(index if isinstance(index, list) else [index])
    return expanded
