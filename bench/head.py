"""Benchmark of one PartialFC step against its two floors: the GEMMs and the random row traffic.

    python bench/head.py [--classes 100000 1000000] [--rates 0.1 1.0] [--world 2] [--steps 3]
                         [--update step backward] [--center-dtype fp32 bf16 fp16]
                         [--logits keep recompute auto] [--device cpu|cuda] [--json PATH]

Each configuration runs in a fresh process group (so peak memory is per configuration): gloo on
CPU ranks, or NCCL with one GPU per rank (``--device cuda``). Per rank: one warm-up step, then
``--steps`` timed steps split into forward, backward and optimizer; times are the median over
steps of the slowest rank. As in the trainer, the head checks its inputs collectively
(``check_inputs``) on the first step only. ``--update step``: backward, then ``optimizer.step()`` on the sparse
gradient; ``--update backward``: the optimizer applied inside the head's backward
(``head.optimizer(update_in_backward=True)``, what the trainer uses).

Two floors, timed in the same processes right after the steps, on every rank at once:

* GEMM floor: the three ``B×D×S`` products of a step (logits, feature gradient, center
  gradient) with the head's shapes and fp32 results, on operands in the center storage type on
  a GPU and in fp32 on the CPU (as the head computes them there);
* row floor: the four random row passes of exact momentum SGD over the S rows the head sampled
  in its last step, on the head's own centers and momentum (each in its storage type), as the
  head makes them: gather W (kept for the backward), then per chunk gather the momentum, write
  back the momentum, write back W (``index_select`` / ``index_copy_``; with ρ = 1 the same four
  passes over contiguous chunks). The values written back are those read: the state is unchanged.

The target is step ≤ 1.25 × (GEMM floor + row floor). A third figure, the **pass floor**, says
what the rest of an exact step cannot avoid with torch's kernels: the three elementwise passes
over the ``S × D`` sampled rows in fp32 (each row's norm, the radial term of the center gradient
``out −= c·w``, and one fused SGD pass reading the gradient, weights and momentum), timed the
same way on chunks of the head's size; ``step/(all floors)`` divides by the sum of the three. Memory, per identity (``C_r`` centers on a
rank): storage = centers + momentum bytes; the head's own peak = peak RSS (peak
``torch.cuda.max_memory_allocated`` on a GPU) above what the rank held before the head existed
(torch, the process group, an optimizer's first step); transient = own peak − storage.
``--center-dtype`` and ``--logits`` are passed to ``PartialFC`` only when not the default (fp32,
the head's own default for logits), so the script also runs on heads without those options.
"""
from __future__ import annotations

import argparse
import datetime
import json
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

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "float32": torch.float32, "bfloat16": torch.bfloat16}   # the long names: earlier commands
KIB = 1024


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_min(device, repeats, run) -> float:
    """The fastest of ``repeats`` runs of ``run()``, every rank starting together."""
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        run()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def gemm_floor(num_rows, dim, num_sampled, dtype, device, repeats=3) -> float:
    """The three ``B×D×S`` products of a step with fp32 results, the operands as the head has them:
    in the storage type ``dtype`` on a GPU (``out_dtype=float32``), in fp32 on the CPU (where the
    head upcasts narrow rows per chunk: the CPU has no narrow GEMM with an fp32 result)."""
    operand = dtype if device.type != "cpu" else torch.float32
    features = torch.randn(num_rows, dim, device=device).to(operand)
    centers = torch.randn(num_sampled, dim, device=device).to(operand)
    logits = torch.empty(num_sampled, num_rows, device=device)
    grad_centers = torch.empty(num_sampled, dim, device=device)
    grad_features = torch.empty(num_rows, dim, device=device)
    grad_logits = logits.to(operand)   # the gradient block as the second GEMM operand

    def mm(a, b, out):
        if a.dtype == torch.float32:
            return torch.mm(a, b, out=out)
        try:
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        except (TypeError, NotImplementedError, RuntimeError):   # a torch without it: the narrow result
            return torch.mm(a, b)

    def run():
        mm(centers, features.t(), logits)
        mm(grad_logits, features, grad_centers)
        mm(grad_logits.t(), centers, grad_features)
    return _timed_min(device, repeats, run)


