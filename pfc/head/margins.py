"""Margins on the target cosine logit (SphereFace, CosFace/AM-Softmax, ArcFace, combined).

A margin maps the cosine ``c = cos θ_y`` between a sample and its own class center to the
target logit ``z_y`` (before the scale ``s``); non-target logits stay ``c``. Each margin gives
its value *and* its derivative in closed form (:meth:`Margin.value_and_grad`), so the sharded
softmax in :mod:`pfc.head.softmax` applies it without autograd, and :meth:`Margin.__call__` wraps the
same closed form as an autograd op for standalone use.

Margins with iteration-dependent behaviour (SphereFace's λ annealing) are advanced with
:meth:`Margin.set_iteration`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_ANGLE_EPS = 1e-6


class Margin:
    """Base class. Subclasses set ``s`` and implement :meth:`value_and_grad`."""

    s: float
    straight_through: bool = False

    def value_and_grad(self, cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(z_y, dz_y/dc)`` for target cosines ``cos`` (any shape, values in [−1, 1])."""
        raise NotImplementedError

    def target_logit(self, cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_y, dz_y/dc)`` as used in training: with ``straight_through`` the value is the
        margin's and the derivative that of the plain cosine (1)."""
        value, grad = self.value_and_grad(cos)
        if self.straight_through:
            grad = torch.ones_like(grad)
        return value, grad

    def set_iteration(self, iteration: int) -> None:
        """Advance iteration-dependent schedules; a no-op for fixed margins."""

    def __call__(self, cos: torch.Tensor) -> torch.Tensor:
        """Target logit ``z_y`` (unscaled) as a differentiable op; gradient per :meth:`target_logit`."""
        return _MarginOp.apply(cos, self)


class _MarginOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cos, margin):
        value, grad = margin.target_logit(cos.detach())
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None


@dataclass
class CombinedMargin(Margin):
    """Combined margin ``z_y = cos(a) − m3`` with ``a = clamp(m1·θ + m2, 0, π − ε)``.

    * Capped angle (default, after the CombinedMargin-caffe bounds): once ``m1·θ + m2`` passes
      π the angle stays at π − ε, so for m1 ≥ 1, m2 ≥ 0, m3 ≥ 0 the target logit never rises
      above ``c``.
    * Gradient: ``dz_y/dc = m1·sin(a)/sqrt(1 − c²)``, clamped to ``[0, g_max]``: finite at
      ``|c| = 1`` (plain autograd through acos is not).
    * ``fallback="insightface"``: where ``θ + m2 > π`` (only for m1 = 1, m3 = 0: ArcFace) use
      ``z_y = c − m2·sin(m2)`` with gradient 1 instead of the cap (insightface's choice;
      discontinuous by about 0.12 at m2 = 0.5).
    * ``straight_through=True``: forward value as above, gradient that of ``c`` (insightface's
      ArcFace since late 2022).

    ArcFace = (1, m, 0); CosFace/AM-Softmax = (1, 0, m); NormFace = (1, 0, 0).
    """

    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    g_max: float = 2.0
    fallback: str = "cap"
    straight_through: bool = False

    def __post_init__(self):
        if not self.s > 0:
            raise ValueError(f"margin scale s={self.s} must be > 0")
        if not self.m1 > 0:
            raise ValueError(f"margin m1={self.m1} must be > 0")
        if not self.g_max > 0:
            raise ValueError(f"margin g_max={self.g_max} must be > 0")
        if self.fallback not in ("cap", "insightface"):
            raise ValueError(f"margin fallback={self.fallback!r} is not 'cap' or 'insightface'")
        if self.fallback == "insightface" and (self.m1 != 1.0 or self.m3 != 0.0):
            raise ValueError("fallback='insightface' is defined for ArcFace only (m1=1, m3=0)")

    def value_and_grad(self, cos):
        if self.m1 == 1.0 and self.m2 == 0.0:  # CosFace / NormFace: exact closed form
            return cos - self.m3, torch.ones_like(cos)
        theta = torch.acos(cos.clamp(-1.0, 1.0))
        raw_angle = self.m1 * theta + self.m2
        angle = raw_angle.clamp(0.0, math.pi - _ANGLE_EPS)
        value = torch.cos(angle) - self.m3
        sin_theta = torch.sqrt((1.0 - cos * cos).clamp_min(0.0))
        # sin(a)/sin(θ) at sin θ = 0: its limit m1 at θ = 0 when m2 = 0, unbounded otherwise
        limit = torch.full_like(cos, self.m1 if self.m2 == 0.0 else math.inf)
        ratio = torch.where(sin_theta > 1e-12, torch.sin(angle) / sin_theta.clamp_min(1e-12), limit)
        grad = (self.m1 * ratio).clamp(0.0, self.g_max)
        if self.fallback == "insightface":
            past = raw_angle > math.pi
            value = torch.where(past, cos - self.m2 * math.sin(self.m2), value)
            grad = torch.where(past, torch.ones_like(grad), grad)
        return value, grad


