"""Five-point alignment for evaluation, resampled as insightface's pipeline does (OpenCV's
``warpAffine``), so that scores compare with published ones.

    matrix = estimate_similarity(landmarks)            # [2, 3], landmarks → ARCFACE_TEMPLATE
    face = warp_affine(image, matrix, 112)              # uint8 [112, 112, 3]
    face = align_face_cv(image, landmarks)              # the two together

insightface's ``norm_crop`` fits the similarity with skimage's ``SimilarityTransform.estimate``
(Umeyama's least squares, no reflection: :func:`pfc.five_points.similarity_transform`, the fit the
packer's aligner uses too) and warps with ``cv2.warpAffine(image, M, (112, 112),
borderValue=0.0)``: output pixel (x, y) is the bilinear interpolation of the input at
M⁻¹·(x, y, 1), pixel centres at integer coordinates, neighbours outside the image read as 0.
The packer's PIL aligner (:func:`pfc.datasets.align.align_face`) samples the same geometry but
resamples differently (PIL's bilinear), which moves IJB pair scores by up to ~1.5e-2; evaluation
uses :func:`warp_affine` instead. By default it interpolates in float32 (torch's ``grid_sample``)
and rounds, as OpenCV 5 does (measured: 116 of 1.5 M values ±1 against OpenCV 5.1);
``resampling="opencv4"`` reproduces OpenCV ≤ 4's fixed-point arithmetic bit for bit (positions
rounded to 1/32 pixel; the float path differs from it by ±1–4 grey levels in ~7 % of the values
of smooth images). docs/benchmarks.md has the comparison.
"""
from __future__ import annotations

import functools
import math
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

from pfc.five_points import TEMPLATE_112, check_landmarks, invert_affine, similarity_transform, template

ARCFACE_TEMPLATE: np.ndarray = TEMPLATE_112      # float64 [5, 2], the 112x112 ArcFace five points

Resampling = Literal["float", "opencv4"]
RESAMPLINGS: tuple[str, ...] = get_args(Resampling)


