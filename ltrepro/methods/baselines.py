"""Plain baselines: CE (stage 1 only), CE+FCC (docs/methods/fcc.md), cRT (Kang et al., ICLR'20:
re-train the classifier on frozen features with class-balanced sampling), and the one-stage
logit-corrected losses every LT table should be read against (docs/methods/bs_la.md): balanced
softmax (Ren et al., NeurIPS'20) and logit-adjusted CE (Menon et al., ICLR'21). The post-hoc
corrections of a finished CE model are in ``ltrepro.methods.posthoc``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ltrepro.config import Config, bounded, register_block
from ltrepro.data import LTData
from ltrepro.methods import SHUFFLED_CLASSES, Method, ReferenceBehaviour, Stage, Tunable, register, selection_on_test
from ltrepro.objectives import Objective
from ltrepro.rebuild import load_input
from ltrepro.stages import (
    FCC_FIELDS, REPRESENTATION_READS, StagePlan, feature_scaling, head_param_groups, make_plan, probe_model, representation_stage,
    stage_loss, train_loader,
)  # fmt: skip

STAGE1 = Stage("stage1", "stage1", representation_stage, reads=REPRESENTATION_READS)


@dataclass
class LogitAdjustedConfig:
    """``la``'s block: the strength of the training-time adjustment."""

    tau: float = bounded(1.0, 0.0)  # CE(z + tau log pi, y); 1 is Menon et al.'s default (and balanced softmax)


register_block("la", LogitAdjustedConfig)


def with_loss(loss: str, params: Callable[[Config], dict] = lambda cfg: {}) -> Callable[[Config], dict]:
    """Stage overrides that make stage 1 train with ``loss``, whatever stage1.loss says: the method is its loss."""
    return lambda cfg: {"stage1": {"loss": loss, "loss_params": params(cfg)}}


# What a one-backbone classifier stage reads of stage2 beyond its plan fields.
PROBE_READS = tuple(
    f"stage2.{name}" for name in ("loss", "loss_params", "head", "init", "bn", "mixup_alpha", "sampler", *FCC_FIELDS)
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
        (
            selection_on_test("FC1"),
            ReferenceBehaviour("FC2", "FCC factors by class index", ("stage1.fcc_by_index=true",), SHUFFLED_CLASSES),
        ),
    )
)
register(
    Method(
        "crt",
        "classifier re-training: frozen CE backbone, new head, class-balanced sampling",
        (STAGE1, Stage("stage2", "stage2", probe_stage, inputs=("stage1",), reads=PROBE_READS)),
        reference=(selection_on_test("H6", "best test epoch kept (H2T's cRT code)"),),
    )
)
register(
    Method(
        "bs",
        "balanced softmax (Ren et al., NeurIPS'20): CE on z + log n_y in training, plain logits at test; one stage",
        (Stage("stage1", "stage1", representation_stage, reads=REPRESENTATION_READS, overrides=with_loss("balanced_softmax")),),
    )
)
register(
    Method(
        "la",
        "logit-adjusted loss (Menon et al., ICLR'21): CE on z + tau log pi_y in training; one stage",
        (
            Stage("stage1", "stage1", representation_stage, reads=(*REPRESENTATION_READS, "la.tau"),
                  overrides=with_loss("logit_adjusted", lambda cfg: {"tau": cfg.la.tau})),
        ),  # fmt: skip
        (Tunable("la.tau", 0.25, 2.5),),
    )
)
