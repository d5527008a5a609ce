"""Data pipeline throughput: the loader per worker process against the JPEG decode floor, the
decoder choice, and the packer.

    OMP_NUM_THREADS=1 python bench/data.py [--ids 200 --per 30 --batch 128 --repeats 3]

Builds synthetic faces (pfc/datasets/synthetic.py), packs them (timed: JPEGs kept as they are, and with
--landmarks alignment + re-encoding), then times over the same shard bytes:
(1) bare decode loops in one process, simplejpeg (the floor) and PIL (the alternative);
(2) exactly the work one DataLoader worker does — read, shuffle, decode, batch into uint8, draw
    the flips — run in this process;
(3) the whole loader with num_workers=0 (adds the flips and the float conversion, done where
    batches are consumed) and num_workers=1 (one worker process beside the consumer: adds the
    hand-off between processes), over the whole epoch and after the first batch (without the
    worker start-up). The last is the loader's rate per worker process that the ">= 90 % of the
    floor" target is about;
(4) the time to the first batch of a loader resumed in the middle of the epoch (``start_batch``)
    against replaying the epoch up to that batch.
Best of --repeats runs each, interleaved, since the machine may be shared. Prints one table.
"""
from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time

import numpy as np
import simplejpeg
from PIL import Image

from pfc.data import make_loader
from pfc.data.loader import ShardStream
from pfc.datasets import FolderSource, PackOptions, pack, write_synthetic


def shard_jpegs(root: str) -> list[bytes]:
    blobs = []
    for name in sorted(os.listdir(root)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(root, name)) as archive:
                blobs += [archive.extractfile(m).read() for m in archive if m.name.endswith(".jpg")]
    return blobs


def decode_simplejpeg(blobs):
    for blob in blobs:
        simplejpeg.decode_jpeg(blob, colorspace="RGB")


def decode_pil(blobs):
    for blob in blobs:
        with Image.open(io.BytesIO(blob)) as image:
            np.asarray(image.convert("RGB"))


def loader_rates(root, batch, workers, epoch) -> tuple[float, float]:
    """(images/s over the whole epoch, images/s after the first batch: the steady state without
    the worker start-up)."""
    loader = make_loader(root, batch_size=batch, rank=0, world_size=1, num_workers=workers, seed=0,
                         epoch=epoch, augment=True)
    started = time.perf_counter()
    count, first_at = 0, None
    for images, labels in loader:
        if first_at is None:
            first_at = time.perf_counter()
        else:
            count += len(labels)
    finished = time.perf_counter()
    return (count + batch) / (finished - started), count / (finished - first_at)


def worker_rate(root, batch) -> float:
    """images/s of exactly the work one DataLoader worker does (read, shuffle, decode, batch into
    uint8, draw the flips), run in this process: ``ShardStream`` iterated directly."""
    loader = make_loader(root, batch_size=batch, rank=0, world_size=1, num_workers=0, seed=0, epoch=0)
    stream = ShardStream(loader.spec)
    started = time.perf_counter()
    count = sum(len(batch[1]) for batch in stream)
    return count / (time.perf_counter() - started)


def first_batch_times(root, batch, workers) -> tuple[float, float, int]:
    """(seconds to the first batch of a loader resumed mid-epoch, seconds to the same batch by
    replaying the epoch up to it — what the trainer did before ``start_batch`` —, the batch
    index): loader creation, worker start and the batch itself included in both."""
    epoch_batches = make_loader(root, batch_size=batch, rank=0, world_size=1, num_workers=0, seed=0,
                                epoch=0).epoch_batches
    middle = epoch_batches // 2
    started = time.perf_counter()
    next(iter(make_loader(root, batch_size=batch, rank=0, world_size=1, num_workers=workers, seed=0, epoch=0,
                          start_batch=middle)))
    resumed = time.perf_counter() - started
    started = time.perf_counter()
    replay = iter(make_loader(root, batch_size=batch, rank=0, world_size=1, num_workers=workers, seed=0, epoch=0))
    for _ in range(middle + 1):
        next(replay)
    return resumed, time.perf_counter() - started, middle


