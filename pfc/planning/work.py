"""The step's work counted op by op: flops, bytes read and written, kernel launches, per part.

    work = WorkCounter()
    with work:
        work.part = "backbone"; ...        # the step, parts named by the simulator
    work.flops["head"], work.bytes["head"], work.launches["head"], work.seconds[(gpu_name, "head")]

What an op costs (:meth:`WorkCounter.cost`), in this order:

- a collective (``c10d``): its payload, counted apart as ``comm_bytes`` (no kernel of the step);
- torch's fused optimizers (``_fused_sgd_``, which return nothing): read weights, gradients and
  momentum, write weights and momentum, as many launches as the multi-tensor kernel needs
  (:func:`fused_sgd_cost`);
- an op of pfc's own (namespace ``pfc``): what its author declared with
  :func:`pfc.head.kernels.costs.declare_cost` (an undeclared one is charged its tensor inputs and
  outputs, as an elementwise op, and counted in ``undeclared``, which the planner reports as a
  finding);
- nothing, and no launch, for an op without a tensor output (``prim.device``, ``_local_scalar_dense``
  and other metadata queries: the value comes from the host or counts as a host sync elsewhere),
  a view or alias, and an allocation (``empty``, ``new_empty``, ``empty_like``, …: memory is
  reserved, not touched);
- a fill from a shape (``zeros``, ``full``, ``zeros_like``, ``new_zeros``, …) or into a target
  (``fill_``, ``zero_``, ``copy_`` from its source, random fills): writes its output, reads only
  its source (the "like" tensor gives a shape);
- a gather (``index_select``, ``index``, ``gather``, ``embedding``) reads and writes the rows it
  returns and its index, a scatter (``index_copy_``, ``index_put_``, ``index_add_``, …) reads
  and writes the rows it is given: the rows moved, not the whole table;
- anything else reads its tensor inputs and writes its outputs; ``out=`` arguments are outputs
  only (written, not read); an in-place op reads and writes its target.

Each op that costs something is one kernel launch (a declared kernel says how many). Floating-
point operations come from ``torch.utils.flop_counter``'s formulas (matmuls and convolutions,
forward and backward). An op takes ``max(flops / peak, bytes / bandwidth)`` on each GPU of
:data:`pfc.planning.roofline.GPUS` (its pure roofline); the launches are priced by
:func:`pfc.planning.roofline.roofline`. ``by_class`` splits each part's bytes by op class
(matmul, gather, scatter, copy, fill, reduction, elementwise, optimizer, pfc kernel) for the
traffic tables of docs/benchmarks.md.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from pfc.head.kernels.costs import KernelCost, declared_cost
from pfc.planning.roofline import GPUS, peak_tflops

_aten = torch.ops.aten
_GATHERS = {_aten.index_select, _aten.index, _aten.gather, _aten.embedding, _aten.take}
_SCATTERS = {_aten.index_copy_, _aten.index_copy, _aten.index_put_, _aten.index_put, _aten.index_add_,
             _aten.index_add, _aten.scatter_, _aten.scatter, _aten.scatter_add_, _aten.scatter_add,
             _aten._index_put_impl_, _aten.index_fill_, _aten.masked_fill_}
_ALLOCATIONS = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "empty_permuted",
                "resize_", "set_", "lift_fresh", "lift_fresh_copy"}
# write their output, read nothing but a scalar: the tensor argument (if any) only gives a shape
_FILLS = {"zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full",
          "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "arange", "linspace",
          "scalar_tensor", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_"}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "logsumexp", "norm", "linalg_vector_norm", "argmax",
               "argmin", "topk", "sort", "cumsum", "prod", "all", "any", "var_mean", "_foreach_norm"}
_COPIES = {"_to_copy", "copy_", "clone", "contiguous", "_copy_from", "to"}
FUSED_OPTIMIZERS = {"_fused_sgd_", "_fused_adam_", "_fused_adamw_", "_fused_adagrad_"}
# torch's multi_tensor_apply (ATen/native/cuda/MultiTensorApply.cuh): a launch takes at most 48
# tensors of a three-list op (weights, gradients, momentum) and 320 blocks of 65,536 elements
_TENSORS_PER_LAUNCH, _CHUNKS_PER_LAUNCH, _CHUNK = 48, 320, 65536


def fused_sgd_cost(args, kwargs) -> KernelCost:
    """``_fused_sgd_(weights, grads, momenta, …)``: per element, ``d = g + λw; v = μv + d;
    w −= lr·v`` (6 flops), reading w, g, v and writing w, v (without momentum: reading w, g and
    writing w); launches as torch's multi-tensor kernel packs them (see the constants above)."""
    weights, grads = args[0], args[1]
    momenta = args[2] if len(args) > 2 else kwargs.get("momentum_buffer_list", [])
    elements = sum(w.numel() for w in weights)
    read = sum(_nbytes(t) for t in (*weights, *grads, *momenta))
    written = sum(_nbytes(t) for t in (*weights, *momenta))
    chunks = sum(math.ceil(w.numel() / _CHUNK) for w in weights)
    launches = max(math.ceil(len(weights) / _TENSORS_PER_LAUNCH), math.ceil(chunks / _CHUNKS_PER_LAUNCH), 1)
    return KernelCost(flops=6 * elements, bytes_read=read, bytes_written=written, launches=launches)


