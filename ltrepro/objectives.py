"""What a training step minimises, one class per way of forming the loss.

The engine calls ``objective(model, images, labels, rng)`` every step and ``set_epoch(epoch)`` at
the start of every epoch (0-based); everything method-specific about a step lives here, so
adding a method never edits the training loop.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ltrepro.features import fcc_scale, graft_channels
from ltrepro.losses import LossModule


class FeatureScaling:
    """FCC (docs/methods/fcc.md#scale-factors): features times tau_y in training from epoch ``start + 1`` (1-based).

    ``factors`` None means FCC is off. With mixup the scale is the label mixture's,
    s_i = lam tau_a + (1 - lam) tau_b (FSGL's soft-label rule, docs/methods/fcc.md#with-mixup), not the reference Remix's
    first-label-only rule (bug FC8).
    """

    def __init__(self, factors: torch.Tensor | None, start_epoch: int) -> None:
        self.factors, self.start_epoch, self.active = factors, start_epoch, False

    def set_epoch(self, epoch: int) -> None:
        self.active = self.factors is not None and epoch + 1 > self.start_epoch

    def __call__(
        self, features: torch.Tensor, labels: torch.Tensor, perm: torch.Tensor | None = None, lam: float = 1.0
    ) -> torch.Tensor:
        """Scale by tau_y, or by the mixture's soft label lam e_y + (1 - lam) e_{y[perm]} under mixup."""
        if not self.active:
            return features
        targets = labels
        if perm is not None:
            one_hot = F.one_hot(labels, len(self.factors)).float()
            targets = lam * one_hot + (1 - lam) * one_hot[perm]
        return fcc_scale(features, targets, self.factors.to(features.device))


class Objective:
    """loss(head(FCC(features(x))), y), with input mixup when alpha > 0 (docs/methods/README.md#mixup).

    One lam ~ Beta(alpha, alpha) and one permutation pi per batch: x~ = lam x + (1 - lam) x[pi],
    loss = lam L(z, y) + (1 - lam) L(z, y[pi]). Stage 1 of every method and the linear-probe stage 2
    (cRT, MiSLAS) use it; the model is a ``Classifier`` (features + head).
    """

    def __init__(self, loss: LossModule, mixup_alpha: float = 0.0, scaling: FeatureScaling | None = None) -> None:
        self.loss, self.alpha = loss, mixup_alpha
        self.scaling = scaling or FeatureScaling(None, 0)

    def set_epoch(self, epoch: int) -> None:
        self.loss.set_epoch(epoch)
        self.scaling.set_epoch(epoch)

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator):
        if self.alpha <= 0:
            return self.loss(model.head(self.scaling(model.features(images), labels)), labels)
        lam = float(rng.beta(self.alpha, self.alpha))
        perm = torch.from_numpy(rng.permutation(len(labels))).to(images.device)
        features = model.features(lam * images + (1 - lam) * images[perm])
        logits = model.head(self.scaling(features, labels, perm, lam))
        return lam * self.loss(logits, labels) + (1 - lam) * self.loss(logits, labels[perm])


class GraftingObjective(Objective):
    """H2T stage 2 (docs/methods/h2t.md#stage-2-dual-sampling-and-grafting): images are (fused x1 class-balanced, fusing x2 instance-sampled).

    Both pass the frozen backbone (fused first, so shift-BN sees them in the reference order); a
    per-batch random subset of floor(rho K) last-stage channels of F1 is replaced by F2's; the loss
    uses y1 only. Grafting acts on pooled features, which equals grafting the maps (pooling is per channel).
    """

    def __init__(self, loss: LossModule, rho: float, scaling: FeatureScaling | None = None) -> None:
        super().__init__(loss, 0.0, scaling)
        self.rho = rho

    def __call__(self, model: nn.Module, images, labels: torch.Tensor, rng: np.random.Generator):
        fused, fusing = images
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        grafted, _ = graft_channels(model.features(fused), model.features(fusing), self.rho, generator)
        return self.loss(model.head(self.scaling(grafted, labels)), labels)


class FusionObjective(Objective):
    """FFN stage 2 (docs/methods/ffn.md#stage-2-fusion): the loss (LDAM) on fused cosine logits
    z = lam cos(W, f_kps) + (1 - lam) cos(W, f_ce) of the two frozen backbones."""

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator):
        return self.loss(model.fused_cosine(images), labels)