def decode_rate(fn, blobs) -> float:
    started = time.perf_counter()
    fn(blobs)
    return len(blobs) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", type=int, default=200)
    parser.add_argument("--per", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        source_dir, shards = os.path.join(tmp, "faces"), os.path.join(tmp, "shards")
        write_synthetic(source_dir, args.ids, args.per, seed=0, landmarks=True)
        images = args.ids * args.per
        started = time.perf_counter()
        pack(FolderSource(source_dir), shards, PackOptions(shard_size=1000, progress=False))
        pack_rate = images / (time.perf_counter() - started)
        started = time.perf_counter()
        pack(FolderSource(source_dir), os.path.join(tmp, "aligned"),
             PackOptions(shard_size=1000, progress=False, landmarks=os.path.join(source_dir, "landmarks.csv")))
        align_rate = images / (time.perf_counter() - started)

        blobs = shard_jpegs(shards)
        rates = {key: 0.0 for key in ("simplejpeg", "pil", "worker", "loader0", "loader0_steady", "loader1",
                                      "loader1_steady")}
        resume = {"resumed": float("inf"), "replayed": float("inf")}
        for repeat in range(args.repeats):
            resumed, replayed, middle = first_batch_times(shards, args.batch, 1)
            resume["resumed"], resume["replayed"] = min(resume["resumed"], resumed), min(resume["replayed"], replayed)
            rates["simplejpeg"] = max(rates["simplejpeg"], decode_rate(decode_simplejpeg, blobs))
            rates["worker"] = max(rates["worker"], worker_rate(shards, args.batch))
            rates["pil"] = max(rates["pil"], decode_rate(decode_pil, blobs))
            for workers in (0, 1):
                whole, steady = loader_rates(shards, args.batch, workers, repeat)
                rates[f"loader{workers}"] = max(rates[f"loader{workers}"], whole)
                rates[f"loader{workers}_steady"] = max(rates[f"loader{workers}_steady"], steady)

    floor = rates["simplejpeg"]
    print(f"{images} synthetic 112x112 JPEG faces (q95, mean {np.mean([len(b) for b in blobs]) / 1024:.1f} KiB), "
          f"batch {args.batch}, best of {args.repeats}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")
    print(f"| {'what':<66} | {'images/s':>9} | {'vs floor':>8} |")
    print(f"|{'-' * 68}|{'-' * 11}|{'-' * 10}|")
    rows = [("decode floor: bare simplejpeg loop, 1 process", floor),
            ("bare PIL decode loop, 1 process", rates["pil"]),
            ("worker's work (read, shuffle, decode, batch) in 1 process", rates["worker"]),
            ("loader, num_workers=0, whole epoch, incl. flips + float conversion", rates["loader0"]),
            ("loader, num_workers=1, whole epoch (incl. worker start)", rates["loader1"]),
            ("loader, num_workers=1, after the first batch", rates["loader1_steady"]),
            ("packer, folder of 112x112 JPEGs (kept as is), 1 worker", pack_rate),
            ("packer, folder + --landmarks (align, re-encode), 1 worker", align_rate)]
    for name, rate in rows:
        ratio = f"{rate / floor:.2f}" if "packer" not in name else ""
        print(f"| {name:<66} | {rate:>9.0f} | {ratio:>8} |")
    print(f"\nfirst batch of a loader resumed at batch {middle} of {images // args.batch} (num_workers=1, "
          f"loader creation and worker start included), best of {args.repeats}:")
    print(f"| {'how':<66} | {'seconds':>9} | {'ratio':>8} |")
    print(f"|{'-' * 68}|{'-' * 11}|{'-' * 10}|")
    for name, key in (("start_batch (skip shards, headers only, no decode)", "resumed"),
                      ("replay: iterate the epoch up to it (before start_batch)", "replayed")):
        print(f"| {name:<66} | {resume[key]:>9.3f} | {resume[key] / resume['resumed']:>8.1f} |")


if __name__ == "__main__":
    main()
