"""Benchmark of one PartialFC step on gloo CPU ranks against its GEMM floor.

    python bench/head.py [--classes 100000 1000000] [--rates 0.1 1.0] [--world 2] [--steps 3]
                         [--update step backward]

Each configuration runs in a fresh process group (so peak RSS is per configuration). Per rank:
one warm-up step, then ``--steps`` timed steps split into forward, backward and optimizer. The
floor is the three ``B×D×S`` GEMMs of a step (logits, feature gradient, center gradient)
timed in the same processes, with the same shapes, at the same time on every rank. Prints a
markdown table; times are the median over steps of the slowest rank. ``--update step``: backward,
then ``optimizer.step()`` on the sparse gradient; ``--update backward``: the optimizer applied
inside the head's backward (``head.optimizer(update_in_backward=True)``, what the trainer uses).
"""
from __future__ import annotations

import argparse
import datetime
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pfc.head.partial_fc import PartialFC  # noqa: E402
from pfc.head.margins import ArcFace  # noqa: E402
from pfc.head.regularizers import MHE, AngularTriplet  # noqa: E402


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _gemm_floor(num_rows, dim, num_sampled, repeats=3):
    features = torch.randn(num_rows, dim)
    centers = torch.randn(num_sampled, dim)
    logits = torch.empty(num_sampled, num_rows)
    grad_centers = torch.empty(num_sampled, dim)
    grad_features = torch.empty(num_rows, dim)
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        torch.mm(centers, features.t(), out=logits)
        torch.mm(logits, features, out=grad_centers)
        torch.mm(logits.t(), centers, out=grad_features)
        best = min(best, time.perf_counter() - start)
    return best


def _worker(rank, world_size, init_file, config, results):
    torch.set_num_threads(config["threads"])
    baseline_rss = _peak_rss_bytes()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=600))
    # the runtime every training process pays before the head exists: torch, the process group,
    # and the lazily imported machinery of a torch optimizer's first step (~70 MiB)
    scalar = torch.nn.Parameter(torch.zeros(1))
    scalar.sum().backward()
    torch.optim.SGD([scalar], lr=0.1, momentum=0.9).step()
    dist.barrier()
    runtime_rss = _peak_rss_bytes()
    num_classes, rate, batch, dim = config["classes"], config["rate"], config["batch"], config["dim"]
    extras = dict(mhe=MHE(weight=0.01, kernel="euclidean", power=2.0)) if config["variant"] == "mhe" else \
        dict(triplet=AngularTriplet(weight=1.0, m=2, semihard=True)) if config["variant"] == "triplet" else {}
    head = PartialFC(num_classes, dim, margin=ArcFace(), sample_rate=rate, seed=0, **extras)
    optimizer = head.optimizer(lr=0.1, momentum=0.9, weight_decay=5e-4, momentum_dtype=config["momentum_dtype"],
                               update_in_backward=config["update"] == "backward")
    generator = torch.Generator().manual_seed(rank)
    timings = {"forward": [], "backward": [], "optimizer": [], "step": []}
    num_sampled = head.num_local
    for step in range(config["steps"] + 1):
        x = torch.randn(batch, dim, generator=generator, requires_grad=True)
        labels = torch.randint(0, num_classes, (batch,), generator=generator)
        if config["variant"] == "triplet":  # identities repeat across the batch: 8 samples each
            labels = torch.randint(0, num_classes, (batch // 8,), generator=torch.Generator().manual_seed(step))
            labels = labels.repeat_interleave(8)[torch.randperm(batch, generator=generator)]
        head.set_iteration(step)
        dist.barrier()
        t0 = time.perf_counter()
        loss = head(x, labels)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        t3 = time.perf_counter()
        if step == 0:
            continue  # warm-up
        timings["forward"].append(t1 - t0)
        timings["backward"].append(t2 - t1)
        timings["optimizer"].append(t3 - t2)
        timings["step"].append(t3 - t0)
    peak_rss = _peak_rss_bytes()  # before the floor's own buffers
    index, _ = head.last_sample
    if index is not None:
        num_sampled = index.numel()  # what the head sampled in the last step
    floor = _gemm_floor(batch * world_size, dim, num_sampled)
    local_weight_bytes = head.weight.numel() * head.weight.element_size()
    results.put(dict(rank=rank, timings=timings, floor=floor, peak_rss=peak_rss,
                     baseline_rss=baseline_rss, runtime_rss=runtime_rss, weight_bytes=local_weight_bytes,
                     num_sampled=num_sampled,
                     loss=loss.item()))
    dist.destroy_process_group()


def run_config(config, world_size):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, world_size, init_file, config, results))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        per_rank = [results.get(timeout=1800) for _ in range(world_size)]
        for p in procs:
            p.join()
    return sorted(per_rank, key=lambda r: r["rank"])


def summarise(per_rank):
    def slowest_median(name):
        return statistics.median(max(r["timings"][name][i] for r in per_rank)
                                 for i in range(len(per_rank[0]["timings"][name])))
    row = {name: slowest_median(name) for name in ("forward", "backward", "optimizer", "step")}
    row["floor"] = max(r["floor"] for r in per_rank)
    row["peak_rss"] = max(r["peak_rss"] for r in per_rank)
    row["baseline_rss"] = max(r["baseline_rss"] for r in per_rank)
    row["runtime_rss"] = max(r["runtime_rss"] for r in per_rank)
    row["weight_bytes"] = max(r["weight_bytes"] for r in per_rank)
    row["num_sampled"] = max(r["num_sampled"] for r in per_rank)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="rows per rank")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--momentum-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--variants", nargs="+", choices=["plain", "mhe", "triplet"], default=["plain"],
                        help="head alone, with MHE (euclidean, power 2), with the angular triplet")
    parser.add_argument("--update", nargs="+", choices=["step", "backward"], default=["step", "backward"],
                        help="optimizer.step() after the backward, or the update inside the backward")
    args = parser.parse_args(argv)
    momentum_dtype = getattr(torch, args.momentum_dtype)
    print(f"# PartialFC step, {args.world} gloo ranks x {args.threads} thread, D={args.dim}, "
          f"b={args.batch}/rank, momentum {args.momentum_dtype}, torch {torch.__version__}")
    print("| variant | update | classes | ρ | sampled/rank | forward s | backward s | optimizer s | step s | GEMM floor s "
          "| step/floor | peak RSS/rank | weights/rank | RSS/weights | runtime RSS | (RSS − runtime)/weights |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for classes in args.classes:
        for rate in args.rates:
            for variant, update in [(v, u) for v in args.variants for u in args.update]:
                config = dict(classes=classes, rate=rate, batch=args.batch, dim=args.dim, steps=args.steps,
                              threads=args.threads, momentum_dtype=momentum_dtype, variant=variant, update=update)
                row = summarise(run_config(config, args.world))
                mib = 2 ** 20
                print(f"| {variant} | {update} | {classes:,} | {rate} | {row['num_sampled']:,} | {row['forward']:.3f} "
                      f"| {row['backward']:.3f} | {row['optimizer']:.3f} | {row['step']:.3f} | {row['floor']:.3f} "
                      f"| {row['step'] / row['floor']:.2f}x | {row['peak_rss'] / mib:,.0f} MiB "
                      f"| {row['weight_bytes'] / mib:,.0f} MiB | {row['peak_rss'] / row['weight_bytes']:.2f}x "
                      f"| {row['runtime_rss'] / mib:,.0f} MiB "
                      f"| {(row['peak_rss'] - row['runtime_rss']) / row['weight_bytes']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
