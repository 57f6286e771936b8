"""The network every method trains: a backbone that yields a 4-D feature map, pooling, and a head."""
from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """``head(GAP(backbone(x)))`` with each stage reachable on its own.

    The head is a separate attribute so cosine heads (NormedLinear, docs/methods/README.md#cosine-classifier)
    can replace it, and ``feature_map`` exposes the un-pooled last-stage map that H2T grafts on (H2T's
    ``resnet32_fe``; docs/methods/h2t.md#channel-grafting) and that FCC scales in its reference code
    (docs/methods/fcc.md#where-it-acts).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.head: nn.Module = nn.Linear(feature_dim, num_classes)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last-stage map, N x feature_dim x h x w."""
        return self.backbone(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled features, N x feature_dim."""
        return self.feature_map(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
