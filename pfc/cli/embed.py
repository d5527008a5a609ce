"""Embeddings of any set of faces: ``OUT.npy`` (float32 [N, D], L2-normalised) and
``OUT.names.txt`` (row i names the face of row i).

    pfc-embed MODEL --folder DIR -o OUT                 # every image under DIR, sorted by relative path
    pfc-embed MODEL --list FILE [--root DIR] -o OUT     # one image path per line (relative to DIR,
                                                        # default the list's folder); names as written
    pfc-embed MODEL --shards DATASET -o OUT             # pfc shards (dataset.json); names = sample keys
    … [--landmarks CSV [--resampling float|opencv4]] [--no-flip] [--batch-size 128] [--workers 4] [--quiet]
    torchrun --nproc_per_node=8 tools/embed.py …        # every rank embeds a share; rank 0 writes

MODEL: a pfc backbone.pt (or a training output folder) or an ONNX file from export_onnx. A face
is aligned when ``--landmarks`` gives its five points (``NAME,x1,y1,…,x5,y5`` per line, NAME as in
OUT.names.txt; every face must then have a row), else taken as aligned (resized to the model's
input when of another size). Embedding = normalize(f(x) + f(flip x)), or normalize(f(x)) with
``--no-flip``. Shards are read into memory whole (their encoded images) before extraction. Both
outputs are written atomically. Bad input: one line ``error: …`` naming the file (and line),
exit code 2, on every rank.
"""
from __future__ import annotations

import argparse
import os
import sys

