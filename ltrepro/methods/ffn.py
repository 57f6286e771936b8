"""FFN, Feature Fusion Network (ffn_h2t.md §2).

Stage 1 trains two identical backbones on the same LT subset: one with CE and a linear head, one
with KPS and a cosine head. Stage 2 freezes both (BN in eval mode; the reference's train-mode CE
branch, bug F1, only behind ``ffn.reference_bn_bug``) and trains one shared cosine classifier,
initialised from the KPS head, on fused logits z = lam cos(W, f_kps) + (1 - lam) cos(W, f_ce) with
the LDAM loss and class-balanced sampling. At test time the fused model runs both backbones.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ltrepro.config import Config
from ltrepro.data import LTData
from ltrepro.features import ffn_fused_logits
from ltrepro.methods import Method, Stage, Tunable, register
from ltrepro.methods.baselines import STAGE1
from ltrepro.models.heads import CosineClassifier
from ltrepro.objectives import FusionObjective
from ltrepro.stages import FrozenBackbone, StagePlan, load_stage_model, stage_loss, train_loader


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
    kps, ce = load_stage_model(inputs["stage1_kps"], data), load_stage_model(inputs["stage1_ce"], data)
    if not isinstance(kps.head, CosineClassifier):
        raise ValueError("FFN's KPS branch must have a cosine head")
    head = CosineClassifier(kps.feature_dim, data.num_classes)
    head.weight.data.copy_(kps.head.weight.data)  # initialised from the KPS stage-1 classifier (§2.3)
    loss = stage_loss(stage, data, "stage2")
    model = FusedClassifier(
        FrozenBackbone(kps.backbone, "eval"),
        FrozenBackbone(ce.backbone, "batch" if cfg.ffn.reference_bn_bug else "eval"),
        head,
        stage.lam,
        float(getattr(loss, "s", 1.0)),
    ).to(device)
    groups = [{"params": list(model.head.parameters())}]
    return StagePlan(model, FusionObjective(loss), train_loader(cfg, data, stage, device), groups)


def kps_branch(cfg: Config) -> dict:
    return {"stage1": {"loss": "kps", "head": "cosine", "loss_params": cfg.ffn.kps_params}}


register(
    Method(
        "ffn",
        "Feature Fusion Network: CE and KPS backbones, fused cosine classifier trained with LDAM",
        (
            Stage("stage1_ce", "stage1", STAGE1.build),
            Stage("stage1_kps", "stage1", STAGE1.build, overrides=kps_branch),
            Stage("stage2", "stage2", fusion_stage, inputs=("stage1_ce", "stage1_kps")),
        ),
        (Tunable("stage2.lam", 0.0, 1.0),),
    )
)
