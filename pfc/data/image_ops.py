"""The image operations of the loader's augmentation, one small function each, with their math.

Geometric ones work on uint8 ``[H, W, 3]`` images (resampling by torch's uint8 bilinear kernel,
which interpolates and rounds in fixed point); photometric ones on float32 ``[H, W, 3]`` images with values in [0, 255] (rounded
and clipped to uint8 once, after the last of them). Pure functions of the image and their
parameters: the parameters are drawn elsewhere (:mod:`pfc.data.augment`).

Colours: luma is ITU-R BT.601, ``Y = 0.299 R + 0.587 G + 0.114 B``; hue and saturation act on
the chroma plane (I, Q) of the YIQ space, whose luma row is Y: a saturation factor scales (I, Q),
a hue shift rotates it, so both keep every pixel's luma and a grey pixel (I = Q = 0) stays grey.
This is the linear form of a hue shift (one 3 × 3 matrix per image), not HSV's piecewise one.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

LUMA = np.array([0.299, 0.587, 0.114])
"""ITU-R BT.601 luma weights of R, G, B (they sum to 1)."""
RGB_TO_YIQ = np.array([LUMA,
                       [0.596, -0.274, -0.322],
                       [0.211, -0.523, 0.312]])
"""RGB → YIQ (NTSC); the chroma rows sum to 0, so a grey (v, v, v) maps to (v, 0, 0)."""
YIQ_TO_RGB = np.linalg.inv(RGB_TO_YIQ)


def resize(image: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The region ``box = (x0, y0, x1, y1)`` (whole pixels, default the whole image) of uint8
    ``image`` [H, W, 3] resampled to ``size = (width, height)`` with the bilinear filter: output
    pixel x samples the region at ``c = x0 + (x + ½)·s``, ``s = (x1 − x0) / width``, as
    ``Σ_i w((i + ½ − c)/f)·in[i] / Σ_i w((i + ½ − c)/f)`` over the source pixels i of the
    region (nothing outside the box is read), ``w(t) = max(0, 1 − |t|)`` and ``f = max(s, 1)`` (a wider triangle when shrinking:
    antialiased); then the same along y; rounded to uint8. torch's uint8 kernel for it (about
    twice PIL's speed at 112 px)."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = box if box is not None else (0, 0, width, height)
    region = torch.from_numpy(image)[y0:y1, x0:x1].permute(2, 0, 1).unsqueeze(0)   # [1, 3, h, w]
    # a channels-last copy in, so that the result is channels-last too, i.e. a contiguous [H, W, 3]
    # (torch's uint8 kernel otherwise returns NCHW, and copying that back costs as much as the resize)
    region = region.contiguous(memory_format=torch.channels_last)
    out = F.interpolate(region, size=(size[1], size[0]), mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def crop_box(width: int, height: int, area: float, log_ratio: float, u_x: float, u_y: float,
             ratio_range: tuple[float, float]) -> tuple[float, float, float, float]:
    """The box ``(x0, y0, x1, y1)`` of a random resized crop: area ``area·W·H`` and aspect ratio
    ``r = w / h`` (``w = √(area·W·H·r)``, ``h = √(area·W·H / r)``), placed at ``x0 = u_x·(W − w)``,
    ``y0 = u_y·(H − h)`` (u in [0, 1)), so it lies inside the image.

    ``log ratio`` in [0, 1) picks ``ln r`` uniformly in the part of ``[ln r_lo, ln r_hi]`` where
    such a box fits (``w ≤ W`` and ``h ≤ H``: ``area·W/H ≤ r ≤ W/(area·H)``); when no ratio of the
    range fits, the fitting ratio nearest to it is taken. No rejection loop: one draw, one box.
    """
    fit_low, fit_high = math.log(area * width / height), math.log(width / (area * height))
    low, high = math.log(ratio_range[0]), math.log(ratio_range[1])
    low, high = max(low, fit_low), min(high, fit_high)
    if low > high:   # no ratio of the range fits: the nearest that does
        low = high = min(max(low, fit_low), fit_high)
    ratio = math.exp(low + log_ratio * (high - low))
    box_width = min(math.sqrt(area * width * height * ratio), width)
    box_height = min(math.sqrt(area * width * height / ratio), height)
    x0, y0 = u_x * (width - box_width), u_y * (height - box_height)
    return x0, y0, x0 + box_width, y0 + box_height


def pixel_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """``box`` with each edge rounded to the nearest pixel edge, inside the W × H image and at
    least one pixel wide and high (a crop's area and ratio then move by under a pixel's worth)."""
    x0, y0 = min(round(box[0]), width - 1), min(round(box[1]), height - 1)
    return x0, y0, max(x0 + 1, min(round(box[2]), width)), max(y0 + 1, min(round(box[3]), height))


def low_resolution(image: np.ndarray, factor: float) -> np.ndarray:
    """uint8 ``image`` [H, W, 3] shrunk to ``(round(factor·W), round(factor·H))`` (at least 1 px)
    and resized back to W × H with :func:`resize`: the detail of a lower-resolution face
    (insightface's DALI ``dali_random_resize``)."""
    height, width = image.shape[:2]
    small = resize(image, (max(1, round(factor * width)), max(1, round(factor * height))))
    return resize(small, (width, height))


def gaussian_kernel(sigma: float) -> np.ndarray:
    """float64 [2r + 1], ``r = max(1, ⌈3σ⌉)``: ``k_i = exp(−i² / 2σ²) / Σ_j exp(−j² / 2σ²)`` for
    ``i = −r … r`` (sums to 1: a blur keeps the mean brightness)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-offsets ** 2 / (2 * sigma * sigma))
    return kernel / kernel.sum()


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """float32 ``image`` [H, W, 3] convolved with the 2-D Gaussian ``k_i·k_j``
    (:func:`gaussian_kernel`), as two 1-D passes (columns, then rows); borders mirrored without
    repeating the edge pixel (``… in[2], in[1] | in[0], in[1], …``)."""
    kernel = gaussian_kernel(sigma).astype(np.float32)
    radius = len(kernel) // 2
    height, width = image.shape[:2]
    vertical = np.empty_like(image, dtype=np.float32)
    _symmetric_filter(_mirror_pad(image, radius, 0).reshape(-1), kernel, width * 3, vertical.reshape(-1))
    # the horizontal pass over the row-padded image as one flat array: output (y, x) at the flat
    # index of (y, x) in the padded layout; the last 2r columns of that layout are left over
    padded = _mirror_pad(vertical, radius, 1)
    horizontal = np.empty_like(padded)
    _symmetric_filter(padded.reshape(-1), kernel, 3, horizontal.reshape(-1)[:padded.size - 6 * radius])
    return np.ascontiguousarray(horizontal[:, :width])


def _symmetric_filter(values: np.ndarray, kernel: np.ndarray, step: int, out: np.ndarray) -> None:
    """``out[j] = Σ_t k_t·values[j + t·step]`` (t = 0 … 2r) for a symmetric kernel of 2r + 1 taps,
    on flat arrays: ``(values[j + (r − o)·step] + values[j + (r + o)·step])·k_(r+o)`` pairwise,
    each term a whole-array operation on shifted views."""
    radius, length = len(kernel) // 2, len(out)

    def shifted(tap: int) -> np.ndarray:
        return values[tap * step:tap * step + length]

    np.multiply(shifted(radius), kernel[radius], out=out)
    pair = np.empty_like(out)   # one scratch buffer for every tap: no image-sized temporaries
    for offset in range(1, radius + 1):
        np.add(shifted(radius - offset), shifted(radius + offset), out=pair)
        pair *= kernel[radius + offset]
        out += pair


def _mirror_pad(image: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """``image`` with ``radius`` mirrored pixels (the edge pixel not repeated) before and after
    along ``axis`` (0 or 1); np.pad's "reflect", without its per-call overhead when the radius
    is below the side (else np.pad itself, which reflects again and again)."""
    length = image.shape[axis]
    if radius >= length:
        padding = [(0, 0)] * image.ndim
        padding[axis] = (radius, radius)
        return np.pad(image, padding, mode="reflect")
    shape = list(image.shape)
    shape[axis] += 2 * radius
    out = np.empty(shape, dtype=image.dtype)

    def along(part: slice) -> tuple:
        return (part,) if axis == 0 else (slice(None), part)

    out[along(slice(radius, radius + length))] = image
    out[along(slice(0, radius))] = image[along(slice(radius, 0, -1))]
    stop = length - 2 - radius
    out[along(slice(radius + length, None))] = image[along(slice(length - 2, stop if stop >= 0 else None, -1))]
    return out


def color_matrix(brightness: float, saturation: float, hue_degrees: float) -> np.ndarray:
    """float64 [3, 3]: ``brightness · YIQ⁻¹ · diag(1, s·R(−h)) · YIQ`` — the chroma plane (I, Q)
    rotated by ``−h`` degrees (red, yellow, green lie clockwise in it: a positive ``h`` moves
    hues the way HSV's hue angle grows, red → yellow → green) and scaled by ``s``, then every
    channel multiplied by ``b``. ``s = 0`` gives the grey of the same luma."""
    angle = -math.radians(hue_degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    chroma = np.array([[1.0, 0.0, 0.0],
                       [0.0, saturation * cos, -saturation * sin],
                       [0.0, saturation * sin, saturation * cos]])
    return brightness * (YIQ_TO_RGB @ chroma @ RGB_TO_YIQ)


def color_jitter(image: np.ndarray, brightness: float, contrast: float, saturation: float,
                 hue_degrees: float) -> np.ndarray:
    """float32 ``image`` [H, W, 3] → ``c·M·x + (1 − c)·b·μ`` per pixel x (an RGB column), with
    ``M`` = :func:`color_matrix` (b, s, h) and ``μ`` the mean luma of ``image``: brightness
    ``b·x``, then contrast (each pixel pulled towards, c < 1, or pushed from, c > 1, the image's
    mean luma ``b·μ``), then saturation and hue, which keep luma. One affine map: nothing is
    clipped between the steps (the result is clipped once, to [0, 255], by the caller)."""
    matrix = color_matrix(brightness, saturation, hue_degrees) * contrast
    mean_luma = float((image.reshape(-1, 3) @ LUMA.astype(np.float32)).mean(dtype=np.float64))
    out = image @ matrix.T.astype(np.float32)
    out += np.float32((1.0 - contrast) * brightness * mean_luma)
    return out


def grayscale(image: np.ndarray) -> np.ndarray:
    """float32 ``image`` [H, W, 3] → its luma ``0.299 R + 0.587 G + 0.114 B`` in all three channels."""
    luma = image @ LUMA.astype(np.float32)
    return np.repeat(luma[..., None], 3, axis=2)
