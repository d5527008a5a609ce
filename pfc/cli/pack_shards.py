"""Pack face images into webdataset shards, or verify a packed shard set.

    pfc-pack folder SRC OUT [--shard-size 10000] [--workers K] [--seed S]
                            [--landmarks FILE] [--image-size 112]   # or: python tools/pack_shards.py …
    pfc-pack rec PREFIX OUT [same options]      # PREFIX.rec + PREFIX.idx
    pfc-pack verify OUT
    pfc-pack index OUT [--workers K]            # the per-sample index (--sampler pk)

Links in SRC are followed only out of the tree; empty classes are left out of the label space;
both are listed. OUT must not lie inside SRC; one packer at a time writes OUT. Packing also
writes the per-sample index OUT/index/ that the P×K sampler (--sampler pk) needs; ``index`` builds
it for a shard set packed before it existed (or rebuilds a stale one).
"""
from __future__ import annotations

import argparse
import os
import sys

from pfc.cli.errors import one_line_errors
from pfc.data.manifest import read_manifest
from pfc.datasets import FolderSource, PackOptions, RecordSource, pack, verify_shards
from pfc.datasets.indexing import build_index
from pfc.datasets.outdir import output_lock, refuse_output_inside


def _add_pack_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output directory for the shards and dataset.json")
    parser.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    parser.add_argument("--workers", type=int, default=1, help="parallel packing processes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle across shards")
    parser.add_argument("--landmarks", default=None,
                        help="CSV 'relative_path,x1,y1,...,x5,y5' (record key for rec): align to the "
                             "five-point template instead of resizing")
    parser.add_argument("--missing-landmarks", choices=["error", "skip"], default="error",
                        help="an image without a row in --landmarks: an error before packing (default), or "
                             "left out and listed")
    parser.add_argument("--image-size", type=int, default=112, help="output side length in pixels")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


@one_line_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    folder = commands.add_parser("folder", help="class-per-folder tree SRC/<class>/<image>")
    folder.add_argument("src", help="source folder")
    _add_pack_options(folder)
    rec = commands.add_parser("rec", help="insightface RecordIO PREFIX.rec + PREFIX.idx (no mxnet needed)")
    rec.add_argument("prefix", help="path prefix of PREFIX.rec / PREFIX.idx")
    _add_pack_options(rec)
    verify = commands.add_parser("verify", help="check every sample of a packed shard set")
    verify.add_argument("out", help="directory holding dataset.json")
    index = commands.add_parser("index", help="build the per-sample index of a local shard set (for --sampler pk)")
    index.add_argument("out", help="directory holding dataset.json and the shards")
    index.add_argument("--workers", type=int, default=1, help="parallel scanning processes")
    args = parser.parse_args(argv)

    if args.command == "index":
        read_manifest(args.out)   # a clear error, and no lock file left, where there is no shard set
        with output_lock(args.out):
            rows, problems = build_index(args.out, max(1, args.workers))
        print(f"indexed {rows} samples into {os.path.join(args.out, 'index')}; {len(problems)} not indexed")
        for problem in problems:
            print(f"  {problem}")
        return 0

    if args.command == "verify":
        report = verify_shards(args.out)
        print(report.describe())
        return 0 if report.ok else 1
    options = PackOptions(shard_size=args.shard_size, workers=args.workers, seed=args.seed,
                          image_size=args.image_size, landmarks=args.landmarks,
                          missing_landmarks=args.missing_landmarks,
                          quality=args.quality, progress=not args.no_progress)
    options.validate()
    if args.command == "folder":
        refuse_output_inside(args.out, {os.path.realpath(args.src)})   # before a long scan
        source = FolderSource(args.src)
        if source.empty_classes or source.ignored:
            print(f"source {args.src}: {len(source.classes)} classes, {len(source.items)} images; "
                  f"{len(source.empty_classes)} empty class folders left out, {len(source.ignored)} links "
                  f"not followed (listed at the end)", flush=True)
    else:
        source = RecordSource(args.prefix, progress=not args.no_progress)
    summary = pack(source, args.out, options)
    print(summary.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
