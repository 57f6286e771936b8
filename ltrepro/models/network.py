"""The network every method trains: a backbone that yields a 4-D feature map, pooling, and a head."""
from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """``head(GAP(backbone(x)))`` with each stage reachable on its own.

    The head is a separate attribute so cosine heads (NormedLinear, ffn_h2t.md §1.3) can replace it,
    and ``feature_map`` exposes the un-pooled last-stage map that H2T grafts on (ffn_h2t.md §1.3,
    ``resnet32_fe``) and that FCC scales (fsgl_fcc.md §1.2).
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
