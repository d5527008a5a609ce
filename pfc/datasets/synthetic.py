"""Procedural face-like identities for demos and tests (no real faces, no downloads).

An identity is a fixed draw of parameters from (seed, identity index): face outline, skin, hair,
eye/brow/nose/mouth geometry and colours, glasses, and a few identity marks (moles). Each sample
of an identity redraws the nuisances: in-plane pose (rotation, scale, shift), a fake yaw that
slides the inner features sideways, expression (mouth, blink), background, lighting direction
and strength, colour cast, blur, sensor noise and an occluding patch. Mean colour alone does not
identify a person (colour casts and lighting move it more than skin tones differ), so verifying
unseen identities needs a learned metric; the geometry is regular enough for a small CNN.

Images are rendered at ``size`` x ``size`` in one vectorised pass per layer (about 1 ms each).
The five landmarks (eye centres, nose tip, mouth corners) of every sample are known exactly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image, ImageFilter

from pfc.datasets.align import TEMPLATE_112
from pfc.errors import ConfigError
from pfc.files import write_atomic

_SKIN = np.array([[235, 200, 170], [220, 175, 140], [190, 140, 105], [150, 105, 75],
                  [110, 75, 55], [240, 210, 190]], dtype=np.float64)
_HAIR = np.array([[30, 25, 20], [70, 50, 30], [120, 85, 50], [200, 170, 110], [140, 60, 30],
                  [90, 90, 90], [220, 220, 215]], dtype=np.float64)
_IRIS = np.array([[60, 40, 25], [90, 120, 160], [70, 110, 70], [40, 30, 20], [120, 100, 60]], dtype=np.float64)


@dataclass(frozen=True)
class Identity:
    """Fixed parameters of one synthetic person, in a canonical 112-pixel face frame."""

    face_center: tuple[float, float]
    face_radii: tuple[float, float]
    chin: float                      # extra downward stretch of the lower face
    skin: np.ndarray                 # RGB 0..255
    hair: np.ndarray
    hair_top: float                  # hairline height (y) at the centre
    hair_wave: tuple[float, float]   # amplitude, frequency of the hairline
    eye_left: tuple[float, float]
    eye_right: tuple[float, float]
    eye_radii: tuple[float, float]
    iris: np.ndarray
    brow_gap: float
    brow_thickness: float
    brow_tilt: float
    nose_tip: tuple[float, float]
    nose_size: tuple[float, float]
    mouth_left: tuple[float, float]
    mouth_right: tuple[float, float]
    lip: np.ndarray
    lip_thickness: float
    smile: float
    glasses: bool
    moles: np.ndarray                # [k, 3]: x, y, radius


def make_identity(seed: int, index: int) -> Identity:
    """The identity ``index`` of generator ``seed`` (different seeds give unrelated identities)."""
    rng = np.random.default_rng([int(seed), int(index), 0x5EED])
    t = TEMPLATE_112
    u = rng.uniform
    eye_dx, eye_dy = u(-5, 5), u(-4, 4)
    eye_y = (t[0, 1] + t[1, 1]) / 2 + eye_dy
    eye_half = (t[1, 0] - t[0, 0]) / 2 + eye_dx
    mouth_y = (t[3, 1] + t[4, 1]) / 2 + u(-4, 5)
    mouth_half = (t[4, 0] - t[3, 0]) / 2 + u(-5, 6)
    skin = _SKIN[rng.integers(len(_SKIN))] + rng.normal(0, 12, 3)
    hair = _HAIR[rng.integers(len(_HAIR))] + rng.normal(0, 10, 3)
    moles = np.stack([u(30, 82, 3), u(55, 100, 3), u(1.0, 2.6, 3)], axis=1)[: rng.integers(0, 4)]
    return Identity(
        face_center=(56 + u(-2, 2), 64 + u(-3, 3)), face_radii=(u(30, 41), u(38, 48)), chin=u(0, 8),
        skin=np.clip(skin, 0, 255), hair=np.clip(hair, 0, 255), hair_top=u(22, 40),
        hair_wave=(u(0, 5), u(0.05, 0.25)),
        eye_left=(56 - eye_half, eye_y), eye_right=(56 + eye_half, eye_y),
        eye_radii=(u(5, 8.5), u(2.5, 4.5)), iris=_IRIS[rng.integers(len(_IRIS))] + rng.normal(0, 10, 3),
        brow_gap=u(6, 12), brow_thickness=u(1.2, 3.5), brow_tilt=u(-0.25, 0.25),
        nose_tip=(56 + u(-2, 2), t[2, 1] + u(-4, 4)), nose_size=(u(4, 8), u(8, 16)),
        mouth_left=(56 - mouth_half, mouth_y), mouth_right=(56 + mouth_half, mouth_y),
        lip=np.clip(skin * u(0.55, 0.8) + np.array([40, 0, 0]), 0, 255), lip_thickness=u(1.5, 4.5),
        smile=u(-3, 5), glasses=bool(rng.random() < 0.2), moles=moles,
    )


def _soft(distance: np.ndarray, edge: float = 0.8) -> np.ndarray:
    """Anti-aliased coverage of the region distance < 0 (distance in pixels)."""
    return np.clip(0.5 - distance / edge, 0.0, 1.0)


class _Canvas:
    """An RGB float canvas whose pixels know their canonical face coordinates (u, v); features
    are drawn only inside the output window that can contain them."""

    def __init__(self, size: int, linear: np.ndarray, offset: np.ndarray):
        self.size = size
        self.linear, self.offset = linear, offset
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
        inverse = np.linalg.inv(linear).astype(np.float32)
        self.u = inverse[0, 0] * (xs - offset[0]) + inverse[0, 1] * (ys - offset[1])
        self.v = inverse[1, 0] * (xs - offset[0]) + inverse[1, 1] * (ys - offset[1])
        self.xs, self.ys = xs, ys
        self.pixels = np.zeros((size, size, 3), dtype=np.float32)
        self.scale = float(np.sqrt(abs(np.linalg.det(linear))))

    def window(self, center, radius: float):
        """Row and column slices covering a canonical disc of ``radius`` around ``center``."""
        x, y = self.linear @ np.asarray(center, dtype=np.float64) + self.offset
        r = radius * self.scale + 2
        rows = slice(max(0, int(y - r)), min(self.size, int(y + r) + 2))
        cols = slice(max(0, int(x - r)), min(self.size, int(x + r) + 2))
        return rows, cols

    def ellipse(self, center, radii, angle: float = 0.0, window=None):
        """(window, coverage) of an ellipse in canonical coordinates."""
        window = window or self.window(center, max(radii) + 1)
        u, v = self.u[window], self.v[window]
        du, dv = u - center[0], v - center[1]
        if angle:
            c, s = np.cos(angle), np.sin(angle)
            du, dv = c * du + s * dv, -s * du + c * dv
        r = np.sqrt((du / radii[0]) ** 2 + (dv / radii[1]) ** 2)
        return window, _soft((r - 1.0) * min(radii) * self.scale)

    def paint(self, window, coverage, colour) -> None:
        if coverage.size == 0:
            return
        region = self.pixels[window]
        region += coverage[..., None] * (np.asarray(colour, dtype=np.float32) - region)


def render_sample(identity: Identity, rng: np.random.Generator, size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 [size, size, 3]) of ``identity`` with random nuisances, and its five
    landmarks ([5, 2], pixel-centre coordinates, template order).

    Layers in order, each drawing its nuisances from ``rng``: pose, background, face (outline,
    hair, marks), eyes and brows, nose, mouth, lighting, then occluder, blur and sensor noise.
    """
    scale_out = size / 112.0
    linear, offset, yaw = _draw_pose(rng, size)
    canvas = _Canvas(size, linear, offset)
    slide = 6.0 * yaw   # fake yaw: inner features slide towards the turned side

    def moved(point, depth=1.0):
        return (point[0] + slide * depth, point[1])

    _paint_background(canvas, rng)
    _paint_face(canvas, identity, yaw, slide)
    _paint_eyes(canvas, identity, rng, yaw, moved)
    _paint_nose(canvas, identity, moved)
    _paint_mouth(canvas, identity, rng, moved)
    _light(canvas, identity, rng)
    image = _degrade(canvas.pixels, rng, size, scale_out)
    canonical = np.array([moved(identity.eye_left), moved(identity.eye_right), moved(identity.nose_tip, 1.4),
                          moved(identity.mouth_left), moved(identity.mouth_right)])
    landmarks = canonical @ linear.T + offset
    return np.ascontiguousarray(image), landmarks


