"""Evaluation alignment (pfc.evaluation.alignment): OpenCV's warpAffine semantics against a float64
bilinear written here from the definition, the similarity fit, and the alignment inverting a
known similarity transform."""
from __future__ import annotations

import numpy as np
import pytest

from pfc.errors import DataError
from pfc.evaluation.alignment import ARCFACE_TEMPLATE, align_face_cv, estimate_similarity, warp_affine


def reference_warp(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """float64, pixel by pixel: out(x, y) = Σ over the 4 neighbours of M⁻¹(x, y) of weight · pixel,
    a neighbour outside the image reading 0; rounded half to even, saturated."""
    image = image.astype(np.float64).reshape(image.shape[0], image.shape[1], -1)
    height, width = image.shape[:2]
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(full)
    out = np.zeros((size, size, image.shape[2]))
    for y in range(size):
        for x in range(size):
            u, v, _ = inverse @ np.array([x, y, 1.0])
            left, top = int(np.floor(u)), int(np.floor(v))
            a, b = u - left, v - top
            for dx, dy, weight in ((0, 0, (1 - a) * (1 - b)), (1, 0, a * (1 - b)), (0, 1, (1 - a) * b), (1, 1, a * b)):
                column, row = left + dx, top + dy
                if 0 <= column < width and 0 <= row < height:
                    out[y, x] += weight * image[row, column]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def similarity(scale: float, angle: float, shift) -> np.ndarray:
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.concatenate([scale * rotation, np.asarray(shift, dtype=np.float64)[:, None]], axis=1)


def smooth_face(size: int = 112) -> np.ndarray:
    """A smooth, non-symmetric RGB test image (the double resampling of the round trip stays small)."""
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [127 + 100 * np.sin(2.1 * x + 3.3 * y + phase) * np.cos(1.7 * x - 0.9 * y) for phase in (0.0, 1.0, 2.0)]
    return np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("matrix, shape", [
    (similarity(0.6, 0.3, (-20.0, 15.0)), (90, 70, 3)),       # shrink, rotate, part of the output outside
    (similarity(1.7, -0.5, (30.0, -40.0)), (60, 80, 3)),      # enlarge
    (similarity(1.0, 0.0, (0.3137, 0.6291)), (40, 40, 1)),    # sub-pixel shift, one channel
    (np.array([[0.9, 0.2, 5.0], [-0.1, 1.1, -3.0]]), (50, 45, 3)),   # a general affine map
])
def test_warp_affine_is_the_bilinear_of_the_inverse_map_with_zeros_outside(matrix, shape):
    image = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)   # noise: the hardest case
    size = 48
    expected = reference_warp(image, matrix, size)
    actual = warp_affine(image if shape[2] == 3 else image[..., 0], matrix, size)
    actual = actual.reshape(expected.shape)
    difference = np.abs(actual.astype(int) - expected.astype(int))
    assert difference.max() <= 1                     # float32 against float64: a rounding tie may fall apart
    assert (difference > 0).mean() < 2e-3


def reference_opencv4(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """OpenCV 4's warpAffine, pixel by pixel from its definition: the position M⁻¹(x, y) rounded to
    1/32 pixel (x·1024 and the row's part rounded separately, +16, >> 5), integer weights
    (32−fx)(32−fy)·32 … (sum 2¹⁵), taps outside the image 0, (sum + 2¹⁴) >> 15."""
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))
    height, width = image.shape[:2]
    out = np.zeros((size, size) + image.shape[2:], dtype=np.uint8)
    for y in range(size):
        for x in range(size):
            u, v = ((int(np.rint(inverse[axis, 0] * x * 1024))
                     + int(np.rint((inverse[axis, 1] * y + inverse[axis, 2]) * 1024)) + 16) >> 5 for axis in (0, 1))
            total = 1 << 14
            for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
                column, row = (u >> 5) + dx, (v >> 5) + dy
                weight = (u & 31 if dx else 32 - (u & 31)) * (v & 31 if dy else 32 - (v & 31)) * 32
                if 0 <= column < width and 0 <= row < height:
                    total = total + weight * image[row, column].astype(np.int64)
            out[y, x] = np.clip(np.asarray(total) >> 15, 0, 255)
    return out


