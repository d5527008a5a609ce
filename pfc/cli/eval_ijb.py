"""IJB-B / IJB-C evaluation of a face model with insightface's protocol; writes DIR/ijb_result.json.

    pfc-eval-ijb --model backbone.pt --root IJB_ROOT --target IJBC --output DIR [--batch-size N] [--no-flip]
                 [--resampling float|opencv4]
    torchrun --nproc_per_node=4 tools/eval_ijb.py --model model.onnx --root … --output DIR

IJB_ROOT in insightface's layout (meta/ and loose_crop/, see pfc/evaluation/ijb/meta.py).
Every rank extracts a share of the faces (GPU when there is one); rank 0 scores and writes
DIR/ijb_result.json (TAR at FAR 1e-6 … 1e-1, nearest-point and interpolated; 1:N per gallery),
DIR/scores.npy (one float64 score per line of the pair file), DIR/roc.png, and prints the table.
The features are cached in DIR: a rerun on the same model, faces and flip setting extracts nothing.
Bad input (a missing or malformed meta file, an unknown template, an unreadable image or model)
ends with one line naming the file (and line) and exit code 2.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

from pfc.cli.errors import one_line_errors
from pfc.errors import CheckpointError
from pfc.evaluation.ijb.meta import TARGETS


@one_line_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a pfc backbone.pt or an ONNX file (tools/export_onnx.py)")
    parser.add_argument("--root", required=True, help="IJB root: meta/ and loose_crop/ (insightface's layout)")
    parser.add_argument("--target", default="IJBC", choices=TARGETS, help="protocol (default IJBC)")
    parser.add_argument("--output", required=True, help="folder for ijb_result.json, scores.npy, roc.png, the cache")
    parser.add_argument("--batch-size", type=int, default=128, help="faces per forward pass (default 128)")
    parser.add_argument("--no-flip", action="store_true", help="f(x) instead of f(x) + f(flipped x)")
    parser.add_argument("--workers", type=int, default=2, help="loader processes per rank (decode, align)")
    parser.add_argument("--resampling", choices=["float", "opencv4"], default="float",
                        help="alignment's bilinear: float (OpenCV 5's warpAffine, default) or opencv4 "
                             "(OpenCV <= 4's 5-bit fixed point, bit for bit)")
    parser.add_argument("--label", help="the method's name in the table (default: the model's file name)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if not os.path.isfile(args.model):
        raise CheckpointError(f"model file {args.model} does not exist")

    import torch.distributed as dist

    from pfc.distributed.agree import run_on_every_rank
    from pfc.distributed.fault import init_process_group
    from pfc.evaluation.ijb import evaluate_ijb, read_ijb_meta
    from pfc.evaluation.ijb.report import format_ijb_table, write_ijb_outputs

    launched = "WORLD_SIZE" in os.environ and not dist.is_initialized()
    if launched:
        init_process_group("gloo", datetime.timedelta(minutes=60))
    try:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if dist.is_initialized():
            meta = run_on_every_rank(lambda: read_ijb_meta(args.root, args.target), "reading the IJB meta files")
        else:
            meta = read_ijb_meta(args.root, args.target)
        features = _extract(args, meta, rank)
        if rank == 0:
            started = time.perf_counter()
            evaluation = evaluate_ijb(meta, features)
            evaluation.result.update(model=os.path.abspath(args.model), flip=not args.no_flip,
                                     resampling=args.resampling, root=os.path.abspath(args.root))
            label = args.label or os.path.basename(args.model)
            paths = write_ijb_outputs(args.output, evaluation, label)
            print(format_ijb_table({label: evaluation.result}))
            print(f"scored {len(evaluation.scores)} pairs of {evaluation.result['templates']} templates in "
                  f"{time.perf_counter() - started:.1f} s; wrote {paths['result']}, {paths['scores']}, {paths['roc']}")
    finally:
        if launched and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _extract(args, meta, rank: int):
    """float32 [faces, D] features of every face of ``meta`` (all ranks; cached in --output)."""
    import torch

    from pfc.evaluation.embedding import FaceItem, extract_features, load_embedding_model

    os.makedirs(args.output, exist_ok=True)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else "cpu"
    model = load_embedding_model(args.model, device)
    items = [FaceItem(meta.layout.image(name), landmarks, line=line)     # line: of the 5-point file
             for line, (name, landmarks) in enumerate(zip(meta.faces.names.tolist(), meta.faces.landmarks), start=1)]
    return extract_features(model, items, batch_size=args.batch_size, flip=not args.no_flip,
                            num_workers=args.workers, cache_dir=args.output, progress=rank == 0,
                            resampling=args.resampling)


if __name__ == "__main__":
    sys.exit(main())
