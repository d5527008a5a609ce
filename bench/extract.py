"""Feature extraction's input pipeline per CPU core against the JPEG-decode floor.

    OMP_NUM_THREADS=1 python bench/extract.py [--subjects 40 --repeats 3 --workers 2]

Writes a synthetic IJB root (pfc/datasets/synthetic_ijb.py: loose crops ≈ 200–280 px, JPEG q95,
five landmarks each), then times over the same images, best of --repeats, interleaved:
(1) decode only (simplejpeg, RGB): the floor;
(2) decode + alignment (pfc.evaluation.embedding.load_face: the file read, the decode,
    align_face_cv's similarity fit and OpenCV-style bilinear) in this process, one thread;
(3) the alignment alone (align_face_cv on decoded images), float and resampling="opencv4";
(4) extract_features' whole loader (DataLoader workers decoding and aligning, batches handed to
    the rank) with a model that costs nothing: wall-clock rate / workers, and images per CPU-second
    the worker processes used (getrusage of the joined children: what a core does, however
    loaded the machine is);
(5) the same with the tiny backbone at 112 (the model on this CPU; on a GPU the loader is the limit).
Prints one table: images/s per core and the fraction of the floor.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np
import simplejpeg
import torch

from pfc.datasets.synthetic_ijb import write_synthetic_ijb
from pfc.evaluation.alignment import align_face_cv
from pfc.evaluation.embedding import FaceItem, extract_features, load_face
from pfc.evaluation.embedding_model import EmbeddingModel, module_embedding_model
from pfc.evaluation.ijb import read_ijb_meta


def best_rate(function, count: int, repeats: int) -> float:
    """The best images/s of ``function()`` (which handles ``count`` images) over ``repeats`` runs."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return count / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        write_synthetic_ijb(root, "IJBC", subjects=args.subjects, seed=0, identification=False)
        meta = read_ijb_meta(root, "IJBC")
        items = [FaceItem(meta.layout.image(name), landmarks)
                 for name, landmarks in zip(meta.faces.names.tolist(), meta.faces.landmarks)]
        encoded = [open(item.path, "rb").read() for item in items]
        decoded = [simplejpeg.decode_jpeg(blob, colorspace="RGB") for blob in encoded]
        sides = np.array([image.shape[:2] for image in decoded])
        count = len(items)
        free = EmbeddingModel(lambda batch: torch.zeros(len(batch), 8), 8, 112)
        from pfc.backbones import build_backbone
        tiny = module_embedding_model(build_backbone("tiny", 128, 0.0, 112), 128, 112)

        rows = {}
        for _ in range(args.repeats):   # interleaved: the machine is shared
            rows.setdefault("decode only (floor)", []).append(
                best_rate(lambda: [simplejpeg.decode_jpeg(blob, colorspace="RGB") for blob in encoded], count, 1))
            rows.setdefault("decode + align (load_face), 1 thread", []).append(
                best_rate(lambda: [load_face(item, 112) for item in items], count, 1))
            rows.setdefault("align only (align_face_cv)", []).append(
                best_rate(lambda: [align_face_cv(image, item.landmarks) for image, item in zip(decoded, items)],
                          count, 1))
            rows.setdefault("align only, resampling='opencv4' (OpenCV 4 bit for bit)", []).append(
                best_rate(lambda: [align_face_cv(image, item.landmarks, resampling="opencv4")
                                   for image, item in zip(decoded, items)], count, 1))
            if args.workers:
                loader_items = items * 16   # long enough that the workers' start-up is a small part
                extract_features(free, items[:args.workers * args.batch_size], batch_size=args.batch_size,
                                 num_workers=args.workers, progress=False, flip=False)
                rate = best_rate(lambda: extract_features(free, loader_items, batch_size=args.batch_size,
                                                          num_workers=args.workers, progress=False, flip=False),
                                 len(loader_items), 1)
                rows.setdefault(f"extract_features loader, free model, per worker ({args.workers} workers)",
                                []).append(rate / args.workers)
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                extract_features(free, loader_items, batch_size=args.batch_size, num_workers=args.workers,
                                 progress=False, flip=False)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)   # the workers, joined at the end
                worker_seconds = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
                rows.setdefault("extract_features loader, free model, per worker CPU-second", []).append(
                    len(loader_items) / worker_seconds)
            rows.setdefault("extract_features, tiny backbone + flip, num_workers=0", []).append(
                best_rate(lambda: extract_features(tiny, items, batch_size=args.batch_size, num_workers=0,
                                                   progress=False), count, 1))
        floor = max(rows["decode only (floor)"])
        print(f"{count} loose crops, {sides[:, 1].min()}–{sides[:, 1].max()} x "
              f"{sides[:, 0].min()}–{sides[:, 0].max()} px, "
              f"best of {args.repeats}; torch threads 1")
        print(f"| {'what':<66} | images/s per core | of the floor |")
        print(f"|{'-' * 68}|-------------------|--------------|")
        for name, rates in rows.items():
            print(f"| {name:<66} | {max(rates):>17,.0f} | {max(rates) / floor:>12.2f} |")


if __name__ == "__main__":
    main()
