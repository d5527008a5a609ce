"""How much the evaluation aligner's resampling moves IJB pair scores: float bilinear (pfc's
default, = OpenCV 5), OpenCV 4's fixed point (``resampling="opencv4"``) and the packer's PIL
aligner, on a synthetic IJB root with a trained backbone.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/ijb_alignment.py --model runs/demo/backbone.pt [--subjects 40]

The model should be trained on pfc's synthetic identities (``make demo``'s backbone), whose
renderer also draws the synthetic IJB faces. Prints max and mean |Δ score| over the pairs of
each aligner against opencv4, and the TAR at FAR 1e-1 … 1e-3 of each.
"""
from __future__ import annotations

import argparse
import tempfile

import numpy as np
import simplejpeg
import torch
from PIL import Image

from pfc.datasets.align import align_face
from pfc.datasets.synthetic_ijb import write_synthetic_ijb
from pfc.evaluation.alignment import align_face_cv
from pfc.evaluation.embedding import to_model_input
from pfc.evaluation.embedding_model import load_embedding_model
from pfc.evaluation.ijb import evaluate_ijb, read_ijb_meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--subjects", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_embedding_model(args.model)
    size = model.image_size
    aligners = {
        "opencv4": lambda image, points: align_face_cv(image, points, size, resampling="opencv4"),
        "float (default)": lambda image, points: align_face_cv(image, points, size),
        "PIL (packer)": lambda image, points: np.asarray(align_face(Image.fromarray(image), points, size)),
    }
    with tempfile.TemporaryDirectory() as root:
        write_synthetic_ijb(root, "IJBC", subjects=args.subjects, seed=0, identification=False)
        meta = read_ijb_meta(root, "IJBC")
        images = [simplejpeg.decode_jpeg(open(meta.layout.image(name), "rb").read(), colorspace="RGB")
                  for name in meta.faces.names.tolist()]
        results = {}
        for name, align in aligners.items():
            faces = np.stack([align(image, points) for image, points in zip(images, meta.faces.landmarks)])
            features = []
            for start in range(0, len(faces), 64):
                x = to_model_input(torch.from_numpy(faces[start:start + 64]))
                features.append((model(x) + model(torch.flip(x, dims=[3]))).numpy())
            results[name] = evaluate_ijb(meta, np.concatenate(features), fars=(1e-1, 1e-2, 1e-3))
    reference = results["opencv4"].scores
    print(f"{len(meta.faces)} faces, {len(reference)} pairs, model {args.model} (input {size})")
    print("| aligner | max |Δ score| vs opencv4 | mean |Δ score| | TAR@1e-1 | TAR@1e-2 | TAR@1e-3 |")
    print("|---|---|---|---|---|---|")
    for name, evaluation in results.items():
        delta = np.abs(evaluation.scores - reference)
        tar = evaluation.result["tar_at_far"]
        print(f"| {name} | {delta.max():.2e} | {delta.mean():.2e} | {tar['1e-01']:.4f} | {tar['1e-02']:.4f} | "
              f"{tar['1e-03']:.4f} |")


if __name__ == "__main__":
    main()