@torch.no_grad()
def row_floor(weight, momentum, index, chunk_rows, repeats=3) -> float:
    """The four row passes of exact momentum SGD over the sampled rows ``index`` (None: all rows):
    gather W into a kept block, then per chunk gather M, write back M, write back W."""
    count = weight.shape[0] if index is None else index.numel()
    kept = weight.new_empty((count, weight.shape[1]))
    scratch = momentum.new_empty((min(chunk_rows, count), momentum.shape[1])) if momentum is not None else None

    def run():
        for start in range(0, count, chunk_rows):   # the forward's gather
            stop = min(start + chunk_rows, count)
            if index is None:
                kept[start:stop].copy_(weight[start:stop])
            else:
                torch.index_select(weight, 0, index[start:stop], out=kept[start:stop])
        for start in range(0, count, chunk_rows):   # the update's momentum round trip and W's write-back
            stop = min(start + chunk_rows, count)
            if index is None:
                if scratch is not None:
                    scratch[:stop - start].copy_(momentum[start:stop])
                    momentum[start:stop].copy_(scratch[:stop - start])
                weight[start:stop].copy_(kept[start:stop])
            else:
                rows = index[start:stop]
                if scratch is not None:
                    torch.index_select(momentum, 0, rows, out=scratch[:stop - start])
                    momentum.index_copy_(0, rows, scratch[:stop - start])
                weight.index_copy_(0, rows, kept[start:stop])
    return _timed_min(weight.device, repeats, run)


@torch.no_grad()
def pass_floor(count, dim, chunk_rows, device, repeats=3) -> float:
    """The three elementwise passes over ``count × dim`` sampled rows that an exact step makes
    besides its GEMMs and row traffic, in fp32 chunks of ``chunk_rows`` over full-size blocks (so
    that the rows come from memory, as the sampled rows do): the rows' norms, the radial term of
    the center gradient (``addcmul_``) and one fused SGD pass."""
    weights, grads, momenta = (torch.randn(count, dim, device=device) for _ in range(3))
    coefficient = torch.randn(count, 1, device=device)
    norms = torch.empty(count, device=device)

    def run():
        for start in range(0, count, chunk_rows):
            rows = slice(start, min(start + chunk_rows, count))
            weight, grad, momentum = weights[rows], grads[rows], momenta[rows]
            torch.linalg.vector_norm(weight, dim=1, out=norms[rows])
            grad.addcmul_(weight, coefficient[rows], value=-1.0)
            torch._fused_sgd_([weight], [grad], [momentum], weight_decay=0.0, momentum=0.9, lr=0.0,
                              dampening=0.0, nesterov=False, maximize=False, is_first_step=False)
    return _timed_min(device, repeats, run)


def _head_options(config) -> dict:
    options = {}
    if config["center_dtype"] != "fp32":
        options["dtype"] = DTYPES[config["center_dtype"]]
    if config["logits"]:
        options["logits"] = config["logits"]
    if config["chunk_rows"]:
        options["chunk_rows"] = config["chunk_rows"]
    if config["variant"] == "mhe":
        options["mhe"] = MHE(weight=0.01, kernel="euclidean", power=2.0)
    elif config["variant"] == "triplet":
        options["triplet"] = AngularTriplet(weight=1.0, m=2, semihard=True)
    return options


