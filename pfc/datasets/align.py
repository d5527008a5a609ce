"""Five-point face alignment for the packer (PIL): least-squares similarity transform onto the
standard ArcFace template (the geometry is :mod:`pfc.five_points`; evaluation resamples as OpenCV
does, :mod:`pfc.evaluation.alignment`).

Coordinates are in pixels with the centre of pixel (i, j) at x = j, y = i (the OpenCV convention
landmark detectors use). Point order: left eye, right eye, nose tip, left mouth corner,
right mouth corner (left/right as seen in the image). Landmarks that cannot be aligned (not
five finite points, all at one point) raise :class:`pfc.errors.DataError`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from pfc.five_points import TEMPLATE_112, apply_transform, check_landmarks, invert_affine, similarity_transform, template

__all__ = ["TEMPLATE_112", "template", "similarity_transform", "apply_transform", "align_face"]


def align_face(image: Image.Image, landmarks: np.ndarray, image_size: int = 112) -> Image.Image:
    """Warp ``image`` so its five ``landmarks`` ([5, 2]) land on the template; returns an RGB
    ``image_size`` x ``image_size`` crop (bilinear, black outside the source)."""
    forward = similarity_transform(check_landmarks(landmarks), template(image_size))
    inverse = invert_affine(forward)
    linear_inv, shift_inv = inverse[:, :2], inverse[:, 2]
    # PIL samples output pixel centres at (j + 0.5, i + 0.5) and reads the input in the same
    # half-pixel convention; shift the inverse map into it.
    half = np.array([0.5, 0.5])
    shift_pil = shift_inv + half - linear_inv @ half
    coefficients = (linear_inv[0, 0], linear_inv[0, 1], shift_pil[0],
                    linear_inv[1, 0], linear_inv[1, 1], shift_pil[1])
    return image.convert("RGB").transform((image_size, image_size), Image.Transform.AFFINE,
                                          coefficients, resample=Image.Resampling.BILINEAR)
