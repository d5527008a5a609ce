"""The simulated GPU of the capacity planner: torch's PrivateUse1 backend set up as a pure-Python
device named ``simgpu`` (with CUDA's autocast policy), fake tensors and a fake process group.

Why not fake CUDA tensors: on a CPU build they work forward, but autograd aborts the process
(``AccumulateGrad`` asks for a CUDA device guard: "PyTorch is not linked with support for cuda
devices", a C++ abort, not an exception). PrivateUse1 has the guard autograd needs; its tensors
exist only as fake tensors. :mod:`pfc.planning.fake_gpu` stands in for what fake tensors cannot do.

Private torch internals used here (checked with torch 2.13): ``FakeTensorMode``
(``torch._subclasses.fake_tensor``), the fake process group (``torch.testing._internal.
distributed.fake_pg.FakeStore``, backend ``"fake"``) and the Python PrivateUse1 backend
(``torch.utils.backend_registration._setup_privateuseone_for_python_backend``, experimental).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._pytree import tree_map

aten = torch.ops.aten

SIM_DEVICE_TYPE = "simgpu"


class _SimGpuModule:
    """The device module torch asks a Python backend for (autocast, seeding, counts)."""

    @staticmethod
    def get_amp_supported_dtype():
        return [torch.float16, torch.bfloat16]

    @staticmethod
    def is_available() -> bool:
        # False: a plain FakeTensorMode made later in this process (another library, a test) keeps
        # treating the machine as GPU-less (its avoid_device_init), as before this backend existed
        return False

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def _is_in_bad_fork() -> bool:
        return False

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        return None

    @staticmethod
    def is_initialized() -> bool:
        return True


_backward_works: list[bool] = []   # whether autograd runs on the simulated GPU in this process


def sim_device() -> torch.device:
    """The simulated GPU (see the module docstring), set up once per process. It must be set up
    before the process's first backward pass: the autograd engine sizes its per-device queues
    once, when it first runs (tools/plan.py is a fresh process; tests simulate in a spawned one).
    Raises RuntimeError when that is too late, or when something else already named torch's
    PrivateUse1 backend."""
    name = torch._C._get_privateuse1_backend_name()
    if name != SIM_DEVICE_TYPE:
        if name != "privateuseone":
            raise RuntimeError(f"torch's PrivateUse1 backend is already {name!r}; the planner needs it")
        from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

        _setup_privateuseone_for_python_backend(SIM_DEVICE_TYPE, backend_module=_SimGpuModule())
        _register_autocast()
    if not _backward_works:
        _backward_works.append(_probe_backward())
    if not _backward_works[0]:
        raise RuntimeError("the simulated GPU was set up after this process's first backward pass, and "
                           "autograd cannot use it: run the simulation in a fresh process")
    return torch.device(SIM_DEVICE_TYPE, 0)


def _probe_backward() -> bool:
    with fake_tensor_mode():
        tensor = torch.empty(1, device=torch.device(SIM_DEVICE_TYPE, 0), requires_grad=True)
        try:
            (tensor * 2).sum().backward()
        except RuntimeError as error:
            if "device_ready_queues_" not in str(error):
                raise
            return False
    return True


# CUDA autocast's policy (torch/csrc/autocast_mode.cpp), the ops a face-recognition step meets:
# these run in the autocast type, those in fp32, the rest in their inputs' type
_LOWER_PRECISION_OPS = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "convolution",
                        "_convolution", "linear", "mm", "addmm", "matmul", "bmm", "baddbmm", "addbmm", "mv",
                        "addmv", "prelu")
_FP32_OPS = ("softmax", "log_softmax", "layer_norm", "group_norm", "nll_loss", "cross_entropy_loss", "norm",
             "cosine_similarity", "exp", "log", "pow", "sum", "prod", "cumsum")
_libraries: list = []   # the registrations live as long as the process


def _register_autocast() -> None:
    """Autocast on the simulated GPU: PrivateUse1's autocast key has no kernels of its own (every
    op would fail under ``torch.autocast``), so everything falls through it, and the ops of
    CUDA's policy get a kernel that casts their floating inputs and calls them below autocast."""
    key = torch._C.DispatchKey.AutocastPrivateUse1
    fallthrough = torch.library.Library("_", "IMPL")
    fallthrough.fallback(torch.library.fallthrough_kernel, "AutocastPrivateUse1")
    kernels = torch.library.Library("aten", "IMPL")

    def make(op, to_fp32: bool):
        def kernel(*args, **kwargs):
            dtype = torch.float32 if to_fp32 else torch.get_autocast_dtype(SIM_DEVICE_TYPE)

            def cast(value):
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
                    return value.to(dtype)
                return value

            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
                return op(*tree_map(cast, args), **tree_map(cast, kwargs))
        return kernel

    for names, to_fp32 in ((_LOWER_PRECISION_OPS, False), (_FP32_OPS, True)):
        for name in names:
            packet = getattr(aten, name, None)
            for overload in packet.overloads() if packet is not None else ():
                if "out" in overload:
                    continue
                kernels.impl(name if overload == "default" else f"{name}.{overload}",
                             make(getattr(packet, overload), to_fp32), "AutocastPrivateUse1")
    _libraries.extend((fallthrough, kernels))


def fake_tensor_mode():
    """A fresh ``FakeTensorMode`` that accepts real tensors as constants (module constants) and
    makes ``torch.tensor(..., device=simgpu)`` on the host first (what it does when no GPU
    backend is available; the Python backend it would otherwise use has no memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    class _NoDeviceInit(FakeTensorMode):
        @property
        def avoid_device_init(self) -> bool:
            return True

    return _NoDeviceInit(allow_non_fake_inputs=True)


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0):
    """The default process group as rank ``rank`` of a fake group of ``world_size`` ranks: every
    collective returns at once (outputs keep their shapes, values are not exchanged)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def gpu_attention():
    """While active, ``F.scaled_dot_product_attention`` on the simulated GPU computes as a CUDA
    run does: flash attention for fp16/bf16 inputs, memory-efficient attention for fp32, the
    inputs first cast to the autocast type as CUDA's autocast does. Without it the simulated
    device takes torch's math path, which keeps the ``[b, heads, L, L]`` attention matrices for
    the backward that the fused kernels recompute (a ViT's activations would be overstated).
    Calls with a mask, dropout, a causal flag or other options, and other devices, are left to
    torch. The function itself is swapped (not a TorchFunctionMode, which the autograd engine
    does not carry into the recompute of a checkpointed block)."""
    original = F.scaled_dot_product_attention

    def attention(*args, **kwargs):
        if len(args) != 3 or kwargs or args[0].device.type != SIM_DEVICE_TYPE:
            return original(*args, **kwargs)
        query, key, value = args
        if torch.is_autocast_enabled(SIM_DEVICE_TYPE):
            dtype = torch.get_autocast_dtype(SIM_DEVICE_TYPE)
            query, key, value = (t.to(dtype) for t in (query, key, value))
        if query.dtype in (torch.float16, torch.bfloat16):
            return aten._scaled_dot_product_flash_attention(query, key, value)[0]
        needs_grad = any(t.requires_grad for t in (query, key, value))
        return aten._scaled_dot_product_efficient_attention(query, key, value, None, needs_grad)[0]

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
