"""IJB 1:1 verification: pair scores and TAR at FAR as insightface reports them.

    scores = verification_scores(templates, pairs)        # float64 [P], pair file order
    roc = Roc.of(scores, labels)
    roc.tar_at_far(1e-4)                 # insightface's number (nearest ROC point)
    roc.tar_at_far_interpolated(1e-4)    # the ROC polyline at FAR = 1e-4
    tar_at_far(scores, labels, FARS)     # {far: nearest-point TAR}

Pair score = t̂₁ · t̂₂ (unit template features, float64), computed as dense blocks: the pairs are
grouped by their first template, each block of first templates is multiplied by the second
templates its pairs need (one GEMM), and the scores are read out of that block.

The ROC is the one ``sklearn.metrics.roc_curve(labels, scores)`` returns with its defaults, as
insightface calls it: thresholds at the distinct scores from high to low, a pair accepted when
its score ≥ the threshold; a point dropped when both its false- and true-positive counts are the
midpoint of their neighbours' (``drop_intermediate=True``: collinear, equally spaced points); a
first point (0, 0). insightface then reverses fpr/tpr and takes the first index of the smallest
|fpr − FAR|: among equally near points the last one of the ascending ROC (the top of a vertical
run). Which points exist depends on the dropping, so it is reproduced here (checked against
scikit-learn 1.9.1 on 30 random score sets with and without ties). The interpolated TAR is the ROC polyline at FAR (the top of a vertical
segment lying at FAR exactly); it needs no choice among nearby points.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pfc.evaluation.ijb.meta import IjbPairs
from pfc.evaluation.ijb.templates import TemplateFeatures

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FIRST_TEMPLATES_PER_BLOCK = 256


def far_key(far: float) -> str:
    """The JSON key of a FAR target: ``1e-06`` … ``1e-01`` (as ``f"{far:.0e}"``)."""
    return f"{far:.0e}"


def verification_scores(templates: TemplateFeatures, pairs: IjbPairs) -> np.ndarray:
    """Score of every pair, in ``pairs`` order: float64 [P] (module docstring)."""
    return pair_scores(templates.features, templates.rows(pairs.first), templates.rows(pairs.second))


def pair_scores(features: np.ndarray, first: np.ndarray, second: np.ndarray,
                block: int = FIRST_TEMPLATES_PER_BLOCK) -> np.ndarray:
    """``features[first[p]] · features[second[p]]`` for every p, float64 [P]; rows are indices."""
    features = np.asarray(features, dtype=np.float64)
    first, second = np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64)
    scores = np.empty(len(first), dtype=np.float64)
    order = np.argsort(first, kind="stable")
    sorted_first = first[order]
    firsts = np.unique(sorted_first)
    for start in range(0, len(firsts), block):
        rows = firsts[start:start + block]
        lo = np.searchsorted(sorted_first, rows[0], side="left")
        hi = np.searchsorted(sorted_first, rows[-1], side="right")
        these = order[lo:hi]
        columns, column_of_pair = np.unique(second[these], return_inverse=True)
        products = features[rows] @ features[columns].T
        scores[these] = products[np.searchsorted(rows, first[these]), column_of_pair]
    return scores


@dataclass
class Roc:
    """``fpr``, ``tpr`` ascending (from 0), ``thresholds`` descending (first +inf), as sklearn."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray

    @classmethod
    def of(cls, scores: np.ndarray, labels: np.ndarray) -> "Roc":
        """The ROC of ``scores`` [P] (higher = more alike) against ``labels`` [P] (True = mated);
        ValueError when either class is absent."""
        scores = np.asarray(scores, dtype=np.float64)
        labels = np.asarray(labels).astype(bool)
        if labels.all() or not labels.any():
            raise ValueError(f"a ROC needs mated and non-mated pairs; got {int(labels.sum())} mated of {labels.size}")
        order = np.argsort(scores, kind="mergesort")[::-1]
        sorted_scores = scores[order]
        last_of_value = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
        true_positives = np.cumsum(labels[order], dtype=np.float64)[last_of_value]
        false_positives = 1.0 + last_of_value - true_positives
        thresholds = sorted_scores[last_of_value]
        if len(false_positives) > 2:
            corner = np.r_[True, (np.diff(false_positives, 2) != 0) | (np.diff(true_positives, 2) != 0), True]
            false_positives, true_positives, thresholds = (
                false_positives[corner], true_positives[corner], thresholds[corner])
        false_positives = np.r_[0.0, false_positives]
        true_positives = np.r_[0.0, true_positives]
        return cls(fpr=false_positives / false_positives[-1], tpr=true_positives / true_positives[-1],
                   thresholds=np.r_[np.inf, thresholds])

    def tar_at_far(self, far: float) -> float:
        """insightface's TAR at ``far``: tpr at the first argmin of |fpr − far| over the reversed ROC."""
        reversed_fpr = self.fpr[::-1]
        nearest = int(np.argmin(np.abs(reversed_fpr - far)))
        return float(self.tpr[::-1][nearest])

    def tar_at_far_interpolated(self, far: float) -> float:
        """The ROC polyline at ``far`` (linear between neighbouring points; the highest tpr of
        the points lying at ``far`` exactly)."""
        last = int(np.searchsorted(self.fpr, far, side="right")) - 1
        if self.fpr[last] == far or last == len(self.fpr) - 1:
            return float(self.tpr[last])
        x0, x1 = self.fpr[last], self.fpr[last + 1]
        y0, y1 = self.tpr[last], self.tpr[last + 1]
        return float(y0 + (y1 - y0) * (far - x0) / (x1 - x0))


def tar_at_far(scores: np.ndarray, labels: np.ndarray, fars=FARS) -> dict[float, float]:
    """``{far: TAR}`` for each target, read off the ROC as insightface does (:meth:`Roc.tar_at_far`)."""
    roc = Roc.of(scores, labels)
    return {far: roc.tar_at_far(far) for far in fars}
