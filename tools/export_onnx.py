"""Export a trained backbone to ONNX: ``python tools/export_onnx.py OUTPUT_OR_CHECKPOINT [-o model.onnx]``.

Input ``images`` float32 [batch, 3, S, S] in [−1, 1] (dynamic batch), output ``embedding`` [batch, D]
(not normalised). When onnxruntime is installed the exported graph is run on a random batch and
compared with PyTorch (max abs difference printed; an error when above --atol).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="training OUTPUT folder (uses its backbone.pt) or a backbone.pt")
    parser.add_argument("-o", "--output", help="ONNX file (default: next to backbone.pt, backbone.onnx)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--atol", type=float, default=1e-3)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from pfc.evaluation.export import load_backbone

    path = os.path.join(args.checkpoint, "backbone.pt") if os.path.isdir(args.checkpoint) else args.checkpoint
    try:
        model, meta = load_backbone(path)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(path)), "backbone.onnx")
    size = meta["image_size"]
    example = torch.rand(2, 3, size, size) * 2 - 1
    temporary = f"{output}.tmp"
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated; the torch.export one needs onnxscript (not a dependency)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), temporary, input_names=["images"], output_names=["embedding"],
                          dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}},
                          opset_version=args.opset, dynamo=False)
    os.replace(temporary, output)
    print(f"wrote {output} ({meta['network']}, input [batch, 3, {size}, {size}], embedding {meta['embedding_size']})")
    try:
        import onnxruntime
    except ImportError:
        print("onnxruntime not installed: exported graph not checked")
        return 0
    session = onnxruntime.InferenceSession(output, providers=["CPUExecutionProvider"])
    batch = torch.rand(3, 3, size, size) * 2 - 1
    (onnx_out,) = session.run(None, {"images": batch.numpy()})
    with torch.no_grad():
        torch_out = model(batch).numpy()
    difference = float(np.abs(onnx_out - torch_out).max())
    print(f"onnxruntime check: max |onnx − torch| = {difference:.2e} on a batch of 3")
    if difference > args.atol:
        print(f"error: ONNX output differs from PyTorch by {difference:.2e} > {args.atol}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
