"""The head's Triton softmax kernels against its torch path on one device: step time, peak memory,
kernel launches per step.

    python bench/head_kernels.py [--device cuda] [--classes 3625000] [--rate 0.1] [--batch 1024]
        [--dim 512] [--center-dtype fp16] [--steps 5] [--json OUT]

One process, no process group: one rank of the issue's job (S = ⌈ρ·C_r⌉ = 362,500 sampled
centers against B = 1,024 gathered rows, D = 512, fp16 centers, the update inside the backward).
Variants: ``torch@2048`` (the torch path with the CPU's 2,048-row chunks: what ran on a GPU
before), ``torch@auto`` and ``triton@auto`` (chunks from the GPU byte budget,
:mod:`pfc.head.chunking`). Time: the median of ``--steps`` steps after one warm-up step, each
between two synchronisations; peak: ``torch.cuda.max_memory_allocated`` over the timed steps
minus what was allocated before the head was built; launches: CUDA kernels of one step
(``torch.profiler``). ``--device cpu`` is a dry run at toy sizes (the Triton variant then needs
``TRITON_INTERPRET=1``, which ``bench/gpu_check.py --device cpu`` sets).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from pfc.head.partial_fc import PartialFC

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = (("torch", 2048), ("torch", None), ("triton", None))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(head, optimizer, x, labels):
    loss = head(x, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss


def _launches(head, optimizer, x, labels, device) -> int | None:
    """CUDA kernels one step launches (None off CUDA)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _step(head, optimizer, x, labels)
        _sync(device)
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def run_variant(kernels, chunk_rows, args, device) -> dict:
    """One variant's numbers (module docstring)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
    head = PartialFC(args.classes, args.dim, sample_rate=args.rate, seed=1, chunk_rows=chunk_rows,
                     dtype=DTYPES[args.center_dtype], device=device, kernels=kernels, check_inputs=False)
    optimizer = head.optimizer(lr=0.1, momentum=0.9, weight_decay=5e-4, update_in_backward=True)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, args.dim, device=device, generator=generator).requires_grad_()
    labels = torch.randint(0, args.classes, (args.batch,), device=device, generator=generator)
    head.set_iteration(0)
    loss = _step(head, optimizer, x, labels)   # warm-up: compiles the kernels, sizes the scratch
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(1, args.steps + 1):
        head.set_iteration(step)
        _sync(device)
        start = time.perf_counter()
        loss = _step(head, optimizer, x, labels)
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    launches = _launches(head, optimizer, x, labels, device)
    index, _ = head.last_sample
    result = dict(variant=f"{kernels}@{chunk_rows or 'auto'}", kernels=kernels, chunk_rows=head.last_chunk_rows,
                  sampled=head.num_local if index is None else index.numel(), step_ms=1e3 * statistics.median(times),
                  peak_gib=None if peak is None else peak / 2 ** 30, launches=launches, loss=float(loss))
    del head, optimizer
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--classes", type=int, default=3_625_000)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--center-dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = [run_variant(kernels, chunk_rows, args, device) for kernels, chunk_rows in VARIANTS]
    print("| variant | chunk rows | S | step (ms) | peak (GiB) | launches | loss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        peak = "–" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        launches = "–" if row["launches"] is None else str(row["launches"])
        print(f"| {row['variant']} | {row['chunk_rows']:,} | {row['sampled']:,} | "
              f"{row['step_ms']:.1f} | {peak} | {launches} | {row['loss']:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
