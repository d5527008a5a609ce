"""The Partial-FC sampler before and after the O(S) rewrite, side by side: time per step and ops
dispatched per step (each a kernel launch on a GPU, except where noted).

    OMP_NUM_THREADS=1 python bench/sampler.py [--classes 500000] [--rate 0.1] [--batch 1024] [--repeats 7]

``before``: what ``pfc.head.sampling.sample_classes`` did up to commit ee662f4, kept here as
the baseline: a SplitMix64 score for each of the C_r local classes, positives set to the
maximum, then the S largest (on the CPU a threshold prefilter, ``kthvalue`` among the
survivors; elsewhere ``topk``) and a sort. ``before (topk)``: the same with the plain ``topk``,
what a GPU ran. ``after``: :func:`pfc.head.sampling.sample_classes` (swap-or-not permutation at
0 … S−1, positives merged; never a pass over C_r). Times: median of ``--repeats`` calls on one
CPU thread, interleaved, as CPU time of the thread (``time.thread_time``: what a busy shared
machine inflates least) and as wall time. Ops: aten ops dispatched by one call on the ``meta``
device (no views), for the torch path and for ``kernels="triton"`` (the permutation as one
custom op), the latter being what a CUDA step launches (a CUDA sort or scan is a few kernels).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pfc.head.sampling import hashed_scores, sample_classes, sample_size, swap_or_not_rounds  # noqa: E402

_SCORE_MAX = torch.iinfo(torch.int64).max


def _largest_scores_before(score: torch.Tensor, count: int, prefilter: bool) -> torch.Tensor:
    total = score.numel()
    if prefilter and score.device.type == "cpu" and 0 < count and count * 4 < total:
        fraction = count / total
        keep = min(1.0, fraction + 6.0 * math.sqrt(fraction * (1 - fraction) / total) + 64 / total)
        threshold = max(-(1 << 63), int(round((1.0 - keep) * 2.0 ** 64)) - (1 << 63))
        candidates = torch.nonzero(score >= threshold).view(-1)
        if candidates.numel() >= count:
            candidate_scores = score[candidates]
            smallest_kept = torch.kthvalue(candidate_scores, candidates.numel() - count + 1).values
            index = candidates[candidate_scores >= smallest_kept]
            if index.numel() == count:
                return index
    return torch.topk(score, count, sorted=False).indices.sort().values


def sample_classes_before(labels, class_start, num_local, sample_rate, key=0, prefilter=True):
    """The sampler up to commit ee662f4 (a pass over all C_r classes)."""
    local = labels - class_start
    owned = (local >= 0) & (local < num_local)
    num_sample = sample_size(sample_rate, num_local, labels.shape[0])
    score = hashed_scores(key, class_start, num_local + 1, labels.device)
    score.index_fill_(0, torch.where(owned, local, num_local), _SCORE_MAX)
    index = _largest_scores_before(score[:num_local], num_sample, prefilter)
    return index, torch.where(owned, torch.searchsorted(index, local.clamp(0, num_local - 1)), -1)


class OpCounter(TorchDispatchMode):
    """Counts the aten (and pfc) ops dispatched, views left out."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.ops.append(func._overloadpacket.__name__)
        return out


def _median_seconds(runs: dict, repeats: int) -> tuple[dict, dict]:
    """Median CPU and wall seconds of each run, the runs interleaved (each repeat calls every
    run once) so that a shared machine's load falls on all of them alike."""
    cpu, wall = {name: [] for name in runs}, {name: [] for name in runs}
    for repeat in range(repeats + 1):
        for name, run in runs.items():
            start_cpu, start_wall = time.thread_time(), time.perf_counter()
            run()
            if repeat:   # the first round warms up
                cpu[name].append(time.thread_time() - start_cpu)
                wall[name].append(time.perf_counter() - start_wall)
    return ({name: statistics.median(values) for name, values in cpu.items()},
            {name: statistics.median(values) for name, values in wall.items()})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=500_000, help="C_r, the classes of one rank")
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=1024, help="B, the gathered batch")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    num_local, count = args.classes, sample_size(args.rate, args.classes, args.batch)
    labels = torch.randint(0, 2 * num_local, (args.batch,), generator=torch.Generator().manual_seed(0))
    key = 0x1234_5678_9ABC_DEF0
    on_meta = labels.to("meta")
    runs = {
        "before (prefilter)": lambda labels=labels: sample_classes_before(labels, 0, num_local, args.rate, key),
        "before (topk)": lambda labels=labels: sample_classes_before(labels, 0, num_local, args.rate, key,
                                                                     prefilter=False),
        "after": lambda labels=labels: sample_classes(labels, 0, num_local, args.rate, key),
    }
    print(f"C_r = {num_local:,}, S = {count:,}, B = {args.batch:,}, swap-or-not rounds = "
          f"{swap_or_not_rounds(num_local)}, one CPU thread, median of {args.repeats}")
    cpu, wall = _median_seconds(runs, args.repeats)
    print(f"  {'':20s} {'CPU time':>10s} {'wall':>10s}   (load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores)")
    for name in runs:
        print(f"  {name:20s} {cpu[name] * 1e3:7.2f} ms {wall[name] * 1e3:7.2f} ms   "
              f"after/this: {cpu['after'] / cpu[name]:.2f}x CPU, {wall['after'] / wall[name]:.2f}x wall")
    for name, run in (("before (topk)", runs["before (topk)"]), ("after, kernels=torch", runs["after"]),
                      ("after, kernels=triton", lambda labels: sample_classes(labels, 0, num_local, args.rate, key,
                                                                              kernels="triton"))):
        with OpCounter() as counter:
            run(on_meta)
        kinds = sorted(set(counter.ops), key=counter.ops.index)
        print(f"  ops per step, {name:22s} {len(counter.ops):5d}  ({', '.join(kinds)})")


if __name__ == "__main__":
    main()
