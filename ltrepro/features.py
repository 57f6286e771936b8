"""Feature operations shared by the methods, as pure functions of tensors (no module state).

* FCC / FSGL feature scaling (Li et al., CVPR'23; docs/methods/fcc.md#scale-factors): multiply each
  training sample's feature by a class-dependent factor tau >= 1.
* H2T channel grafting (Li et al., AAAI'24; docs/methods/h2t.md#channel-grafting): replace a random,
  batch-shared subset of channels of the fused sample's features by the fusing sample's.
* Cosine logits (NormedLinear, docs/methods/README.md#cosine-classifier) and FFN's stage-2 fused
  logits (docs/methods/ffn.md#stage-2-fusion).
* The post-hoc corrections of a finished classifier (docs/methods/posthoc.md): logit adjustment
  (Menon et al., ICLR'21) and tau-normalised weights (Kang et al., ICLR'20).

Callers decide when an operation is active (training only, epoch > start, ...).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ltrepro.errors import LtreproError


def fcc_factors(
    num_classes: int,
    gamma: float,
    class_rank: torch.Tensor | Sequence[int] | None = None,
    decimals: int | None = 2,
) -> torch.Tensor:
    """FCC "equal difference compression" table (docs/methods/fcc.md#scale-factors), float32 of shape (C,).

        tau_c = round(1 + gamma - k_c * (gamma / C), 2),   k_c = class_rank[c], or c when None

    The head (k = 0) gets 1 + gamma, the tail 1 + gamma / C. Rounding is Python ``round`` on float64
    (binary half-even), as the reference: C=100, gamma=0.5 gives tau_1 = round(1.495) = 1.5.
    ``class_rank=None`` follows the reference, which uses the raw class index (FC2 in
    docs/methods/fcc.md#differences-from-the-released-code: right only when ids are frequency-sorted);
    pass ``class_ranks(counts)`` otherwise. ``decimals=None`` skips the rounding (FC3's exact mode).
    """
    if gamma < 0:
        raise LtreproError(f"FCC gamma: got {gamma!r}, expected a number >= 0")
    ranks = list(range(num_classes)) if class_rank is None else [int(k) for k in class_rank]
    if sorted(ranks) != list(range(num_classes)):
        raise ValueError(f"class_rank must be a permutation of 0..{num_classes - 1}, got {ranks}")
    values = [1 + gamma - k * (gamma / num_classes) for k in ranks]
    if decimals is not None:
        values = [round(value, decimals) for value in values]
    return torch.tensor(values, dtype=torch.float32)


def fcc_scale(features: torch.Tensor, labels: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Scale each sample's features by its label's factor (docs/methods/fcc.md#with-mixup for soft labels).

        f~_i = s_i * f_i,   s_i = tau_{y_i} (hard labels, LongTensor (N,))
                            s_i = sum_j y_ij * tau_j (soft labels (N, C), FSGL's mixed labels)

    ``features`` is (N, ...): a pooled (N, D) vector or an (N, D, H, W) map (GAP is linear, so both
    give the same pooled result). Always scales: it is the caller's job to apply it in training only.
    """
    factors = factors.to(features.device, features.dtype)
    if labels.dim() == 1:
        if labels.is_floating_point():
            raise ValueError("hard labels must be an integer tensor (N,); pass soft labels as (N, C)")
        scale = factors[labels]
    else:
        scale = labels.to(features.dtype) @ factors
    return features * scale.view(-1, *([1] * (features.dim() - 1)))


def class_ranks(counts: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Frequency rank of each class: 0 = most images; ties keep class-index order (stable sort)."""
    counts = torch.as_tensor(counts)
    order = torch.argsort(counts, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(order))
    return ranks


def graft_channels(
    fused: torch.Tensor, fusing: torch.Tensor, rho: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """H2T fusion (docs/methods/h2t.md#channel-grafting): F1[:, S] = F2[:, S], one channel subset S per batch.

        S = first floor(rho * K) entries of one random permutation of the K channels (dim 1)
        out = F1 * (1 - M) + F2 * M,   M = channel mask of S, broadcast over samples and space

    Works on last-stage maps (N, K, H, W) and on pooled features (N, K): per-channel pooling commutes
    with the grafting, so both give the same pooled vector for the same generator state.
    ``generator`` is a CPU generator; the permutation is drawn there and moved to the tensors' device.
    Returns a new tensor (inputs untouched) and the boolean mask M of shape (K,).
    """
    if not 0.0 <= rho <= 1.0:
        raise LtreproError(f"H2T rho: got {rho!r}, expected a number in [0, 1]")
    if fused.shape != fusing.shape or fused.dim() < 2:
        raise ValueError(f"fused and fusing must share one (N, K, ...) shape, got {fused.shape} and {fusing.shape}")
    channels = fused.shape[1]
    chosen = torch.randperm(channels, generator=generator)[: math.floor(rho * channels)]
    mask = torch.zeros(channels, dtype=torch.bool)
    mask[chosen] = True
    mask = mask.to(fused.device)
    grafted = torch.where(mask.view(1, channels, *([1] * (fused.dim() - 2))), fusing, fused)
    return grafted, mask


def cosine_logits(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """NormedLinear logits (docs/methods/README.md#cosine-classifier): z_ic = <f_i/||f_i||, w_c/||w_c||> in [-1, 1].

    ``features`` (N, D), ``weight`` (C, D); no bias and no scale (the loss applies s).
    """
    return F.normalize(features, dim=1) @ F.normalize(weight, dim=1).t()


def ffn_fused_logits(f_kps: torch.Tensor, f_ce: torch.Tensor, weight: torch.Tensor, lam: float) -> torch.Tensor:
    """FFN stage-2 logits (docs/methods/ffn.md#stage-2-fusion): z = lam cos(W, f_KPS) + (1 - lam) cos(W, f_CE).

    One shared cosine classifier W (C, D) on both frozen branches' pooled features (N, D). Equivalently,
    the dot product of lam * f^_KPS + (1 - lam) * f^_CE (L2-normalised features, not re-normalised after
    the sum) with the unit-norm rows of W: a late weighted sum, not a concatenation.
    """
    if not 0.0 <= lam <= 1.0:
        raise LtreproError(f"FFN lam: got {lam!r}, expected a number in [0, 1]")
    return lam * cosine_logits(f_kps, weight) + (1 - lam) * cosine_logits(f_ce, weight)


def posthoc_adjusted_logits(logits: torch.Tensor, counts: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """Post-hoc logit adjustment (Menon et al., ICLR'21, post-hoc correction; docs/methods/posthoc.md#posthoc_la):

        z'_c = z_c - tau log pi_c,   pi_c = n_c / sum_j n_j

    ``logits`` (N, C), ``counts`` (C,) the training counts. tau = 1 is the Bayes-optimal correction
    for the balanced error when the model estimates the training class posterior; tau = 0 is the model.
    """
    return logits - tau * torch.log(counts / counts.sum())


def tau_normalised_weight(weight: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """tau-normalised classifier (Kang et al., ICLR'20, tau-normalised classifier; docs/methods/posthoc.md#tau_norm):

        w~_c = w_c / ||w_c||^tau

    ``weight`` (C, D), one row per class. tau = 1 gives unit-norm rows, tau = 0 the weights as they are;
    long-tailed training leaves head classes with larger norms, which tau between shrinks.
    """
    return weight / weight.norm(dim=1, keepdim=True).pow(tau)


def cutmix_box(height: int, width: int, lam: float, centre_y: int, centre_x: int) -> tuple[int, int, int, int]:
    """The CutMix box (Yun et al., ICCV'19) as GLMC / FSGL draw it (docs/methods/fsgl.md#views):
    side ceil(S sqrt(1 - lam)) per axis, spanning centre +- side // 2, clipped to the image.

    Returns (y0, y1, x0, x1). An odd side loses a pixel (side 23 spans 22), as in the reference.
    """
    cut = math.sqrt(1.0 - lam)
    half_h, half_w = math.ceil(height * cut) // 2, math.ceil(width * cut) // 2
    y0, y1 = min(max(centre_y - half_h, 0), height), min(max(centre_y + half_h, 0), height)
    x0, x1 = min(max(centre_x - half_w, 0), width), min(max(centre_x + half_w, 0), width)
    return y0, y1, x0, x1


def paste_box(target: torch.Tensor, source: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """``target`` (N, C, H, W) with the box (y0, y1, x0, x1) of ``source`` pasted in, one box for the batch."""
    y0, y1, x0, x1 = box
    mixed = target.clone()
    mixed[:, :, y0:y1, x0:x1] = source[:, :, y0:y1, x0:x1]
    return mixed
