"""Plain baselines: CE (stage 1 only), CE+FCC (docs/methods/fcc.md), and cRT (Kang et al., ICLR'20:
re-train the classifier on frozen features with class-balanced sampling)."""
from __future__ import annotations

from pathlib import Path

import torch

from ltrepro.config import Config
from ltrepro.data import LTData
from ltrepro.methods import Method, Stage, Tunable, register
from ltrepro.objectives import Objective
from ltrepro.rebuild import load_input
from ltrepro.stages import (
    REPRESENTATION_READS, StagePlan, feature_scaling, head_param_groups, make_plan, probe_model, representation_stage,
    stage_loss, train_loader,
)  # fmt: skip

STAGE1 = Stage("stage1", "stage1", representation_stage, reads=REPRESENTATION_READS)
# What a one-backbone classifier stage reads of stage2 beyond its plan fields.
PROBE_READS = tuple(
    f"stage2.{name}" for name in ("loss", "loss_params", "head", "init", "bn", "mixup_alpha", "sampler", "fcc", "fcc_start_epoch")
)


def probe_stage(cfg: Config, data: LTData, inputs: dict[str, Path], device: torch.device) -> StagePlan:
    """Stage 2 on one frozen backbone: cfg.stage2's head init, loss, sampler, BN mode and FCC."""
    stage = cfg.stage2
    model = probe_model(load_input(inputs["stage1"], data, device), cfg, data).to(device)
    objective = Objective(stage_loss(stage, data, "stage2"), stage.mixup_alpha, feature_scaling(stage, data))
    return make_plan(stage, model, objective, train_loader(cfg, data, stage, device), head_param_groups(model, stage.lr))


register(Method("ce", "cross-entropy baseline, one stage", (STAGE1,)))
register(
    Method(
        "ce_fcc",
        "cross-entropy with Feature Clusters Compression (CVPR'23): features times tau_y in training",
        (STAGE1,),
        (Tunable("stage1.fcc", 0.05, 2.0, log=True),),
    )
)
register(
    Method(
        "crt",
        "classifier re-training: frozen CE backbone, new head, class-balanced sampling",
        (STAGE1, Stage("stage2", "stage2", probe_stage, inputs=("stage1",), reads=PROBE_READS)),
    )
)
