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
