"""Classifier heads that replace ``Classifier.head``: linear, cosine (NormedLinear), MiSLAS LWS, and the
post-hoc corrections of a finished linear head (logit adjustment, tau-normalisation)."""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ltrepro.errors import LtreproError
from ltrepro.features import cosine_logits, posthoc_adjusted_logits, tau_normalised_weight

HeadKind = Literal["linear", "cosine"]


class CosineClassifier(nn.Module):
    """NormedLinear (docs/methods/README.md#cosine-classifier): z_ic = <f_i/||f_i||, w_c/||w_c||>, no bias or scale.

    ``weight`` is stored (C, D) like ``nn.Linear``; the reference stores it (D, C), so load a reference
    ``linear.weight`` with ``from_reference_weight``. Init: uniform(-1, 1), then each class vector
    rescaled to unit L2 norm.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        weight = torch.empty(num_classes, in_features).uniform_(-1, 1)
        self.weight = nn.Parameter(weight / weight.norm(dim=1, keepdim=True))

    @classmethod
    def from_reference_weight(cls, weight_d_by_c: torch.Tensor) -> CosineClassifier:
        """A head holding the transpose of a reference (FFN/KPS) NormedLinear weight of shape (D, C)."""
        in_features, num_classes = weight_d_by_c.shape
        head = cls(in_features, num_classes)
        with torch.no_grad():
            head.weight.copy_(weight_d_by_c.t())
        return head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(features, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"


class LearnableWeightScaling(nn.Module):
    """MiSLAS LWS (docs/methods/mislas.md#learnable-weight-scaling): z = g * head(f), learnable g in R^C, init 1.

    ``head`` and ``scales`` are separate attributes so an optimiser can give them separate param groups.
    """

    def __init__(self, head: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.head = head
        self.scales = nn.Parameter(torch.ones(num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features) * self.scales


class PosthocCorrection(nn.Module):
    """A finished head, frozen, whose scores a correction of strength ``tau`` changes without training.

    ``tau`` is a buffer, so the value chosen on validation is saved with the weights and a rebuilt
    model scores as the selected one did (docs/methods/posthoc.md).
    """

    def __init__(self, head: nn.Module, tau: float) -> None:
        super().__init__()
        self.head = head
        for parameter in self.head.parameters():
            parameter.requires_grad_(False)
        self.register_buffer("tau", torch.tensor(float(tau)))


class LogitAdjustedHead(PosthocCorrection):
    """z - tau log pi (``posthoc_adjusted_logits``) on top of ``head``; ``counts`` are the training counts."""

    def __init__(self, head: nn.Module, counts: torch.Tensor, tau: float) -> None:
        super().__init__(head, tau)
        self.register_buffer("counts", counts.float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return posthoc_adjusted_logits(self.head(features), self.counts, self.tau)


class TauNormalisedHead(PosthocCorrection):
    """``head``'s rows divided by their norm to the power tau (``tau_normalised_weight``), bias kept, so
    tau = 0 is the finished head itself."""

    def __init__(self, head: nn.Linear, tau: float) -> None:
        if not isinstance(head, nn.Linear):
            raise LtreproError(f"tau-normalisation needs a linear head, got {type(head).__name__} (a cosine head is normalised already)")
        super().__init__(head, tau)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(features, tau_normalised_weight(self.head.weight, self.tau), self.head.bias)


def make_head(kind: HeadKind, feature_dim: int, num_classes: int) -> nn.Module:
    """``linear``: nn.Linear with kaiming_normal_ weight (as resnet32 inits it); ``cosine``: CosineClassifier."""
    if kind == "linear":
        head = nn.Linear(feature_dim, num_classes)
        nn.init.kaiming_normal_(head.weight)
        return head
    if kind == "cosine":
        return CosineClassifier(feature_dim, num_classes)
    raise LtreproError(f"unknown head kind {kind!r}; allowed: linear, cosine")
