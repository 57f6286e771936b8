"""How a stage's model is read out as class scores, for model selection and for its one test read.

A stage with a classifier reads its logits (``LogitReadout``). A stage without one (contrastive
pre-training) declares another readout; ``NearestClassMean`` scores each image by the cosine
similarity of its L2-normalised feature to the mean normalised feature of each class over the
un-augmented training split (the nearest-class-mean classifier, Mensink et al., TPAMI'13), the
class means recomputed from the current weights at every read. Scores are not calibrated
probabilities, so ECE and NLL of such a stage describe the cosine scale, not a classifier.
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ltrepro.data import LTData
from ltrepro.data.loader import make_loader


class Readout(Protocol):
    has_logits: bool  # whether the model's forward gives class logits (export needs that)

    def predict(self, model: nn.Module, loader, device: torch.device) -> tuple[np.ndarray, np.ndarray]: ...


class LogitReadout:
    """The model's forward output, the class logits."""

    has_logits = True

    def predict(self, model: nn.Module, loader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        from ltrepro.engine import predict

        return predict(model, loader, device)


class NearestClassMean:
    """Cosine similarity to the class means of normalised training features (``embed(model, x)``)."""

    has_logits = False

    def __init__(self, data: LTData, batch_size: int, device: torch.device, num_workers: int,
                 embed: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda model, x: model.features(x)) -> None:  # fmt: skip
        self.train = make_loader(data, "train", batch_size, device, num_workers=num_workers, in_order=True)
        self.num_classes, self.embed = data.num_classes, embed

    def predict(self, model: nn.Module, loader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        from ltrepro.engine import predict

        embed = EmbeddingOf(model, self.embed)
        features, labels = predict(embed, self.train, device)
        features = F.normalize(torch.from_numpy(features), dim=1)
        means = torch.zeros(self.num_classes, features.shape[1]).index_add_(0, torch.from_numpy(labels).long(), features)
        means = F.normalize(means, dim=1)  # a class absent from training keeps a zero mean, scoring 0
        queries, query_labels = predict(embed, loader, device)
        return (F.normalize(torch.from_numpy(queries), dim=1) @ means.T).numpy(), query_labels


class EmbeddingOf(nn.Module):
    """``embed(model, x)`` as a module, so ``engine.predict`` (eval mode, autocast) runs it."""

    def __init__(self, model: nn.Module, embed: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model, self.embed = model, embed

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.model, images)
