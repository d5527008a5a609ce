"""Face verification with the insightface protocol, so numbers compare with published ones.

    pairs = read_bin("lfw.bin")                       # or read_pairs("pairs.txt", root)
    result = evaluate(backbone, pairs)                # VerificationResult (pfc.evaluation.roc)
    result.summary()  → {"accuracy": …, "accuracy_std": …, "tar@far=1e-3": …, …}

This module holds the pair sets and the embeddings: embedding e = normalize(f(img) + f(flip(img))),
flip = horizontal, images as float in [−1, 1] like the training data. The metrics (10 folds,
thresholds, TAR at FAR) are :mod:`pfc.evaluation.roc`. A set that cannot be read (missing file,
malformed pairs list, a .bin carrying anything but images and flags, an undecodable image) raises
:class:`pfc.errors.DataError` naming it.
"""
from __future__ import annotations

import io
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from pfc.errors import CheckpointError, DataError
from pfc.evaluation.roc import NUM_FOLDS, VerificationResult, verification_metrics


# --------------------------------------------------------------------------------- pair sets

@dataclass
class VerificationSet:
    """A list of 2N images (encoded bytes, a file path, or a uint8 HWC array) and N is-same flags.

    Pair i is ``(images[2i], images[2i+1])`` with label ``issame[i]``. ``source`` (the file it was
    read from) and ``pair_lines`` (a pairs list's line of each pair) serve error messages.
    """

    name: str
    images: list
    issame: np.ndarray
    source: str = ""
    pair_lines: list | None = field(default=None, repr=False)

    def __post_init__(self):
        self.issame = np.asarray(self.issame, dtype=bool)
        if len(self.images) != 2 * len(self.issame):
            raise DataError(f"verification set {self.name!r}: {len(self.images)} images for "
                            f"{len(self.issame)} pairs (need exactly 2 per pair)")
        if len(self.issame) < NUM_FOLDS:
            raise DataError(f"verification set {self.name!r} has {len(self.issame)} pairs; "
                            f"the 10-fold protocol needs at least {NUM_FOLDS}")

    @property
    def num_pairs(self) -> int:
        return len(self.issame)


