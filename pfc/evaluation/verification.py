"""Face verification with the insightface protocol, so numbers compare with published ones.

    pairs = read_bin("lfw.bin")                       # or read_pairs("pairs.txt", root)
    result = evaluate(backbone, pairs)                # VerificationResult
    result.summary()  → {"accuracy": …, "accuracy_std": …, "tar@far=1e-3": …, …}

Protocol (identical to insightface's verification):
  * embedding e = normalize(f(img) + f(flip(img))), flip = horizontal;
  * score of a pair = squared L2 distance ‖e1 − e2‖² ∈ [0, 4]; predicted "same" when score < t;
  * thresholds t = 0, 0.01, …, 3.99; the pairs are split into 10 contiguous folds (no shuffle, the
    first n mod 10 folds one pair longer); for each fold the threshold with the best accuracy on
    the other nine is applied to it; accuracy = mean ± std over the folds;
  * TAR at FAR 1e-3 / 1e-4 from the exact ROC over all pairs: the largest fraction of genuine
    pairs accepted by a threshold that accepts at most FAR·#impostor impostor pairs.
"""
from __future__ import annotations

import io
import math
import os
import pickle
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

THRESHOLDS = np.arange(0.0, 4.0, 0.01)
NUM_FOLDS = 10
FAR_TARGETS = (1e-3, 1e-4)


# --------------------------------------------------------------------------------- pair sets

@dataclass
class VerificationSet:
    """A list of 2N images (encoded bytes, a file path, or a uint8 HWC array) and N is-same flags.

    Pair i is ``(images[2i], images[2i+1])`` with label ``issame[i]``.
    """

    name: str
    images: list
    issame: np.ndarray

    def __post_init__(self):
        self.issame = np.asarray(self.issame, dtype=bool)
        if len(self.images) != 2 * len(self.issame):
            raise ValueError(f"verification set {self.name!r}: {len(self.images)} images for "
                             f"{len(self.issame)} pairs (need exactly 2 per pair)")
        if len(self.issame) < NUM_FOLDS:
            raise ValueError(f"verification set {self.name!r} has {len(self.issame)} pairs; "
                             f"the 10-fold protocol needs at least {NUM_FOLDS}")

    @property
    def num_pairs(self) -> int:
        return len(self.issame)


class _BinUnpickler(pickle.Unpickler):
    """Unpickler that builds only containers, bytes, bools and plain numpy arrays.

    Lists, tuples, bytes, str, bools and ints are pickle opcodes and never reach ``find_class``;
    the globals below are what Python-3 (``_codecs.encode`` for bytes at protocol ≤ 2) and numpy
    (``ndarray`` reconstruction) need. Any other global (``os.system``, ``builtins.eval`` …) is refused.
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
            raise ValueError(f"{self.source}: refusing to unpickle global '{module}.{name}': a "
                             "verification .bin may only contain images (bytes) and is-same bools")
        return super().find_class(module, name)


def read_bin(path: str) -> VerificationSet:
    """Read an insightface verification ``.bin`` (pickle of ``(list of 2N encoded images, N bools)``).

    Uses a restricted unpickler (see ``_BinUnpickler``); a file carrying any other object raises
    ValueError naming it. Python-2 pickles are read with ``encoding='bytes'``.
    """
    try:
        with open(path, "rb") as handle:
            data = _BinUnpickler(handle, path).load()
    except (pickle.UnpicklingError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable verification .bin pickle ({exc})") from exc
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise ValueError(f"{path}: expected a pickle of (images, issame), got {type(data).__name__}")
    images, issame = data
    images = list(images)
    for index, image in enumerate(images):
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                raise ValueError(f"{path}: image {index} is a {image.dtype} array, expected encoded bytes")
            images[index] = image.tobytes()
        elif not isinstance(image, (bytes, bytearray)):
            raise ValueError(f"{path}: image {index} is {type(image).__name__}, expected encoded bytes")
    flags = np.asarray(issame)
    if flags.dtype != bool and not (flags.dtype.kind in "iu" and set(np.unique(flags)) <= {0, 1}):
        raise ValueError(f"{path}: is-same list must hold booleans, got dtype {flags.dtype}")
    name = os.path.splitext(os.path.basename(path))[0]
    return VerificationSet(name, images, flags.astype(bool))


def read_pairs(pairs_file: str, root: str | None = None) -> VerificationSet:
    """Read a pairs list: one ``path1 path2 1|0`` per line, paths relative to ``root``.

    ``root`` defaults to the list's folder. Blank lines and ``#`` comments are skipped.
    Raises ValueError naming the line of a malformed entry or the first missing image.
    """
    root = os.path.dirname(os.path.abspath(pairs_file)) if root is None else root
    images, issame = [], []
    with open(pairs_file, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            parts = text.split()
            if len(parts) != 3 or parts[2] not in ("0", "1"):
                raise ValueError(f"{pairs_file}:{line_number}: expected 'path1 path2 1|0', got {text!r}")
            for relative in parts[:2]:
                path = os.path.join(root, relative)
                if not os.path.isfile(path):
                    raise ValueError(f"{pairs_file}:{line_number}: image {path} does not exist")
                images.append(path)
            issame.append(parts[2] == "1")
    name = os.path.splitext(os.path.basename(pairs_file))[0]
    return VerificationSet(name, images, np.array(issame, dtype=bool))


# --------------------------------------------------------------------------------- embeddings

def load_image(item, image_size: int) -> np.ndarray:
    """Decode one item (bytes, path, or uint8 HWC array) to uint8 RGB ``[image_size, image_size, 3]``."""
    if isinstance(item, np.ndarray):
        image = Image.fromarray(item)
    elif isinstance(item, (bytes, bytearray)):
        image = Image.open(io.BytesIO(item))
    else:
        image = Image.open(item)
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

    The backbone is run in eval mode (restored afterwards) on ``device`` (default: its parameters').
    """
    if device is None:
        device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    outputs = []
    try:
        for start in range(0, len(images), batch_size):
            batch = np.stack([load_image(item, image_size) for item in images[start:start + batch_size]])
            x = to_tensor(batch).to(device)
            features = backbone(x).float() + backbone(torch.flip(x, dims=[3])).float()
            outputs.append(F.normalize(features, dim=1).cpu().numpy())
    finally:
        backbone.train(was_training)
    return np.concatenate(outputs, axis=0)


