"""Cost of each augmentation per image against the JPEG-decode floor, at 112x112.

    OMP_NUM_THREADS=1 python bench/augment.py [--ids 60 --per 10 --images 512 --worker-batch 16 --repeats 10]

Builds synthetic faces (pfc/datasets/synthetic.py), packs them, then times over the same JPEG
bytes, in one process: (1) the decode floor, simplejpeg into a reused buffer; (2) decode + one
operation applied to every image (probability 1, the default ranges unless named); the draws
(:func:`pfc.data.augment.uniforms`) timed apart; (3) decode + insightface's DALI recipe (low
resolution 0.1, blur 0.2, colour jitter 0.2, grayscale 0.1: what one image costs on average)
and + every operation on every image; (4) a DataLoader worker's whole work (read, shuffle,
decode, batch, draws, augmentation), ``ShardStream`` iterated in this process, without and with
insightface's recipe, in batches of --worker-batch images. Times are this thread's CPU time
(``time.thread_time``: what other processes take of the core is not counted), (1)-(3) of each
of the first --images images alone, (4) of each batch, best of --repeats: on a shared machine
the rows then compare as on a quiet one (the one thread: torch's too, OMP_NUM_THREADS=1). Prints one table: µs per image,
images/s, and the rate as a fraction of the decode floor.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import simplejpeg

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this tree's pfc and bench

from pfc.data import make_loader
from pfc.data.augment import SHUFFLE_STREAM, Augmentation, augment_image, uniforms
from pfc.data.loader import ShardStream
from pfc.datasets import FolderSource, PackOptions, pack, write_synthetic
from bench.data import shard_jpegs

INSIGHTFACE = Augmentation(low_resolution=0.1, blur=0.2, color_jitter=0.2, grayscale=0.1)
CASES = [  # (name, augmentation or None for the bare decode)
    ("decode floor: simplejpeg into a reused buffer", None),
    ("+ random resized crop (scale 0.5-1, ratio 3/4-4/3)", Augmentation(random_resized_crop=1.0)),
    ("+ low resolution (factor 0.5-0.8, down and up)", Augmentation(low_resolution=1.0)),
    ("+ Gaussian blur, sigma 0.8 (7 taps)", Augmentation(blur=1.0)),
    ("+ Gaussian blur, sigma 0.1-2 (3-13 taps)", Augmentation(blur=1.0, blur_sigma=(0.1, 2.0))),
    ("+ colour jitter (saturation 1-1.2, hue 0-20 deg)", Augmentation(color_jitter=1.0)),
    ("+ colour jitter, all four (b, c, s 0.6-1.4, hue +-30 deg)",
     Augmentation(color_jitter=1.0, brightness=(0.6, 1.4), contrast=(0.6, 1.4), saturation=(0.6, 1.4),
                  hue=(-30.0, 30.0))),
    ("+ grayscale", Augmentation(grayscale=1.0)),
    ("+ insightface's DALI recipe (0.1 / 0.2 / 0.2 / 0.1)", INSIGHTFACE),
    ("+ all five operations on every image",
     Augmentation(random_resized_crop=1.0, low_resolution=1.0, blur=1.0, color_jitter=1.0, grayscale=1.0)),
]


def per_image_times(blobs: list[bytes], augmentation: Augmentation | None, repeats: int) -> np.ndarray:
    """Seconds to decode blob n into one reused buffer and augment it with the draws of key n,
    for each n: the best of ``repeats`` timings of that image alone (a single image's work is
    short enough that the best timing is one that no other process interrupted)."""
    out = np.empty((112, 112, 3), dtype=np.uint8)
    draws = uniforms(0, 0, SHUFFLE_STREAM, np.arange(len(blobs)))
    best = np.full(len(blobs), np.inf)
    clock = time.thread_time
    for _ in range(repeats):
        for number, blob in enumerate(blobs):
            started = clock()
            simplejpeg.decode_jpeg(blob, colorspace="RGB", buffer=out)
            if augmentation is not None:
                augment_image(out, draws[number], augmentation)
            best[number] = min(best[number], clock() - started)
    return best


def draw_time(count: int, batch: int, repeats: int) -> float:
    """Seconds per image of the draws (:func:`pfc.data.augment.uniforms`), a batch at a time."""
    best = np.inf
    for _ in range(repeats):
        started = time.thread_time()
        for start in range(0, count, batch):
            uniforms(0, 0, SHUFFLE_STREAM, np.arange(start, start + batch))
        best = min(best, (time.thread_time() - started) / (count // batch * batch))
    return best


def worker_batch_times(root: str, batch: int, augmentation: Augmentation | None) -> np.ndarray:
    """Seconds each batch of one DataLoader worker's whole work took (read, shuffle, decode,
    batch, draws, augmentation), ``ShardStream`` iterated in this process."""
    loader = make_loader(root, batch_size=batch, rank=0, world_size=1, num_workers=0, seed=0, epoch=0,
                         augmentation=augmentation)
    times, started = [], time.thread_time()
    for _ in ShardStream(loader.spec):
        now = time.thread_time()
        times.append(now - started)
        started = now
    return np.array(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", type=int, default=60)
    parser.add_argument("--per", type=int, default=10)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--worker-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        source_dir, shards = os.path.join(tmp, "faces"), os.path.join(tmp, "shards")
        write_synthetic(source_dir, args.ids, args.per, seed=0)
        pack(FolderSource(source_dir), shards, PackOptions(shard_size=1000, progress=False))
        blobs = shard_jpegs(shards)[:args.images]
        times = {name: per_image_times(blobs, augmentation, args.repeats) for name, augmentation in CASES}
        draws = draw_time(len(blobs), 128, args.repeats)
        workers = {"plain": None, "insightface": None}
        for _ in range(args.repeats):   # each batch's best: batches of --worker-batch images are short
            for name, augmentation in (("plain", None), ("insightface", INSIGHTFACE)):
                batches = worker_batch_times(shards, args.worker_batch, augmentation)
                workers[name] = batches if workers[name] is None else np.minimum(workers[name], batches)

    floor = float(times[CASES[0][0]].mean())
    print(f"{len(blobs)} synthetic 112x112 JPEG faces (q95), each image's best of {args.repeats}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")
    print(f"| {'what (1 process)':<62} | {'µs/image':>8} | {'+µs':>5} | {'images/s':>8} | {'vs floor':>8} |")
    print(f"|{'-' * 64}|{'-' * 10}|{'-' * 7}|{'-' * 10}|{'-' * 10}|")
    rows = [(name, float(value.mean())) for name, value in times.items()]
    rows.insert(1, ("+ the draws alone (15 uniforms per image, a batch at a time)", floor + draws))
    per_image = {name: float(value.sum()) / (len(value) * args.worker_batch) for name, value in workers.items()}
    rows += [("worker's work (read, shuffle, decode, batch), no augmentation", per_image["plain"]),
             ("worker's work + insightface's DALI recipe", per_image["insightface"])]
    for name, seconds in rows:
        extra = f"{1e6 * (seconds - floor):5.0f}" if name.startswith("+") else ""
        print(f"| {name:<62} | {1e6 * seconds:>8.0f} | {extra:>5} | {1 / seconds:>8.0f} | {floor / seconds:>8.2f} |")

if __name__ == "__main__":
    main()
