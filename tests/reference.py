"""Single-process float64 references for the head, written from the formulas (no pfc code)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pfc.head.margins import CombinedMargin, SphereFace


def reference_target_logit(cos: torch.Tensor, margin) -> torch.Tensor:
    """Closed-form target logit through plain autograd (valid away from the clamps)."""
    if isinstance(margin, SphereFace):
        theta = torch.acos(cos)
        k = torch.floor(margin.m * theta / math.pi)
        psi = (-1.0) ** k * torch.cos(margin.m * theta) - 2.0 * k
        lam = margin.lam
        return (psi + lam * cos) / (1.0 + lam)
    assert isinstance(margin, CombinedMargin)
    return torch.cos(margin.m1 * torch.acos(cos) + margin.m2) - margin.m3


def reference_loss(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, margin) -> torch.Tensor:
    """``F.cross_entropy`` over all of ``centers`` with the margin on the target logit."""
    cos = F.normalize(features, dim=1) @ F.normalize(centers, dim=1).t()
    rows = torch.arange(labels.numel())
    target = reference_target_logit(cos[rows, labels], margin)
    logits = margin.s * cos.scatter(1, labels[:, None], target[:, None])
    return F.cross_entropy(logits, labels)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ``‖a − e‖ / ‖e‖``."""
    actual = actual.to_dense() if actual.is_sparse else actual
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-300))


def reference_adamw_rows(weight, exp_avg, exp_avg_sq, steps, rows, grad, lr, betas, eps, weight_decay) -> None:
    """Row-sparse ("lazy") AdamW from the formulas, in place, row by row: only ``rows`` (distinct
    ids, in the order of ``grad``'s rows) change, and each row's bias correction uses its own count
    ``steps[j]``: t ← t + 1, w ← w − lr·wd·w, m ← β1·m + (1 − β1)·g, v ← β2·v + (1 − β2)·g²,
    w ← w − lr · (m / (1 − β1^t)) / (sqrt(v / (1 − β2^t)) + eps)."""
    beta1, beta2 = betas
    for position, row in enumerate(rows.tolist()):
        g = grad[position]
        steps[row] += 1
        t = int(steps[row])
        weight[row] = weight[row] - lr * weight_decay * weight[row]
        exp_avg[row] = beta1 * exp_avg[row] + (1 - beta1) * g
        exp_avg_sq[row] = beta2 * exp_avg_sq[row] + (1 - beta2) * g * g
        first = exp_avg[row] / (1 - beta1 ** t)
        second = exp_avg_sq[row] / (1 - beta2 ** t)
        weight[row] = weight[row] - lr * first / (torch.sqrt(second) + eps)
