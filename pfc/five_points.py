"""Five-point face geometry shared by the packer's aligner (:mod:`pfc.datasets.align`) and the
evaluation's (:mod:`pfc.evaluation.alignment`): the ArcFace template and the least-squares
similarity fit. numpy only.

Coordinates are in pixels with the centre of pixel (i, j) at x = j, y = i (the OpenCV convention
landmark detectors use). Point order: left eye, right eye, nose tip, left mouth corner,
right mouth corner (left/right as seen in the image).
"""
from __future__ import annotations

import numpy as np

from pfc.errors import DataError

# The standard 112x112 five-point template used by ArcFace-style aligned face datasets.
TEMPLATE_112 = np.array([
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
], dtype=np.float64)


def template(image_size: int) -> np.ndarray:
    """The five template points for a square ``image_size`` output (the 112 template scaled)."""
    if image_size <= 0:
        raise ValueError(f"image size must be positive, got {image_size}")
    return TEMPLATE_112 * (image_size / 112.0)


def check_landmarks(landmarks) -> np.ndarray:
    """``landmarks`` as a float64 [5, 2] array; DataError unless it is five finite (x, y) points."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (5, 2) or not np.isfinite(landmarks).all():
        raise DataError(f"need 5 finite (x, y) landmarks, got shape {landmarks.shape}")
    return landmarks


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix M = [s·R | t] minimising Σ‖s·R·src_k + t − dst_k‖² (Umeyama, no reflection).

    ``src`` and ``dst`` are [K, 2] point arrays, K ≥ 2, not all ``src`` points equal.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need two [K, 2] point arrays with K >= 2, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c ** 2).sum() / len(src)
    if src_var < 1e-12:
        raise DataError("landmarks are all at one point; cannot estimate an alignment")
    u, sigma, vt = np.linalg.svd(dst_c.T @ src_c / len(src))
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1] = -1.0
    rotation = u @ np.diag(sign) @ vt
    scale = (sigma * sign).sum() / src_var
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map [K, 2] points through the 2x3 affine ``matrix``."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """The 2x3 inverse of the 2x3 affine ``matrix``; ValueError when it is singular."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (2, 3):
        raise ValueError(f"need a 2x3 affine matrix, got shape {matrix.shape}")
    if abs(np.linalg.det(matrix[:, :2])) < 1e-12:
        raise ValueError("the affine matrix is singular (it maps the plane onto a line)")
    linear_inv = np.linalg.inv(matrix[:, :2])
    return np.concatenate([linear_inv, (-linear_inv @ matrix[:, 2])[:, None]], axis=1)
