"""Augmentation beside the flip: each operation against its formula written out in float64, the
draws a function of (seed, epoch, stream, key) alone, and the loader's images the same with any
worker count and world size, after a mid-epoch resume, and untouched when it is off."""
import math

import numpy as np
import pytest
import torch

from pfc.data import image_ops, make_loader
from pfc.data.augment import BLUR, CROP, DRAWS, GRAY, PK_STREAM, SHUFFLE_STREAM, Augmentation, uniforms
from pfc.errors import ConfigError
from pfc.train.config import load_config
from tests.test_data_pk import _write as write_pk_set
from tests.test_data_resume import BATCH, WINDOW
from tests.test_data_resume import _write as write_noise_set

LUMA = np.array([0.299, 0.587, 0.114])   # ITU-R BT.601
EVERYTHING = Augmentation(random_resized_crop=0.5, low_resolution=0.5, blur=0.5, color_jitter=0.5, grayscale=0.3,
                          blur_sigma=(0.5, 1.5), brightness=(0.6, 1.4), contrast=(0.6, 1.4), hue=(-30.0, 30.0))


def _image(height=9, width=11, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype(np.uint8)


# ------------------------------------------------------------------------------ each op, its formula

def test_grayscale_is_the_bt601_luma_in_every_channel():
    image = _image().astype(np.float64)
    luma = image @ LUMA
    out = image_ops.grayscale(image.astype(np.float32))
    assert out.shape == image.shape and np.allclose(out, luma[..., None], atol=1e-3)


@pytest.mark.parametrize("sigma", [0.3, 0.8, 1.7])
def test_gaussian_kernel_is_normalised_symmetric_and_three_sigma_wide(sigma):
    kernel = image_ops.gaussian_kernel(sigma)
    radius = max(1, math.ceil(3 * sigma))
    offsets = np.arange(-radius, radius + 1)
    assert len(kernel) == 2 * radius + 1 and math.isclose(kernel.sum(), 1.0, rel_tol=1e-12)
    assert np.allclose(kernel, kernel[::-1])
    assert np.allclose(kernel / kernel[radius], np.exp(-offsets ** 2 / (2 * sigma ** 2)))


@pytest.mark.parametrize("sigma", [0.8, 1.7])
def test_gaussian_blur_is_the_2d_convolution_with_mirrored_borders(sigma):
    image = _image().astype(np.float64)
    height, width = image.shape[:2]
    kernel = image_ops.gaussian_kernel(sigma)
    radius = len(kernel) // 2

    def mirrored(i, n):   # … in[2], in[1] | in[0] … in[n-1] | in[n-2] …
        period = 2 * (n - 1)
        i = abs(i) % period
        return period - i if i >= n else i

    want = np.zeros_like(image)
    for y in range(height):
        for x in range(width):
            for dy in range(-radius, radius + 1):
                for dx in range(-radius, radius + 1):
                    want[y, x] += kernel[dy + radius] * kernel[dx + radius] * image[mirrored(y + dy, height),
                                                                                     mirrored(x + dx, width)]
    out = image_ops.gaussian_blur(image.astype(np.float32), sigma)
    assert out.dtype == np.float32 and np.allclose(out, want, atol=1e-3)


@pytest.mark.parametrize("brightness,contrast,saturation,hue", [(1.3, 0.7, 1.2, 20.0), (0.8, 1.4, 0.5, -75.0),
                                                                  (1.0, 1.0, 1.0, 0.0)])
def test_color_jitter_is_brightness_then_contrast_then_saturation_and_hue_in_yiq(brightness, contrast, saturation, hue):
    image = _image().astype(np.float64)
    bright = brightness * image
    mean_luma = (bright @ LUMA).mean()
    contrasted = contrast * bright + (1 - contrast) * mean_luma
    to_yiq = np.array([LUMA, [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    y, i, q = np.moveaxis(contrasted @ to_yiq.T, 2, 0)
    angle = -math.radians(hue)   # HSV's hue grows red → yellow → green, clockwise in the (I, Q) plane
    i, q = (saturation * (math.cos(angle) * i - math.sin(angle) * q),
            saturation * (math.sin(angle) * i + math.cos(angle) * q))
    want = np.stack([y, i, q], axis=2) @ np.linalg.inv(to_yiq).T
    out = image_ops.color_jitter(image.astype(np.float32), brightness, contrast, saturation, hue)
    assert np.allclose(out, want, atol=2e-3)
    # saturation and hue keep luma; saturation 0 is the grey of the same luma
    assert np.allclose(image_ops.color_jitter(image.astype(np.float32), 1, 1, saturation, hue) @ LUMA,
                       image @ LUMA, atol=2e-3)
    assert np.allclose(image_ops.color_jitter(image.astype(np.float32), 1, 1, 0, hue),
                       image_ops.grayscale(image.astype(np.float32)), atol=2e-3)


def test_a_positive_hue_shift_turns_red_towards_yellow_and_green_as_hsv_does():
    red = np.zeros((1, 1, 3), dtype=np.float32)
    red[..., 0] = 200
    for shift, strongest in ((60, (0, 1)), (120, (1,)), (240, (2,))):   # yellow: red = green; green; blue
        out = image_ops.color_jitter(red, 1, 1, 1, shift)[0, 0]
        assert set(np.flatnonzero(out >= out.max() - 25)) == set(strongest), (shift, out)


@pytest.mark.parametrize("width,height", [(112, 112), (16, 16), (20, 12)])
def test_crop_boxes_lie_in_the_image_with_area_and_ratio_in_their_ranges(width, height):
    scale, ratio = (0.3, 0.9), (0.75, 4 / 3)
    draws = np.random.default_rng(1).random((2000, 4))
    for area_u, ratio_u, u_x, u_y in draws:
        area = scale[0] + area_u * (scale[1] - scale[0])
        x0, y0, x1, y1 = image_ops.crop_box(width, height, area, ratio_u, u_x, u_y, ratio)
        assert 0 <= x0 < x1 <= width + 1e-9 and 0 <= y0 < y1 <= height + 1e-9
        assert math.isclose((x1 - x0) * (y1 - y0), area * width * height, rel_tol=1e-9)
        fits = (area * width / height, width / (area * height))   # the ratios of boxes of that area inside
        low, high = max(ratio[0], fits[0]), min(ratio[1], fits[1])
        if low > high:   # none of the range fits: the fitting ratio nearest to it
            low = high = fits[0] if fits[0] > ratio[1] else fits[1]
        assert low * (1 - 1e-9) <= (x1 - x0) / (y1 - y0) <= high * (1 + 1e-9)
    # rounded to whole pixels: inside, non-empty, each edge within half a pixel
    for box in ((0.2, 0.4, 15.6, 15.5), (15.7, 3.0, 15.9, 3.2), (-0.0, 0.0, 16.0, 16.0)):
        x0, y0, x1, y1 = image_ops.pixel_box(box, 16, 16)
        assert 0 <= x0 < x1 <= 16 and 0 <= y0 < y1 <= 16
        assert all(abs(a - b) <= 1 for a, b in zip((x0, y0, x1, y1), box))
    # a ratio range no box of that area fits: the nearest ratio that fits, area kept
    x0, y0, x1, y1 = image_ops.crop_box(16, 16, 0.9, 0.5, 0.5, 0.5, (3.0, 4.0))
    assert math.isclose((x1 - x0) / (y1 - y0), 1 / 0.9) and x1 - x0 <= 16 + 1e-9


def _triangle_resample(image: np.ndarray, size, box) -> np.ndarray:
    """float64 reference of :func:`pfc.data.image_ops.resize`'s formula, axis by axis, on the
    pixels of the box alone."""
    x0, y0, x1, y1 = box
    image = image[y0:y1, x0:x1]

    def along(values, length, axis):
        scale = values.shape[axis] / length
        support = max(scale, 1.0)
        out = []
        for x in range(length):
            center = (x + 0.5) * scale
            taps = np.arange(values.shape[axis])
            weights = np.maximum(0.0, 1 - np.abs((taps + 0.5 - center) / support))
            out.append(np.tensordot(weights / weights.sum(), values, axes=([0], [axis])))
        return np.stack(out, axis=axis)
    return along(along(image.astype(np.float64), size[1], 0), size[0], 1)


@pytest.mark.parametrize("size,box", [((11, 9), (2, 1, 9, 7)),     # a crop, enlarged
                                      ((5, 4), (0, 0, 11, 9)),     # shrunk (antialiased)
                                      ((13, 4), (3, 2, 10, 9)),    # a crop, wider and lower
                                      ((11, 9), (0, 0, 11, 9))])   # the identity
def test_resize_is_the_triangle_filter_of_its_docstring(size, box):
    image = _image(seed=3)
    out = image_ops.resize(image, size, box)
    assert out.shape == (size[1], size[0], 3) and out.dtype == np.uint8
    assert np.abs(out.astype(np.float64) - _triangle_resample(image, size, box)).max() <= 1.0


def test_low_resolution_shrinks_and_resizes_back():
    image = _image(16, 16, seed=4)
    out = image_ops.low_resolution(image, 0.5)
    want = image_ops.resize(image_ops.resize(image, (8, 8)), (16, 16))
    assert out.shape == image.shape and np.array_equal(out, want) and not np.array_equal(out, image)


# ------------------------------------------------------------------------------ the draws

def test_draws_are_a_function_of_seed_epoch_stream_and_key_alone():
    draws = uniforms(7, 2, SHUFFLE_STREAM, np.arange(1000))
    assert draws.shape == (1000, DRAWS) and 0 <= draws.min() and draws.max() < 1
    assert np.array_equal(uniforms(7, 2, SHUFFLE_STREAM, np.array([812, 3])), draws[[812, 3]])   # whatever else is drawn
    for other in (uniforms(8, 2, SHUFFLE_STREAM, np.arange(1000)), uniforms(7, 3, SHUFFLE_STREAM, np.arange(1000)),
                  uniforms(7, 2, PK_STREAM, np.arange(1000))):
        assert not np.isclose(other, draws).any(axis=1).all()


def test_each_operation_fires_with_its_probability_independently_of_the_others():
    draws = uniforms(0, 0, SHUFFLE_STREAM, np.arange(200_000))
    assert abs((draws[:, BLUR] < 0.2).mean() - 0.2) < 0.005
    assert abs((draws[:, CROP] < 0.5).mean() - 0.5) < 0.005
    both = ((draws[:, BLUR] < 0.2) & (draws[:, GRAY] < 0.1)).mean()
    assert abs(both - 0.02) < 0.002
    assert abs(np.corrcoef(draws.T)[np.triu_indices(DRAWS, 1)]).max() < 0.01


def test_bad_settings_are_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"blur is a probability in \[0, 1\], got 1.5"):
        Augmentation(blur=1.5)
    with pytest.raises(ValueError, match=r"crop_scale is a range \(low, high\) with low <= high, got \(0.9, 0.5\)"):
        Augmentation(crop_scale=(0.9, 0.5))
    with pytest.raises(ValueError, match=r"blur_sigma is a range \(low, high\) of two numbers, got 0.8"):
        Augmentation(blur_sigma=0.8)
    with pytest.raises(ValueError, match=r"blur_sigma \(0.0, 1.0\): both ends must be > 0"):
        Augmentation(blur_sigma=(0.0, 1.0))
    with pytest.raises(ConfigError, match=r"'data.crop_scale'.*both ends must be > 0.0 and <= 1.0"):
        load_config(None, ["--data.crop_scale", "0.5,1.5"])
    with pytest.raises(ConfigError, match=r"--data.hue: expected two numbers LOW,HIGH"):
        load_config(None, ["--data.hue", "20"])
    config = load_config(None, ["--data.blur", "0.2", "--data.blur_sigma", "0.5,1.5"])
    assert config.data.augmentation() == Augmentation(blur=0.2, blur_sigma=(0.5, 1.5))
    assert load_config(None).data.augmentation() == Augmentation()   # the same defaults: every operation off
    assert not Augmentation().active


# ------------------------------------------------------------------------------ in the loader

@pytest.fixture(scope="module")
def noise_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("augment")
    return {"clean": write_noise_set(str(root / "clean"), False), "damaged": write_noise_set(str(root / "damaged"), True)}


def _batches(root, world_size=1, rank=0, workers=0, start_batch=0, augment=True, augmentation=EVERYTHING, **kwargs):
    loader = make_loader(root, BATCH, rank, world_size, workers, seed=5, epoch=1, augment=augment,
                         shuffle_buffer_size=WINDOW, start_batch=start_batch, augmentation=augmentation, **kwargs)
    return [(images.clone(), labels.clone()) for images, labels in loader]


def _by_label(batches) -> dict[int, torch.Tensor]:
    return {int(label): image for images, labels in batches for image, label in zip(images, labels)}


def test_off_leaves_the_loader_untouched(noise_sets, monkeypatch):
    import pfc.data.loader

    plain = _batches(noise_sets["clean"], augmentation=None)
    monkeypatch.setattr(pfc.data.loader, "augment_batch", lambda *args: pytest.fail("augmentation ran while off"))
    for off in (Augmentation(), Augmentation(blur_sigma=(2.0, 3.0), hue=(-90.0, 90.0))):   # all probabilities 0
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                   for a, b in zip(_batches(noise_sets["clean"], augmentation=off), plain))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_each_sample_is_augmented_alike_with_any_worker_count_and_world_size(noise_sets):
    # flips off: they are drawn per worker's window; everything else follows the sample's position
    root = noise_sets["clean"]
    plain = _by_label(_batches(root, augment=False, augmentation=None))
    alone = _by_label(_batches(root, augment=False))
    changed = sum(not torch.equal(alone[label], plain[label]) for label in alone)
    assert changed >= 0.8 * len(alone)
    for world_size, workers in ((1, 2), (2, 0)):
        seen = {}
        for rank in range(world_size):
            seen.update(_by_label(_batches(root, world_size, rank, workers, augment=False)))
        assert len(seen) >= len(alone) - 2 * BATCH
        for label, image in seen.items():
            assert torch.equal(image, alone[label]), (world_size, workers, label)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("data,workers", [("clean", 2), ("damaged", 0)])
def test_a_resumed_loader_yields_the_same_augmented_batches(noise_sets, data, workers):
    root = noise_sets[data]
    full = _batches(root, workers=workers)
    for start in (1, 2 * (WINDOW // BATCH) + 1, len(full) - 1):   # inside a window, a later window, the last batch
        resumed = _batches(root, workers=workers, start_batch=start)
        assert len(resumed) == len(full) - start
        for (images, labels), (want_images, want_labels) in zip(resumed, full[start:]):
            assert torch.equal(labels, want_labels) and torch.equal(images, want_images), start


@pytest.fixture(scope="module")
def pk_set(tmp_path_factory):
    return write_pk_set(str(tmp_path_factory.mktemp("augment_pk") / "shards"))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_pk_batches_are_augmented_alike_with_any_worker_count_and_after_a_resume(pk_set):
    # one grey level per identity: brightness and contrast are the operations that change a grey image
    augmentation = Augmentation(color_jitter=0.7, brightness=(0.5, 1.5), contrast=(0.5, 1.5), blur=0.5)
    options = dict(sampler="pk", pk_k=4, augmentation=augmentation)
    plain = make_loader(pk_set, 8, 0, 1, 0, seed=4, epoch=0, sampler="pk", pk_k=4)
    one = [(images.clone(), labels.clone()) for images, labels in
           make_loader(pk_set, 8, 0, 1, 0, seed=4, epoch=0, **options)]
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(one, plain))
    two = [(images.clone(), labels.clone()) for images, labels in
           make_loader(pk_set, 8, 0, 1, 2, seed=4, epoch=0, **options)]
    resumed = [(images.clone(), labels.clone()) for images, labels in
               make_loader(pk_set, 8, 0, 1, 0, seed=4, epoch=0, start_batch=3, **options)]
    for got in (two, [None] * 3 + resumed):
        assert len(got) == len(one)
        for a, b in zip(got, one):
            assert a is None or (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))
