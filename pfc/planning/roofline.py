"""Time on paper: the step's work counted op by op, turned into a roofline estimate for a named GPU.

    work = WorkCounter()
    with work:
        work.part = "backbone"; ...        # the step, parts named by the simulator
    seconds = {part: s for (gpu, part), s in work.seconds.items() if gpu == GPUS["h100"].name}
    estimate = roofline(seconds, work.comm_bytes, GPUS["h100"], global_batch=8 * 128)

Each op's floating-point operations come from ``torch.utils.flop_counter``'s formulas (the ones
``FlopCounterMode`` uses: matmuls and convolutions, forward and backward), its memory traffic is
the bytes of its tensor inputs and outputs (a view moves nothing; an in-place op reads and
writes its target), so the head's row gathers and row updates (``index_select``,
``index_copy_``) are counted by the rows they move. An op takes ``max(flops / peak, bytes /
bandwidth)`` at the vendor's peak for its input dtype (bf16/fp16: dense tensor-core peak; fp32
matmuls: the plain fp32 peak, torch's default without TF32; convolutions in fp32: TF32, cuDNN's
default). Collectives of the head take ``bytes / link bandwidth`` (ring algorithms move about
twice the payload, which the payload-per-link convention below absorbs); DDP's all-reduce of the
backbone gradient overlaps its backward and is not added.

This is an ideal bound, not a measurement: real kernels reach a fraction of peak (often
40-70 %) and the data loader is not modelled. Ratios between two class counts are its point.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry


@dataclass(frozen=True)
class GPU:
    """Vendor figures (SXM parts, dense, no sparsity): TFLOP/s, memory GB/s, GPU-to-GPU GB/s."""

    name: str
    memory_gb: float
    fp32_tflops: float
    tf32_tflops: float
    bf16_tflops: float
    memory_gbps: float
    link_gbps: float


# NVIDIA data sheets (V100 SXM2 32 GB; A100 SXM4 80 GB; H100 SXM5; H200 SXM); V100 has no bf16
# tensor cores: its bf16 figure is the fp16 tensor-core one (an optimistic bound)
GPUS = {
    "v100": GPU("V100-SXM2-32GB", 32, 15.7, 15.7, 125.0, 900.0, 300.0),
    "a100": GPU("A100-SXM4-80GB", 80, 19.5, 156.0, 312.0, 2039.0, 600.0),
    "h100": GPU("H100-SXM5-80GB", 80, 67.0, 494.7, 989.4, 3350.0, 900.0),
    "h200": GPU("H200-SXM-141GB", 141, 67.0, 494.7, 989.4, 4800.0, 900.0),
}
PARTS = ("backbone", "head", "optimizer", "other")
_CONVOLUTIONS = {"convolution", "convolution_backward", "_convolution"}
_aten = torch.ops.aten
_GATHERS = {_aten.index_select, _aten.index, _aten.gather, _aten.embedding, _aten.take}
_SCATTERS = {_aten.index_copy_, _aten.index_copy, _aten.index_put_, _aten.index_put, _aten.index_add_,
             _aten.index_add, _aten.scatter_, _aten.scatter, _aten.scatter_add_, _aten.scatter_add,
             _aten._index_put_impl_, _aten.index_fill_, _aten.masked_fill_}


class WorkCounter(TorchDispatchMode):
    """Per part (``part``, set by the caller): flops, bytes moved and roofline seconds per GPU,
    and the bytes handed to collectives."""

    def __init__(self, gpus=tuple(GPUS.values())):
        super().__init__()
        self.part = "other"
        self.gpus = gpus
        self.flops: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.comm_bytes: dict[str, int] = defaultdict(int)
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)   # (gpu name, part)

    def reset(self) -> None:
        """Forget what was counted (count one step only)."""
        for counts in (self.flops, self.bytes, self.comm_bytes, self.seconds):
            counts.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func.namespace in ("c10d", "_c10d_functional"):
            self.comm_bytes[self.part] += sum(_nbytes(t) for t in inputs)
            return out
        if not any(t.device.type != "cpu" for t in inputs) and not _on_device(out):
            return out  # host-side bookkeeping (flags over the CPU group)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if func.is_view or _aliases(outputs, inputs) and not func._schema.is_mutable:
            return out
        packet = func._overloadpacket
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        if packet in _GATHERS:      # reads the rows it returns, not the whole source
            moved = 2 * sum(_nbytes(t) for t in outputs) + sum(_nbytes(t) for t in inputs[1:])
        elif packet in _SCATTERS:   # reads and writes the rows it is given, not the whole target
            moved = 2 * sum(_nbytes(t) for t in inputs[1:])
        else:
            moved = sum(_nbytes(t) for t in inputs) + sum(_nbytes(t) for t in outputs)
        self.flops[self.part] += flops
        self.bytes[self.part] += moved
        dtype = inputs[0].dtype if inputs else torch.float32
        for gpu in self.gpus:
            peak = _peak_tflops(gpu, dtype, packet.__name__) * 1e12
            self.seconds[(gpu.name, self.part)] += max(flops / peak, moved / (gpu.memory_gbps * 1e9))
        return out


def _on_device(out) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in tree_flatten(out)[0])


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


def _peak_tflops(gpu: GPU, dtype: torch.dtype, op: str) -> float:
    if dtype in (torch.bfloat16, torch.float16):
        return gpu.bf16_tflops
    return gpu.tf32_tflops if op in _CONVOLUTIONS else gpu.fp32_tflops


@dataclass(frozen=True)
class TimeEstimate:
    """Roofline seconds of one step on ``gpu`` by part, the step, and samples/s over all ranks."""

    gpu: str
    backbone_s: float
    head_s: float
    optimizer_s: float
    other_s: float
    head_comm_s: float
    step_s: float
    samples_per_s: float

    @property
    def head_share(self) -> float:
        """The head's share of the step (its compute and its collectives)."""
        return (self.head_s + self.head_comm_s) / self.step_s if self.step_s else 0.0


def roofline(seconds: dict[str, float], comm_bytes: dict[str, float], gpu: GPU, global_batch: int) -> TimeEstimate:
    """The step's estimate on ``gpu``: ``seconds`` per part (a :class:`WorkCounter`'s for this
    GPU, one step), ``comm_bytes`` per part, ``global_batch`` samples per step over all ranks."""
    parts = {part: max(seconds.get(part, 0.0), 0.0) for part in PARTS}
    head_comm = max(comm_bytes.get("head", 0), 0) / (gpu.link_gbps * 1e9)
    step = sum(parts.values()) + head_comm
    return TimeEstimate(gpu.name, parts["backbone"], parts["head"], parts["optimizer"], parts["other"],
                        head_comm, step, global_batch / step if step else 0.0)
