from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdray.losses import KDLoss


def _batch(seed=0, n=6, k=4):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, k, generator=g),
        torch.randn(n, k, generator=g),
        torch.randint(0, k, (n,), generator=g),
    )


def test_alpha_one_is_plain_cross_entropy():
    s, t, y = _batch()
    out = KDLoss(alpha=1.0, temperature=3.0)(s, t, y)
    assert torch.allclose(out["loss"], F.cross_entropy(s, y))
    assert set(out) == {"loss", "hard", "soft"}
    # alpha = 1 needs no teacher at all
    assert torch.allclose(KDLoss(1.0, 3.0)(s, None, y)["loss"], F.cross_entropy(s, y))


def test_soft_term_matches_a_hand_computation_with_t_squared():
    s = torch.tensor([[2.0, 0.5, -1.0]])
    t = torch.tensor([[1.0, 1.5, 0.0]])
    y = torch.tensor([0])
    temp = 2.5
    p_t = [math.exp(v / temp) for v in t[0].tolist()]
    p_t = [v / sum(p_t) for v in p_t]
    p_s = [math.exp(v / temp) for v in s[0].tolist()]
    p_s = [v / sum(p_s) for v in p_s]
    kl = sum(a * math.log(a / b) for a, b in zip(p_t, p_s, strict=True))
    out = KDLoss(alpha=0.0, temperature=temp)(s, t, y)
    assert out["soft"].item() == pytest.approx(temp**2 * kl, rel=1e-5)
    assert out["loss"].item() == pytest.approx(temp**2 * kl, rel=1e-5)
    mixed = KDLoss(alpha=0.3, temperature=temp)(s, t, y)
    ce = -math.log(math.exp(2.0) / sum(math.exp(v) for v in s[0].tolist()))
    assert mixed["loss"].item() == pytest.approx(0.3 * ce + 0.7 * temp**2 * kl, rel=1e-5)


def test_soft_gradient_reaches_the_student_not_the_teacher():
    s, t, y = _batch(1)
    s.requires_grad_(True)
    t.requires_grad_(True)
    KDLoss(alpha=0.0, temperature=4.0)(s, t, y)["loss"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None  # teacher logits are detached


def test_soft_term_is_zero_when_student_equals_teacher():
    s, _, y = _batch(2)
    out = KDLoss(alpha=0.0, temperature=5.0)(s, s.clone(), y)
    assert out["soft"].abs().item() < 1e-6


@pytest.mark.parametrize(
    ("alpha", "temperature"), [(-0.1, 2.0), (1.1, 2.0), (0.5, 0.0), (0.5, -1.0)]
)
def test_invalid_arguments(alpha, temperature):
    with pytest.raises(ValueError):
        KDLoss(alpha, temperature)


def test_teacher_required_when_alpha_below_one():
    s, _, y = _batch()
    with pytest.raises(ValueError, match="teacher_logits"):
        KDLoss(0.5, 2.0)(s, None, y)
