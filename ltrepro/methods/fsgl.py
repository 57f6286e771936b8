"""FSGL, Feature Scaling Guided Learning (docs/methods/fsgl.md): GLMC with a Feature Scaling Module and SAM.

One stage trains the whole network on two mixed views per step (docs/methods/fsgl.md#views): a
MixUp view of the instance batch's first augmentation with a re-sampled batch's, and a CutMix
view of their second augmentations, one lam per step. The pooled feature of each view is scaled
by its mixed label times FCC's equal-difference factors, ranked by class frequency (the FSM,
docs/methods/fsgl.md#feature-scaling-module); a plain head and a re-weighted soft-label head are
blended by alpha(e) = 1 - (e/E)^2, a SimSiam term ties the two views, and SAM wraps SGD. At test
only the re-weighted head reads the unscaled feature, so the trained model is a plain
``Classifier`` whose ``head`` is that head: any stage 2 (cRT, H2T) takes it as its stage 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ltrepro.config import Config, bounded, register_block
from ltrepro.data import LTData
from ltrepro.data.loader import make_loader
from ltrepro.features import cutmix_box, fcc_scale, paste_box
from ltrepro.losses import functional as LF
from ltrepro.methods import SHUFFLED_CLASSES, Method, ReferenceBehaviour, Stage, Tunable, register, selection_on_test
from ltrepro.methods.baselines import PROBE_READS, probe_stage
from ltrepro.methods.h2t import CLASSIFIER_READS, RHO, h2t_stage
from ltrepro.models.network import Classifier
from ltrepro.stages import PairedLoader, StagePlan, build_model, make_plan, stage_fcc_factors


@dataclass
class FSGLConfig:
    """FSGL's own block; the FSM's gamma is ``stage1.fcc`` and SAM's radius ``stage1.sam.rho``."""

    contrast_weight: float = bounded(4.0, 0.0)  # lambda_c of the SimSiam term (4 in every FSGL command)
    label_weighting: float = bounded(1.2, 0.0)  # beta_l: w_c ∝ n_c^-beta_l in the re-weighted head's targets
    resample_weighting: float = bounded(0.0, 0.0)  # rho_s: re-sampled batch draws class c ∝ n_c^(1 - rho_s)
    mix_alpha: float = bounded(1.0, 0.001)  # lam ~ Beta(a, a); the reference always draws U(0, 1) (bug FS2)
    cutmix_area_labels: bool = False  # true: the CutMix view's label uses the pasted area (reference: lam, FS19)
    perturb_with_consistency: bool = False  # true: SAM's first pass includes the SimSiam term (reference: not, FS17)
    projection_dim: int = bounded(256, 1)  # projector d -> 256 -> predictor 256 -> 256


register_block("fsgl", FSGLConfig)


class FSGLNetwork(Classifier):
    """backbone -> pooled f, and four linear maps on it (PyTorch default init, as the reference):
    ``head`` (fc_cb, the re-weighted head, the only one used at test), ``plain_head`` (fc),
    ``projector`` (d -> p) and ``predictor`` (p -> p) of the SimSiam term."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, projection_dim: int) -> None:
        super().__init__(backbone, feature_dim, num_classes)
        self.plain_head = nn.Linear(feature_dim, num_classes)
        self.projector = nn.Linear(feature_dim, projection_dim)
        self.predictor = nn.Linear(projection_dim, projection_dim)


class TwoStreamBatch(NamedTuple):
    """One FSGL step's images: two views of the instance batch and of the re-sampled batch."""

    instance: tuple[torch.Tensor, torch.Tensor]
    resampled: tuple[torch.Tensor, torch.Tensor]
    resampled_labels: torch.Tensor


class TwoStreamLoader(PairedLoader):
    """The instance stream and the re-sampled stream, each two views of its images, as ``TwoStreamBatch``."""

    def epoch(self, epoch: int = 0, generator: torch.Generator | None = None):
        for (instance, (resampled, resampled_labels)), labels in super().epoch(epoch, generator, with_second_labels=True):
            yield TwoStreamBatch(instance, resampled, resampled_labels), labels


def cumulative_alpha(epoch: int, epochs: int) -> float:
    """alpha(e) = 1 - (e/E)^2 with 0-based e (GLMC's cumulative learning, docs/methods/fsgl.md#losses)."""
    return 1.0 - (epoch / epochs) ** 2


