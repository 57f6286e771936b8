"""Contrastive pre-training losses as pure functions of tensors (projection-head outputs, labels).

Like ``ltrepro.losses.functional``, everything is computed in float32 whatever the inputs' dtype,
and with autocast switched off inside, so bf16 autocast outputs lose nothing in the similarities.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bns_loss(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """Balanced negative sampling (BNS) loss of Lin & Yuan, "Long-Tailed Recognition via
    Information-Preservable Two-Stage Learning" (arXiv:2510.08836), in the form of their code.

    z1, z2: (B, D) projection-head outputs of view 1 and view 2 of the same B images; labels: (B,).
    The 2B views are ordered view 1 of every image, then view 2, and a runs over them:

        z_a = e_a / ||e_a||,  s_ab = z_a . z_b
        P(a) = {b != a : y_b = y_a}      (the other view of a and every same-class view)
        N(a) = {b : y_b != y_a}
        pi_a = 1 / max(|P(a)|, 1) * sum_{b in P(a)} exp(s_ab / tau)
        nu_a = 1 / (2B)           * sum_{b in N(a)} exp(s_ab / tau)
        L    = 1 / (2B) * sum_a [ softplus(-pi_a) + softplus(nu_a) ]
             = 1 / (2B) * sum_a [ -log sigmoid(pi_a) - log sigmoid(-nu_a) ]

    Labels are used: positives are all same-class views, a supervised variant of SimCLR. nu_a is
    divided by 2B, not |N(a)|, as in the reference code, so negatives are not re-weighted per class.
    The sigmoid acts on averages of exp-similarities, not on logits, so pi_a lies in
    [e^(-1/tau), e^(1/tau)], nu_a >= 0 and L >= log 2 + softplus(-e^(1/tau)) (0.693765 at tau 0.5).
    Similarities come from one (2B, 2B) matrix product instead of the reference's 2B x 2B x D
    broadcast, which needs 2 GB at B = 1024.
    """
    if z1.shape != z2.shape or z1.dim() != 2 or labels.shape != z1.shape[:1]:
        shapes = f"{tuple(z1.shape)}, {tuple(z2.shape)}, {tuple(labels.shape)}"
        raise ValueError(f"bns_loss: need z1, z2 of shape (B, D) and labels of shape (B,); got {shapes}")
    with torch.autocast(z1.device.type, enabled=False):
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        y = labels.repeat(2)
        n = z.shape[0]
        exp_sim = torch.exp(z @ z.T / tau)
        same = y[:, None] == y[None, :]
        positive = same & ~torch.eye(n, dtype=torch.bool, device=z.device)
        zero = exp_sim.new_zeros(())
        pi = torch.where(positive, exp_sim, zero).sum(1) / positive.sum(1).clamp(min=1)
        nu = torch.where(same, zero, exp_sim).sum(1) / n
        return (F.softplus(-pi) + F.softplus(nu)).mean()


__all__ = ["bns_loss"]