def estimate_similarity(src: np.ndarray, dst: np.ndarray = ARCFACE_TEMPLATE) -> np.ndarray:
    """The 2x3 similarity M = [s·R | t] mapping ``src`` onto ``dst`` ([K, 2] points each) in the
    least-squares sense: argmin Σ‖s·R·src_k + t − dst_k‖², R a rotation (Umeyama; skimage's
    ``SimilarityTransform.estimate``). DataError when all ``src`` points coincide."""
    return similarity_transform(src, dst)


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int = 112, *,
                resampling: Resampling = "float") -> np.ndarray:
    """uint8 [H, W, C] (or [H, W]) → uint8 [size, size, C] (or [size, size]):
    ``out[y, x] = bilinear(image, M⁻¹·(x, y, 1))`` with ``M = matrix`` (2x3, input → output
    pixels), pixel centres at integers, the four neighbours weighted (1−fx)(1−fy), fx(1−fy),
    (1−fx)fy, fx·fy, a neighbour outside the image counting as 0 (OpenCV's INTER_LINEAR with
    BORDER_CONSTANT 0), rounded to the nearest integer and saturated to [0, 255]. Computed by
    torch's ``grid_sample`` (zeros padding, ``align_corners=True``: the same sampling) in
    float32 (positions to ~1e-5 pixel) on the part of the image the output reads.

    ``resampling="opencv4"``: OpenCV ≤ 4's fixed-point arithmetic instead: the inverse map as OpenCV inverts it, each
    position rounded to 1/32 pixel, integer weights (32−fx)(32−fy)·32 … summing to 2¹⁵, the sum
    rounded half up (:func:`_warp_opencv4`); bit-identical to OpenCV 4's ``warpAffine``."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or 0 in image.shape[:2]:
        raise ValueError(f"need a uint8 [H, W, C] or [H, W] image, got {image.dtype} {image.shape}")
    if size <= 0:
        raise ValueError(f"output size must be positive, got {size}")
    if resampling not in RESAMPLINGS:
        raise ValueError(f"resampling {resampling!r} is not one of {', '.join(RESAMPLINGS)}")
    inverse = invert_affine(matrix)
    if resampling == "opencv4":
        return _warp_opencv4(image, matrix, size)
    height, width = image.shape[:2]
    # only the pixels some output reads (each position reads floor(p) and floor(p) + 1) are
    # converted: the box of the output square's corners in the image (an affine map takes its
    # extremes at them), in Python floats (numpy's call overhead dominates on four points)
    last = size - 1.0
    (a, b, c), (d, e, f) = inverse.tolist()
    xs = (c, a * last + c, b * last + c, (a + b) * last + c)
    ys = (f, d * last + f, e * last + f, (d + e) * last + f)
    x_low = int(min(max(math.floor(min(xs)), 0), width - 1))
    x_high = int(min(max(math.floor(max(xs)) + 1, x_low), width - 1))
    y_low = int(min(max(math.floor(min(ys)), 0), height - 1))
    y_high = int(min(max(math.floor(max(ys)) + 1, y_low), height - 1))
    # the part inside a frame of zeros one pixel wide: the image's zero surround where the part
    # meets the image's edge (grid_sample's own zero padding serves positions beyond it)
    channels = image.shape[2] if image.ndim == 3 else 1
    framed = np.zeros((y_high - y_low + 3, x_high - x_low + 3, channels), dtype=np.uint8)
    framed[1:-1, 1:-1] = image[y_low:y_high + 1, x_low:x_high + 1].reshape(framed.shape[0] - 2, -1, channels)
    part = torch.from_numpy(framed).permute(2, 0, 1)[None].float()
    # grid_sample's coordinates with align_corners=True: −1 and 1 are the centres of the first and
    # last pixel, of the output (u, v) as of the framed part; output (x, y) = (u + 1)·(size − 1)/2,
    # its position in the part p = M⁻¹·(x, y, 1) − (x_low, y_low) + 1, normalised 2p/(side − 1) − 1
    half = (size - 1) / 2.0
    theta = np.empty((2, 3))
    for axis, (low, side) in enumerate(((x_low, framed.shape[1]), (y_low, framed.shape[0]))):
        scale = 2.0 / (side - 1)
        theta[axis, :2] = scale * half * inverse[axis, :2]
        theta[axis, 2] = scale * (half * inverse[axis, :2].sum() + inverse[axis, 2] - low + 1) - 1.0
    grid = torch.mm(torch.from_numpy(theta).float(), _output_grid(size)).t().reshape(1, size, size, 2)
    # far-away positions read zeros either way; clamped so that no index computation can overflow
    sampled = F.grid_sample(part, grid.clamp_(-2.0, 2.0), mode="bilinear", padding_mode="zeros",
                            align_corners=True)
    out = sampled[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out if image.ndim == 3 else out[..., 0]


def _warp_opencv4(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """OpenCV ≤ 4's ``warpAffine`` (INTER_LINEAR, BORDER_CONSTANT 0) in its integer arithmetic:
    positions in units of 1/32 pixel (``AB_BITS`` 10, ``INTER_BITS`` 5), weights in units of 2⁻¹⁵."""
    m = np.asarray(matrix, dtype=np.float64).ravel()
    determinant = m[0] * m[4] - m[1] * m[3]
    reciprocal = 1.0 / determinant
    # the inverse as OpenCV computes it (the order of the operations matters to the last bit)
    a, b, d, e = m[4] * reciprocal, -m[1] * reciprocal, -m[3] * reciprocal, m[0] * reciprocal
    c, f = -a * m[2] - b * m[5], -d * m[2] - e * m[5]
    grid = np.arange(size, dtype=np.float64)
    x_step, y_step = np.rint(a * grid * 1024).astype(np.int64), np.rint(d * grid * 1024).astype(np.int64)
    x_row = np.rint((b * grid + c) * 1024).astype(np.int64) + 16
    y_row = np.rint((e * grid + f) * 1024).astype(np.int64) + 16
    x = (x_row[:, None] + x_step[None, :]) >> 5          # 1/32 pixel
    y = (y_row[:, None] + y_step[None, :]) >> 5
    fx, fy = x & 31, y & 31
    height, width = image.shape[:2]
    channels = image.shape[2] if image.ndim == 3 else 1
    framed = np.zeros((height + 2, width + 2, channels), dtype=np.int32)
    framed[1:-1, 1:-1] = image.reshape(height, width, channels)
    flat = framed.reshape(-1)
    column, column_right = np.clip((x >> 5) + 1, 0, width + 1), np.clip((x >> 5) + 2, 0, width + 1)
    row, row_below = np.clip((y >> 5) + 1, 0, height + 1), np.clip((y >> 5) + 2, 0, height + 1)
    taps = [((rows * (width + 2) + columns) * channels, (32 * weight).astype(np.int32))
            for rows, columns, weight in ((row, column, (32 - fx) * (32 - fy)), (row, column_right, fx * (32 - fy)),
                                          (row_below, column, (32 - fx) * fy), (row_below, column_right, fx * fy))]
    total = np.empty((size, size, channels), dtype=np.int32)
    for channel in range(channels):   # one plane at a time: numpy is slow along a last axis of 3
        plane = np.full((size, size), 1 << 14, dtype=np.int32)
        for index, weight in taps:
            plane += flat.take(index + channel) * weight
        total[..., channel] = plane
    out = np.clip(total >> 15, 0, 255).astype(np.uint8)
    return out if image.ndim == 3 else out[..., 0]


@functools.lru_cache(maxsize=8)
def _output_grid(size: int) -> torch.Tensor:
    """float32 [3, size·size]: (u, v, 1) of each output pixel, row by row, u and v from −1 to 1
    (``affine_grid``'s base grid with align_corners=True, transposed; made once per size)."""
    steps = torch.linspace(-1.0, 1.0, size, dtype=torch.float64) if size > 1 else torch.full((1,), -1.0,
                                                                                              dtype=torch.float64)
    v, u = torch.meshgrid(steps, steps, indexing="ij")
    return torch.stack([u.reshape(-1), v.reshape(-1), torch.ones(size * size, dtype=torch.float64)]).float()


def align_face_cv(image: np.ndarray, landmarks: np.ndarray, size: int = 112, *,
                  resampling: Resampling = "float") -> np.ndarray:
    """The ``size`` x ``size`` face of uint8 ``image`` whose five ``landmarks`` ([5, 2], image
    pixels) are mapped onto the ArcFace template scaled to ``size`` (insightface's ``norm_crop``):
    :func:`estimate_similarity` then :func:`warp_affine` (with ``resampling``). DataError for
    landmarks that are not five finite points or all coincide."""
    matrix = estimate_similarity(check_landmarks(landmarks), template(size))
    return warp_affine(image, matrix, size, resampling=resampling)
