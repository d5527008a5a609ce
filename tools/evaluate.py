"""Verification of a trained backbone; prints one JSON object on stdout.

    python tools/evaluate.py OUTPUT_OR_CHECKPOINT --pairs FILE [--root DIR]
    python tools/evaluate.py OUTPUT_OR_CHECKPOINT --bin lfw.bin [--roc roc.png]
    python tools/evaluate.py OUTPUT_OR_CHECKPOINT --pairs FILE --untrained   # same network, initial weights

Keys: accuracy (10-fold, in [0, 1]), accuracy_std, threshold, auc, tar@far=1e-3, tar@far=1e-4, num_pairs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools._cli import one_line_errors  # noqa: E402


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
    from pfc.evaluation.export import backbone_file, rebuild_backbone
    from pfc.evaluation.roc import save_roc_plot

    path = backbone_file(args.checkpoint)
    model, meta = load_backbone(path)
    if args.untrained:
        torch.manual_seed(args.seed)
        model = rebuild_backbone(meta).eval()
    pairs = read_pairs(args.pairs, args.root) if args.pairs else read_bin(args.bin)
    result = evaluate(model, pairs, meta["image_size"], args.batch_size)
    if args.roc:
        save_roc_plot([result], args.roc)
    print(json.dumps(dict(result.summary(), checkpoint=path, untrained=args.untrained)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