class WorkCounter(TorchDispatchMode):
    """Per part (``part``, set by the caller): flops, bytes moved, kernel launches, roofline
    seconds per GPU (without launches), bytes per op class, and the bytes handed to collectives.
    ``count_host``: count ops on CPU tensors too (tests); by default only device ops count (the
    host's bookkeeping, flags over the CPU group, is no GPU work)."""

    def __init__(self, gpus=tuple(GPUS.values()), *, count_host: bool = False):
        super().__init__()
        self.part = "other"
        self.gpus = gpus
        self.count_host = count_host
        self.flops: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.launches: dict[str, int] = defaultdict(int)
        self.comm_bytes: dict[str, int] = defaultdict(int)
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)   # (gpu name, part)
        self.by_class: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.undeclared: Counter[str] = Counter()   # pfc ops without a declared cost: calls

    def reset(self) -> None:
        """Forget what was counted (count one step only)."""
        for counts in (self.flops, self.bytes, self.launches, self.comm_bytes, self.seconds, self.by_class,
                       self.undeclared):
            counts.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace in ("c10d", "_c10d_functional"):
            self.comm_bytes[self.part] += sum(_nbytes(t) for t in _tensors((args, kwargs)))
            return out
        charged = self.cost(func, args, kwargs, out)
        if charged is not None:
            self._add(*charged, dtype=_multiplicand_dtype(args, kwargs, out), op=func._overloadpacket.__name__)
        return out

    def cost(self, func, args, kwargs, out) -> tuple[KernelCost, str] | None:
        """The op's cost and class by the rules of the module docstring; None: free (no launch)."""
        outs = {argument.name for argument in func._schema.arguments if argument.is_out}
        inputs = _tensors((args, {k: v for k, v in kwargs.items() if k not in outs}))
        outputs = _tensors(out)
        if not self.count_host and not any(t.device.type != "cpu" for t in inputs + outputs):
            return None   # host-side bookkeeping (flags over the CPU group)
        name = func._overloadpacket.__name__
        if name in FUSED_OPTIMIZERS:
            return fused_sgd_cost(args, kwargs), "optimizer"
        if func.namespace == "pfc":
            formula = declared_cost(func._schema.name)
            if formula is not None:
                return formula(args, kwargs, out), "pfc kernel"
            self.undeclared[func._schema.name] += 1
            return _io_cost(inputs, outputs, func, args, kwargs, out), "pfc kernel"
        if not outputs or name in _ALLOCATIONS:
            return None
        if func.is_view or (_aliases(outputs, inputs) and not func._schema.is_mutable):
            return None
        flops = _flops(func, args, kwargs, out)
        written = sum(_nbytes(t) for t in outputs)
        if name in _FILLS:
            return KernelCost(0, 0, written), "fill"
        if name == "copy_":   # reads its source only
            return KernelCost(0, _nbytes(args[1]) if isinstance(args[1], torch.Tensor) else 0, written), "copy"
        if func._overloadpacket in _GATHERS:   # the rows it returns, not the whole source
            return KernelCost(flops, written + sum(_nbytes(t) for t in inputs[1:]), written), "gather"
        if func._overloadpacket in _SCATTERS:  # the rows it is given, not the whole target
            moved = sum(_nbytes(t) for t in inputs[1:])
            return KernelCost(flops, moved, moved), "scatter"
        return KernelCost(flops, sum(_nbytes(t) for t in inputs), written), _op_class(name, flops)

    def _add(self, cost: KernelCost, op_class: str, *, dtype: torch.dtype, op: str) -> None:
        moved = cost.bytes_read + cost.bytes_written
        self.flops[self.part] += cost.flops
        self.bytes[self.part] += moved
        self.launches[self.part] += cost.launches
        self.by_class[self.part][op_class] += moved
        for gpu in self.gpus:
            peak = peak_tflops(gpu, dtype, op) * 1e12
            self.seconds[(gpu.name, self.part)] += max(cost.flops / peak, moved / (gpu.memory_gbps * 1e9))


