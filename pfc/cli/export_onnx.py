"""Export a trained backbone to ONNX: ``pfc-export-onnx OUTPUT_OR_CHECKPOINT [-o model.onnx] [--opset 17]``
(or ``python tools/export_onnx.py …``).

The graph: input ``images`` float32 [batch, 3, S, S] in [−1, 1], output ``embedding`` [batch, D]
(not normalised). The batch dimension is dynamic: one file runs any batch size. When onnxruntime
is installed the graph is run at batch sizes 1 and 3 and compared with PyTorch before the file is
kept; a graph onnxruntime refuses, inf/NaN outputs or a difference over --atol are an error (exit
2) and leave no file. A backbone.pt whose weights do not match their checksum or hold inf/NaN is
refused the same way.
"""
from __future__ import annotations

import argparse
import os
import sys

from pfc.cli.errors import one_line_errors
from pfc.errors import CheckpointError


@one_line_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="training OUTPUT folder (uses its backbone.pt) or a backbone.pt")
    parser.add_argument("-o", "--output", help="ONNX file (default: next to backbone.pt, backbone.onnx); its "
                                               "folder must exist")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, 7–20 (default 17)")
    parser.add_argument("--atol", type=float, default=1e-3,
                        help="largest |onnx − torch| accepted in the onnxruntime check (default 1e-3)")
    args = parser.parse_args(argv)

    from pfc.evaluation.export import backbone_file, load_backbone, unchecked_note
    from pfc.evaluation.onnx_export import check_export_target, export_onnx

    path = backbone_file(args.checkpoint)
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(path)), "backbone.onnx")
    model, meta = load_backbone(path)            # first: a missing backbone.pt is named as such
    check_export_target(output, args.opset)
    note = unchecked_note(path, meta)
    if note:
        print(note, file=sys.stderr)
    size = meta["image_size"]
    try:
        report = export_onnx(model, output, size, args.opset, args.atol)
    except CheckpointError as exc:
        raise CheckpointError(f"exporting {path} to {output}: {exc}; no file written") from exc
    print(f"wrote {output} ({meta['network']}, opset {args.opset}, input [batch, 3, {size}, {size}] with a "
          f"dynamic batch, embedding {meta['embedding_size']})")
    if not report.checked:
        print("onnxruntime not installed: exported graph not checked")
    else:
        print(f"onnxruntime check: max |onnx − torch| = {report.max_difference:.2e} on batches of "
              f"{' and '.join(map(str, report.batch_sizes))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