from pfc.cli.errors import one_line_errors
from pfc.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def folder_items(root: str) -> list[tuple[str, str, bytes | None, int | None]]:
    """(name = path relative to ``root`` with '/', path, None, None) of every image under ``root``, sorted."""
    if not os.path.isdir(root):
        raise DataError(f"--folder {root} is not a folder")
    found = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders.sort()
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                path = os.path.join(folder, name)
                found.append((os.path.relpath(path, root).replace(os.sep, "/"), path, None, None))
    if not found:
        raise DataError(f"--folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(found)


def list_items(list_file: str, root: str | None) -> list[tuple[str, str, bytes | None, int | None]]:
    """(name as written, path, None, line) of each non-blank, non-# line of ``list_file``."""
    if not os.path.isfile(list_file):
        raise DataError(f"image list {list_file} does not exist")
    root = os.path.dirname(os.path.abspath(list_file)) if root is None else root
    found = []
    with open(list_file, encoding="utf-8") as stream:
        for number, line in enumerate(stream, 1):
            name = line.strip()
            if not name or name.startswith("#"):
                continue
            path = os.path.join(root, name)
            if not os.path.isfile(path):
                raise DataError(f"{list_file}:{number}: image {path} does not exist")
            found.append((name, path, None, number))
    if not found:
        raise DataError(f"image list {list_file} names no images")
    return found


def shard_items(dataset: str) -> list[tuple[str, str, bytes | None, int | None]]:
    """(sample key, "SHARD:KEY", encoded image, None) of every sample of a pfc shard set, in order."""
    import webdataset as wds

    from pfc.data.manifest import read_manifest, shard_urls
    from pfc.data.tarstream import TarDamage, iter_samples

    manifest = read_manifest(dataset)
    found = []
    for url in shard_urls(dataset, manifest):
        try:
            with wds.gopen(url) as stream:
                for sample in iter_samples(stream, url):
                    if "jpg" not in sample:
                        raise DataError(f"shard {url}: sample {sample['__key__']} has no jpg member")
                    found.append((sample["__key__"], f"{url}:{sample['__key__']}", bytes(sample["jpg"]), None))
        except (TarDamage, OSError) as exc:
            raise DataError(f"shard {url} cannot be read ({exc})") from exc
    if not found:
        raise DataError(f"the shard set {dataset} holds no samples")
    return found


def output_paths(out: str) -> tuple[str, str]:
    """(OUT.npy, OUT.names.txt) for ``-o OUT`` (or ``-o OUT.npy``); ConfigError when the folder is missing."""
    prefix = out[:-4] if out.endswith(".npy") else out
    folder = os.path.dirname(os.path.abspath(prefix))
    if not os.path.isdir(folder):
        raise ConfigError(f"cannot write {prefix}.npy: the folder {folder} does not exist")
    return prefix + ".npy", prefix + ".names.txt"


def face_items(args) -> tuple[list[str], list]:
    """(names, FaceItems) of the input the arguments name, with their landmarks when given."""
    from pfc.datasets.sources import read_landmarks
    from pfc.evaluation.embedding import FaceItem

    if args.folder:
        found = folder_items(args.folder)
    elif args.list:
        found = list_items(args.list, args.root)
    else:
        found = shard_items(args.shards)
    landmarks = read_landmarks(args.landmarks) if args.landmarks else None
    items = []
    for name, path, data, line in found:
        points = None
        if landmarks is not None:
            points = landmarks.get(os.path.normpath(name))
            if points is None:
                raise DataError(f"{args.landmarks}: no landmarks for {name} (every face needs a row when "
                                f"--landmarks is given)")
        items.append(FaceItem(path, points, data, line))
    return [name for name, _, _, _ in found], items


def write_outputs(npy_path: str, names_path: str, names: list[str], features) -> None:
    """Normalised features to ``npy_path`` and the names to ``names_path``, each atomically."""
    import io

    import numpy as np

    from pfc.files import write_atomic

    norms = np.linalg.norm(features, axis=1, keepdims=True)
    if not np.isfinite(features).all() or (norms == 0).any():
        raise DataError(f"the model gives inf/NaN or zero embeddings for "
                        f"{int((~np.isfinite(norms) | (norms == 0)).sum())} faces; nothing written")
    buffer = io.BytesIO()
    np.save(buffer, (features / norms).astype(np.float32), allow_pickle=False)
    write_atomic(npy_path, buffer.getvalue())
    write_atomic(names_path, "".join(f"{name}\n" for name in names))


@one_line_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="backbone.pt, a training output folder, or an .onnx file")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", help="embed every image under this folder")
    source.add_argument("--list", help="text file: one image path per line")
    source.add_argument("--shards", help="pfc shard set (folder or dataset.json)")
    parser.add_argument("--root", help="folder the --list paths are relative to (default: the list's folder)")
    parser.add_argument("--landmarks", help="CSV NAME,x1,y1,…,x5,y5: align these unaligned faces")
    parser.add_argument("-o", "--output", required=True, help="OUT: writes OUT.npy and OUT.names.txt")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                        help="add the horizontally flipped face's embedding before normalising (default: on)")
    parser.add_argument("--resampling", choices=["float", "opencv4"], default="float",
                        help="alignment's bilinear: float (as OpenCV 5) or opencv4 (OpenCV <= 4's fixed point, "
                             "bit for bit)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers decoding and aligning, per rank")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.root and not args.list:
        raise ConfigError("--root applies to --list only")
    if args.batch_size < 1 or args.workers < 0:
        raise ConfigError(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size} and {args.workers}")

    import torch.distributed as dist

    from pfc.distributed.agree import run_on_every_rank
    from pfc.evaluation.embedding import extract_features, load_embedding_model
    from pfc.train.runtime import init_runtime

    runtime = init_runtime()
    try:
        npy_path, names_path = run_on_every_rank(lambda: output_paths(args.output), "checking the output")
        names, items = run_on_every_rank(lambda: face_items(args), "reading the input")
        model = run_on_every_rank(lambda: load_embedding_model(args.model, runtime.device), "loading the model")
        features = extract_features(model, items, batch_size=args.batch_size, flip=args.flip,
                                    num_workers=args.workers, progress=not args.quiet, resampling=args.resampling)
        run_on_every_rank(lambda: write_outputs(npy_path, names_path, names, features) if runtime.is_main else None,
                          "writing the embeddings")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if runtime.is_main:
        print(f"wrote {npy_path} ({len(names)} x {model.embedding_size}) and {names_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