def _flops(func, args, kwargs, out) -> int:
    """The op's flops by torch's formulas (0 for an op without one). An overload with an extra
    positional argument the formulas do not know (``addmm.dtype``'s ``out_dtype``, the fp32-output
    GEMM of narrow centers) is counted without it, ``out=`` left out; every other op (a convolution's
    ``None`` bias and int strides included) by all its arguments."""
    formula = flop_registry.get(func._overloadpacket)
    if formula is None:
        return 0
    names = [argument.name for argument in func._schema.arguments]
    if "out_dtype" not in names:
        return formula(*args, **kwargs, out_val=out)
    outs = {argument.name for argument in func._schema.arguments if argument.is_out}
    positional = [arg for name, arg in zip(names, args) if name != "out_dtype"]
    options = {key: value for key, value in kwargs.items() if key not in outs and key != "out_dtype"}
    return formula(*positional, **options, out_val=out)


def _io_cost(inputs, outputs, func, args, kwargs, out) -> KernelCost:
    flops = _flops(func, args, kwargs, out)
    return KernelCost(flops, sum(_nbytes(t) for t in inputs), sum(_nbytes(t) for t in outputs))


def _op_class(name: str, flops: int) -> str:
    if flops:
        return "matmul"
    if name in _REDUCTIONS:
        return "reduction"
    if name in _COPIES:
        return "copy"
    return "elementwise"


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _multiplicand_dtype(args, kwargs, out) -> torch.dtype:
    """The dtype whose peak the op's flops run at: bf16/fp16 when any input is (tensor cores take the
    narrow multiplicands: ``addmm(out fp32, a fp16, b fp16)`` accumulates into an fp32 ``self``), else
    the first tensor's. Only matmuls and convolutions have flops, so only they depend on it."""
    tensors = _tensors((args, kwargs)) or _tensors(out)
    narrow = [t.dtype for t in tensors if t.dtype in (torch.bfloat16, torch.float16)]
    return narrow[0] if narrow else tensors[0].dtype if tensors else torch.float32


def _nbytes(tensor: torch.Tensor) -> int:
    if tensor.is_sparse:
        return 0
    return tensor.numel() * tensor.element_size()


def _aliases(outputs, inputs) -> bool:
    """Whether every output shares an input's storage (a view, or an in-place op's result)."""
    if not outputs:
        return False
    storages = {id(t.untyped_storage()) for t in inputs if not t.is_sparse}
    return all(not t.is_sparse and id(t.untyped_storage()) in storages for t in outputs)