# --------------------------------------------------------------------------------- metrics

def fold_slices(num_items: int, num_folds: int = NUM_FOLDS) -> list[slice]:
    """Contiguous folds, no shuffle; the first ``num_items % num_folds`` folds one item longer."""
    base, extra = divmod(num_items, num_folds)
    slices, start = [], 0
    for fold in range(num_folds):
        stop = start + base + (1 if fold < extra else 0)
        slices.append(slice(start, stop))
        start = stop
    return slices


def _accuracy_per_threshold(distances: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy of "same ⇔ distance < t" for every t: ``[len(thresholds)]``."""
    predicted_same = distances[None, :] < thresholds[:, None]
    return (predicted_same == issame[None, :]).mean(axis=1)


def roc_curve(distances: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC of the rule "same ⇔ distance ≤ t" over every distinct distance.

    Returns ``(far, tar, thresholds)``, starting at (0, 0) with t = −inf and ending at (1, 1).
    """
    order = np.argsort(distances, kind="mergesort")
    sorted_distances = distances[order]
    sorted_same = issame[order]
    genuine_accepted = np.cumsum(sorted_same)
    impostor_accepted = np.cumsum(~sorted_same)
    # keep only the last index of each run of equal distances (a threshold accepts all of them)
    last_of_run = np.r_[sorted_distances[1:] != sorted_distances[:-1], True]
    num_genuine = max(int(issame.sum()), 1)
    num_impostor = max(int((~issame).sum()), 1)
    tar = np.r_[0.0, genuine_accepted[last_of_run] / num_genuine]
    far = np.r_[0.0, impostor_accepted[last_of_run] / num_impostor]
    return far, tar, np.r_[-np.inf, sorted_distances[last_of_run]]


def tar_at_far(far: np.ndarray, tar: np.ndarray, far_target: float) -> float:
    """Largest TAR among ROC points with FAR ≤ ``far_target``."""
    return float(tar[far <= far_target + 1e-12].max())


@dataclass
class VerificationResult:
    """Outcome of the protocol; ``summary()`` is the JSON-ready part."""

    name: str
    num_pairs: int
    accuracy: float
    accuracy_std: float
    best_threshold: float
    fold_accuracies: list
    tar_at_far: dict
    auc: float
    far: np.ndarray = field(repr=False)
    tar: np.ndarray = field(repr=False)

    def summary(self) -> dict:
        """Flat dict: accuracy, accuracy_std, threshold, tar@far=1e-3, tar@far=1e-4, auc, num_pairs."""
        out = {"set": self.name, "num_pairs": self.num_pairs, "accuracy": self.accuracy,
               "accuracy_std": self.accuracy_std, "threshold": self.best_threshold, "auc": self.auc}
        for far_target, value in self.tar_at_far.items():
            out[f"tar@far={far_target:.0e}".replace("e-0", "e-")] = value
        return out


def verification_metrics(embeddings1: np.ndarray, embeddings2: np.ndarray, issame: np.ndarray,
                         name: str = "pairs", thresholds: np.ndarray = THRESHOLDS,
                         num_folds: int = NUM_FOLDS) -> VerificationResult:
    """Metrics of the protocol from already-normalised pair embeddings ``[N, D]`` and flags ``[N]``.

    distance_i = ‖e1_i − e2_i‖²; per fold k: t_k = argmax_t acc(train folds, t) (first maximum),
    acc_k = acc(fold k, t_k); accuracy = mean_k acc_k, std over k (population std, as numpy).
    """
    issame = np.asarray(issame, dtype=bool)
    distances = np.sum((np.asarray(embeddings1, np.float64) - np.asarray(embeddings2, np.float64)) ** 2, axis=1)
    if len(distances) < num_folds:
        raise ValueError(f"{len(distances)} pairs is fewer than the {num_folds} folds")
    fold_accuracies, fold_thresholds = [], []
    all_indices = np.arange(len(distances))
    for test in fold_slices(len(distances), num_folds):
        train_mask = np.ones(len(distances), dtype=bool)
        train_mask[test] = False
        train_accuracy = _accuracy_per_threshold(distances[train_mask], issame[train_mask], thresholds)
        threshold = thresholds[int(np.argmax(train_accuracy))]
        test_indices = all_indices[test]
        fold_accuracies.append(float(np.mean((distances[test_indices] < threshold) == issame[test_indices])))
        fold_thresholds.append(float(threshold))
    far, tar, _ = roc_curve(distances, issame)
    auc = float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2))
    return VerificationResult(
        name=name, num_pairs=len(distances),
        accuracy=float(np.mean(fold_accuracies)), accuracy_std=float(np.std(fold_accuracies)),
        best_threshold=float(np.mean(fold_thresholds)), fold_accuracies=fold_accuracies,
        tar_at_far={far_target: tar_at_far(far, tar, far_target) for far_target in FAR_TARGETS},
        auc=auc, far=far, tar=tar)


