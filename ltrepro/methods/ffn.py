"""FFN, Feature Fusion Network (docs/methods/ffn.md).

Stage 1 trains two identical backbones on the same LT subset: one with CE and a linear head, one
with KPS and a cosine head. Stage 2 freezes both (BN in eval mode; the reference's train-mode CE
branch, bug F1, only behind ``ffn.reference_bn_bug``) and trains one shared cosine classifier,
initialised from the KPS head, on fused logits z = lam cos(W, f_kps) + (1 - lam) cos(W, f_ce) with
the LDAM loss and class-balanced sampling. At test time the fused model runs both backbones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ltrepro.config import Config, bounded, register_block
from ltrepro.data import LTData
from ltrepro.features import ffn_fused_logits
from ltrepro.methods import SHUFFLED_CLASSES, Method, ReferenceBehaviour, Stage, Tunable, register, selection_on_test
from ltrepro.methods.baselines import STAGE1
from ltrepro.models.heads import CosineClassifier
from ltrepro.objectives import FusionObjective
from ltrepro.rebuild import load_input
from ltrepro.stages import REPRESENTATION_READS, FrozenBackbone, StagePlan, make_plan, stage_loss, train_loader


@dataclass
class FFNConfig:
    """FFN's own block: the KPS branch's loss parameters, the fusion weight, the bug-F1 switch."""

    kps_params: dict[str, Any] = field(default_factory=lambda: {"max_m": 0.5, "s": 15, "ga_epoch": 36})
    lam: float = bounded(0.5, 0.0, 1.0)  # z = lam cos(W, f_kps) + (1 - lam) cos(W, f_ce)
    reference_bn_bug: bool = False  # bug F1: the CE backbone's BN left in train mode (off = the fix)


register_block("ffn", FFNConfig)


class FusedClassifier(nn.Module):
    """Two frozen backbones and one cosine head; ``forward`` returns scale * z, the logits the loss
    (LDAM, s = 30) trains, so softmax confidences and ECE are on the training temperature."""

    def __init__(self, kps: nn.Module, ce: nn.Module, head: CosineClassifier, lam: float, scale: float) -> None:
        super().__init__()
        self.kps, self.ce, self.head, self.lam, self.scale = kps, ce, head, lam, scale

    def fused_cosine(self, images: torch.Tensor) -> torch.Tensor:
        f_kps = self.kps(images).mean(dim=(2, 3))
        f_ce = self.ce(images).mean(dim=(2, 3))
        return ffn_fused_logits(f_kps, f_ce, self.head.weight, self.lam)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scale * self.fused_cosine(images)


def fusion_stage(cfg: Config, data: LTData, inputs: dict[str, Path], device: torch.device) -> StagePlan:
    stage = cfg.stage2
    kps, ce = load_input(inputs["stage1_kps"], data, device), load_input(inputs["stage1_ce"], data, device)
    if not isinstance(getattr(kps, "head", None), CosineClassifier):
        raise ValueError("FFN's KPS branch must have a cosine head")
    head = CosineClassifier(kps.feature_dim, data.num_classes)
    head.weight.data.copy_(kps.head.weight.data)  # initialised from the KPS stage-1 classifier (docs/methods/ffn.md)
    loss = stage_loss(stage, data, "stage2")
    model = FusedClassifier(
        FrozenBackbone(kps.backbone, "eval"),
        FrozenBackbone(ce.backbone, "batch" if cfg.ffn.reference_bn_bug else "eval"),
        head,
        cfg.ffn.lam,
        float(getattr(loss, "s", 1.0)),
    ).to(device)
    groups = [{"params": list(model.head.parameters())}]
    return make_plan(stage, model, FusionObjective(loss), train_loader(cfg, data, stage, device), groups)


def kps_branch(cfg: Config) -> dict:
    return {"stage1": {"loss": "kps", "head": "cosine", "loss_params": cfg.ffn.kps_params}}


register(
    Method(
        "ffn",
        "Feature Fusion Network: CE and KPS backbones, fused cosine classifier trained with LDAM",
        (
            Stage("stage1_ce", "stage1", STAGE1.build, reads=REPRESENTATION_READS),
            Stage("stage1_kps", "stage1", STAGE1.build, reads=(*REPRESENTATION_READS, "ffn.kps_params"), overrides=kps_branch),
            Stage(
                "stage2", "stage2", fusion_stage, inputs=("stage1_ce", "stage1_kps"),
                reads=("stage2.loss", "stage2.loss_params", "stage2.sampler", "ffn.lam", "ffn.reference_bn_bug"),
            ),  # fmt: skip
        ),
        (Tunable("ffn.lam", 0.0, 1.0),),
        (
            ReferenceBehaviour("F1", "CE backbone's BN in train mode in stage 2", ("ffn.reference_bn_bug=true",)),
            ReferenceBehaviour("F5", "KPS margins and GA scales by class index", ("ffn.kps_params.mirror=index",),
                               SHUFFLED_CLASSES, stage="stage1_kps"),
            selection_on_test("F8"),
        ),
    )
)
