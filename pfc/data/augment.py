"""Augmentation beside the flip, as insightface's DALI path offers it, seeded and position-exact.

    augmentation = Augmentation(blur=0.2, color_jitter=0.2, grayscale=0.1, low_resolution=0.1)
    augment_batch(pixels, keys, augmentation, seed, epoch, stream)   # uint8 [b, H, W, 3], in place

Each operation fires on an image with its own probability (0: off, the default: an
:class:`Augmentation` with all probabilities 0 changes nothing, and the loader then does not call
this module at all). In this order, in the DataLoader workers, right after the JPEG decode:

1. ``random_resized_crop``: a box of area fraction in ``crop_scale`` and aspect ratio
   (width / height, log-uniform) in ``crop_ratio`` (:func:`pfc.data.image_ops.crop_box`), its
   edges rounded to whole pixels, resampled back to the image size;
2. ``low_resolution``: shrunk by a factor in ``low_resolution_factor`` and resized back
   (insightface: probability 0.1, side 56 … 89.6 of 112);
3. ``blur``: a Gaussian of σ in ``blur_sigma`` (insightface: probability 0.2, a 3 × 3 window,
   which DALI gives σ = 0.8);
4. ``color_jitter``: brightness, contrast, saturation factors and a hue shift in degrees, each
   uniform in its range, as one affine colour map (insightface: probability 0.2, hue 0 … 20°,
   saturation 1 … 1.2, brightness and contrast unchanged — the ranges' defaults);
5. ``grayscale``: BT.601 luma in all channels (insightface: probability 0.1).

The flip (``augment`` of the loader) stays where it is: drawn by the epoch plan, applied where
the batch is consumed, after all of these.

Seeded and position-exact: the draws of an image (:data:`DRAWS` uniforms: a coin and the
parameters of every operation, whether it is on or not, so turning one operation on changes no
other's draws) are a hash of (seed, epoch, stream, key) alone — a counter-based generator
(:func:`uniforms`), cheap enough to run per image. The shuffle sampler's key is the sample's
position in the epoch sequence (:mod:`pfc.data.plan`: the same sample whatever the world size
and worker count), the P×K sampler's is the slot in the plan's global batch; a slot refilled with
a replacement for a corrupt sample keeps the draws of the position it stands for. So an image is
augmented the same way with any number of workers, on any rank that reads it, and in a resumed
run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pfc.data import image_ops

OPERATIONS = ("random_resized_crop", "low_resolution", "blur", "color_jitter", "grayscale")
"""The fields of :class:`Augmentation` that are an operation's probability, in the order they run."""
SHUFFLE_STREAM, PK_STREAM = 0x5348, 0x504B   # "SH", "PK": keys of the two samplers never collide

# columns of an image's draws
(CROP, CROP_AREA, CROP_RATIO, CROP_X, CROP_Y, LOW_RES, LOW_RES_FACTOR, BLUR, BLUR_SIGMA,
 JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE, GRAY) = range(15)
DRAWS = 15


@dataclass(frozen=True)
class Augmentation:
    """What the loader does to each image besides the flip: a probability per operation (0: off)
    and the ranges its parameters are drawn from, uniformly (the crop's ratio log-uniformly)."""

    random_resized_crop: float = 0.0
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    low_resolution: float = 0.0
    low_resolution_factor: tuple[float, float] = (0.5, 0.8)
    blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.8, 0.8)
    color_jitter: float = 0.0
    brightness: tuple[float, float] = (1.0, 1.0)
    contrast: tuple[float, float] = (1.0, 1.0)
    saturation: tuple[float, float] = (1.0, 1.2)
    hue: tuple[float, float] = (0.0, 20.0)
    grayscale: float = 0.0

    def __post_init__(self):
        """ValueError naming the field: a probability outside [0, 1], a range that is not
        ``low ≤ high`` or leaves the field's domain."""
        for name in OPERATIONS:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {value}")
        domains = {"crop_scale": (0.0, 1.0, False), "crop_ratio": (0.0, math.inf, False),
                   "low_resolution_factor": (0.0, 1.0, False), "blur_sigma": (0.0, math.inf, False),
                   "brightness": (0.0, math.inf, True), "contrast": (0.0, math.inf, True),
                   "saturation": (0.0, math.inf, True), "hue": (-180.0, 180.0, True)}
        for name, (low, high, low_allowed) in domains.items():
            try:
                value = tuple(float(end) for end in getattr(self, name))
            except (TypeError, ValueError):
                raise ValueError(f"{name} is a range (low, high) of two numbers, got {getattr(self, name)!r}") from None
            object.__setattr__(self, name, value)   # a list from a config becomes the tuple it stands for
            if len(value) != 2 or not value[0] <= value[1]:
                raise ValueError(f"{name} is a range (low, high) with low <= high, got {value}")
            above_low = value[0] >= low if low_allowed else value[0] > low
            if not (above_low and value[1] <= high):
                least = f">= {low}" if low_allowed else f"> {low}"
                bound = f"{least} and <= {high}" if high < math.inf else least
                raise ValueError(f"{name} {value}: both ends must be {bound}")

    @property
    def active(self) -> bool:
        """Whether any operation can fire (else the loader skips augmentation entirely)."""
        return any(getattr(self, name) > 0 for name in OPERATIONS)


