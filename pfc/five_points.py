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

    ``src`` and ``dst`` are [K, 2] point arrays, K ≥ 2, not all ``src`` points equal. In the plane
    s·R is any matrix [[p, −q], [q, p]], so the fit is linear least squares in (p, q, t): with the
    centred points x_k, y_k, p = Σ x_k·y_k / Σ‖x_k‖², q = Σ x_k × y_k / Σ‖x_k‖² (× the 2-d cross
    product), t = ȳ − s·R·x̄; the same minimiser as Umeyama's SVD with its reflection check.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need two [K, 2] point arrays with K >= 2, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    spread = float((src_c ** 2).sum())
    if spread < 1e-12 * len(src):
        raise DataError("landmarks are all at one point; cannot estimate an alignment")
    p = float((src_c * dst_c).sum()) / spread
    q = float((src_c[:, 0] * dst_c[:, 1] - src_c[:, 1] * dst_c[:, 0]).sum()) / spread
    linear = np.array([[p, -q], [q, p]])
    matrix = np.empty((2, 3))
    matrix[:, :2] = linear
    matrix[:, 2] = dst_mean - linear @ src_mean
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
    (a, b, c), (d, e, f) = matrix.tolist()
    determinant = a * e - b * d
    if abs(determinant) < 1e-12:
        raise ValueError("the affine matrix is singular (it maps the plane onto a line)")
    # closed form: numpy's inverse of a 2x2 costs more in call overhead than the arithmetic
    ia, ib, id_, ie = e / determinant, -b / determinant, -d / determinant, a / determinant
    return np.array([[ia, ib, -(ia * c + ib * f)], [id_, ie, -(id_ * c + ie * f)]])
