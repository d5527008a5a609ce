import math

import pytest
import torch

from pfc.head.margins import ArcFace, CombinedMargin, CosFace, NormFace, SphereFace
from tests.reference import reference_target_logit

GRID = torch.cat([torch.linspace(-1.0, 1.0, 2001, dtype=torch.float64),
                  torch.tensor([-1.0, 1.0, -1 + 1e-15, 1 - 1e-15, 0.0], dtype=torch.float64)])


@pytest.mark.parametrize("m1,m2,m3", [(1.0, 0.5, 0.0), (1.0, 0.3, 0.2), (1.35, 0.0, 0.0), (2.0, 0.2, 0.1),
                                      (1.0, 0.0, 0.35), (4.0, 0.0, 0.0), (1.0, 0.0, 0.0), (1.5, 1.2, 0.4)])
def test_combined_never_raises_the_target_and_gradient_is_bounded(m1, m2, m3):
    margin = CombinedMargin(s=64.0, m1=m1, m2=m2, m3=m3)
    value, grad = margin.value_and_grad(GRID)
    assert torch.all(value <= GRID + 1e-12)
    assert torch.isfinite(grad).all() and torch.isfinite(value).all()
    assert torch.all(grad >= 0) and torch.all(grad <= margin.g_max)


def test_combined_gradient_is_the_clamped_derivative():
    margin = CombinedMargin(s=64.0, m1=1.2, m2=0.3, m3=0.2, g_max=2.0)
    cos = torch.linspace(-0.6, 0.9, 301, dtype=torch.float64, requires_grad=True)
    reference_target_logit(cos, margin).sum().backward()
    value, grad = margin.value_and_grad(cos.detach())
    assert torch.allclose(value, reference_target_logit(cos.detach(), margin), atol=1e-12)
    assert torch.allclose(grad, cos.grad.clamp(0, 2.0), atol=1e-9)


def test_autograd_op_is_finite_at_the_poles():
    for margin in [ArcFace(), CombinedMargin(m1=1.3, m2=0.2, m3=0.1), SphereFace(m=4)]:
        cos = torch.tensor([-1.0, 1.0, 0.3], dtype=torch.float64, requires_grad=True)
        margin(cos).sum().backward()
        assert torch.isfinite(cos.grad).all(), margin


def test_presets_equal_their_closed_forms():
    cos = torch.linspace(-0.8, 0.99, 200, dtype=torch.float64)
    theta = torch.acos(cos)
    arc_value, _ = ArcFace(m=0.5).value_and_grad(cos)
    uncapped = theta + 0.5 < math.pi - 1e-6
    assert torch.allclose(arc_value[uncapped], torch.cos(theta + 0.5)[uncapped], atol=1e-12)
    cos_value, cos_grad = CosFace(m=0.35).value_and_grad(cos)
    assert torch.equal(cos_value, cos - 0.35) and torch.equal(cos_grad, torch.ones_like(cos))
    norm_value, _ = NormFace().value_and_grad(cos)
    assert torch.equal(norm_value, cos)
    assert ArcFace().s == 64.0 and CosFace().s == 30.0


def test_arcface_insightface_fallback():
    margin = ArcFace(m=0.5, fallback="insightface")
    cos = torch.tensor([-0.99, -0.95, 0.0], dtype=torch.float64)
    value, grad = margin.value_and_grad(cos)
    past = torch.acos(cos) + 0.5 > math.pi
    assert past.tolist() == [True, True, False]
    assert torch.allclose(value[past], cos[past] - 0.5 * math.sin(0.5))
    assert torch.equal(grad[past], torch.ones(2, dtype=torch.float64))
    assert torch.isclose(value[2], torch.cos(torch.tensor(math.pi / 2 + 0.5, dtype=torch.float64)))
    with pytest.raises(ValueError, match="ArcFace only"):
        CombinedMargin(m1=1.2, fallback="insightface")


def test_straight_through_keeps_value_and_passes_unit_gradient():
    margin = ArcFace(m=0.5, straight_through=True)
    cos = torch.tensor([0.1, 0.5, -0.3], dtype=torch.float64, requires_grad=True)
    value = margin(cos)
    value.sum().backward()
    assert torch.allclose(value, torch.cos(torch.acos(cos.detach()) + 0.5))
    assert torch.equal(cos.grad, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_sphereface_psi_matches_closed_form_and_is_monotonic(m):
    margin = SphereFace(m=m, base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0)
    margin.set_iteration(500)
    assert margin.lam == pytest.approx(max(1000.0 * (1 + 0.12 * 500) ** -1.0, 5.0))
    cos = torch.linspace(-0.999, 0.999, 999, dtype=torch.float64, requires_grad=True)
    reference = reference_target_logit(cos, margin)
    reference.sum().backward()
    value, grad = margin.value_and_grad(cos.detach())
    assert torch.allclose(value, reference.detach(), atol=1e-9)
    assert torch.allclose(grad, cos.grad, atol=1e-6, rtol=1e-6)
    full_value, full_grad = margin.value_and_grad(GRID.sort().values)
    assert torch.all(full_value[1:] >= full_value[:-1] - 1e-12)  # increasing in c = decreasing in θ
    assert torch.isfinite(full_grad).all()


def test_sphereface_lambda_anneals_to_its_floor():
    margin = SphereFace()
    assert margin.lam == 1000.0
    margin.set_iteration(10**7)
    assert margin.lam == 5.0
    with pytest.raises(ValueError, match="positive integer"):
        SphereFace(m=1.5)


def test_bad_margin_parameters_are_rejected():
    with pytest.raises(ValueError, match="scale s=0"):
        CombinedMargin(s=0)
    with pytest.raises(ValueError, match="fallback"):
        CombinedMargin(fallback="clip")