def _draw_pose(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(linear [2, 2], offset [2], yaw in [-1, 1]): the in-plane rotation, scale and shift that
    map canonical 112-frame coordinates to the output's pixels."""
    scale_out = size / 112.0
    angle = rng.normal(0, 0.14)
    scale = rng.uniform(0.88, 1.1) * scale_out
    shift = rng.normal(0, 3.5, 2) * scale_out
    yaw = rng.uniform(-1, 1)
    c, s = np.cos(angle), np.sin(angle)
    linear = scale * np.array([[c, -s], [s, c]])
    offset = np.array([size / 2, size / 2]) + shift - linear @ np.array([56.0, 60.0])
    return linear, offset, yaw


def _paint_background(canvas: _Canvas, rng: np.random.Generator) -> None:
    """A random colour with a gradient, unrelated to identity."""
    size = canvas.size
    direction = rng.normal(size=2)
    ramp = (canvas.xs * direction[0] + canvas.ys * direction[1]) / (size * (np.abs(direction).sum() + 1e-6))
    canvas.pixels[:] = rng.uniform(20, 235, 3)
    canvas.pixels += ramp[..., None] * rng.uniform(-80, 80, 3).astype(np.float32)


def _paint_face(canvas: _Canvas, identity: Identity, yaw: float, slide: float) -> None:
    """Hair, the face outline (narrowed by the yaw), the hairline and the identity marks."""
    u, v, whole = canvas.u, canvas.v, (slice(None), slice(None))
    fx, fy = identity.face_center
    rx, ry = identity.face_radii
    rx_pose = rx * (1 - 0.12 * abs(yaw))
    _, hair = canvas.ellipse((fx, fy - 8), (rx_pose + 4, ry + 2), window=whole)
    canvas.paint(whole, hair * (v < identity.hair_top + 25), identity.hair)
    lower = np.where(v > fy, 1.0 + identity.chin / ry, 1.0)
    face = _soft((np.sqrt(((u - fx) / rx_pose) ** 2 + ((v - fy) / (ry * lower)) ** 2) - 1) * rx_pose * canvas.scale)
    canvas.paint(whole, face, identity.skin)
    hairline = identity.hair_top + identity.hair_wave[0] * np.sin(u * (identity.hair_wave[1] * 2 * np.pi))
    canvas.paint(whole, face * _soft(v - hairline, 2.0), identity.hair)
    for mx, my, mr in identity.moles:
        canvas.paint(*canvas.ellipse((mx + slide * 0.5, my), (mr, mr)), identity.skin * 0.45)


def _paint_eyes(canvas: _Canvas, identity: Identity, rng: np.random.Generator, yaw: float, moved) -> None:
    """Both eyes (white, iris, pupil; a random blink), the brows and the glasses if any."""
    blink = rng.uniform(0.35, 1.15)
    eye_rx, eye_ry = identity.eye_radii
    for eye, side in ((identity.eye_left, -1), (identity.eye_right, 1)):
        ex, ey = moved(eye)
        squeeze = 1 - 0.15 * yaw * side
        area = canvas.window((ex, ey), eye_rx + 7)
        _, white = canvas.ellipse((ex, ey), (eye_rx * squeeze, eye_ry * blink), window=area)
        canvas.paint(area, white, (245, 245, 240))
        canvas.paint(area, canvas.ellipse((ex, ey), (eye_ry * 0.95, eye_ry * 0.95), window=area)[1] * white,
                     identity.iris)
        canvas.paint(area, canvas.ellipse((ex, ey), (eye_ry * 0.4, eye_ry * 0.4), window=area)[1] * white,
                     (10, 10, 10))
        brow_y = ey - eye_ry - identity.brow_gap
        canvas.paint(*canvas.ellipse((ex, brow_y), (eye_rx * 1.3, identity.brow_thickness),
                                     angle=identity.brow_tilt * side), identity.hair * 0.8)
        if identity.glasses:
            outer = canvas.ellipse((ex, ey), (eye_rx + 5, eye_rx + 3), window=area)[1]
            inner = canvas.ellipse((ex, ey), (eye_rx + 3.8, eye_rx + 1.8), window=area)[1]
            canvas.paint(area, np.clip(outer - inner, 0, 1), (25, 25, 30))


def _paint_nose(canvas: _Canvas, identity: Identity, moved) -> None:
    """The nose ridge and both nostrils (the tip slides further with the yaw: it stands out)."""
    nx, ny = moved(identity.nose_tip, 1.4)
    nw, nh = identity.nose_size
    canvas.paint(*canvas.ellipse((nx, ny - nh / 2), (nw * 0.55, nh / 2)), identity.skin * 0.82)
    canvas.paint(*canvas.ellipse((nx - nw * 0.45, ny), (nw * 0.3, nw * 0.2)), identity.skin * 0.45)
    canvas.paint(*canvas.ellipse((nx + nw * 0.45, ny), (nw * 0.3, nw * 0.2)), identity.skin * 0.45)


def _paint_mouth(canvas: _Canvas, identity: Identity, rng: np.random.Generator, moved) -> None:
    """Lips along a parabola through the mouth corners (a random smile), open at random."""
    left, right = moved(identity.mouth_left), moved(identity.mouth_right)
    mouth_cx, mouth_cy = (left[0] + right[0]) / 2, (left[1] + right[1]) / 2
    half = (right[0] - left[0]) / 2
    smile = identity.smile + rng.normal(0, 1.5)
    opening = max(0.0, rng.normal(0, 1.5))
    area = canvas.window((mouth_cx, mouth_cy), half + abs(smile) + 10)
    mu, mv = canvas.u[area], canvas.v[area]
    t = np.clip((mu - mouth_cx) / half, -1, 1)
    centre_line = mouth_cy + smile * (1 - t ** 2)
    inside = _soft((np.abs(mu - mouth_cx) - half) * canvas.scale, 1.0)
    canvas.paint(area, inside * _soft((np.abs(mv - centre_line) - identity.lip_thickness - opening) * canvas.scale, 1.0),
                 identity.lip)
    if opening > 0.5:
        canvas.paint(area, inside * _soft((np.abs(mv - centre_line) - opening * 0.8) * canvas.scale, 1.0), (60, 20, 25))


def _light(canvas: _Canvas, identity: Identity, rng: np.random.Generator) -> None:
    """Directional shading over the face, global gain, colour cast, contrast (in place)."""
    fx, fy = identity.face_center
    pixels = canvas.pixels
    light = rng.normal(size=2)
    light /= np.linalg.norm(light) + 1e-9
    shade = 1.0 + rng.uniform(0, 0.5) * ((canvas.u - fx) * light[0] + (canvas.v - fy) * light[1]) / 60.0
    pixels *= shade[..., None]
    pixels *= (rng.uniform(0.6, 1.35) * rng.uniform(0.8, 1.2, 3)).astype(np.float32)
    contrast = rng.uniform(0.7, 1.2)
    mean = pixels.mean()
    pixels -= mean
    pixels *= contrast
    pixels += mean


def _degrade(pixels: np.ndarray, rng: np.random.Generator, size: int, scale_out: float) -> np.ndarray:
    """uint8 image of the float ``pixels`` after a random occluder, blur and sensor noise."""
    if rng.random() < 0.3:   # occluder: a random block, never the whole face
        w, h = rng.uniform(0.15, 0.45, 2) * size
        x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
        pixels[int(y0):int(y0 + h), int(x0):int(x0 + w)] = rng.uniform(0, 255, 3)
    image = np.clip(pixels, 0, 255).astype(np.uint8)
    sigma = rng.uniform(0, 1.6) * scale_out
    if sigma > 0.3:
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)))
    noise = rng.uniform(0, 10)
    if noise > 1:
        noisy = image + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(noise)
        image = np.clip(noisy, 0, 255).astype(np.uint8)
    return image