@pytest.mark.parametrize("matrix", [similarity(0.6, 0.3, (-20.0, 15.0)), similarity(0.8, -0.2, (-8.0, 6.0))])
def test_opencv4_resampling_is_its_fixed_point_arithmetic(matrix):
    image = np.random.default_rng(5).integers(0, 256, (70, 60, 3), dtype=np.uint8)
    expected = reference_opencv4(image, matrix, 40)
    actual = warp_affine(image, matrix, 40, resampling="opencv4")
    # the reference inverts M with numpy, OpenCV (and pfc) in closed form: a position may land on
    # the other side of a 1/2048 rounding boundary, rarely
    assert (actual != expected).mean() < 2e-3
    floating = warp_affine(image, matrix, 40)
    assert (floating != expected).mean() > 0.05 and np.abs(floating.astype(int) - actual).max() <= 16


def test_warp_affine_reads_only_zeros_far_outside_the_image():
    image = np.full((10, 10, 3), 200, dtype=np.uint8)
    assert warp_affine(image, similarity(1.0, 0.0, (500.0, 500.0)), 16).max() == 0
    assert warp_affine(image[:1, :1], similarity(1.0, 0.0, (0.0, 0.0)), 4)[0, 0, 0] == 200
    edge = warp_affine(image, similarity(1.0, 0.0, (0.5, 0.0)), 12)   # column 0 reads half of pixel 0, half zero
    assert edge[5, 0, 0] == 100 and edge[5, 1, 0] == 200 and edge[5, 10, 0] == 100 and edge[5, 11, 0] == 0


def test_estimate_similarity_recovers_a_known_transform_and_never_reflects():
    known = similarity(1.9, 0.4, (12.0, -7.0))
    inverse = np.linalg.inv(np.vstack([known, [0, 0, 1]]))[:2]
    source = ARCFACE_TEMPLATE @ inverse[:, :2].T + inverse[:, 2]       # points that `known` maps onto the template
    np.testing.assert_allclose(estimate_similarity(source), known, atol=1e-9)
    mirrored = ARCFACE_TEMPLATE * [-1.0, 1.0]
    linear = estimate_similarity(mirrored)[:, :2]
    assert np.linalg.det(linear) > 0
    assert np.allclose(linear[0, 0], linear[1, 1]) and np.allclose(linear[0, 1], -linear[1, 0])


def test_alignment_inverts_the_similarity_that_made_a_loose_crop():
    aligned = smooth_face()
    rng = np.random.default_rng(0)
    for scale, angle in ((1.8, 0.35), (2.4, -0.2), (1.2, 0.05)):
        to_loose = similarity(scale, angle, (0.0, 0.0))
        corners = np.array([[0, 0], [111, 0], [0, 111], [111, 111]]) @ to_loose[:, :2].T
        to_loose[:, 2] = rng.uniform(5, 25, 2) - corners.min(0)          # the whole face inside the crop
        loose = warp_affine(aligned, to_loose, int(np.ceil((corners.max(0) - corners.min(0)).max())) + 50)
        landmarks = ARCFACE_TEMPLATE @ to_loose[:, :2].T + to_loose[:, 2]
        np.testing.assert_allclose(estimate_similarity(landmarks), np.linalg.inv(np.vstack([to_loose, [0, 0, 1]]))[:2],
                                   atol=1e-9)
        back = align_face_cv(loose, landmarks).astype(int)
        interior = np.s_[4:-4, 4:-4]
        difference = np.abs(back[interior] - aligned[interior].astype(int))
        assert difference.mean() < 0.1 and difference.max() <= 2, (scale, difference.mean(), difference.max())


def test_align_face_cv_scales_the_template_to_the_output_size():
    loose = smooth_face(200)
    landmarks = ARCFACE_TEMPLATE * 1.5 + 10
    small = align_face_cv(loose, landmarks, 56)
    expected = warp_affine(loose, estimate_similarity(landmarks, ARCFACE_TEMPLATE / 2), 56)
    assert small.shape == (56, 56, 3) and np.array_equal(small, expected)


@pytest.mark.parametrize("landmarks, message", [
    (np.zeros((4, 2)), "need 5 finite"),
    (np.full((5, 2), np.nan), "need 5 finite"),
    (np.full((5, 2), 7.0), "all at one point"),
])
def test_unusable_landmarks_are_a_data_error(landmarks, message):
    with pytest.raises(DataError, match=message):
        align_face_cv(smooth_face(), landmarks)


def test_warp_affine_refuses_what_is_not_a_uint8_image_or_an_invertible_map():
    with pytest.raises(ValueError, match="uint8"):
        warp_affine(np.zeros((8, 8, 3), dtype=np.float32), similarity(1, 0, (0, 0)))
    with pytest.raises(ValueError, match="singular"):
        warp_affine(np.zeros((8, 8, 3), dtype=np.uint8), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="resampling 'cubic' is not one of float, opencv4"):
        warp_affine(np.zeros((8, 8, 3), dtype=np.uint8), similarity(1, 0, (0, 0)), resampling="cubic")
