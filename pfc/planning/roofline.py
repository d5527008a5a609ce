"""Time on paper: the step's work (:class:`pfc.planning.work.WorkCounter`) as seconds on a named GPU.

    estimate = roofline(seconds, comm_bytes, GPUS["v100"], global_batch=8 * 128, launches=launches)
    estimate.samples_per_s            # calibrated: the backbone at its measured efficiency
    estimate.roofline_samples_per_s   # pure roofline: every op at vendor peak, no launch cost

Two estimates of one step, per part (backbone, head, optimizer, other):

- the **pure roofline**: every op at ``max(flops / peak, bytes / bandwidth)`` at the vendor's
  peak for its input dtype (bf16/fp16: dense tensor-core peak; fp32 matmuls: plain fp32, torch's
  default without TF32; fp32 convolutions: TF32, cuDNN's default), no launch cost. An ideal bound.
- the **calibrated** estimate (``samples_per_s``, the planner's ``predicted_samples_per_s``):
  the backbone's roofline divided by the fraction of it a published run reached on that GPU
  (:data:`BACKBONE_CALIBRATION`, which also covers its launches); the head, the optimizers and
  the rest at their roofline plus :data:`LAUNCH_S` per kernel launch. Kernels are issued one
  after another by eager PyTorch: when they are short (the head's per-chunk ops), the GPU waits
  for the host to launch the next one, and that wait is what a fused kernel saves.

Collectives of the head take ``bytes / link bandwidth`` (ring algorithms move about twice the
payload, which the payload-per-link convention absorbs); DDP's all-reduce of the backbone
gradient overlaps its backward and is not added. The data loader is not modelled.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


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


def peak_tflops(gpu: GPU, dtype: torch.dtype, op: str) -> float:
    """The peak an op of input ``dtype`` runs at: bf16/fp16 the dense tensor-core peak; fp32
    matmuls the plain fp32 peak (torch's default, no TF32); fp32 convolutions TF32 (cuDNN's default)."""
    if dtype in (torch.bfloat16, torch.float16):
        return gpu.bf16_tflops
    return gpu.tf32_tflops if op in _CONVOLUTIONS else gpu.fp32_tflops


# One kernel launch as the step pays it: the driver and runtime take about 4-6 µs to submit a
# kernel (measured with CUDA 13: https://susun-blog.com/blog/pegainfer-3-cuda-graph, "about
# 4-6 μs"), and PyTorch's dispatcher adds its own per-op overhead on top; 5 µs is the low end
# of the 5-10 µs issue 19 assumed, so launch-bound estimates are optimistic rather than not.
LAUNCH_S = 5e-6


@dataclass(frozen=True)
class Calibration:
    """A published training speed that calibrates the backbone on one GPU kind: ``efficiency``
    is the backbone's pure roofline time divided by its measured time (the measured step less
    this planner's calibrated head, optimizer and other time for that job)."""

    efficiency: float
    source: str


# From `python bench/calibrate_planner.py` (docs/benchmarks.md, "Planner calibration"), which plans
# each published job and solves for the backbone's share of its measured step: V100 204.6 ms
# measured, 13.2 ms planned for the rest, 64.0 ms backbone roofline → 0.334; A100 189.6 ms,
# 35.9 ms, 26.7 ms → 0.174 (PyTorch 1.9, CUDA 11.1 there; a newer stack may do better).
BACKBONE_CALIBRATION = {
    "v100": Calibration(0.334, "insightface arcface_torch docs/speed_benchmark.md: iresnet50, 8 × V100-SXM2-32GB, "
                              "batch 128/GPU, fp16, Partial FC 0.1, 125k classes: 5,004 samples/s"),
    "a100": Calibration(0.174, "insightface benchmarks/train/nvidia_a100.md: iresnet50, 8 × A100-80GB, batch 1024 "
                              "(128/GPU), FP16 + TF32, no PFC, WebFace600K (618K classes): ~5,400 samples/s"),
}
# no published insightface figure on Hopper: H100 and H200 are taken to reach the fraction of
# their (3.2 × A100's) tensor-core peak that the A100 run reached (an assumption, likely optimistic:
# the same convolutions leave more of a bigger GPU idle)
BACKBONE_CALIBRATION["h100"] = Calibration(BACKBONE_CALIBRATION["a100"].efficiency, "A100's efficiency (assumed)")
BACKBONE_CALIBRATION["h200"] = Calibration(BACKBONE_CALIBRATION["a100"].efficiency, "A100's efficiency (assumed)")


@dataclass(frozen=True)
class TimeEstimate:
    """One step on ``gpu`` by part, calibrated (see the module docstring), with the pure roofline
    beside it; samples/s over all ranks; kernel launches per part."""

    gpu: str
    backbone_s: float
    head_s: float
    optimizer_s: float
    other_s: float
    head_comm_s: float
    step_s: float
    samples_per_s: float
    roofline_backbone_s: float = 0.0
    roofline_head_s: float = 0.0
    roofline_step_s: float = 0.0
    roofline_samples_per_s: float = 0.0
    launches: tuple[tuple[str, int], ...] = ()

    @property
    def head_share(self) -> float:
        """The head's share of the step (its compute, launches and collectives)."""
        return (self.head_s + self.head_comm_s) / self.step_s if self.step_s else 0.0

    @property
    def head_launches(self) -> int:
        return dict(self.launches).get("head", 0)


def roofline(seconds: dict[str, float], comm_bytes: dict[str, float], gpu: GPU, global_batch: int,
             launches: dict[str, float] | None = None, backbone_efficiency: float | None = None) -> TimeEstimate:
    """The step's estimate on ``gpu``: ``seconds`` per part (a WorkCounter's pure roofline for this
    GPU, one step), ``comm_bytes`` per part, ``global_batch`` samples per step over all ranks,
    ``launches`` per part, ``backbone_efficiency`` (default: :data:`BACKBONE_CALIBRATION`'s for
    ``gpu``, else 1)."""
    if backbone_efficiency is None:
        kind = next((key for key, spec in GPUS.items() if spec.name == gpu.name), None)
        backbone_efficiency = BACKBONE_CALIBRATION[kind].efficiency if kind in BACKBONE_CALIBRATION else 1.0
    launches = {part: max(round(launches.get(part, 0)), 0) for part in PARTS} if launches else {p: 0 for p in PARTS}
    pure = {part: max(seconds.get(part, 0.0), 0.0) for part in PARTS}
    head_comm = max(comm_bytes.get("head", 0), 0) / (gpu.link_gbps * 1e9)
    pure_step = sum(pure.values()) + head_comm
    timed = {part: pure[part] + launches[part] * LAUNCH_S for part in PARTS}
    timed["backbone"] = pure["backbone"] / backbone_efficiency
    step = sum(timed.values()) + head_comm
    return TimeEstimate(gpu.name, timed["backbone"], timed["head"], timed["optimizer"], timed["other"], head_comm,
                        step, global_batch / step if step else 0.0, pure["backbone"], pure["head"], pure_step,
                        global_batch / pure_step if pure_step else 0.0, tuple(launches.items()))
