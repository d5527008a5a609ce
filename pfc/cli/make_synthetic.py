"""Write a class-per-folder tree of procedural face-like identities (see pfc/datasets/synthetic.py).

    pfc-make-synthetic OUT --ids N --per K --seed S [--pairs P] [--landmarks]   # or: python tools/make_synthetic.py …

OUT/<class>/<i>.jpg (112x112 RGB); with --pairs, OUT/pairs.txt ("relpath1 relpath2 1|0", half
same identity); with --landmarks, OUT/landmarks.csv ("relpath,x1,y1,...,x5,y5"). Different seeds
give disjoint identities (train on one seed, verify on another).
"""
from __future__ import annotations

import argparse
import sys
import time

from pfc.cli.errors import one_line_errors
from pfc.datasets import write_synthetic


@one_line_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output folder")
    parser.add_argument("--ids", type=int, required=True, help="number of identities")
    parser.add_argument("--per", type=int, required=True, help="images per identity")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (identities depend on it)")
    parser.add_argument("--pairs", type=int, default=0, help="also write this many verification pairs")
    parser.add_argument("--landmarks", action="store_true", help="also write landmarks.csv")
    parser.add_argument("--image-size", type=int, default=112, help="side length in pixels")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    counts = write_synthetic(args.out, args.ids, args.per, args.seed, pairs=args.pairs,
                             landmarks=args.landmarks, size=args.image_size)
    print(f"wrote {counts['images']} images of {counts['identities']} identities"
          f"{' and ' + str(counts['pairs']) + ' pairs' if counts['pairs'] else ''} to {args.out} "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
