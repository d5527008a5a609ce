"""Import a backbone trained elsewhere: ``pfc-import-weights insightface SRC.pth OUT.pt --network NAME``
(or ``python tools/import_weights.py …``).

SRC is an insightface arcface_torch backbone (``torch.save(backbone.state_dict())``, its
``model.pt``, or a ``checkpoint_gpu_*.pt``); OUT a pfc ``backbone.pt`` (a folder: its
``backbone.pt``) with the network, embedding size, image size and sha256, which
``tools/evaluate.py``, ``tools/export_onnx.py`` and the trainer load. NAME: insightface's
network name (r18 r34 r50 r100 r200 mbf mbf_large vit_*) or pfc's (iresnet50 …). The file is
read with ``torch.load(weights_only=True)``: nothing in it runs. Weights that do not fit NAME,
an unknown NAME or a file that is not a state dict: one line ``error: …``, exit 2, nothing
written.
"""
from __future__ import annotations

import argparse
import os
import sys

from pfc.cli.errors import one_line_errors
from pfc.errors import ConfigError

FORMATS = ("insightface",)


@one_line_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=FORMATS, help="where the weights come from")
    parser.add_argument("source", help="the weights: a state dict saved with torch.save")
    parser.add_argument("output", help="the pfc backbone.pt to write (a folder: its backbone.pt)")
    parser.add_argument("--network", required=True, help="the network the weights are for (r50, mbf, vit_t, …)")
    args = parser.parse_args(argv)

    from pfc.evaluation.export import backbone_file, save_backbone
    from pfc.evaluation.import_weights import convert_insightface, read_state_dict

    output = backbone_file(args.output)
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise ConfigError(f"output folder {folder} does not exist")
    model, meta = convert_insightface(read_state_dict(args.source), args.network, args.source)
    save_backbone(model, output, **meta)
    count = sum(parameter.numel() for parameter in model.parameters())
    print(f"wrote {output}: pfc {meta['network']} with insightface's {args.network} weights "
          f"({count / 1e6:.2f} M parameters, embedding {meta['embedding_size']}, "
          f"input {meta['image_size']}×{meta['image_size']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