def class_name(seed: int, index: int) -> str:
    """Folder name of identity ``index`` of generator ``seed`` (names never collide across seeds)."""
    return f"s{seed}_id{index:05d}"


def write_synthetic(out_dir: str, ids: int, per: int, seed: int, pairs: int = 0, landmarks: bool = False,
                    size: int = 112, quality: int = 95) -> dict:
    """Write ``out_dir/<class>/<i>.jpg`` for ``ids`` identities x ``per`` samples.

    With ``pairs`` > 0 also ``out_dir/pairs.txt``: ``pairs`` lines ``relpath1 relpath2 1|0``, the
    first half same-identity pairs (needs ``per`` >= 2), the rest different-identity pairs (needs
    ``ids`` >= 2), interleaved. With ``landmarks``, ``out_dir/landmarks.csv``:
    ``relpath,x1,y1,...,x5,y5`` per image. Returns counts. Deterministic in (ids, per, seed).
    ConfigError for counts that cannot be written.
    """
    if ids < 1 or per < 1:
        raise ConfigError(f"need at least one identity and one image each, got ids={ids} per={per}")
    if pairs < 0:
        raise ConfigError(f"pairs must be >= 0, got {pairs}")
    if pairs and (per < 2 or ids < 2):
        raise ConfigError("pairs need at least 2 identities and 2 images per identity")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for index in range(ids):
        identity = make_identity(seed, index)
        folder = os.path.join(out_dir, class_name(seed, index))
        os.makedirs(folder, exist_ok=True)
        rng = np.random.default_rng([int(seed), int(index), 0x5A3])
        for sample in range(per):
            image, points = render_sample(identity, rng, size)
            relpath = f"{class_name(seed, index)}/{sample}.jpg"
            with open(os.path.join(out_dir, relpath), "wb") as stream:
                stream.write(simplejpeg.encode_jpeg(image, quality=quality, colorspace="RGB"))
            if landmarks:
                rows.append(relpath + "," + ",".join(f"{value:.3f}" for value in points.ravel()))
    if landmarks:
        _write_text(os.path.join(out_dir, "landmarks.csv"), rows)
    if pairs:
        rng = np.random.default_rng([int(seed), 0xFA1125])
        lines = []
        for number in range(pairs):
            if number % 2 == 0:
                who = int(rng.integers(ids))
                first, second = rng.choice(per, size=2, replace=False)
                lines.append(f"{class_name(seed, who)}/{first}.jpg {class_name(seed, who)}/{second}.jpg 1")
            else:
                one, two = rng.choice(ids, size=2, replace=False)
                lines.append(f"{class_name(seed, one)}/{rng.integers(per)}.jpg "
                             f"{class_name(seed, two)}/{rng.integers(per)}.jpg 0")
        _write_text(os.path.join(out_dir, "pairs.txt"), lines)
    return {"identities": ids, "images": ids * per, "pairs": pairs}


def _write_text(path: str, lines: list[str]) -> None:
    write_atomic(path, "".join(line + "\n" for line in lines))
