"""Will the job fit? One rank's memory, host syncs and time at any class count, from a few simulations.

    plan = make_plan(Job(num_classes=100_000_000, gpus=8, ...), gpu_memory_gib=80)
    plan.peak_bytes, plan.categories, plan.fits, plan.host_syncs_per_step
    largest_fitting(plan_maker, 80)      # --max-classes

Simulating the head at 1B classes op by op is too slow (≈ 6,000 chunks of the fused softmax per
step, each a few dozen ops on fake tensors), so a plan combines simulations (see
:mod:`pfc.planning.simulate`) that cost the same at any class count:

- the **job** itself (its backbone) at a small class count ``C0``;
- the same job with the ``tiny`` backbone (same embedding width, batch, ranks, head options)
  at ``C0`` and at the target ``C``, or, for large ``C``, at ``C0`` and ``2·C0``.

``C0`` holds two full chunks of sampled rows per rank, in the chunk rows the simulated head
really uses (:attr:`pfc.planning.job.Job.head_chunk_rows`: the job's ``chunk_rows``, else the
GPU's budget-sized chunks, 61,440 rows at B = 1,024, D = 512, fp16 centers, so C0 ≈ 10M classes
on 8 ranks at ρ = 0.1; a simulation on fake tensors costs seconds there, the centers' setup
growing with C_r: ≈ 6 s per million centers per rank on one CPU core). Below a full chunk
the chunk scratch grows with S; from one full chunk on it stays, so the peak is affine from there.

Every number (per phase of the step, bytes by category at its high-water mark; host syncs and
findings per source line; flops, bytes and roofline seconds per part) is then
``job(C0) − tiny(C0) + tiny(C)``: the backbone's share does not depend on C, and with the tiny
backbone every number is affine in C once the sampled rows fill whole chunks (the centers,
their momentum and the sampled rows grow with C; the softmax's chunk scratch does not; syncs
and work grow with the chunk count), which :func:`tiny_at` extends linearly; kernel launches,
a fixed count per chunk, follow the chunk count ⌈S / chunk rows⌉ exactly. The peak is the
largest phase mark. tests/test_plan.py checks the extrapolation against a direct simulation.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from pfc.head.partition import class_partition
from pfc.head.sampling import sample_size
from pfc.planning.job import Job
from pfc.planning.simulate import RankResult, simulate

# what a GPU holds besides the tensors PyTorch allocates, and what the caching allocator loses
CUDA_RESERVED_GIB = 1.5      # CUDA context (~0.5 GiB), cuBLAS/cuDNN workspaces, NCCL buffers
FRAGMENTATION = 0.05         # of the rest: blocks the caching allocator cannot reuse
HEADROOM_NOTE = (f"fits = peak ≤ (GPU memory − {CUDA_RESERVED_GIB} GiB for the CUDA context, cuBLAS/cuDNN "
                 f"workspaces and NCCL) × {1 - FRAGMENTATION:.2f} (allocator fragmentation)")
GIB = 2**30


@dataclass
class Plan:
    """One rank of ``job``: per phase its high-water mark by category, and what it implies."""

    job: Job
    phase_peaks: dict[str, dict[str, float]]
    host_syncs: dict[str, float]
    step_findings: dict[str, float]
    setup_findings: dict[str, float]
    flops: dict[str, float]
    comm_bytes: dict[str, float]
    seconds: dict[str, dict[str, float]]
    launches: dict[str, float] = field(default_factory=dict)
    by_class: dict[str, dict[str, float]] = field(default_factory=dict)
    bytes_per_identity: float = 0.0
    method: str = ""
    simulated: list[int] = field(default_factory=list)

    @property
    def peak_phase(self) -> str:
        return max(self.phase_peaks, key=lambda phase: sum(self.phase_peaks[phase].values()))

    @property
    def peak_bytes(self) -> int:
        return round(sum(self.phase_peaks[self.peak_phase].values()))

    @property
    def categories(self) -> dict[str, int]:
        return {name: round(value) for name, value in self.phase_peaks[self.peak_phase].items()}

    @property
    def host_syncs_per_step(self) -> int:
        """Value reads (item/bool/…) plus data-dependent sizes (each a host sync on a GPU)."""
        dynamic = sum(count for site, count in self.step_findings.items() if site.startswith("data-dependent"))
        return round(sum(self.host_syncs.values()) + dynamic)

    @property
    def flops_per_step(self) -> int:
        return round(sum(self.flops.values()))


def usable_bytes(gpu_memory_gib: float) -> float:
    """What the tensors of one rank may use on a GPU of ``gpu_memory_gib`` (see HEADROOM_NOTE)."""
    return max(gpu_memory_gib - CUDA_RESERVED_GIB, 0.0) * (1 - FRAGMENTATION) * GIB


def fits(plan: Plan, gpu_memory_gib: float) -> bool:
    return plan.peak_bytes <= usable_bytes(gpu_memory_gib)


def _combine(terms):
    """Σ coefficient × value over nested dicts of numbers (a missing key counts 0)."""
    if any(isinstance(value, dict) for _, value in terms):
        keys = set().union(*(value.keys() for _, value in terms if isinstance(value, dict)))
        return {key: _combine([(coef, value.get(key, 0) if isinstance(value, dict) else 0) for coef, value in terms])
                for key in keys}
    return sum(coef * value for coef, value in terms)


def _numbers(result: RankResult) -> dict:
    return {"phase_peaks": result.phase_peaks, "host_syncs": result.host_syncs,
            "step_findings": result.step_findings, "setup_findings": result.setup_findings,
            "flops": result.flops, "comm_bytes": result.comm_bytes, "seconds": result.seconds,
            "launches": result.launches, "by_class": result.by_class}


def base_classes(job: Job, chunk_rows: int | None = None) -> int:
    """``C0``: the class count from which everything is affine in C: two full chunks of sampled
    rows per rank (``chunk_rows``, default the job's :attr:`~pfc.planning.job.Job.head_chunk_rows`,
    what the simulated head uses), more than the gathered batch."""
    rows = max(2 * (chunk_rows or job.head_chunk_rows), 2 * job.batch_size * job.gpus)
    return job.gpus * math.ceil(rows / job.sample_rate)


def memory_anchors(job: Job) -> list[int]:
    """Class counts between which one rank's peak memory is affine in C (tiny backbone), ascending:
    the sample is twice the gathered batch (its size no longer depends on the labels); it fills
    exactly one chunk (up to here the one chunk's scratch grows with S, beyond it stays one full
    chunk); ``C0`` and ``2·C0``. Launches and work are a step function of the chunk count in
    between, memory is not (a partial last chunk uses the first rows of the full chunk's blocks)."""
    rows = job.head_chunk_rows
    smallest = job.gpus * math.ceil(2 * job.batch_size * job.gpus / job.sample_rate)
    one_chunk = job.gpus * math.floor(rows / job.sample_rate)
    base = base_classes(job)
    return sorted({count for count in (smallest, one_chunk, base, 2 * base) if smallest <= count <= 2 * base})


class Planner:
    """Makes plans for one job at any class count, reusing its simulations (see the module docstring)."""

    def __init__(self, job: Job, progress=None, counter=None):
        self.job = job
        self.progress = progress
        self.counter = counter   # the work counter's class (default: pfc.planning.work.WorkCounter)
        self.chunk_rows = job.head_chunk_rows
        self.base = base_classes(job, self.chunk_rows)
        self._runs: dict[tuple[str, int], dict] = {}

    def _run(self, network: str, num_classes: int) -> dict:
        key = (network, num_classes)
        if key not in self._runs:
            # the tiny backbone (the head's growth) has no checkpointing, and needs none
            job = dataclasses.replace(self.job, network=network, num_classes=num_classes,
                                      grad_checkpointing=self.job.grad_checkpointing and network == self.job.network)
            extra = {} if self.counter is None else {"counter": self.counter}
            self._runs[key] = _numbers(simulate(job, progress=self.progress, **extra))
        return self._runs[key]

    def tiny_at(self, num_classes: int) -> dict:
        """The tiny-backbone numbers at ``num_classes``: simulated up to 2·C0, linear beyond."""
        if num_classes <= 2 * self.base:
            return self._run("tiny", num_classes)
        low, high = self._run("tiny", self.base), self._run("tiny", 2 * self.base)
        ratio = (num_classes - self.base) / self.base
        numbers = _combine([(1 - ratio, low), (ratio, high)])
        # launches grow by a fixed count per chunk: a step in C, exact from the chunk counts
        chunks = [self.chunks_per_step(count) for count in (self.base, 2 * self.base, num_classes)]
        steps = (chunks[2] - chunks[0]) / (chunks[1] - chunks[0])
        numbers["launches"] = _combine([(1 - steps, low["launches"]), (steps, high["launches"])])
        return numbers

    def chunks_per_step(self, num_classes: int) -> int:
        """Chunks of the head's softmax per pass on the simulated rank (rank 0, the largest shard)
        at ``num_classes``: ⌈S / chunk rows⌉ with S from :func:`pfc.head.sampling.sample_size`."""
        local = class_partition(num_classes, self.job.gpus, 0).num_local
        rows = sample_size(min(self.job.sample_rate, 1.0), local, self.job.batch_size * self.job.gpus)
        return math.ceil(rows / self.chunk_rows)

    def plan(self, num_classes: int) -> Plan:
        """The plan of the job at ``num_classes``."""
        if self.job.network == "tiny":
            numbers, method = self.tiny_at(num_classes), "tiny backbone"
        else:
            numbers = _combine([(1, self._run(self.job.network, self.base)), (-1, self._run("tiny", self.base)),
                                (1, self.tiny_at(num_classes))])
            method = f"{self.job.network} at {self.base:,} classes, its head's growth from the tiny backbone"
        if num_classes > 2 * self.base:
            method += f" (linear in C beyond {2 * self.base:,})"
        low, high = self.tiny_at(self.base), self.tiny_at(2 * self.base)
        slope = (_peak(high["phase_peaks"]) - _peak(low["phase_peaks"])) / self.base
        return Plan(self.job.with_classes(num_classes), **numbers, bytes_per_identity=slope * self.job.gpus,
                    method=method, simulated=sorted(c for _, c in self._runs))


def _peak(phase_peaks: dict) -> float:
    return max(sum(categories.values()) for categories in phase_peaks.values())


def largest_fitting(planner: Planner, gpu_memory_gib: float, upper: int = 10**12) -> int:
    """Bisection over the class count: the largest C whose plan fits (0 when none does).

    From ``2·C0`` up on the extrapolated plans (no new simulation). When ``2·C0`` does not fit (a
    small GPU, or budget-sized chunks making ``C0`` large), on the peak interpolated linearly
    between the two :func:`memory_anchors` around the limit (each simulated once; memory is
    affine between them); below the smallest anchor, on direct simulations (small C, cheap)."""
    budget = usable_bytes(gpu_memory_gib)

    def bisect(low: int, high: int, fitting) -> int:
        while high - low > max(1, low // 10**4):   # to 0.01 %
            middle = (low + high) // 2
            if fitting(middle):
                low = middle
            else:
                high = middle
        return low

    def plan_fits(num_classes: int) -> bool:
        return planner.plan(num_classes).peak_bytes <= budget

    if plan_fits(2 * planner.base):
        return bisect(2 * planner.base, upper, plan_fits)
    anchors = memory_anchors(planner.job)
    peaks = {}
    for low, high in zip([None, *anchors], anchors):
        peaks[high] = planner.plan(high).peak_bytes
        if peaks[high] <= budget:
            continue
        if low is None:   # the smallest anchor does not fit
            return bisect(planner.job.gpus, high, plan_fits) if plan_fits(planner.job.gpus) else 0
        slope = (peaks[high] - peaks[low]) / (high - low)
        return bisect(low, high, lambda count: peaks[low] + slope * (count - low) <= budget)
    return anchors[-1]   # not reached: 2·C0, the last anchor, does not fit
