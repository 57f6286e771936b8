"""BNS loss (ltrepro.losses.contrastive) against hand-computed toys and a loop transcription.

softplus(x) = log(1 + e^x). With tau = 0.5, exp(s / tau) = e^(2 s), so unit vectors give
exp-similarities in [e^-2, e^2].
"""
from __future__ import annotations

import math

import pytest
import torch

from ltrepro.losses.contrastive import bns_loss

E2 = math.exp(2.0)
LOWER_BOUND = math.log(2.0) + math.log1p(math.exp(-E2))  # 0.693765 at tau 0.5


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def loop_bns(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, tau: float) -> float:
    """The formula transcribed term by term in float64, one anchor and one partner at a time."""
    views = [v / v.norm() for v in torch.cat([z1, z2]).double()]
    ys = labels.tolist() * 2
    n = len(views)
    total = 0.0
    for a in range(n):
        pos_sum, pos_count, neg_sum = 0.0, 0, 0.0
        for b in range(n):
            term = math.exp(float(views[a] @ views[b]) / tau)
            if ys[b] == ys[a] and b != a:
                pos_sum, pos_count = pos_sum + term, pos_count + 1
            elif ys[b] != ys[a]:
                neg_sum += term
        pi, nu = pos_sum / max(pos_count, 1), neg_sum / n
        total += softplus(-pi) + softplus(nu)
    return total / n


def test_toy_two_classes() -> None:
    # Each image's two views coincide; the images are orthogonal. pi = e^2 (its other view),
    # nu = (e^0 + e^0) / 4 = 0.5 (the two views of the other image), L = softplus(-e^2) + softplus(0.5).
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = bns_loss(z, z.clone(), torch.tensor([0, 1]), tau=0.5)
    expected = softplus(-E2) + softplus(0.5)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert math.isclose(expected, 0.974695, abs_tol=1e-6)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_toy_one_class_has_no_negatives() -> None:
    # All four views positive to each other: pi = (e^2 + e^0 + e^0) / 3, nu = 0 -> softplus(0) = log 2.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = bns_loss(z, z.clone(), torch.tensor([0, 0]), tau=0.5)
    expected = softplus(-(2 + E2) / 3) + math.log(2.0)
    assert math.isclose(expected, 0.735950, abs_tol=1e-6)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_toy_three_images() -> None:
    # Views in order a = 0..5: (1,0), (.6,.8), (-1,0), (.8,.6), (0,1), (-.6,-.8); labels 0,0,1,0,0,1.
    # Anchor 0: P = {1, 3, 4} with s = .6, .8, 0; N = {2, 5} with s = -1, -.6; and so on.
    z1 = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])
    z2 = torch.tensor([[0.8, 0.6], [0.0, 1.0], [-0.6, -0.8]])
    labels = torch.tensor([0, 0, 1])
    loss = bns_loss(z1, z2, labels, tau=0.5)
    assert loop_bns(z1, z2, labels, 0.5) == pytest.approx(0.792319, abs=1e-6)
    assert loss.item() == pytest.approx(0.792319, abs=1e-6)


@pytest.mark.parametrize("tau", [0.5, 0.2])
def test_matches_loop_transcription(tau: float) -> None:
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(2, 12, 5, generator=generator).unbind(0)
    labels = torch.randint(3, (12,), generator=generator)
    assert bns_loss(z1, z2, labels, tau).item() == pytest.approx(loop_bns(z1, z2, labels, tau), abs=1e-6)


def test_lower_bound_gradients_and_scale_invariance() -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        z1, z2 = torch.randn(2, 16, 8, generator=generator).unbind(0)
        labels = torch.randint(4, (16,), generator=generator)
        assert bns_loss(z1, z2, labels).item() >= LOWER_BOUND - 1e-6
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    loss = bns_loss(z1, z2, labels)
    loss.backward()
    assert z1.grad is not None and z2.grad is not None
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
    scales = torch.rand(16, 1, generator=generator) * 10 + 0.1
    scaled = bns_loss(z1.detach() * scales, z2.detach() * 3.0, labels)
    assert scaled.item() == pytest.approx(loss.item(), abs=1e-6)


def test_low_precision_inputs_are_computed_in_float32() -> None:
    generator = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(2, 8, 4, generator=generator).unbind(0)
    labels = torch.randint(2, (8,), generator=generator)
    z1, z2 = z1.bfloat16(), z2.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = bns_loss(z1, z2, labels)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(loop_bns(z1.float(), z2.float(), labels, 0.5), abs=1e-6)


def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        bns_loss(torch.randn(4, 3), torch.randn(3, 3), torch.zeros(4, dtype=torch.long))