_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def _mix(value: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (a bijection whose output bits each depend on all input bits)."""
    value = (value ^ (value >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    value = (value ^ (value >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return value ^ (value >> np.uint64(31))


def uniforms(seed: int, epoch: int, stream: int, keys: np.ndarray, count: int = DRAWS) -> np.ndarray:
    """float64 [len(keys), count] in [0, 1): ``u[n, j] = top 53 bits of mix(mix(h(seed, epoch,
    stream) + key_n·φ) + (j + 1)·φ) · 2⁻⁵³`` (``mix``: splitmix64's finaliser, φ its golden-ratio
    increment), a counter-based generator: any image's draws without the others'."""
    with np.errstate(over="ignore"):
        base = np.array([seed & _MASK], dtype=np.uint64)
        for part in (epoch, stream):
            base = _mix(base + np.uint64(_GOLDEN)) ^ np.uint64(part & _MASK)
        keyed = _mix(_mix(base) + np.asarray(keys, dtype=np.int64).astype(np.uint64) * np.uint64(_GOLDEN))
        counters = np.arange(1, count + 1, dtype=np.uint64) * np.uint64(_GOLDEN)
        bits = _mix(keyed[:, None] + counters[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _between(bounds: tuple[float, float], u: float) -> float:
    return bounds[0] + u * (bounds[1] - bounds[0])


def augment_image(image: np.ndarray, draws: np.ndarray, augmentation: Augmentation) -> None:
    """Augment uint8 ``image`` [H, W, 3] in place with an image's :data:`DRAWS` uniforms (see the
    module docstring for the operations and their order): the geometric ones on uint8, the
    photometric ones in float32, rounded and clipped to [0, 255] once at the end."""
    a = augmentation
    height, width = image.shape[:2]
    if draws[CROP] < a.random_resized_crop:
        box = image_ops.crop_box(width, height, _between(a.crop_scale, draws[CROP_AREA]), draws[CROP_RATIO],
                                 draws[CROP_X], draws[CROP_Y], a.crop_ratio)
        image[...] = image_ops.resize(image, (width, height), image_ops.pixel_box(box, width, height))
    if draws[LOW_RES] < a.low_resolution:
        image[...] = image_ops.low_resolution(image, _between(a.low_resolution_factor, draws[LOW_RES_FACTOR]))
    blur, jitter, gray = draws[BLUR] < a.blur, draws[JITTER] < a.color_jitter, draws[GRAY] < a.grayscale
    if not (blur or jitter or gray):
        return
    pixels = image.astype(np.float32)
    if blur:
        pixels = image_ops.gaussian_blur(pixels, _between(a.blur_sigma, draws[BLUR_SIGMA]))
    if jitter:
        pixels = image_ops.color_jitter(pixels, _between(a.brightness, draws[BRIGHTNESS]),
                                        _between(a.contrast, draws[CONTRAST]),
                                        _between(a.saturation, draws[SATURATION]), _between(a.hue, draws[HUE]))
    if gray:
        pixels = image_ops.grayscale(pixels)
    np.rint(pixels, out=pixels)
    np.clip(pixels, 0, 255, out=pixels)
    image[...] = pixels


def augment_batch(pixels: np.ndarray, keys: np.ndarray, augmentation: Augmentation, seed: int, epoch: int,
                  stream: int) -> None:
    """Augment each image ``pixels[n]`` (uint8 [b, H, W, 3], in place) with the draws of
    ``keys[n]`` (:func:`uniforms` of (seed, epoch, stream, key))."""
    draws = uniforms(seed, epoch, stream, keys)
    for image, image_draws in zip(pixels, draws):
        augment_image(image, image_draws, augmentation)
