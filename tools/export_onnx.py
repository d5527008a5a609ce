"""Export a trained backbone to ONNX: ``python tools/export_onnx.py OUTPUT_OR_CHECKPOINT [-o model.onnx]``.

Input ``images`` float32 [batch, 3, S, S] in [−1, 1] (dynamic batch), output ``embedding`` [batch, D]
(not normalised). When onnxruntime is installed the exported graph is run on a random batch and
compared with PyTorch (max abs difference printed; an error when above --atol).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools._cli import one_line_errors  # noqa: E402


@one_line_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="training OUTPUT folder (uses its backbone.pt) or a backbone.pt")
    parser.add_argument("-o", "--output", help="ONNX file (default: next to backbone.pt, backbone.onnx)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--atol", type=float, default=1e-3)
    args = parser.parse_args(argv)

    from pfc.evaluation.export import backbone_file, export_onnx, load_backbone, onnx_difference

    path = backbone_file(args.checkpoint)
    model, meta = load_backbone(path)
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(path)), "backbone.onnx")
    size = meta["image_size"]
    export_onnx(model, output, size, args.opset)
    print(f"wrote {output} ({meta['network']}, input [batch, 3, {size}, {size}], embedding {meta['embedding_size']})")
    difference = onnx_difference(model, output, size)
    if difference is None:
        print("onnxruntime not installed: exported graph not checked")
        return 0
    print(f"onnxruntime check: max |onnx − torch| = {difference:.2e} on a batch of 3")
    if difference > args.atol:
        print(f"error: ONNX output differs from PyTorch by {difference:.2e} > {args.atol}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
