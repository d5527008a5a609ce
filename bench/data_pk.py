"""P×K batches against shuffled ones: loader throughput over the same shards, and the index build.

    OMP_NUM_THREADS=1 python bench/data_pk.py SHARDS [--batch 128 --k 4 --repeats 3]

SHARDS is a packed shard set (with its per-sample index; e.g. ``make demo``'s ``demo/shards``).
Times, best of --repeats, interleaved (the machine may be shared): a whole epoch of the loader
with ``sampler="shuffle"`` and ``sampler="pk"``, with num_workers=0 (everything in this process,
incl. the float conversion) and num_workers=1 (one worker process and the hand-off), and
``build_index`` (the ``pack_shards.py index`` command's work) on a copy of the set. Prints one
table with images/s and the P×K / shuffle ratio.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from pfc.data import make_loader
from pfc.data.manifest import read_manifest
from pfc.datasets.indexing import build_index


def epoch_rate(root: str, batch: int, workers: int, sampler: str, k: int) -> float:
    """Images per second over one whole epoch (worker start-up included)."""
    loader = make_loader(root, batch, 0, 1, workers, seed=0, epoch=0, sampler=sampler, pk_k=k)
    start = time.perf_counter()
    count = sum(labels.numel() for _, labels in loader)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    samples = read_manifest(args.shards)["num_samples"]
    best: dict[tuple, float] = {}
    copy = tempfile.mkdtemp()
    for name in os.listdir(args.shards):
        if name.endswith(".tar") or name in ("dataset.json", "classes.txt"):
            shutil.copy(os.path.join(args.shards, name), copy)
    for _ in range(args.repeats):
        for workers in (0, 1):
            for sampler in ("shuffle", "pk"):
                rate = epoch_rate(args.shards, args.batch, workers, sampler, args.k)
                best[(workers, sampler)] = max(best.get((workers, sampler), 0.0), rate)
        start = time.perf_counter()
        build_index(copy)
        best["index"] = max(best.get("index", 0.0), samples / (time.perf_counter() - start))
    shutil.rmtree(copy)
    print(f"{samples} samples, batch {args.batch}, K {args.k}; best of {args.repeats}, images/s")
    print("| what | shuffle | pk | pk / shuffle |")
    print("|---|---|---|---|")
    for workers in (0, 1):
        shuffle, pk = best[(workers, "shuffle")], best[(workers, "pk")]
        print(f"| loader, num_workers={workers}, whole epoch | {shuffle:.0f} | {pk:.0f} | {pk / shuffle:.2f} |")
    print(f"| build_index (tarfile scan + write), 1 process | | {best['index']:.0f} | |")


if __name__ == "__main__":
    main()
