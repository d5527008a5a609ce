"""Small faces on disk for the extraction and embedding tests: a tiny backbone file, aligned images
and loose crops with their landmarks (made by known similarity transforms of aligned faces)."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from pfc.evaluation.alignment import ARCFACE_TEMPLATE, warp_affine

SIZE = 32          # the tiny backbone's input side
DIM = 8            # its embedding size


def save_tiny_backbone(path: str, seed: int = 0) -> str:
    """A tiny backbone.pt (input 32, embedding 8) with fixed random weights."""
    from pfc.backbones import build_backbone
    from pfc.evaluation.export import save_backbone

    torch.manual_seed(seed)
    model = build_backbone("tiny", DIM, 0.0, SIZE).eval()
    save_backbone(model, path, network="tiny", embedding_size=DIM, image_size=SIZE)
    return path


def face_image(seed: int, size: int = SIZE) -> np.ndarray:
    """A smooth, seed-dependent RGB image ``size`` x ``size``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    a, b, c = rng.uniform(1, 4, 3)
    channels = [127 + 110 * np.sin(a * x + b * y + phase) * np.cos(c * x - y) for phase in rng.uniform(0, 3, 3)]
    return np.clip(np.rint(np.stack(channels, -1)), 0, 255).astype(np.uint8)


def loose_crop(aligned: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a larger image holding ``aligned`` under a known similarity, the landmarks there)."""
    rng = np.random.default_rng(seed)
    scale, angle = rng.uniform(1.3, 2.0), rng.uniform(-0.3, 0.3)
    linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = np.concatenate([linear, (rng.uniform(20, 30, 2))[:, None]], axis=1)
    landmarks = (ARCFACE_TEMPLATE * len(aligned) / 112) @ linear.T + matrix[:, 2]
    return warp_affine(aligned, matrix, 3 * len(aligned)), landmarks


def write_faces(folder: str, count: int, *, loose_every: int = 0,
                extension: str = "png") -> list[tuple[str, np.ndarray | None]]:
    """``count`` images under ``folder`` (lossless by default, so tests can decode them exactly):
    ``(path, landmarks or None)``; every ``loose_every``-th one a loose crop with landmarks."""
    os.makedirs(folder, exist_ok=True)
    written = []
    for index in range(count):
        image, landmarks = face_image(index), None
        if loose_every and index % loose_every == loose_every - 1:
            image, landmarks = loose_crop(image, index)
        path = os.path.join(folder, f"face{index:03d}.{extension}")
        Image.fromarray(image).save(path)
        written.append((path, landmarks))
    return written
