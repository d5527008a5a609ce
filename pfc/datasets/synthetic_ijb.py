"""A small IJB-B/C-format root of synthetic faces (insightface's layout), for demos and tests.

    info = write_synthetic_ijb(root, target="IJBC", subjects=6, seed=0)

Each face is a procedural face (:mod:`pfc.datasets.synthetic`) rendered aligned at 112 × 112 and
moved into a larger loose crop by a known similarity transform (scale 1.3–2, rotation up to
±0.35 rad, random shift; bilinear, grey outside); its five landmarks are moved by the same
transform, so aligning the crop inverts it. ``info["transforms"][i]`` is face i's 2 × 3 matrix
(aligned pixel → loose-crop pixel, pixel centres at integers).

Per subject (half of them in the first gallery, half in the second), with sparse large template,
media and subject ids in shuffled file order:
* a gallery template of several single-face media;
* a probe template of one face;
* a probe template of a multi-frame media (three frames) plus a single-face media whose media id
  also appears in another subject's gallery template (media pool per template).
Detector scores are drawn from [0.1, 1.0]. Pairs: every gallery template against every probe
template (mated when the subject is the same), in shuffled order.
"""
from __future__ import annotations

import os

import numpy as np
import simplejpeg
from PIL import Image

from pfc.datasets.synthetic import make_identity, render_sample
from pfc.errors import ConfigError
from pfc.evaluation.ijb.meta import GALLERIES
from pfc.files import write_atomic


def write_synthetic_ijb(root: str, target: str = "IJBC", subjects: int = 6, seed: int = 0,
                        identification: bool = True, quality: int = 95) -> dict:
    """Write ``root/meta/*`` and ``root/loose_crop/*.jpg`` (module docstring); returns counts and
    the per-face ``transforms``. Deterministic in (target, subjects, seed)."""
    if target not in GALLERIES:
        raise ConfigError(f"IJB target {target!r} is not one of {', '.join(GALLERIES)}")
    if subjects < 2:
        raise ConfigError(f"need at least 2 subjects (one per gallery), got {subjects}")
    rng = np.random.default_rng([int(seed), 0x1B])
    subject_ids = 1000 + np.sort(rng.choice(90_000, subjects, replace=False))
    template_ids = rng.choice(np.arange(1, 200_000), 3 * subjects, replace=False)
    media_ids = rng.choice(np.arange(1, 500_000), 5 * subjects, replace=False)
    templates = []   # (template id, subject, role, [media id per face])
    for s in range(subjects):
        gallery, probe_one, probe_video = template_ids[3 * s: 3 * s + 3]
        m = media_ids[5 * s: 5 * s + 5]
        shared_media = media_ids[5 * ((s + 1) % subjects)]          # a media id of the next subject's gallery
        templates.append((gallery, s, "gallery", [m[0], m[1], m[2]]))
        templates.append((probe_one, s, "probe", [m[3]]))
        templates.append((probe_video, s, "probe", [m[4], m[4], m[4], shared_media]))
    rng.shuffle(templates)
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    os.makedirs(os.path.join(root, "loose_crop"), exist_ok=True)
    prefix = target.lower()
    point_lines, template_lines, transforms = [], [], []
    images_of = {}
    face = 0
    for template_id, subject, _, medias in templates:
        identity = make_identity(seed, int(subject_ids[subject]))
        for media in medias:
            face += 1
            name = f"{face}.jpg"
            aligned, points = render_sample(identity, rng)
            crop, matrix = _loosen(aligned, rng)
            with open(os.path.join(root, "loose_crop", name), "wb") as stream:
                stream.write(simplejpeg.encode_jpeg(crop, quality=quality, colorspace="RGB"))
            moved = points @ matrix[:, :2].T + matrix[:, 2]
            score = rng.uniform(0.1, 1.0)
            point_lines.append(" ".join([name, *(f"{v:.3f}" for v in moved.ravel()), f"{score:.3f}"]))
            template_lines.append(f"{name} {template_id} {media}")
            transforms.append(matrix)
            images_of.setdefault(template_id, []).append(name)
    pairs = [(g, p, int(gs == ps)) for g, gs, grole, _ in templates if grole == "gallery"
             for p, ps, prole, _ in templates if prole == "probe"]
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    _write_lines(root, f"{prefix}_name_5pts_score.txt", point_lines)
    _write_lines(root, f"{prefix}_face_tid_mid.txt", template_lines)
    _write_lines(root, f"{prefix}_template_pair_label.txt", [f"{a} {b} {label}" for a, b, label in pairs])
    if identification:
        first_gallery = set(range((subjects + 1) // 2))
        for index, gallery in enumerate(GALLERIES[target]):
            rows = [(t, s) for t, s, role, _ in templates
                    if role == "gallery" and (s in first_gallery) == (index == 0)]
            _write_search_csv(root, f"{prefix}_1N_gallery_{gallery}.csv", rows, subject_ids, images_of)
        probes = [(t, s) for t, s, role, _ in templates if role == "probe"]
        _write_search_csv(root, f"{prefix}_1N_probe_mixed.csv", probes, subject_ids, images_of)
    return {"faces": face, "templates": len(templates), "pairs": len(pairs), "subjects": subjects,
            "transforms": np.stack(transforms)}


def _loosen(aligned: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The aligned face moved into a larger canvas by a random similarity: (crop, 2 × 3 matrix)."""
    scale, angle = rng.uniform(1.3, 2.0), rng.uniform(-0.35, 0.35)
    width, height = int(rng.integers(200, 260)), int(rng.integers(200, 280))
    linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.array([width / 2, height / 2]) + rng.uniform(-15, 15, 2)
    matrix = np.empty((2, 3))
    matrix[:, :2] = linear
    matrix[:, 2] = centre - linear @ np.array([55.5, 55.5])
    inverse = np.linalg.inv(linear)
    shift = -inverse @ matrix[:, 2]
    half = np.array([0.5, 0.5])        # PIL samples at pixel centres (j + 0.5, i + 0.5)
    shift_pil = shift + half - inverse @ half
    coefficients = (inverse[0, 0], inverse[0, 1], shift_pil[0], inverse[1, 0], inverse[1, 1], shift_pil[1])
    crop = Image.fromarray(aligned).transform((width, height), Image.Transform.AFFINE, coefficients,
                                              resample=Image.Resampling.BILINEAR, fillcolor=(128, 128, 128))
    return np.ascontiguousarray(np.asarray(crop)), matrix


def _write_search_csv(root: str, name: str, rows, subject_ids: np.ndarray, images_of: dict) -> None:
    lines = ["TEMPLATE_ID,SUBJECT_ID,FILENAME"]
    for template_id, subject in rows:
        lines += [f"{template_id},{subject_ids[subject]},img/{image}" for image in images_of[template_id]]
    _write_lines(root, name, lines)


def _write_lines(root: str, name: str, lines: list[str]) -> None:
    write_atomic(os.path.join(root, "meta", name), "".join(line + "\n" for line in lines))