def ArcFace(s: float = 64.0, m: float = 0.5, **options) -> CombinedMargin:
    """ArcFace additive angular margin: ``z_y = cos(θ + m)`` (capped), scale s."""
    return CombinedMargin(s=s, m1=1.0, m2=m, m3=0.0, **options)


def CosFace(s: float = 30.0, m: float = 0.35, **options) -> CombinedMargin:
    """CosFace / AM-Softmax additive cosine margin: ``z_y = c − m``, scale s."""
    return CombinedMargin(s=s, m1=1.0, m2=0.0, m3=m, **options)


def NormFace(s: float = 30.0, **options) -> CombinedMargin:
    """Normalised softmax without margin: ``z_y = c``, scale s."""
    return CombinedMargin(s=s, m1=1.0, m2=0.0, m3=0.0, **options)


@dataclass
class SphereFace(Margin):
    """SphereFace multiplicative angular margin with λ annealing.

    ``z_y = (ψ(θ) + λ·c) / (1 + λ)``, ``ψ(θ) = (−1)^k cos(m·θ) − 2k`` on
    ``θ ∈ [kπ/m, (k+1)π/m]`` (monotonic in θ), ``λ = max(base·(1 + γ·iter)^(−power), lambda_min)``.
    ``m`` is a positive integer: ``cos(m·θ)`` is then the Chebyshev polynomial ``T_m(c)``, whose
    derivative is finite on all of [−1, 1]. The trainer advances ``iter`` via :meth:`set_iteration`.
    """

    s: float = 30.0
    m: int = 4
    base: float = 1000.0
    gamma: float = 0.12
    power: float = 1.0
    lambda_min: float = 5.0
    straight_through: bool = False
    iteration: int = 0

    def __post_init__(self):
        if not self.s > 0:
            raise ValueError(f"margin scale s={self.s} must be > 0")
        if int(self.m) != self.m or self.m < 1:
            raise ValueError(f"SphereFace margin m={self.m} must be a positive integer")
        self.m = int(self.m)
        if self.lambda_min < 0 or self.base < 0:
            raise ValueError("SphereFace base and lambda_min must be >= 0")

    @property
    def lam(self) -> float:
        """The current λ."""
        return max(self.base * (1.0 + self.gamma * self.iteration) ** (-self.power), self.lambda_min)

    def set_iteration(self, iteration: int) -> None:
        self.iteration = int(iteration)

    def value_and_grad(self, cos):
        cos = cos.clamp(-1.0, 1.0)
        theta = torch.acos(cos)
        k = torch.floor(self.m * theta / math.pi).clamp(0, self.m - 1)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        # T_m and its derivative T_m' = m·U_{m−1} by the three-term recurrences
        t_prev, t_cur = torch.ones_like(cos), cos
        u_prev, u_cur = torch.ones_like(cos), 2.0 * cos
        for _ in range(self.m - 1):
            t_prev, t_cur = t_cur, 2.0 * cos * t_cur - t_prev
        for _ in range(self.m - 2):
            u_prev, u_cur = u_cur, 2.0 * cos * u_cur - u_prev
        chebyshev_grad = torch.ones_like(cos) if self.m == 1 else self.m * u_cur
        psi = sign * t_cur - 2.0 * k
        lam = self.lam
        value = (psi + lam * cos) / (1.0 + lam)
        grad = (sign * chebyshev_grad + lam) / (1.0 + lam)
        return value, grad

