"""Stage plans: what one stage trains (model, objective, batches, optimiser, update rule, readout).

A representation stage trains a whole ``Classifier`` from scratch (stage 1 of every method). A
classifier stage rebuilds its input runs (``ltrepro.rebuild.load_input``), freezes their backbones
and trains a head (stage 2): BN is explicit, ``eval`` (frozen statistics) or ``shift`` (MiSLAS:
running statistics follow the stage-2 batches, affine parameters frozen). Methods compose these;
the engine runs any of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ltrepro.config import Config, StageConfig
from ltrepro.data import LTData
from ltrepro.data.loader import fixed_seed_generator, make_loader
from ltrepro.errors import LtreproError
from ltrepro.features import class_ranks, fcc_factors
from ltrepro.losses import build_loss
from ltrepro.models import Classifier, create_model
from ltrepro.models.heads import LearnableWeightScaling, make_head
from ltrepro.objectives import FeatureScaling, Objective
from ltrepro.optim import UpdateRule, build_optimizer, build_update
from ltrepro.readouts import LogitReadout, Readout


@dataclass
class StagePlan:
    """Everything ``engine.fit`` needs beyond the stage config.

    The objective and the loader may also implement the engine's epoch hooks (``epoch_metrics``,
    ``epoch_state`` / ``load_epoch_state``; the loader ``set_epoch(epoch, model)``). A post-hoc plan
    (``posthoc_plan``, a stage of 0 epochs) trains nothing and has none of them: its ``choose``
    fixes the model's free values on validation.
    """

    model: nn.Module
    objective: Any
    train_loader: Any
    optimizer: torch.optim.Optimizer | None
    update: UpdateRule | None
    readout: Readout
    # (model, validation loader, device) -> what it chose, logged as metrics
    choose: Callable[[nn.Module, Any, torch.device], dict[str, float]] | None = None


def make_plan(
    stage: StageConfig, model: nn.Module, objective, loader, param_groups: list[dict] | None = None,
    readout: Readout | None = None,
) -> StagePlan:  # fmt: skip
    """A plan whose optimiser and update rule come from ``stage`` (``param_groups``: all of the
    model's parameters by default); a stage without class logits passes its ``readout``."""
    groups = param_groups if param_groups is not None else [{"params": list(model.parameters())}]
    return StagePlan(model, objective, loader, build_optimizer(stage, groups), build_update(stage), readout or LogitReadout())


def posthoc_plan(model: nn.Module, choose: Callable[[nn.Module, Any, torch.device], dict[str, float]] | None) -> StagePlan:
    """A stage that trains nothing: ``choose`` (None: nothing to choose) sets the model on validation."""
    return StagePlan(model, None, None, None, None, LogitReadout(), choose)


def build_model(cfg: Config, data: LTData, head: str = "linear") -> Classifier:
    """The configured backbone with a ``head`` of the given kind for this dataset."""
    in_channels = cfg.model.in_channels or data.in_channels
    if in_channels != data.in_channels:
        raise LtreproError(f"model.in_channels={in_channels} but {data.name} images have {data.in_channels}")
    try:
        model = create_model(cfg.model.name, data.num_classes, in_channels)
    except LtreproError as exc:
        raise LtreproError(f"model.name: {exc}") from None
    if head != "linear":
        model.head = make_head(head, model.feature_dim, data.num_classes)
    return model


def stage_loss(stage: StageConfig, data: LTData, section: str):
    try:
        return build_loss(stage.loss, data.train_counts.tolist(), **stage.loss_params)
    except LtreproError as exc:
        raise LtreproError(f"{section}.loss: {exc}") from None


def feature_scaling(stage: StageConfig, data: LTData) -> FeatureScaling:
    """FCC factors, or off when stage.fcc is 0."""
    if stage.fcc <= 0:
        return FeatureScaling(None, 0)
    return FeatureScaling(stage_fcc_factors(stage, data.train_counts.tolist()), stage.fcc_start_epoch)


def stage_fcc_factors(stage: StageConfig, counts: list[int]) -> torch.Tensor:
    """FCC factors ranked by training frequency (our fix of bug FC2), or by class id with
    ``fcc_by_index`` (the released code's)."""
    return fcc_factors(len(counts), stage.fcc, None if stage.fcc_by_index else class_ranks(counts))


def train_loader(cfg: Config, data: LTData, stage: StageConfig, device: torch.device, sampler: str | None = None):
    return make_loader(
        data, "train", stage.batch_size, device, cfg.data.augment, sampler or stage.sampler, stage.epochs,
        cfg.data.num_workers,
    )  # fmt: skip


def representation_stage(cfg: Config, data: LTData, inputs: dict[str, Path], device: torch.device) -> StagePlan:
    """Stage 1: the whole network, cfg.stage1's loss, head, mixup and FCC, instance sampling by default."""
    stage = cfg.stage1
    model = build_model(cfg, data, stage.head).to(device)
    objective = Objective(stage_loss(stage, data, "stage1"), stage.mixup_alpha, feature_scaling(stage, data))
    return make_plan(stage, model, objective, train_loader(cfg, data, stage, device))


FCC_FIELDS = ("fcc", "fcc_start_epoch", "fcc_by_index")  # what feature_scaling reads of a stage's block
# What representation_stage reads beyond the plan fields, data, model and seed.
REPRESENTATION_READS = tuple(f"stage1.{name}" for name in ("loss", "loss_params", "head", "mixup_alpha", "sampler", *FCC_FIELDS))


class FrozenBackbone(nn.Module):
    """A stage-1 backbone that never trains: no gradients, and BN as ``bn`` says.

    ``eval``: BN always uses the stage-1 running statistics. ``shift``: in training the running
    statistics are updated from the stage-2 batches (momentum 0.1) while the affine parameters stay
    frozen (MiSLAS "shift learning on BN", Zhong et al., CVPR'21, §3.3); evaluation uses them. ``batch``: BN in
    train mode always, test included: FFN's reference bug F1, offered only to reproduce it.
    """

    def __init__(self, backbone: nn.Module, bn: str) -> None:
        super().__init__()
        self.backbone, self.bn = backbone, bn
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenBackbone":
        self.training = mode
        self.backbone.train((mode and self.bn == "shift") or self.bn == "batch")
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone(images)


def probe_model(stage1: Classifier, cfg: Config, data: LTData, lws: bool = False) -> Classifier:
    """Stage-2 model on one frozen backbone: the head from ``stage2.init``, optionally LWS-scaled."""
    stage = cfg.stage2
    model = Classifier(FrozenBackbone(stage1.backbone, stage.bn), stage1.feature_dim, data.num_classes)
    model.head = stage1.head if stage.init == "stage1" else make_head(stage.head, stage1.feature_dim, data.num_classes)
    if lws:
        model.head = LearnableWeightScaling(model.head, data.num_classes)
    return model


def head_param_groups(model: Classifier, lr: float, head_lr_factor: float = 1.0) -> list[dict]:
    """The trainable head; with LWS, the classifier at lr * head_lr_factor and the scales at lr (docs/methods/mislas.md#learnable-weight-scaling)."""
    if isinstance(model.head, LearnableWeightScaling):
        return [
            {"params": list(model.head.head.parameters()), "lr": lr * head_lr_factor},
            {"params": [model.head.scales], "lr": lr},
        ]
    return [{"params": [p for p in model.head.parameters() if p.requires_grad]}]


class PairedLoader:
    """H2T dual sampling (docs/methods/h2t.md): batches of ((fused, fusing), fused labels).

    The fused stream is class-balanced, the fusing stream instance-sampled; both are augmented
    independently and drawn from generators derived from the epoch's, so runs stay reproducible.
    """

    def __init__(self, fused, fusing) -> None:
        self.fused, self.fusing = fused, fusing
        self.device = fused.device

    def __len__(self) -> int:
        return len(self.fused)

    def epoch(self, epoch: int = 0, generator: torch.Generator | None = None, with_second_labels: bool = False) -> Iterator:
        """Both streams hold N images in batches of one size, so they end together; the second
        stream's labels come along as ``(other, other_labels)`` when ``with_second_labels``."""
        second = fixed_seed_generator(int(torch.randint(2**31, (1,), generator=generator)), epoch)
        for (images, labels), (other, other_labels) in zip(
            self.fused.epoch(epoch, generator), self.fusing.epoch(epoch, second), strict=True
        ):
            yield (images, (other, other_labels) if with_second_labels else other), labels