def evaluate(backbone: torch.nn.Module, pairs: VerificationSet, image_size: int = 112,
             batch_size: int = 64, device=None) -> VerificationResult:
    """Embed every image of ``pairs`` (flip-averaged, normalised) and apply :func:`verification_metrics`."""
    embeddings = embed_images(backbone, pairs.images, image_size, batch_size, device)
    return verification_metrics(embeddings[0::2], embeddings[1::2], pairs.issame, name=pairs.name)


# --------------------------------------------------------------------------------- ROC plot

def save_roc_plot(results: list[VerificationResult], path: str, size: int = 480) -> str:
    """Write the ROC curves (TAR vs log10 FAR, 1e-4 … 1) as a PNG at ``path``; returns ``path``.

    Drawn with matplotlib when it is installed, otherwise with PIL (no extra dependency).
    The file is written to a temporary name and renamed, so it is never half-written.
    """
    temporary = f"{path}.tmp.png"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _draw_roc_with_pil(results, temporary, size)
    else:
        figure, axes = plt.subplots(figsize=(5, 5))
        for result in results:
            axes.plot(np.maximum(result.far, 1e-4), result.tar, label=f"{result.name} (acc {result.accuracy:.3f})")
        axes.set(xscale="log", xlim=(1e-4, 1), ylim=(0, 1), xlabel="FAR", ylabel="TAR", title="ROC")
        axes.grid(True, alpha=0.3)
        axes.legend(loc="lower right")
        figure.savefig(temporary, dpi=100)
        plt.close(figure)
    os.replace(temporary, path)
    return path


def _draw_roc_with_pil(results: list[VerificationResult], path: str, size: int) -> None:
    from PIL import ImageDraw

    margin = 50
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = margin, 20, size - 20, size - margin
    draw.rectangle([left, top, right, bottom], outline="black")

    def to_pixel(far: float, tar: float) -> tuple[float, float]:
        x = (math.log10(max(far, 1e-4)) + 4.0) / 4.0
        return left + x * (right - left), bottom - tar * (bottom - top)

    for exponent in range(-4, 1):
        x, _ = to_pixel(10.0 ** exponent, 0)
        draw.line([x, top, x, bottom], fill=(220, 220, 220))
        draw.text((x - 12, bottom + 5), f"1e{exponent}", fill="black")
    for tenth in range(0, 11, 2):
        _, y = to_pixel(1, tenth / 10)
        draw.line([left, y, right, y], fill=(220, 220, 220))
        draw.text((left - 30, y - 5), f"{tenth / 10:.1f}", fill="black")
    draw.text(((left + right) // 2 - 10, bottom + 25), "FAR", fill="black")
    draw.text((5, (top + bottom) // 2), "TAR", fill="black")
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    for index, result in enumerate(results):
        colour = colours[index % len(colours)]
        points = [to_pixel(f, t) for f, t in zip(result.far, result.tar)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        draw.text((left + 10, top + 10 + 14 * index), f"{result.name}: accuracy {result.accuracy:.3f}", fill=colour)
    image.save(path, format="PNG")
