"""H2T, Feature Fusion from Head to Tail (AAAI'24, docs/methods/h2t.md), and the MiSLAS stage 2 it builds on.

Stage 1 of all three is MiSLAS's: CE with mixup (alpha from the recipe, 1.0 on CIFAR). Stage 2
keeps the backbone frozen with shift BN and trains the stage-1 classifier:
- h2t: dual sampling (class-balanced fused sample with its label, instance-sampled fusing sample
  whose label is ignored), floor(rho K) last-stage channels grafted per batch, plain CE;
- mislas: label-aware smoothing, learnable weight scaling, class-balanced sampling (the reference
  ClassAwareSampler cycles classes 4 images at a time; we draw classes uniformly per image);
- mislas_h2t: both, the paper's combination that the released code lacks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ltrepro.config import Config, bounded, register_block
from ltrepro.data import LTData
from ltrepro.methods import Method, Stage, Tunable, register, selection_on_test
from ltrepro.methods.baselines import PROBE_READS, STAGE1
from ltrepro.objectives import GraftingObjective, Objective
from ltrepro.rebuild import load_input
from ltrepro.stages import (
    PairedLoader, StagePlan, feature_scaling, head_param_groups, make_plan, probe_model, stage_loss, train_loader,
)  # fmt: skip


@dataclass
class H2TConfig:
    """H2T grafting ratio: floor(rho K) last-stage channels of the fused sample replaced (docs/methods/h2t.md)."""

    rho: float = bounded(0.25, 0.0, 1.0)


register_block("h2t", H2TConfig)


def classifier_stage(cfg: Config, data: LTData, inputs: dict[str, Path], device: torch.device, graft: bool, lws: bool) -> StagePlan:
    stage = cfg.stage2
    model = probe_model(load_input(inputs["stage1"], data, device), cfg, data, lws=lws).to(device)
    loss, scaling = stage_loss(stage, data, "stage2"), feature_scaling(stage, data)
    groups = head_param_groups(model, stage.lr, stage.head_lr_factor if lws else 1.0)
    if not graft:
        return make_plan(stage, model, Objective(loss, 0.0, scaling), train_loader(cfg, data, stage, device), groups)
    loader = PairedLoader(train_loader(cfg, data, stage, device), train_loader(cfg, data, stage, device, "instance"))
    return make_plan(stage, model, GraftingObjective(loss, cfg.h2t.rho, scaling), loader, groups)


def h2t_stage(cfg, data, inputs, device) -> StagePlan:
    return classifier_stage(cfg, data, inputs, device, graft=True, lws=False)


def mislas_stage(cfg, data, inputs, device) -> StagePlan:
    return classifier_stage(cfg, data, inputs, device, graft=False, lws=True)


def mislas_h2t_stage(cfg, data, inputs, device) -> StagePlan:
    return classifier_stage(cfg, data, inputs, device, graft=True, lws=True)


RHO = Tunable("h2t.rho", 0.05, 0.6)
# classifier_stage reads what a probe stage reads but mixup (it never mixes); LWS adds head_lr_factor.
CLASSIFIER_READS = tuple(key for key in PROBE_READS if key != "stage2.mixup_alpha")
LWS_READS = ("stage2.head_lr_factor",)
for name, summary, build, reads, tunables, reference in (
    ("h2t", "H2T: graft head-class channels into class-balanced samples, stage-2 classifier with CE", h2t_stage,
     (*CLASSIFIER_READS, "h2t.rho"), (RHO,), (selection_on_test("H6"),)),
    ("mislas", "MiSLAS stage 2: label-aware smoothing, LWS, class-balanced sampling, shift BN", mislas_stage,
     (*CLASSIFIER_READS, *LWS_READS), (), (selection_on_test("M4"),)),
    ("mislas_h2t", "MiSLAS stage 2 with H2T grafting (the paper's MiSLAS+H2T)", mislas_h2t_stage,
     (*CLASSIFIER_READS, *LWS_READS, "h2t.rho"), (RHO,), ()),
):  # fmt: skip
    register(Method(name, summary, (STAGE1, Stage("stage2", "stage2", build, inputs=("stage1",), reads=reads)), tunables, reference))
