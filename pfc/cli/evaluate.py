"""Verification of a trained backbone; prints one JSON object on stdout.

    pfc-evaluate OUTPUT_OR_CHECKPOINT --pairs FILE [--root DIR]      # or: python tools/evaluate.py …
    pfc-evaluate OUTPUT_OR_CHECKPOINT --bin lfw.bin [--roc roc.png]
    pfc-evaluate OUTPUT_OR_CHECKPOINT --pairs FILE --untrained   # same network, initial weights

Keys: accuracy (10-fold, in [0, 1]), accuracy_std, threshold, auc, tar@far=1e-3, tar@far=1e-4, num_pairs.
A backbone.pt whose weights do not match their checksum, hold inf/NaN or give inf/NaN embeddings
is an error naming the file (exit 2), never a result.
"""
from __future__ import annotations

import argparse
import json
import sys

from pfc.cli.errors import one_line_errors
from pfc.errors import CheckpointError


@one_line_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="training OUTPUT folder (uses its backbone.pt) or a backbone.pt")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pairs", help="pairs list 'path1 path2 1|0'")
    source.add_argument("--bin", help="insightface verification .bin")
    parser.add_argument("--root", help="folder the pairs' paths are relative to (default: the list's folder)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--roc", help="also write the ROC curve to this PNG")
    parser.add_argument("--untrained", action="store_true",
                        help="evaluate the same network with its initial weights (seed 2048), for comparison")
    parser.add_argument("--seed", type=int, default=2048, help="initialisation seed for --untrained")
    args = parser.parse_args(argv)

    import torch

    from pfc.evaluation import evaluate, load_backbone, read_bin, read_pairs
    from pfc.evaluation.export import backbone_file, rebuild_backbone, unchecked_note
    from pfc.evaluation.roc import save_roc_plot

    path = backbone_file(args.checkpoint)
    model, meta = load_backbone(path)
    note = unchecked_note(path, meta)
    if note:
        print(note, file=sys.stderr)
    if args.untrained:
        torch.manual_seed(args.seed)
        model = rebuild_backbone(meta).eval()
    pairs = read_pairs(args.pairs, args.root) if args.pairs else read_bin(args.bin)
    try:
        result = evaluate(model, pairs, meta["image_size"], args.batch_size, require_finite=True)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    if args.roc:
        save_roc_plot([result], args.roc)
    print(json.dumps(dict(result.summary(), checkpoint=path, untrained=args.untrained)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
