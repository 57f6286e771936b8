"""Post-hoc baselines on a finished CE model (docs/methods/posthoc.md): nothing trains in their stage.

``posthoc_la`` subtracts tau log pi from the logits (Menon et al., ICLR'21); ``tau_norm``
divides each class's weight row by its norm to the power tau (Kang et al., ICLR'20). Both take
the CE baseline's stage 1 as input (the same run as ``ce``, reused) and choose tau on validation
from a grid, unless ``posthoc.tau`` fixes it (which is what ``ltrepro tune`` sets).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ltrepro.config import Config, StageConfig, bounded, register_block
from ltrepro.data import LTData
from ltrepro.engine import predict
from ltrepro.evaluate import balanced_accuracy
from ltrepro.methods import Method, Stage, Tunable, register
from ltrepro.methods.baselines import STAGE1
from ltrepro.models import Classifier
from ltrepro.models.heads import LogitAdjustedHead, PosthocCorrection, TauNormalisedHead
from ltrepro.readouts import EmbeddingOf
from ltrepro.rebuild import load_input
from ltrepro.stages import FrozenBackbone, StagePlan, posthoc_plan


@dataclass
class PosthocConfig(StageConfig):
    """A post-hoc stage: 0 epochs (nothing trains), tau from ``tau`` or the best of the validation grid."""

    epochs: int = bounded(0, 0, 0)  # post-hoc: no training
    tau: float | None = bounded(None, 0.0)  # null: the grid value best on validation; a number: that tau
    tau_max: float = bounded(2.0, 0.0)  # the grid: 0, tau_step, ..., tau_max
    tau_step: float = bounded(0.05, 0.001)


register_block("posthoc", PosthocConfig)
READS = ("posthoc.tau", "posthoc.tau_max", "posthoc.tau_step")


def tau_grid(block: PosthocConfig) -> list[float]:
    """[tau] when fixed, else 0, step, ..., tau_max (tau_max included when step divides it)."""
    if block.tau is not None:
        return [float(block.tau)]
    return [round(i * block.tau_step, 6) for i in range(int(block.tau_max / block.tau_step + 1e-9) + 1)]


def tau_on_validation(grid: list[float], num_classes: int) -> Callable[[nn.Module, object, torch.device], dict[str, float]]:
    """A ``choose`` that scores every tau of ``grid`` on validation features computed once, and keeps
    the first best (the weakest correction among equals); it logs the tau it kept."""

    def choose(model: Classifier, val_loader, device: torch.device) -> dict[str, float]:
        head: PosthocCorrection = model.head
        features, labels = predict(EmbeddingOf(model, lambda m, x: m.features(x)), val_loader, device)
        features = torch.from_numpy(features).to(device)
        scores = []
        for tau in grid:
            head.tau.fill_(tau)
            with torch.no_grad():
                scores.append(balanced_accuracy(head(features).argmax(1).cpu().numpy(), labels, num_classes))
        best = grid[int(np.argmax(scores))]
        head.tau.fill_(best)
        return {"posthoc_tau": best}

    return choose


def correction_plan(
    cfg: Config, data: LTData, inputs: dict[str, Path], device: torch.device, correct: Callable[[nn.Module, float], PosthocCorrection]
) -> StagePlan:  # fmt: skip
    """The input's frozen backbone (BN statistics frozen) and its head under ``correct``'s correction."""
    finished = load_input(inputs["stage1"], data, device)
    grid = tau_grid(cfg.posthoc)
    model = Classifier(FrozenBackbone(finished.backbone, "eval"), finished.feature_dim, data.num_classes)
    model.head = correct(finished.head, grid[0])
    return posthoc_plan(model.to(device), tau_on_validation(grid, data.num_classes))


def posthoc_la_stage(cfg: Config, data: LTData, inputs: dict[str, Path], device: torch.device) -> StagePlan:
    counts = torch.as_tensor(data.train_counts, dtype=torch.float32)
    return correction_plan(cfg, data, inputs, device, lambda head, tau: LogitAdjustedHead(head, counts, tau))


def tau_norm_stage(cfg: Config, data: LTData, inputs: dict[str, Path], device: torch.device) -> StagePlan:
    return correction_plan(cfg, data, inputs, device, TauNormalisedHead)


TAU = (Tunable("posthoc.tau", 0.0, 2.0),)

register(
    Method(
        "posthoc_la",
        "post-hoc logit adjustment of the CE model (Menon et al., ICLR'21): z - tau log pi, tau on validation",
        (STAGE1, Stage("posthoc", "posthoc", posthoc_la_stage, inputs=("stage1",), reads=READS)),
        TAU,
    )
)
register(
    Method(
        "tau_norm",
        "tau-normalised classifier of the CE model (Kang et al., ICLR'20): w_c / ||w_c||^tau, tau on validation",
        (STAGE1, Stage("posthoc", "posthoc", tau_norm_stage, inputs=("stage1",), reads=READS)),
        TAU,
    )
)
