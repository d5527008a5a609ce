"""The verification metrics of the insightface protocol, from pair distances; the ROC plot.

    result = verification_metrics(e1, e2, issame, name="lfw")   # normalised [N, D] embeddings
    result.summary()  → {"accuracy": …, "accuracy_std": …, "tar@far=1e-3": …, …}
    save_roc_plot([result], "roc.png")

* distance of pair i: d_i = ‖e1_i − e2_i‖² ∈ [0, 4]; predicted "same" when d_i < t;
* thresholds t = 0, 0.01, …, 3.99; the pairs are split into 10 contiguous folds (no shuffle, the
  first n mod 10 folds one pair longer, :func:`fold_slices`); for each fold k the threshold t_k
  with the best accuracy on the other nine (first maximum) is applied to it; accuracy = mean ±
  std (population std) of the fold accuracies;
* TAR at FAR 1e-3 / 1e-4 from the exact ROC over all pairs (:func:`roc_curve`): the largest
  fraction of genuine pairs accepted by a threshold that accepts at most FAR·#impostor impostor
  pairs (:func:`tar_at_far`); None ("n/a" when printed, null in JSON) when FAR·#impostor < 1:
  a set with fewer than 1/FAR impostor pairs cannot measure that FAR. AUC by the trapezoid rule
  over the ROC.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from pfc.errors import DataError

THRESHOLDS = np.arange(0.0, 4.0, 0.01)
NUM_FOLDS = 10
FAR_TARGETS = (1e-3, 1e-4)


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


def tar_at_far(far: np.ndarray, tar: np.ndarray, far_target: float, num_impostor: int | None = None) -> float | None:
    """Largest TAR among ROC points with FAR ≤ ``far_target``; None when ``num_impostor`` pairs
    are too few to measure that FAR (``far_target · num_impostor < 1``: the smallest FAR above 0
    is 1/num_impostor)."""
    if num_impostor is not None and far_target * num_impostor < 1 - 1e-9:
        return None
    return float(tar[far <= far_target + 1e-12].max())


def format_rate(value: float | None, digits: int = 4) -> str:
    """A rate for printing: ``0.1234``, or ``n/a`` for a TAR the set cannot measure (None)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


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
        """Flat dict: accuracy, accuracy_std, threshold, tar@far=1e-3, tar@far=1e-4 (None when the
        set has too few impostor pairs), auc, num_pairs."""
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
        raise DataError(f"{len(distances)} pairs is fewer than the {num_folds} folds")
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
        tar_at_far={far_target: tar_at_far(far, tar, far_target, int((~issame).sum())) for far_target in FAR_TARGETS},
        auc=auc, far=far, tar=tar)


def save_roc_plot(results: list[VerificationResult], path: str, size: int = 480) -> str:
    """Write the ROC curves of ``results`` (TAR vs log10 FAR, 1e-4 … 1) as a PNG at ``path``;
    returns ``path`` (:func:`save_curves_plot`)."""
    curves = [(f"{result.name} (acc {result.accuracy:.3f})", result.far, result.tar) for result in results]
    return save_curves_plot(curves, path, size)


def save_curves_plot(curves: list[tuple[str, np.ndarray, np.ndarray]], path: str, size: int = 480,
                     far_floor: float = 1e-4) -> str:
    """Write ROC curves ``(label, far, tar)`` as TAR vs log10 FAR from ``far_floor`` to 1 in a PNG at
    ``path``; returns ``path``.

    Drawn with matplotlib when it is installed, otherwise with PIL (no extra dependency).
    The file is written to a temporary name and renamed, so it is never half-written.
    """
    temporary = f"{path}.tmp.png"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _draw_roc_with_pil(curves, temporary, size, far_floor)
    else:
        figure, axes = plt.subplots(figsize=(5, 5))
        for label, far, tar in curves:
            axes.plot(np.maximum(far, far_floor), tar, label=label)
        axes.set(xscale="log", xlim=(far_floor, 1), ylim=(0, 1), xlabel="FAR", ylabel="TAR", title="ROC")
        axes.grid(True, alpha=0.3)
        axes.legend(loc="lower right")
        figure.savefig(temporary, dpi=100)
        plt.close(figure)
    os.replace(temporary, path)
    return path


def _draw_roc_with_pil(curves: list[tuple[str, np.ndarray, np.ndarray]], path: str, size: int,
                       far_floor: float) -> None:
    from PIL import ImageDraw

    margin = 50
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = margin, 20, size - 20, size - margin
    draw.rectangle([left, top, right, bottom], outline="black")
    decades = max(1, round(-math.log10(far_floor)))

    def to_pixel(far: float, tar: float) -> tuple[float, float]:
        x = (math.log10(max(far, far_floor)) + decades) / decades
        return left + x * (right - left), bottom - tar * (bottom - top)

    for exponent in range(-decades, 1):
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
    for index, (label, far, tar) in enumerate(curves):
        colour = colours[index % len(colours)]
        points = [to_pixel(f, t) for f, t in zip(far, tar)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        draw.text((left + 10, top + 10 + 14 * index), label, fill=colour)
    image.save(path, format="PNG")