class _BinUnpickler(pickle.Unpickler):
    """Unpickler that builds only containers, bytes, bools and plain numpy arrays.

    Lists, tuples, bytes, str, bools and ints are pickle opcodes and never reach ``find_class``;
    the globals below are what Python-3 (``_codecs.encode`` for bytes at protocol ≤ 2) and numpy
    (``ndarray`` reconstruction) need. Any other global (``os.system``, ``builtins.eval`` …) is refused.
    The check is on exact (module, name) pairs, so a dotted name (``numpy.os.system``, which
    ``find_class`` would resolve attribute by attribute under protocol ≥ 4) never matches.
    """

    ALLOWED_GLOBALS = {
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")  # Python-2 str → bytes
        self.source = source

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED_GLOBALS:
            raise DataError(f"{self.source}: refusing to unpickle global '{module}.{name}': a "
                            "verification .bin may only contain images (bytes) and is-same bools")
        return super().find_class(module, name)


def read_bin(path: str) -> VerificationSet:
    """Read an insightface verification ``.bin`` (pickle of ``(list of 2N encoded images, N bools)``).

    Uses a restricted unpickler (see ``_BinUnpickler``); a file carrying any other object raises
    DataError naming it. Python-2 pickles are read with ``encoding='bytes'``.
    """
    if not os.path.isfile(path):
        raise DataError(f"verification set {path} does not exist")
    try:
        with open(path, "rb") as handle:
            data = _BinUnpickler(handle, path).load()
    except (pickle.UnpicklingError, EOFError, OSError) as exc:
        raise DataError(f"{path}: not a readable verification .bin pickle ({exc})") from exc
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise DataError(f"{path}: expected a pickle of (images, issame), got {type(data).__name__}")
    images, issame = data
    images = list(images)
    for index, image in enumerate(images):
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                raise DataError(f"{path}: image {index} is a {image.dtype} array, expected encoded bytes")
            images[index] = image.tobytes()
        elif not isinstance(image, (bytes, bytearray)):
            raise DataError(f"{path}: image {index} is {type(image).__name__}, expected encoded bytes")
    flags = np.asarray(issame)
    if flags.dtype != bool and not (flags.dtype.kind in "iu" and set(np.unique(flags)) <= {0, 1}):
        raise DataError(f"{path}: is-same list must hold booleans, got dtype {flags.dtype}")
    name = os.path.splitext(os.path.basename(path))[0]
    return VerificationSet(name, images, flags.astype(bool), source=path)


def read_pairs(pairs_file: str, root: str | None = None) -> VerificationSet:
    """Read a pairs list: one ``path1 path2 1|0`` per line, paths relative to ``root``.

    ``root`` defaults to the list's folder. Blank lines and ``#`` comments are skipped.
    Raises DataError naming the line of a malformed entry or the first missing image.
    """
    if not os.path.isfile(pairs_file):
        raise DataError(f"pairs list {pairs_file} does not exist")
    root = os.path.dirname(os.path.abspath(pairs_file)) if root is None else root
    images, issame, lines = [], [], []
    with open(pairs_file, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            parts = text.split()
            if len(parts) != 3 or parts[2] not in ("0", "1"):
                raise DataError(f"{pairs_file}:{line_number}: expected 'path1 path2 1|0', got {text!r}")
            for relative in parts[:2]:
                path = os.path.join(root, relative)
                if not os.path.isfile(path):
                    raise DataError(f"{pairs_file}:{line_number}: image {path} does not exist")
                images.append(path)
            issame.append(parts[2] == "1")
            lines.append(line_number)
    name = os.path.splitext(os.path.basename(pairs_file))[0]
    return VerificationSet(name, images, np.array(issame, dtype=bool), source=pairs_file, pair_lines=lines)


def check_decodes(pairs: VerificationSet, image_size: int, workers: int = 8) -> None:
    """Decode every image of ``pairs`` once (in ``workers`` threads: decoding releases the GIL),
    so that a damaged image fails when the set is loaded, not in the verification after training.
    DataError naming the set's file, the pair (and its line in a pairs list) and the image."""
    def decode(number: int) -> None:
        try:
            load_image(pairs.images[number], image_size)
        except DataError as exc:
            pair = number // 2
            line = f", line {pairs.pair_lines[pair]}" if pairs.pair_lines else ""
            item = "" if isinstance(pairs.images[number], (str, os.PathLike)) else f"item {number}: "
            raise DataError(f"verification set {pairs.source or pairs.name}, pair {pair}{line}: {item}{exc}") from exc

    with ThreadPoolExecutor(max(1, min(workers, os.cpu_count() or 1))) as pool:
        for _ in pool.map(decode, range(len(pairs.images))):  # the first failure (in order) is raised
            pass


# --------------------------------------------------------------------------------- embeddings

def load_image(item, image_size: int) -> np.ndarray:
    """Decode one item (bytes, path, or uint8 HWC array) to uint8 RGB ``[image_size, image_size, 3]``;
    DataError when it does not decode."""
    if isinstance(item, np.ndarray):
        image = Image.fromarray(item)
    else:
        try:
            image = Image.open(io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else item)
            image.load()
        except (UnidentifiedImageError, OSError) as exc:
            where = f"image {item}" if isinstance(item, (str, os.PathLike)) else "an encoded image"
            raise DataError(f"{where} does not decode ({exc})") from exc
    image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def to_tensor(batch: np.ndarray) -> torch.Tensor:
    """uint8 ``[b,H,W,3]`` → float32 ``[b,3,H,W]`` in [−1, 1] (x/127.5 − 1, as the training data)."""
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


@torch.no_grad()
def embed_images(backbone: torch.nn.Module, images: list, image_size: int = 112,
                 batch_size: int = 64, device: torch.device | str | None = None) -> np.ndarray:
    """Flip-averaged normalised embeddings: ``normalize(f(x) + f(flip(x)))``, float32 ``[len(images), D]``.

    The backbone is run in eval mode (restored afterwards) on ``device`` (default: its parameters'),
    the images in its parameters' dtype (a DeepSpeed bf16 engine holds bf16 weights).
    """
    parameter = next(backbone.parameters())
    device = parameter.device if device is None else device
    dtype = parameter.dtype if parameter.is_floating_point() else torch.float32  # a bf16 engine's weights
    was_training = backbone.training
    backbone.eval()
    outputs = []
    try:
        for start in range(0, len(images), batch_size):
            batch = np.stack([load_image(item, image_size) for item in images[start:start + batch_size]])
            x = to_tensor(batch).to(device=device, dtype=dtype)
            features = backbone(x).float() + backbone(torch.flip(x, dims=[3])).float()
            outputs.append(F.normalize(features, dim=1).cpu().numpy())
    finally:
        backbone.train(was_training)
    return np.concatenate(outputs, axis=0)


def evaluate(backbone: torch.nn.Module, pairs: VerificationSet, image_size: int = 112,
             batch_size: int = 64, device=None, require_finite: bool = False) -> VerificationResult:
    """Embed every image of ``pairs`` (flip-averaged, normalised) and apply :func:`verification_metrics`.
    ``require_finite``: CheckpointError when an embedding holds inf/NaN (metrics of such
    embeddings look plausible, e.g. accuracy 0.5, but mean nothing)."""
    embeddings = embed_images(backbone, pairs.images, image_size, batch_size, device)
    if require_finite:
        bad = int((~np.isfinite(embeddings).all(axis=1)).sum())
        if bad:
            raise CheckpointError(f"the backbone gives inf/NaN embeddings for {bad} of {len(embeddings)} "
                                  f"images of {pairs.name}")
    return verification_metrics(embeddings[0::2], embeddings[1::2], pairs.issame, name=pairs.name)
