"""Long-tailed loss math as pure functions of tensors; ``ltrepro.losses`` wraps them in modules.

Notation (docs/methods/losses.md): z = logits (N, C), y = labels (N,), n_c = training images of
class c, C = number of classes. Nothing assumes classes sorted by frequency: where a method
pairs the head with the tail (KPS), the pairing comes from frequency ranks (L1 in
docs/methods/losses.md#differences-from-the-released-code; FFN's bug F5).
Per-class tables are computed in float64 from the counts; losses are computed in float32
whatever the logits' dtype, so bfloat16 autocast outputs lose nothing in the log-softmax, and
the tables are moved to the logits' device (a no-op once the module is on that device).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

# KPS sensitivity base (Li et al. 2023): the rarest class gets ln(50)/ln(50) = 1.
KPS_BASE = 50.0


def as_counts(class_counts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Class counts as a float64 vector (one entry per class, in class-index order)."""
    return torch.as_tensor(class_counts, dtype=torch.float64).reshape(-1)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CE in float32; with ``weight`` the mean is sum_i w_{y_i} l_i / sum_i w_{y_i}, as torch's."""
    weight = None if weight is None else weight.to(device=logits.device, dtype=torch.float32)
    return F.cross_entropy(logits.float(), labels, weight=weight)


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """Focal loss, Lin et al., ICCV'17 ("Focal Loss for Dense Object Detection"), Eq. 4: no alpha balancing.

    FL_i = (1 - p_{y_i})^gamma * (-log p_{y_i}). As in FFN's code, p_y is detached, so the factor only
    re-weights the CE gradient and is not differentiated itself. Only FFN's code does this: the paper
    and the LDAM-DRW code differentiate through p_y (L3, docs/methods/losses.md#focal).
    """
    nll = F.cross_entropy(logits.float(), labels, reduction="none")
    p_target = torch.exp(-nll).detach()
    return ((1 - p_target) ** gamma * nll).mean()


def effective_number_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Class-balanced weights w_c = (1 - beta) / (1 - beta^{n_c}), rescaled to sum to C.

    Cui et al. 2019 ("Class-Balanced Loss Based on Effective Number of Samples"): 1 / E_{n_c}
    with effective number E_n = (1 - beta^n) / (1 - beta). DRW (Cao et al. 2019) switches these
    on late in training with beta = 0.9999; beta = 0 gives all ones.
    """
    weights = (1 - beta) / (1 - beta**counts)
    return weights * len(weights) / weights.sum()


def ldam_margins(counts: torch.Tensor, max_m: float) -> torch.Tensor:
    """LDAM margins m_c = max_m * n_c^(-1/4) / max_j n_j^(-1/4): the rarest class gets max_m.

    Cao et al., NeurIPS'19 ("Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss"),
    Eq. 13: m_c = K / n_c^{1/4}, with K chosen (as in their code) so that the largest margin is max_m.
    """
    inverse_fourth_root = counts ** (-0.25)
    return max_m * inverse_fourth_root / inverse_fourth_root.max()


def subtract_target_margin(logits: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
    """z - m_y e_y: lower only each sample's target logit by its class margin."""
    one_hot = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return logits - one_hot * margins.to(device=logits.device, dtype=logits.dtype)[labels].unsqueeze(1)


