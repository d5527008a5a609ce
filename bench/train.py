"""Trainer throughput on CPU: samples/s of the whole trainer and where a step's time goes.

    python bench/train.py [--network tiny] [--batch-size 64] [--steps 40] [--ranks 2]

Makes synthetic identities and shards (tools/make_synthetic.py, tools/pack_shards.py) in a
temporary folder, then under ``torchrun --nproc_per_node=RANKS`` (gloo) on every rank:
  1. a phase-timed loop built from the engine's own factories: data (waiting for the loader),
     backbone forward, head forward+backward (including the head's own collectives: the feature
     all-gather, the softmax all-reduces, the gradient reduce-scatter), backbone backward (compute
     only, DDP sync off), communication (the backbone-gradient all-reduce DDP performs, here done
     explicitly so it is not hidden behind the backward), optimizer steps;
  2. the real trainer (pfc.train.loop.train) for the same number of steps: end-to-end samples/s.
Rank 0 prints one table. The floor is the backbone's compute alone (forward + backward).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PHASES = ("data", "backbone forward", "head fwd+bwd", "backbone backward", "communication", "optimizer")


def phase_timed_loop(config, runtime, steps: int, warmup: int) -> dict:
    """Seconds per phase, summed over ``steps`` measured steps (after ``warmup`` steps)."""
    import torch
    import torch.distributed as dist

    from pfc.data.manifest import image_side, read_manifest
    from pfc.train.builders import build_loader, build_train_state

    image_size = image_side(read_manifest(config.data.root))
    loader = build_loader(config, runtime, epoch=0)
    state = build_train_state(config, runtime, image_size, len(loader), {})
    model, head = state.runner.model, state.head
    parameters = [p for p in model.parameters() if p.requires_grad]
    totals = dict.fromkeys(PHASES, 0.0)
    batches = iter(loader)
    for step in range(warmup + steps):
        marks = [time.perf_counter()]
        try:
            images, labels = next(batches)
        except StopIteration:
            batches = iter(build_loader(config, runtime, epoch=step))
            images, labels = next(batches)
        marks.append(time.perf_counter())
        embeddings = model(images)
        marks.append(time.perf_counter())
        detached = embeddings.detach().requires_grad_()
        head.set_iteration(step)
        head(detached, labels).backward()
        marks.append(time.perf_counter())
        embeddings.backward(detached.grad)
        marks.append(time.perf_counter())
        if runtime.world_size > 1:
            flat = torch.cat([p.grad.flatten() for p in parameters])
            dist.all_reduce(flat)
            flat /= runtime.world_size
            offset = 0
            for p in parameters:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        marks.append(time.perf_counter())
        state.runner.step(state.head_optimizer)
        for scheduler in state.schedulers.values():
            scheduler.step()
        marks.append(time.perf_counter())
        if step >= warmup:
            for phase, start, stop in zip(PHASES, marks[:-1], marks[1:]):
                totals[phase] += stop - start
    del batches, loader  # stop this loop's loader workers before the real trainer runs
    gc.collect()
    return totals


def worker(args) -> None:
    import dataclasses

    from pfc.train.config import load_config
    from pfc.train.loop import train
    from pfc.train.runtime import init_runtime

    runtime = init_runtime()
    config = load_config(os.path.join(ROOT, "configs", "synthetic_cpu.py"), [
        "--data", args.data, "--output", os.path.join(args.workdir, "run"), "--network", args.network,
        "--batch_size", str(args.batch_size), "--val_pairs", "", "--num_workers", str(args.num_workers),
        "--log_every", str(args.steps)])
    from pfc.data.manifest import manifest_source, read_manifest
    from pfc.train.config import apply_dataset

    manifest = read_manifest(args.data)
    resolved = apply_dataset(config, manifest["num_classes"], manifest["num_samples"], manifest_source(args.data))
    totals = phase_timed_loop(resolved, runtime, args.steps, warmup=5)
    # end to end: the real trainer; its second logging window excludes start-up and the first steps
    summary_config = dataclasses.replace(config, schedule=dataclasses.replace(config.schedule, max_steps=2 * args.steps))
    train(summary_config, runtime)
    if runtime.is_main:
        with open(os.path.join(args.workdir, "run", "metrics.jsonl")) as handle:
            records = [json.loads(line) for line in handle]
        result = {"phases": totals, "steps": args.steps, "end_to_end_samples_per_s": records[-1]["samples_per_s"],
                  "world_size": runtime.world_size}
        with open(os.path.join(args.workdir, "result.json"), "w") as handle:
            json.dump(result, handle)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", default="tiny")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--ids", type=int, default=200)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    with tempfile.TemporaryDirectory() as workdir:
        per_id = max(2, (2 * args.steps * args.batch_size * args.ranks) // args.ids + 1)
        subprocess.run([sys.executable, "tools/make_synthetic.py", f"{workdir}/images", "--ids", str(args.ids),
                        "--per", str(per_id), "--seed", "1"], cwd=ROOT, env=env, check=True)
        subprocess.run([sys.executable, "tools/pack_shards.py", "folder", f"{workdir}/images", f"{workdir}/shards",
                        "--shard-size", "1000"], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={args.ranks}", "bench/train.py", "--worker", "--data", f"{workdir}/shards",
                        "--workdir", workdir, "--network", args.network, "--batch-size", str(args.batch_size),
                        "--steps", str(args.steps), "--num-workers", str(args.num_workers)],
                       cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(workdir, "result.json")) as handle:
            result = json.load(handle)
    phases, steps = result["phases"], result["steps"]
    step_time = sum(phases.values()) / steps
    global_batch = args.batch_size * args.ranks
    compute = (phases["backbone forward"] + phases["backbone backward"]) / steps
    print(f"\ntrainer on CPU: {args.ranks} gloo ranks × batch {args.batch_size}, network {args.network}, "
          f"{steps} measured steps, 1 thread per rank")
    print(f"{'phase':<22}{'ms/step':>10}{'share':>8}")
    for phase in PHASES:
        print(f"{phase:<22}{1000 * phases[phase] / steps:>10.1f}{phases[phase] / steps / step_time:>8.1%}")
    print(f"{'total (phase-timed)':<22}{1000 * step_time:>10.1f}")
    print(f"phase-timed loop        {global_batch / step_time:8.0f} samples/s")
    print(f"real trainer (DDP)      {result['end_to_end_samples_per_s']:8.0f} samples/s")
    print(f"floor: backbone compute {global_batch / compute:8.0f} samples/s "
          f"(real trainer at {result['end_to_end_samples_per_s'] / (global_batch / compute):.0%} of it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
