"""Training samplers as one family: class c is drawn with probability proportional to n_c^q.

instance (q = 1, a plain shuffle), square-root (q = 1/2), class-balanced (q = 0), and progressive,
which moves linearly from instance to class-balanced over training (Kang et al., ICLR'20, §3).
Each returns one epoch of N indices from a seeded generator, for the device loader and the
DataLoader alike.
"""
from __future__ import annotations

import numpy as np
import torch

SAMPLERS = ("instance", "class_balanced", "sqrt", "progressive")


def class_probabilities(counts: np.ndarray, kind: str, epoch: int = 0, total_epochs: int = 1) -> np.ndarray:
    """p_c ∝ n_c^q for the sampler ``kind``; progressive: p_c(t) = (1 - t/T) n_c/N + (t/T)/C."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    if kind == "progressive":
        t = epoch / max(total_epochs - 1, 1)
        return (1 - t) * counts / counts.sum() + t * present / present.sum()
    return power_probabilities(counts, {"instance": 1.0, "sqrt": 0.5, "class_balanced": 0.0}[kind])


def power_probabilities(counts: np.ndarray, power: float) -> np.ndarray:
    """p_c ∝ n_c^power over the classes present (power 1: instance, 0: class-balanced)."""
    counts = np.asarray(counts, dtype=np.float64)
    probs = counts**power * (counts > 0)
    return probs / probs.sum()


def epoch_indices(
    labels: np.ndarray, kind: str, generator: torch.Generator, epoch: int = 0, total_epochs: int = 1
) -> torch.Tensor:
    """N training indices for one epoch; instance sampling is a permutation, the others draw with
    replacement with per-image weight p_{y_i} / n_{y_i}."""
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler {kind!r}; allowed: {', '.join(SAMPLERS)}")
    if kind == "instance":
        return torch.randperm(len(labels), generator=generator)
    return weighted_indices(labels, class_probabilities(np.bincount(labels), kind, epoch, total_epochs), generator)


def weighted_indices(labels: np.ndarray, class_probs: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    """N indices drawn with replacement, image i with weight class_probs[y_i] / n_{y_i}."""
    counts = np.bincount(labels, minlength=len(class_probs))
    per_image = (class_probs / np.maximum(counts, 1))[labels]
    return torch.multinomial(torch.from_numpy(per_image), len(labels), replacement=True, generator=generator)
