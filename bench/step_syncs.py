"""Host synchronisations and collectives per training step, this tree beside another (before/after).

    python bench/step_syncs.py [--before main] [--steps 10] [--log-every 5]

Runs the real trainer (``pfc.train.loop.train``, DDP engine) on 2 gloo ranks on a tiny shard set
(the tests' ``tiny`` network), twice per tree: grad_accumulation 1 (the head updates its centers
inside its backward) and 2 (stored center gradients). Every step is counted from one
``train_step`` call to the next, the loop's work after the step included:

* host syncs: :class:`pfc.host_syncs.HostSyncCounter` (on a CPU run every tensor counts, as each
  would be a device tensor on a GPU), by the innermost pfc source file;
* collectives: every ``c10d`` operator that reaches the dispatcher (DDP's bucket all-reduces from
  its C++ reducer included), by operator and by the innermost pfc source file.

``--before REF`` checks out REF's tree (``git worktree``, removed afterwards) and counts it the
same way. The table shows rank 0's counts for a steady-state step (step 2) and a log step.
Counts, not times: the machine's load does not change them.

``--restore-rows N`` (one process, no training) times instead what deciding the rollback on the
device costs: with the centers' update inside the head's backward, every step now runs the masked
restore of the sampled rows (gather the updated rows, ``where``, write back) where before only a
skipped step wrote the saved rows back; beside it the forward hook's snapshot of the same rows
(there before and after). A shard of N rows × 512 (centers and momentum), ``--sample-rate`` of
them sampled; medians in ms.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import traceback
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pfc_site() -> str:
    frames = [frame for frame in traceback.extract_stack()[:-2] if "/pfc/" in frame.filename]
    return frames[-1].filename.split("/pfc/")[-1] if frames else "outside pfc"


def counted_training(rank: int, world_size: int, data: str, output: str, steps: int, log_every: int,
                     accumulation: int) -> list[dict]:
    """One training with every step's host syncs and collectives counted (see the module docstring)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from pfc.host_syncs import HostSyncCounter
    from pfc.train import loop
    from tests.train_fixtures import make_config

    class Collectives(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.by_op, self.by_site = Counter(), Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "c10d":
                name = func.__name__.split(".")[0].rstrip("_")
                self.by_op[name] += 1
                self.by_site[f"{name} at {_pfc_site()}"] += 1
            return func(*args, **(kwargs or {}))

    syncs, collectives, marks = HostSyncCounter(), Collectives(), []
    original_step, original_run = loop.train_step, loop._run

    def snapshot(step):
        by_file = Counter()
        for site, count in syncs.sites.items():
            by_file[site.split(" at ")[-1].rsplit(":", 1)[0]] += count
        marks.append({"step": step, "syncs": syncs.count, "sync_sites": dict(by_file),
                      "collectives": dict(collectives.by_op), "collective_sites": dict(collectives.by_site)})

    def train_step(state, *args, **kwargs):
        snapshot(state.step + 1)
        return original_step(state, *args, **kwargs)

    def run(*args, **kwargs):
        with syncs, collectives:
            result = original_run(*args, **kwargs)
        snapshot(None)
        return result

    loop.train_step, loop._run = train_step, run
    try:
        torch.manual_seed(0)
        loop.train(make_config(data, output, log_every=log_every, max_steps=steps, save_every=0,
                               save_every_minutes=0, val_pairs="", grad_accumulation=accumulation))
    finally:
        loop.train_step, loop._run = original_step, original_run

    def minus(after: dict, before: dict) -> dict:
        return {key: value - before.get(key, 0) for key, value in after.items() if value > before.get(key, 0)}

    return [{"step": before["step"], "syncs": after["syncs"] - before["syncs"],
             "sync_sites": minus(after["sync_sites"], before["sync_sites"]),
             "collectives": minus(after["collectives"], before["collectives"]),
             "collective_sites": minus(after["collective_sites"], before["collective_sites"])}
            for before, after in zip(marks, marks[1:])]


def _ranks(rank: int, world_size: int, data: str, output: str, steps: int, log_every: int) -> dict:
    return {accumulation: counted_training(rank, world_size, data, f"{output}/{accumulation}", steps, log_every,
                                           accumulation) for accumulation in (1, 2)}


def worker(tree: str, steps: int, log_every: int, out: str) -> None:
    """In a fresh process whose ``sys.path`` starts at ``tree``: count both trainings, write JSON."""
    from tests.distributed import run_ranks
    from tests.train_fixtures import write_shards

    with tempfile.TemporaryDirectory() as scratch:
        data = write_shards(os.path.join(scratch, "shards"), num_classes=12, per_class=8, image_size=16)
        results = run_ranks(_ranks, 2, data, os.path.join(scratch, "runs"), steps, log_every, timeout=600)
    with open(out, "w") as handle:
        json.dump(results[0], handle)


def count_tree(tree: str, steps: int, log_every: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", tree, "--steps", str(steps),
                        "--log-every", str(log_every), "--out", out.name], check=True, env=env, cwd=tree)
        with open(out.name) as handle:
            return {int(key): value for key, value in json.load(handle).items()}