def ldam_loss(
    cosine: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor, s: float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """LDAM loss on cosine logits z in [-1, 1]: CE(s * (z - m_y e_y), y), optionally class-weighted (DRW)."""
    return cross_entropy(s * subtract_target_margin(cosine.float(), labels, margins), labels, weight)


def kps_sensitivity(counts: torch.Tensor) -> torch.Tensor:
    """KPS class sensitivities s_j = ln(50 n_j / n_min) / ln(50), so s_j >= 1 and the rarest class has 1.

    Li, Cheung, Hu 2023 ("Key Point Sensitive Loss for Long-tailed Visual Recognition", TPAMI
    45(4)); docs/methods/losses.md#kps. CIFAR-100 IF 100: the head class gets 2.18.
    """
    return torch.log(KPS_BASE * counts / counts.min()) / math.log(KPS_BASE)


def frequency_mirror(counts: torch.Tensor) -> torch.Tensor:
    """mirror[j] = the class whose frequency rank is C-1-rank(j) (rank 0 = most images).

    Ranks sort by count, descending, ties broken by class index (stable). The reference code
    flips the class-index vector instead, which is right only for frequency-sorted ids (L1 / FFN's F5).
    """
    order = torch.argsort(-counts, stable=True)
    mirror = torch.empty_like(order)
    mirror[order] = order.flip(0)
    return mirror


def index_mirror(num_classes: int) -> torch.Tensor:
    """mirror[j] = C-1-j: the released FFN code's pairing by reversed class index (L1 / FFN's F5),
    equal to ``frequency_mirror`` only when ids are sorted by count."""
    return torch.arange(num_classes - 1, -1, -1)


def kps_margins(counts: torch.Tensor, max_m: float, mirror: torch.Tensor | None = None) -> torch.Tensor:
    """KPS margins m_j = max_m * s_{mirror(j)} / max_k s_k: the tail gets the head's large s.

    Li, Cheung, Hu, TPAMI'23; docs/methods/losses.md#kps. ``mirror`` defaults to ``frequency_mirror``.
    """
    sensitivity = kps_sensitivity(counts)
    mirror = frequency_mirror(counts) if mirror is None else mirror
    return max_m * sensitivity[mirror] / sensitivity.max()


def kps_ga_scales(counts: torch.Tensor, s: float, ga_max: float, mirror: torch.Tensor | None = None) -> torch.Tensor:
    """Per-class "gradient adjustment" scales clamp(s * s_{mirror(c)}, s, ga_max) (docs/methods/losses.md#kps).

    A sample of class y uses entry y once GA is on: s for the head class, up to ga_max for the tail.
    """
    mirror = frequency_mirror(counts) if mirror is None else mirror
    return torch.clamp(s * kps_sensitivity(counts)[mirror], s, ga_max)


def kps_loss(
    cosine: torch.Tensor,
    labels: torch.Tensor,
    sensitivity: torch.Tensor,
    margins: torch.Tensor,
    scale: torch.Tensor | float,
) -> torch.Tensor:
    """KPS loss on cosine logits: CE(scale_i * (s ⊙ cos_i - m_y e_y), y) (docs/methods/losses.md#kps).

    ``scale`` is the global s (a float) or a per-sample vector (N,) of GA scales.
    """
    cosine = cosine.float()
    scaled = subtract_target_margin(cosine * sensitivity.to(device=cosine.device, dtype=cosine.dtype), labels, margins)
    row_scale = torch.as_tensor(scale, dtype=torch.float32, device=scaled.device).reshape(-1, 1)
    return cross_entropy(row_scale * scaled, labels)


def las_smoothing(counts: torch.Tensor, head: float, tail: float) -> torch.Tensor:
    """MiSLAS "concave" label-aware smoothing eps_c = eps_K + (eps_1 - eps_K) sin(pi (n_c - n_K) / (2 (n_1 - n_K))).

    Zhong et al., CVPR'21 ("Improving Calibration for Long-Tailed Recognition"): eps_1 = head
    for the largest class n_1, eps_K = tail for the smallest n_K. Equal counts give head for every
    class (the formula is 0/0 there).
    """
    largest, smallest = counts.max(), counts.min()
    if largest == smallest:
        return torch.full_like(counts, head)
    return tail + (head - tail) * torch.sin(math.pi * (counts - smallest) / (2 * (largest - smallest)))


def las_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: torch.Tensor) -> torch.Tensor:
    """Label-aware smoothing loss, mean over i of (1 - eps_y)(-log p_y) + eps_y mean_j(-log p_j).

    The mean over j includes the ground truth, as the MiSLAS code does; the paper spreads eps_y
    over the other C-1 classes only. The author confirms the code's GT weight 1 - eps + eps/C
    (MiSLAS issue #4); both agree up to O(eps/C). L2 in docs/methods/losses.md#differences-from-the-released-code.
    """
    log_probs = F.log_softmax(logits.float(), dim=1)
    eps = smoothing.to(device=log_probs.device, dtype=log_probs.dtype)[labels]
    nll = -log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
    uniform = -log_probs.mean(dim=1)
    return ((1 - eps) * nll + eps * uniform).mean()


def logit_adjustment(counts: torch.Tensor, tau: float) -> torch.Tensor:
    """Offsets tau * log pi_c with the training prior pi_c = n_c / sum_j n_j.

    Menon et al., ICLR'21 ("Long-Tail Learning via Logit Adjustment"): CE(z + tau log pi, y).
    """
    return tau * torch.log(counts / counts.sum())


def offset_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """CE(z + b, y) with a fixed per-class offset b: balanced softmax (b = log n) and logit adjustment."""
    logits = logits.float()
    return cross_entropy(logits + offsets.to(device=logits.device, dtype=logits.dtype), labels)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE against soft targets q (N, C), not renormalised (GLMC / FSGL, docs/methods/fsgl.md#losses):

        L = -(1/N) sum_i sum_c q_ic log softmax(z_i)_c

    FSGL's re-weighted targets q = lam w_a e_a + (1 - lam) w_b e_b do not sum to 1; keeping the
    sum is what re-weights the classes.
    """
    return -(targets.float() * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def power_class_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-class weights w_c = C n_c^-beta / sum_j n_j^-beta (FSGL's label weighting, beta_l; mean 1).

    Counts [100, 25]: beta 1 gives [0.4, 1.6]. A class without images counts as one image.
    """
    counts = as_counts(counts).clamp(min=1)
    raw = counts.pow(-beta)
    return raw / raw.sum() * len(counts)


def simsiam_consistency(p_a: torch.Tensor, z_a: torch.Tensor, p_b: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """Symmetric SimSiam term (Chen & He, CVPR'21, Eq. 1-2), FSGL's consistency between its views:

        L = -(1/N) sum_i [cos(p_a,i, sg(z_b,i)) + cos(p_b,i, sg(z_a,i))]   in [-2, 2]

    p = predictor outputs, z = projections, sg = stop-gradient (no temperature, no negatives).
    """
    def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()

    return negative_cosine(p_a, z_b) + negative_cosine(p_b, z_a)
