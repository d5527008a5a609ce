"""Cost of each augmentation per image against the JPEG-decode floor, at 112x112.

    OMP_NUM_THREADS=1 python bench/augment.py [--ids 100 --per 20 --batch 128 --repeats 5]

Builds synthetic faces (pfc/datasets/synthetic.py), packs them, then times over the same JPEG
bytes, in one process: (1) the decode floor, simplejpeg into a reused buffer; (2) decode + one
operation applied to every image (probability 1, the default ranges unless named), its draws
included; (3) decode + insightface's DALI recipe (low resolution 0.1, blur 0.2, colour jitter
0.2, grayscale 0.1: what one image costs on average) and + every operation on every image;
(4) a DataLoader worker's whole work (read, shuffle, decode, batch, draws, augmentation),
``ShardStream`` iterated in this process, without and with insightface's recipe. Best of
--repeats, interleaved (the machine may be shared). Prints one table: µs per image, images/s,
and the rate as a fraction of the decode floor.
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


def decode_and_augment(blobs: list[bytes], augmentation: Augmentation | None) -> float:
    """images/s of decoding every blob into one reused buffer and augmenting it (draws included)."""
    out = np.empty((112, 112, 3), dtype=np.uint8)
    started = time.perf_counter()
    for start in range(0, len(blobs), 128):   # draws per batch of 128, as the loader makes them
        chunk = blobs[start:start + 128]
        draws = None if augmentation is None else uniforms(0, 0, SHUFFLE_STREAM, np.arange(start, start + len(chunk)))
        for number, blob in enumerate(chunk):
            simplejpeg.decode_jpeg(blob, colorspace="RGB", buffer=out)
            if augmentation is not None:
                augment_image(out, draws[number], augmentation)
    return len(blobs) / (time.perf_counter() - started)


def worker_rate(root: str, batch: int, augmentation: Augmentation | None) -> float:
    """images/s of one DataLoader worker's whole work, run in this process."""
    loader = make_loader(root, batch_size=batch, rank=0, world_size=1, num_workers=0, seed=0, epoch=0,
                         augmentation=augmentation)
    started = time.perf_counter()
    count = sum(len(item[1]) for item in ShardStream(loader.spec))
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", type=int, default=100)
    parser.add_argument("--per", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        source_dir, shards = os.path.join(tmp, "faces"), os.path.join(tmp, "shards")
        write_synthetic(source_dir, args.ids, args.per, seed=0)
        pack(FolderSource(source_dir), shards, PackOptions(shard_size=1000, progress=False))
        blobs = shard_jpegs(shards)
        rates = {name: 0.0 for name, _ in CASES}
        workers = {"plain": 0.0, "insightface": 0.0}
        for _ in range(args.repeats):
            for name, augmentation in CASES:
                rates[name] = max(rates[name], decode_and_augment(blobs, augmentation))
            workers["plain"] = max(workers["plain"], worker_rate(shards, args.batch, None))
            workers["insightface"] = max(workers["insightface"], worker_rate(shards, args.batch, INSIGHTFACE))

    floor = rates[CASES[0][0]]
    print(f"{len(blobs)} synthetic 112x112 JPEG faces (q95), best of {args.repeats}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")
    print(f"| {'what (1 process)':<60} | {'µs/image':>8} | {'+µs':>5} | {'images/s':>8} | {'vs floor':>8} |")
    print(f"|{'-' * 62}|{'-' * 10}|{'-' * 7}|{'-' * 10}|{'-' * 10}|")
    rows = [(name, rate) for name, rate in rates.items()]
    rows += [("worker's work (read, shuffle, decode, batch), no augmentation", workers["plain"]),
             ("worker's work + insightface's DALI recipe", workers["insightface"])]
    for name, rate in rows:
        extra = f"{1e6 / rate - 1e6 / floor:5.0f}" if name.startswith("+") else ""
        print(f"| {name:<60} | {1e6 / rate:>8.0f} | {extra:>5} | {rate:>8.0f} | {rate / floor:>8.2f} |")


if __name__ == "__main__":
    main()
