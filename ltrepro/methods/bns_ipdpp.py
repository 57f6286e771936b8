"""BNS + IP-DPP, information-preservable two-stage learning (Lin & Yuan, arXiv:2510.08836; docs/methods/bns_ipdpp.md).

Three stages, each its own run:
- ``pretrain`` (stage1 block): BNS, a supervised sigmoid contrastive loss on two SimCLR views of
  every image, through a projection head; no classifier, read out by nearest class mean.
- ``probe`` (probe block): linear probing of the frozen encoder on a seeded class-balanced subset,
  BN frozen too (the reference lets BN statistics drift: ``probe.bn: shift``), an evaluation of the
  representation only.
- ``finetune`` (stage2 block): the whole network from the pre-trained encoder with a fresh head, on
  a class-balanced subset redrawn before epoch 0 and every F epochs: each class larger than k keeps
  k images drawn from an exact k-DPP whose kernel comes from p_i, the model's probability of the
  image's true label (docs/methods/bns_ipdpp.md#ip-dpp-undersampling). It takes the probe as input
  to chain the three stages; it loads it (and its key depends on it) only when the probe's head
  seeds the fine-tune, ``ipdpp.init_head_from_probe``.
Every stage uses AdamW and, with ``bns.scale_lr``, the batch-size rule lr = lr_config x B / 256.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from ltrepro import dpp
from ltrepro.config import Config, StageConfig, bounded, register_block
from ltrepro.data import LTData
from ltrepro.data.lt import class_indices
from ltrepro.data.loader import make_loader, split_loader
from ltrepro.data.simclr import SimclrAugment
from ltrepro.errors import LtreproError
from ltrepro.losses.contrastive import bns_loss
from ltrepro.methods import Method, ReferenceBehaviour, Stage, Tunable, register, selection_on_test
from ltrepro.models.network import Classifier
from ltrepro.objectives import Objective
from ltrepro.readouts import EmbeddingOf, NearestClassMean
from ltrepro.rebuild import load_input
from ltrepro.stages import FrozenBackbone, StagePlan, build_model, feature_scaling, make_plan, stage_loss


@dataclass
class BNSConfig:
    """BNS pre-training (docs/methods/bns_ipdpp.md#bns-pre-training) and the learning-rate rule of all three stages."""

    tau: float = bounded(0.5, 0.001)  # temperature of exp(s_ab / tau)
    projector_hidden: int = bounded(512, 1)  # projector d -> hidden -> ReLU -> projection_dim (no BN; the reference: 2048)
    projection_dim: int = bounded(128, 1)
    color_strength: float = bounded(2.0, 0.0)  # SimCLR colour-jitter strength s of the pre-training views
    scale_lr: bool = True  # every stage's lr is per 256 images: lr x batch_size / 256 (Goyal et al.)


@dataclass
class ProbeConfig(StageConfig):
    """Linear probing (docs/methods/bns_ipdpp.md#linear-probing): a StageConfig plus the subset and BN mode."""

    epochs: int = bounded(100, 1)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = bounded(0.1, 0.0)  # per 256 images (bns.scale_lr); the reference's 0.001 leaves few-shot at 0 on fmnist_lt
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = bounded(0.05, 0.0)
    decay_1d: bool = False
    warmup_epochs: int = bounded(2, 0)
    per_class: int = bounded(40, 1)  # images per class in the probe's training subset (all of a smaller class)
    bn: Literal["eval", "shift"] = "eval"  # shift: BN statistics follow the probe's batches (the reference, B9)
    color_strength: float = bounded(2.0, 0.0)  # SimCLR jitter strength of the probe's training views


@dataclass
class IPDPPConfig:
    """IP-DPP undersampling of the fine-tune (docs/methods/bns_ipdpp.md#ip-dpp-undersampling)."""

    k: int = bounded(50, 1)  # images kept per class larger than k; smaller classes are kept whole
    every: int = bounded(10, 1)  # F: redraw before epoch 0 and before epoch e when (e + 1) % F == 0 and e + 1 < E
    sampler: Literal["exact", "repo", "uniform"] = "exact"  # exact k-DPP | the released code's subsets | uniform k
    kernel: Literal["reference", "features"] = "reference"  # p-only kernel (near identity) | quality x diversity
    scores: Literal["clean", "augmented"] = "clean"  # p_i on un-augmented images, or the training views (B11)
    ridge: float = bounded(0.1, 0.0)  # features kernel: L = diag(q) (F F^T + ridge I) diag(q)
    quality_floor: float = bounded(0.1, 0.0)  # features kernel: q_i = 1 - p_i + floor
    repo_seed: int = bounded(42, 0)  # repo mode: the RandomState seed of the released code
    color_strength: float = bounded(1.0, 0.0)  # SimCLR jitter strength of the fine-tune's training views
    init_head_from_probe: bool = False  # true: the fine-tune's head starts from the probe's (B13); false: fresh


register_block("bns", BNSConfig)
register_block("probe", ProbeConfig)
register_block("ipdpp", IPDPPConfig)


def scaled_lr(cfg: Config, stage: StageConfig) -> float:
    return stage.lr * stage.batch_size / 256 if cfg.bns.scale_lr else stage.lr


class ContrastiveEncoder(nn.Module):
    """A backbone and the BNS projector (Linear, ReLU, Linear); ``features`` is the pooled backbone output."""

    def __init__(self, backbone: nn.Module, feature_dim: int, hidden: int, out: int) -> None:
        super().__init__()
        self.backbone, self.feature_dim = backbone, feature_dim
        self.projector = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.features(images))