def _cell(counts: dict) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items())) or "none"


def table(label_counts: list[tuple[str, dict]], log_every: int) -> str:
    lines = ["| tree | grad_accumulation | step | host syncs | where (pfc file: syncs) | collectives | "
             "collectives by site |", "|---|---|---|---|---|---|---|"]
    for label, counts in label_counts:
        for accumulation, steps in counts.items():
            for wanted, kind in ((2, "steady"), (log_every, "log")):
                record = next(r for r in steps if r["step"] == wanted)
                lines.append(f"| {label} | {accumulation} | {wanted} ({kind}) | {record['syncs']} | "
                             f"{_cell(record['sync_sites'])} | {sum(record['collectives'].values())}: "
                             f"{_cell(record['collectives'])} | {_cell(record['collective_sites'])} |")
    return "\n".join(lines)


def restore_cost(rows: int, sample_rate: float, repeats: int) -> str:
    """The masked restore against the snapshot it pairs with (see the module docstring)."""
    import statistics
    import time

    import torch

    from pfc.head.optim import SparseRowSGD
    from pfc.train.rollback import StepRollback

    class Shard(torch.nn.Module):  # stands for the head: a center shard and its last sample
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(rows, 512))
            self.last_sample = (torch.randperm(rows)[:int(rows * sample_rate)].sort().values, None)

        def forward(self):
            return None

    head = Shard()
    rollback = StepRollback(torch.nn.BatchNorm1d(8), head, SparseRowSGD([head.weight], lr=0.1), True)

    def median_ms(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def masked(skip: bool):
        head()                                   # the hook's snapshot
        rollback.restore(torch.tensor(skip))

    snapshot = median_ms(head)
    kept = median_ms(lambda: masked(False)) - snapshot
    skipped = median_ms(lambda: masked(True)) - snapshot
    old = median_ms(lambda: (head(), rollback.restore(True))) - snapshot
    rollback.close()
    sampled = int(rows * sample_rate)
    return "\n".join([
        f"| {rows} rows × 512, {sampled} sampled | ms |", "|---|---:|",
        f"| snapshot of the sampled rows (forward hook, every step, before and after) | {snapshot:.2f} |",
        f"| masked restore, step kept (after: every step) | {kept:.2f} |",
        f"| masked restore, step skipped (after) | {skipped:.2f} |",
        f"| host-decided restore, skipped steps only (before) | {old:.2f} |"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="main", help="git ref counted beside this tree ('' for none)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--restore-rows", type=int, default=0, help="time the masked restore instead")
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.restore_rows:
        sys.path.insert(0, ROOT)
        print(restore_cost(args.restore_rows, args.sample_rate, args.repeats))
        return
    if args.worker:
        sys.path.insert(0, args.worker)
        worker(args.worker, args.steps, args.log_every, args.out)
        return
    measured = []
    if args.before:
        with tempfile.TemporaryDirectory() as scratch:
            tree = os.path.join(scratch, "before")
            subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", tree, args.before], check=True,
                           capture_output=True)
            try:
                measured.append((f"before ({args.before})", count_tree(tree, args.steps, args.log_every)))
            finally:
                subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], check=False)
    measured.append(("after (this tree)", count_tree(ROOT, args.steps, args.log_every)))
    print(table(measured, args.log_every))


if __name__ == "__main__":
    main()