def _batch(config, step, generator, device):
    batch, dim, num_classes = config["batch"], config["dim"], config["classes"]
    x = torch.randn(batch, dim, generator=generator, device=device, requires_grad=True)
    if config["variant"] != "triplet":
        return x, torch.randint(0, num_classes, (batch,), generator=generator, device=device)
    # identities repeat across the batch: 8 samples each, the same identities on every rank
    shared = torch.Generator(device=device).manual_seed(step)
    labels = torch.randint(0, num_classes, (batch // 8,), generator=shared, device=device).repeat_interleave(8)
    return x, labels[torch.randperm(batch, generator=generator, device=device)]


def _worker(rank, world_size, init_file, config, results):
    on_gpu = config["device"] == "cuda"
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    torch.set_num_threads(config["threads"])
    dist.init_process_group("cpu:gloo,cuda:nccl" if on_gpu else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=1800),
                            **({"device_id": device} if on_gpu else {}))
    # the runtime every training process pays before the head exists: torch, the process group,
    # and the lazily imported machinery of a torch optimizer's first step (~70 MiB)
    scalar = torch.nn.Parameter(torch.zeros(1, device=device))
    scalar.sum().backward()
    torch.optim.SGD([scalar], lr=0.1, momentum=0.9).step()
    dist.barrier()
    _sync(device)
    runtime_rss = _peak_rss_bytes()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
        runtime_device = torch.cuda.memory_allocated(device)
    head = PartialFC(config["classes"], config["dim"], margin=ArcFace(), sample_rate=config["rate"], seed=0,
                     device=device, **_head_options(config))
    optimizer_options = {} if config["momentum_dtype"] == "same" else {"momentum_dtype": DTYPES[config["momentum_dtype"]]}
    optimizer = head.optimizer(lr=0.1, momentum=0.9, weight_decay=5e-4, update_in_backward=config["update"] == "backward",
                               **optimizer_options)
    generator = torch.Generator(device=device).manual_seed(rank)
    timings = {"forward": [], "backward": [], "optimizer": [], "step": []}
    for step in range(config["steps"] + 1):
        x, labels = _batch(config, step, generator, device)
        head.set_iteration(step)
        head.check_inputs = step == 0   # as the trainer runs it: the collective input check on the first step
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        loss = head(x, labels)
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        _sync(device)
        t3 = time.perf_counter()
        if step == 0:
            continue  # warm-up
        for name, seconds in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2), ("step", t3 - t0)):
            timings[name].append(seconds)
    # the peaks before the floors' own buffers
    peak_rss = _peak_rss_bytes()
    peak = torch.cuda.max_memory_allocated(device) - runtime_device if on_gpu else peak_rss - runtime_rss
    weight = head.weight.detach()
    momentum = optimizer.state[head.weight].get("momentum_buffer")
    storage = weight.numel() * weight.element_size() + (momentum.numel() * momentum.element_size() if momentum is not None else 0)
    index, _ = head.last_sample
    num_sampled = head.num_local if index is None else index.numel()   # what the head sampled in its last step
    floor = gemm_floor(config["batch"] * world_size, config["dim"], num_sampled, weight.dtype, device)
    rows = row_floor(weight, momentum, index, head.last_chunk_rows)
    passes = pass_floor(num_sampled, config["dim"], head.last_chunk_rows, device)
    results.put(dict(rank=rank, timings=timings, gemm_floor=floor, row_floor=rows, pass_floor=passes,
                     peak_rss=peak_rss, runtime_rss=runtime_rss, own_peak=peak, storage=storage, num_local=head.num_local,
                     num_sampled=num_sampled, weight_dtype=str(weight.dtype).removeprefix("torch."),
                     momentum_dtype=str(momentum.dtype).removeprefix("torch.") if momentum is not None else "-",
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
        per_rank = []
        while len(per_rank) < world_size:
            try:
                per_rank.append(results.get(timeout=10))
            except Exception:   # queue.Empty: fail fast when a rank died instead of waiting forever
                if any(p.exitcode not in (None, 0) for p in procs):
                    for p in procs:
                        p.kill()
                    raise RuntimeError(f"a benchmark rank failed: exit codes {[p.exitcode for p in procs]}")
        for p in procs:
            p.join()
    return sorted(per_rank, key=lambda r: r["rank"])


def summarise(per_rank) -> dict:
    """The slowest rank's median step times, both floors and the largest memory figures."""
    def slowest_median(name):
        return statistics.median(max(r["timings"][name][i] for r in per_rank)
                                 for i in range(len(per_rank[0]["timings"][name])))
    row = {name: slowest_median(name) for name in ("forward", "backward", "optimizer", "step")}
    for name in ("gemm_floor", "row_floor", "pass_floor", "peak_rss", "runtime_rss", "own_peak", "storage", "num_sampled"):
        row[name] = max(r[name] for r in per_rank)
    row["weight_dtype"], row["momentum_dtype"] = per_rank[0]["weight_dtype"], per_rank[0]["momentum_dtype"]
    row["storage_per_id"] = max(r["storage"] / r["num_local"] for r in per_rank)
    row["total_per_id"] = max(r["own_peak"] / r["num_local"] for r in per_rank)
    row["transient_per_id"] = max((r["own_peak"] - r["storage"]) / r["num_local"] for r in per_rank)
    row["step_over_floors"] = row["step"] / (row["gemm_floor"] + row["row_floor"])
    row["step_over_all_floors"] = row["step"] / (row["gemm_floor"] + row["row_floor"] + row["pass_floor"])
    row["step_over_gemm"] = row["step"] / row["gemm_floor"]
    return row


HEADER = ("| variant | update | centers | momentum | logits | classes | ρ | S/rank | fwd s | bwd s | opt s | step s "
          "| GEMM floor s | row floor s | step/(GEMM+rows) | pass floor s | step/(all floors) | step/GEMM "
          "| peak RSS/rank | storage/id | transient/id "
          "| own peak/id |")


def format_row(config, row) -> str:
    mib = 2 ** 20
    return (f"| {config['variant']} | {config['update']} | {row['weight_dtype']} | {row['momentum_dtype']} "
            f"| {config['logits'] or 'default'} | {config['classes']:,} | {config['rate']} | {row['num_sampled']:,} "
            f"| {row['forward']:.3f} | {row['backward']:.3f} | {row['optimizer']:.3f} | {row['step']:.3f} "
            f"| {row['gemm_floor']:.3f} | {row['row_floor']:.3f} | {row['step_over_floors']:.2f}x "
            f"| {row['pass_floor']:.3f} | {row['step_over_all_floors']:.2f}x | {row['step_over_gemm']:.2f}x "
            f"| {row['peak_rss'] / mib:,.0f} MiB "
            f"| {row['storage_per_id'] / KIB:.2f} KB | {row['transient_per_id'] / KIB:.2f} KB "
            f"| {row['total_per_id'] / KIB:.2f} KB |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="rows per rank")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per rank, NCCL")
    parser.add_argument("--center-dtype", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32"],
                        help="storage type of the centers (PartialFC dtype)")
    parser.add_argument("--momentum-dtype", choices=["same", *DTYPES], default="same",
                        help="storage type of the momentum; same: the optimizer's default (the centers' type)")
    parser.add_argument("--logits", nargs="+", choices=["keep", "recompute", "auto"], default=[None],
                        help="the head's logits option (default: not passed, the head's default)")
    parser.add_argument("--chunk-rows", type=int, default=0, help="the head's chunk_rows (0: its default)")
    parser.add_argument("--variants", nargs="+", choices=["plain", "mhe", "triplet"], default=["plain"],
                        help="head alone, with MHE (euclidean, power 2), with the angular triplet")
    parser.add_argument("--update", nargs="+", choices=["step", "backward"], default=["step", "backward"],
                        help="optimizer.step() after the backward, or the update inside the backward")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        parser.error(f"--device cuda --world {args.world} needs {args.world} GPUs, found {torch.cuda.device_count()}")
    where = f"{args.world} NCCL rank(s) on {torch.cuda.get_device_name(0)}" if args.device == "cuda" else \
        f"{args.world} gloo ranks x {args.threads} thread"
    print(f"# PartialFC step, {where}, D={args.dim}, b={args.batch}/rank, torch {torch.__version__}; "
          f"KB = 1024 bytes")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    rows = []
    for classes in args.classes:
        for rate in args.rates:
            for variant, update, center_dtype, logits in [(v, u, c, lg) for v in args.variants for u in args.update
                                                          for c in args.center_dtype for lg in args.logits]:
                config = dict(classes=classes, rate=rate, batch=args.batch, dim=args.dim, steps=args.steps,
                              threads=args.threads, device=args.device, center_dtype=center_dtype,
                              momentum_dtype=args.momentum_dtype, logits=logits, chunk_rows=args.chunk_rows,
                              variant=variant, update=update)
                row = summarise(run_config(config, args.world))
                print(format_row(config, row), flush=True)
                rows.append({"config": config, **row})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "world": args.world, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