class BNSObjective:
    """BNS loss of the two views' projections (docs/methods/bns_ipdpp.md#bns-loss); both views in one forward pass."""

    def __init__(self, tau: float) -> None:
        self.tau = tau

    def set_epoch(self, epoch: int) -> None:
        pass

    def __call__(self, model: ContrastiveEncoder, images, labels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        first, second = images
        z = model(torch.cat([first, second]))
        return bns_loss(z[: len(labels)], z[len(labels) :], labels, self.tau)


def pretrain_stage(cfg: Config, data: LTData, inputs: dict[str, Path], device: torch.device) -> StagePlan:
    stage, bns = cfg.stage1, cfg.bns
    base = build_model(cfg, data)
    model = ContrastiveEncoder(base.backbone, base.feature_dim, bns.projector_hidden, bns.projection_dim).to(device)
    loader = make_loader(data, "train", stage.batch_size, device, SimclrAugment(bns.color_strength), "instance",
                         stage.epochs, cfg.data.num_workers, views=2, drop_last=True)  # fmt: skip
    if len(loader) == 0:
        raise LtreproError(
            f"stage1.batch_size={stage.batch_size} exceeds the {len(data.train)} training images; BNS pre-training needs full batches"
        )
    readout = NearestClassMean(data, stage.eval_batch_size, device, cfg.data.num_workers)
    groups = [{"params": list(model.parameters()), "lr": scaled_lr(cfg, stage)}]
    return make_plan(stage, model, BNSObjective(bns.tau), loader, groups, readout)


def balanced_subset(labels: np.ndarray, num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """min(n_c, per_class) images of every class, drawn without replacement from a seeded generator
    (the reference's probe subset is unseeded, B8); sorted training indices."""
    rng = np.random.default_rng([seed, 0x9B0BE])
    parts = [rng.choice(idx, min(len(idx), per_class), replace=False) for idx in class_indices(labels, num_classes)]
    return np.sort(np.concatenate(parts)).astype(np.int64)


def probe_stage(cfg: Config, data: LTData, inputs: dict[str, Path], device: torch.device) -> StagePlan:
    stage = cfg.probe
    encoder = load_input(inputs["pretrain"], data, device)
    model = Classifier(FrozenBackbone(encoder.backbone, stage.bn), encoder.feature_dim, data.num_classes).to(device)
    subset = data.train.subset(balanced_subset(data.train.labels, data.num_classes, stage.per_class, cfg.seed))
    loader = split_loader(subset, data, stage.batch_size, device, SimclrAugment(stage.color_strength), stage.sampler,
                          stage.epochs, cfg.data.num_workers)  # fmt: skip
    objective = Objective(stage_loss(stage, data, "probe"), stage.mixup_alpha, feature_scaling(stage, data))
    groups = [{"params": list(model.head.parameters()), "lr": scaled_lr(cfg, stage)}]
    return make_plan(stage, model, objective, loader, groups)


def redraw_epochs(epochs: int, every: int) -> list[int]:
    """0-based epochs before which the fine-tune redraws its subset: 0, then e with (e + 1) % F == 0, e + 1 < E."""
    return [0, *(e for e in range(1, epochs) if (e + 1) % every == 0 and e + 1 != epochs)]


class IPDPPLoader:
    """The fine-tune's batches: a subset of the training split redrawn from the current model.

    ``set_epoch(epoch, model)`` (the engine's hook) redraws on the epochs of ``redraw_epochs``; the
    draw's generator and the subset live in ``last.pt`` (``epoch_state``), so a resumed run draws
    what an uninterrupted one draws. Each redraw's cost (scoring pass, kernels + draws) is logged.
    """

    def __init__(self, cfg: Config, data: LTData, device: torch.device) -> None:
        self.stage, self.ipdpp, self.data, self.device = cfg.stage2, cfg.ipdpp, data, device
        self.num_workers = cfg.data.num_workers
        self.augment = SimclrAugment(self.ipdpp.color_strength)
        self.redraws = set(redraw_epochs(self.stage.epochs, self.ipdpp.every))
        self.classes = class_indices(data.train.labels, data.num_classes)
        self.large = [c for c, idx in enumerate(self.classes) if len(idx) > self.ipdpp.k]
        self.rng = np.random.default_rng([cfg.seed, 0x1DDDD])
        self.size = sum(min(len(idx), self.ipdpp.k) for idx in self.classes)
        self.subset: torch.Tensor | None = None
        self.loader, self.costs = None, {}

    def __len__(self) -> int:
        return -(-self.size // self.stage.batch_size)

    def set_epoch(self, epoch: int, model: nn.Module) -> None:
        redraw = self.subset is None or epoch in self.redraws and self.ipdpp.sampler != "repo"
        if redraw:
            self.subset = torch.from_numpy(self.draw(model))
        if redraw or self.loader is None:  # a resumed run rebuilds the loader of its restored subset
            self.loader = split_loader(self.data.train.subset(self.subset.numpy()), self.data, self.stage.batch_size,
                                       self.device, self.augment, "instance", self.stage.epochs, self.num_workers)  # fmt: skip

    def epoch(self, epoch: int = 0, generator: torch.Generator | None = None):
        return self.loader.epoch(epoch, generator)

    def draw(self, model: nn.Module) -> np.ndarray:
        """Training indices of the subset: every class of at most k images, and k of each larger one."""
        keep = {c: np.arange(len(idx)) for c, idx in enumerate(self.classes) if c not in self.large}
        start = time.perf_counter()
        if self.ipdpp.sampler == "repo":  # B1: the released code keeps a fixed uniform subset, whatever the model
            keep |= dpp.repo_subsets([len(idx) for idx in self.classes], self.ipdpp.k, self.ipdpp.repo_seed)
            self.costs = {"redraw_seconds": time.perf_counter() - start}
            return self.indices(keep)
        scores, features = self.score(model) if self.ipdpp.sampler == "exact" and self.large else ({}, {})
        scored = time.perf_counter()
        for c in self.large:
            n = len(self.classes[c])
            if self.ipdpp.sampler == "uniform":
                keep[c] = np.sort(self.rng.choice(n, self.ipdpp.k, replace=False))
            elif self.ipdpp.kernel == "reference":
                keep[c] = dpp.sample_k_dpp_rejection(scores[c], self.ipdpp.k, self.rng)
            else:
                kernel = dpp.feature_kernel(features[c], scores[c], self.ipdpp.ridge, self.ipdpp.quality_floor)
                keep[c] = dpp.sample_k_dpp_spectral(kernel, self.ipdpp.k, self.rng)
        end = time.perf_counter()
        self.costs = {"redraw_seconds": end - start, "redraw_score_seconds": scored - start, "redraw_draw_seconds": end - scored}
        if scores:
            self.costs["redraw_mean_p"] = float(np.mean(np.concatenate([scores[c] for c in self.large])))
        return self.indices(keep)

    def indices(self, keep: dict[int, np.ndarray]) -> np.ndarray:
        return np.sort(np.concatenate([self.classes[c][np.asarray(keep[c], dtype=np.int64)] for c in sorted(keep)]))

    def score(self, model: nn.Module) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """p_i (the softmax probability of the true label) and the pooled features of every image of
        the classes larger than k, in eval mode, on clean images or on one training view each."""
        from ltrepro.engine import predict

        positions = np.concatenate([self.classes[c] for c in self.large])
        split = self.data.train.subset(positions)
        augment = self.augment if self.ipdpp.scores == "augmented" else None
        loader = split_loader(split, self.data, self.stage.eval_batch_size, self.device, augment, "instance", 1,
                              self.num_workers, train=augment is not None, ordered=True)  # fmt: skip
        generator = torch.Generator().manual_seed(int(self.rng.integers(2**62)))
        features, labels = predict(EmbeddingOf(model, lambda m, x: m.features(x)), EpochOf(loader, generator), self.device)
        with torch.inference_mode():
            logits = model.head(torch.from_numpy(features).to(self.device)).float().cpu()
        p = logits.softmax(dim=1)[torch.arange(len(labels)), torch.from_numpy(labels)].numpy().astype(np.float64)
        bounds = np.cumsum([0, *(len(self.classes[c]) for c in self.large)])
        return ({c: p[a:b] for c, a, b in zip(self.large, bounds, bounds[1:])},
                {c: features[a:b] for c, a, b in zip(self.large, bounds, bounds[1:])})  # fmt: skip

    def epoch_metrics(self) -> dict:
        metrics, self.costs = {**self.costs, "subset_size": float(len(self.subset))} if self.costs else {}, {}
        return metrics

    def epoch_state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "subset": self.subset}

    def load_epoch_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.subset, self.loader = state["subset"], None


class EpochOf:
    """A loader whose ``epoch()`` draws its augmentation from a fixed generator (a scoring pass)."""

    def __init__(self, loader, generator: torch.Generator) -> None:
        self.loader, self.generator = loader, generator

    def epoch(self, epoch: int = 0, generator: torch.Generator | None = None):
        return self.loader.epoch(0, self.generator)


def finetune_stage(cfg: Config, data: LTData, inputs: dict[str, Path], device: torch.device) -> StagePlan:
    stage = cfg.stage2
    encoder = load_input(inputs["pretrain"], data, device)
    model = Classifier(encoder.backbone.requires_grad_(True), encoder.feature_dim, data.num_classes)
    if cfg.ipdpp.init_head_from_probe:
        model.head.load_state_dict(load_input(inputs["probe"], data, device).head.state_dict())
    model = model.to(device)
    groups = [{"params": list(model.parameters()), "lr": scaled_lr(cfg, stage)}]
    return make_plan(stage, model, Objective(stage_loss(stage, data, "stage2")), IPDPPLoader(cfg, data, device), groups)


register(
    Method(
        "bns_ipdpp",
        "BNS contrastive pre-training, linear probe (evaluation), fine-tune on IP-DPP k-DPP undersampled classes",
        (
            Stage("pretrain", "stage1", pretrain_stage, reads=("bns",)),
            Stage("probe", "probe", probe_stage, ("pretrain",), reads=("probe", "bns.scale_lr")),
            Stage("finetune", "stage2", finetune_stage, ("pretrain", "probe"),
                  reads=("stage2.loss", "stage2.loss_params", "ipdpp", "bns.scale_lr"),
                  loads=lambda cfg: ("pretrain", "probe") if cfg.ipdpp.init_head_from_probe else ("pretrain",)),
        ),
        (Tunable("ipdpp.k", 20, 400, log=True, integer=True), Tunable("ipdpp.every", 1, 5, integer=True)),
        (
            ReferenceBehaviour("B1", "one fixed uniform subset per class for the whole fine-tune", ("ipdpp.sampler=repo",)),
            ReferenceBehaviour("B9", "the probe's BN statistics follow its batches", ("probe.bn=shift",), stage="probe"),
            ReferenceBehaviour("B11", "IP-DPP scores on one augmented view", ("ipdpp.scores=augmented",)),
            selection_on_test("B14"),
        ),
    )
)  # fmt: skip