class FSGLObjective:
    """L = alpha L_bal + (1 - alpha) L_reb + lambda_c L_con over the MixUp and CutMix views
    (docs/methods/fsgl.md#losses); SAM's first pass takes alpha L_bal + (1 - alpha) L_reb only."""

    def __init__(self, fsgl: FSGLConfig, factors: torch.Tensor | None, label_weights: torch.Tensor, epochs: int, num_classes: int) -> None:
        self.fsgl, self.factors, self.epochs, self.num_classes = fsgl, factors, epochs, num_classes
        self.label_weights = label_weights.float()
        self.alpha, self.sums, self.steps = 1.0, None, 0

    def set_epoch(self, epoch: int) -> None:
        self.alpha = cumulative_alpha(epoch, self.epochs)

    def view_outputs(self, model: FSGLNetwork, images: torch.Tensor, soft_labels: torch.Tensor):
        """(fc, fc_cb, z, p) of one view on the FSM-scaled feature s_i f_i, s_i = soft_label_i . tau."""
        features = model.features(images)
        if self.factors is not None:
            features = fcc_scale(features, soft_labels, self.factors)
        z = model.projector(features)
        return model.plain_head(features), model.head(features), z, model.predictor(z)

    def terms(self, model: FSGLNetwork, batch: TwoStreamBatch, labels: torch.Tensor, rng: np.random.Generator, consistency: bool):
        """(classification loss, SimSiam term or None, L_bal, L_reb) of one step; every draw comes from ``rng``."""
        (first, second), (other_first, other_second) = batch.instance, batch.resampled
        lam = float(rng.beta(self.fsgl.mix_alpha, self.fsgl.mix_alpha))
        height, width = second.shape[2:]
        box = cutmix_box(height, width, lam, int(rng.integers(height)), int(rng.integers(width)))
        cut_lam = 1 - (box[1] - box[0]) * (box[3] - box[2]) / (height * width) if self.fsgl.cutmix_area_labels else lam
        one_hot, other_one_hot = (F.one_hot(y, self.num_classes).float() for y in (labels, batch.resampled_labels))
        weights = self.label_weights.to(labels.device)
        losses, outputs = [], []
        for images, mix in ((lam * first + (1 - lam) * other_first, lam), (paste_box(second, other_second, box), cut_lam)):
            soft = mix * one_hot + (1 - mix) * other_one_hot
            weighted = mix * weights[labels, None] * one_hot + (1 - mix) * weights[batch.resampled_labels, None] * other_one_hot
            plain, reweighted, z, p = self.view_outputs(model, images, soft)
            losses.append((LF.soft_cross_entropy(plain, soft), LF.soft_cross_entropy(reweighted, weighted)))
            outputs.append((z, p))
        balanced, rebalanced = losses[0][0] + losses[1][0], losses[0][1] + losses[1][1]
        classification = self.alpha * balanced + (1 - self.alpha) * rebalanced
        (z_mix, p_mix), (z_cut, p_cut) = outputs
        return classification, LF.simsiam_consistency(p_mix, z_mix, p_cut, z_cut) if consistency else None, balanced, rebalanced

    def __call__(self, model, images: TwoStreamBatch, labels, rng) -> torch.Tensor:
        classification, consistency, balanced, rebalanced = self.terms(model, images, labels, rng, True)
        parts = torch.stack([balanced, rebalanced, consistency]).detach()
        self.sums = parts if self.sums is None else self.sums + parts
        self.steps += 1
        return classification + self.fsgl.contrast_weight * consistency

    def perturbation_loss(self, model, images: TwoStreamBatch, labels, rng) -> torch.Tensor:
        with_consistency = self.fsgl.perturb_with_consistency
        classification, consistency, _, _ = self.terms(model, images, labels, rng, with_consistency)
        return classification + self.fsgl.contrast_weight * consistency if with_consistency else classification

    def epoch_metrics(self) -> dict:
        """alpha and the epoch's mean L_bal, L_reb and L_con (one device sync per epoch)."""
        means = (self.sums / max(self.steps, 1)).tolist() if self.sums is not None else []
        self.sums, self.steps = None, 0
        return {"fsgl_alpha": self.alpha, **dict(zip(("loss_balanced", "loss_rebalanced", "loss_consistency"), means))}


def fsgl_stage(cfg: Config, data: LTData, inputs: dict[str, Path], device: torch.device) -> StagePlan:
    stage, fsgl, counts = cfg.stage1, cfg.fsgl, data.train_counts.tolist()
    base = build_model(cfg, data)
    model = FSGLNetwork(base.backbone, base.feature_dim, data.num_classes, fsgl.projection_dim).to(device)
    # FSM factors by frequency rank (FS5: the reference uses the class index; stage1.fcc_by_index)
    factors = stage_fcc_factors(stage, counts) if stage.fcc > 0 else None
    objective = FSGLObjective(fsgl, factors, LF.power_class_weights(counts, fsgl.label_weighting), stage.epochs, data.num_classes)

    def views_loader(**sampling):
        return make_loader(data, "train", stage.batch_size, device, cfg.data.augment, num_workers=cfg.data.num_workers, views=2, **sampling)

    loader = TwoStreamLoader(views_loader(), views_loader(class_power=1.0 - fsgl.resample_weighting))
    return make_plan(stage, model, objective, loader)


FSGL_READS = ("stage1.fcc", "stage1.fcc_by_index", "fsgl")
STAGE = Stage("stage1", "stage1", fsgl_stage, reads=FSGL_READS)
TUNABLES = (Tunable("stage1.fcc", 0.05, 2.0, log=True), Tunable("stage1.sam.rho", 0.01, 0.5, log=True),
            Tunable("fsgl.contrast_weight", 0.5, 10.0, log=True))  # fmt: skip
REFERENCE = (
    selection_on_test("FS3"),
    ReferenceBehaviour("FS5", "feature scaling factors by class index", ("stage1.fcc_by_index=true",), SHUFFLED_CLASSES),
)
register(Method("fsgl", "FSGL: GLMC mixed views, feature scaling by frequency rank, SimSiam term, SAM; one stage", (STAGE,), TUNABLES, REFERENCE))
register(
    Method(
        "fsgl_crt", "FSGL backbone, then cRT (frozen backbone, new head, class-balanced sampling)",
        (STAGE, Stage("stage2", "stage2", probe_stage, inputs=("stage1",), reads=PROBE_READS)), TUNABLES,
    )
)  # fmt: skip
register(
    Method(
        "fsgl_h2t", "FSGL backbone, then H2T grafting (frozen backbone, shift BN, stage-1 head)",
        (STAGE, Stage("stage2", "stage2", h2t_stage, inputs=("stage1",), reads=(*CLASSIFIER_READS, "h2t.rho"))),
        (*TUNABLES, RHO),
    )
)  # fmt: skip
