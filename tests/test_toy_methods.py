"""Methods registered from outside the package, as a researcher adding a sixth method would.

- ``toy_one``: a one-stage method with a builder of its own; it must get its own stage key, never
  CE's finished run.
- ``toy_three``: three stages driven by the method's own config blocks: a classifier-free
  contrastive pre-training read out by nearest class mean, a linear probe on the frozen encoder,
  and a fine-tune of the whole network on a subset its loader redraws every ``redraw_every``
  epochs from a generator whose state lives in ``last.pt``. Killed after epoch 1 of the fine-tune
  and resumed, it equals an uninterrupted run bit for bit.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ltrepro.config import StageConfig, bounded, load_config, register_block, unregister_block
from ltrepro.context import resolve
from ltrepro.data.loader import DeviceLoader
from ltrepro.errors import LtreproError
from ltrepro.methods import METHODS, Method, Stage, register
from ltrepro.models import Classifier
from ltrepro.objectives import Objective
from ltrepro.readouts import NearestClassMean
from ltrepro.rebuild import load_input
from ltrepro.runner import plan_method, train
from ltrepro.stages import FrozenBackbone, build_model, make_plan, representation_stage, stage_loss, train_loader
from tests.test_runner import interrupt_at_validation


@dataclass
class ToyStage(StageConfig):
    """A short stage; ``redraw_every`` and ``keep`` are the fine-tune's subset schedule."""

    epochs: int = bounded(2, 1)
    batch_size: int = bounded(16, 2)
    eval_batch_size: int = bounded(64, 1)
    lr: float = bounded(0.05, 0.0)
    warmup_epochs: int = bounded(0, 0)
    redraw_every: int = bounded(2, 1)
    keep: float = bounded(0.5, 0.0, 1.0)


class Encoder(nn.Module):
    """A backbone and a projection head, no classifier."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.backbone, self.feature_dim = classifier.backbone, classifier.feature_dim
        self.projector = nn.Linear(classifier.feature_dim, 16)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.features(images)), dim=1)


class SupervisedContrastive:
    """-mean log softmax over the batch of same-label similarities (tau 0.5), no classifier."""

    def set_epoch(self, epoch: int) -> None:
        pass

    def __call__(self, model, images, labels, rng):
        z = model(images)
        similarity = (z @ z.T / 0.5).fill_diagonal_(-1e9)
        positives = (labels[:, None] == labels[None, :]).float().fill_diagonal_(0)
        log_p = similarity.log_softmax(dim=1)
        return -((log_p * positives).sum(1) / positives.sum(1).clamp(min=1)).mean()


class RedrawLoader:
    """Batches from a random ``keep`` fraction of the training split, redrawn every ``every`` epochs."""

    def __init__(self, data, stage, device, seed: int) -> None:
        self.data, self.stage, self.device = data, stage, device
        self.generator = torch.Generator().manual_seed(seed + 7)
        self.size = max(2, int(stage.keep * len(data.train)))
        self.subset, self.loader, self.seconds = None, None, None

    def set_epoch(self, epoch: int, model) -> None:
        if epoch % self.stage.redraw_every == 0:
            start = time.perf_counter()
            self.subset = torch.randperm(len(self.data.train), generator=self.generator)[: self.size]
            self.seconds = time.perf_counter() - start
        self.loader = DeviceLoader(
            self.data.train.subset(self.subset.numpy()), self.stage.batch_size, self.device, self.data.mean, self.data.std
        )  # fmt: skip

    def __len__(self) -> int:
        return -(-self.size // self.stage.batch_size)

    def epoch(self, epoch=0, generator=None):
        return self.loader.epoch(epoch, generator)

    def epoch_metrics(self) -> dict:
        metrics, self.seconds = ({"redraw_seconds": self.seconds} if self.seconds is not None else {}), None
        return metrics

    def epoch_state(self) -> dict:
        return {"generator": self.generator.get_state(), "subset": self.subset}

    def load_epoch_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.subset = state["subset"]


def pretrain_stage(cfg, data, inputs, device):
    stage = cfg.toy_pretrain
    encoder = Encoder(build_model(cfg, data)).to(device)
    readout = NearestClassMean(data, stage.eval_batch_size, device, cfg.data.num_workers)
    return make_plan(stage, encoder, SupervisedContrastive(), train_loader(cfg, data, stage, device), readout=readout)


def probe_stage(cfg, data, inputs, device):
    stage = cfg.toy_probe
    encoder = load_input(inputs["pretrain"], data, device)
    model = Classifier(FrozenBackbone(encoder.backbone, "eval"), encoder.feature_dim, data.num_classes).to(device)
    objective = Objective(stage_loss(stage, data, "toy_probe"))
    return make_plan(stage, model, objective, train_loader(cfg, data, stage, device), [{"params": list(model.head.parameters())}])


def finetune_stage(cfg, data, inputs, device):
    stage = cfg.toy_finetune
    probe = load_input(inputs["probe"], data, device)
    backbone = probe.backbone.backbone.requires_grad_(True)  # unfrozen: the whole network trains
    model = Classifier(backbone, probe.feature_dim, data.num_classes).to(device)  # a fresh head
    objective = Objective(stage_loss(stage, data, "toy_finetune"))
    return make_plan(stage, model, objective, RedrawLoader(data, stage, device, cfg.seed))


def toy_one_stage(cfg, data, inputs, device):
    return representation_stage(cfg, data, inputs, device)


def undeclared_reader(cfg, data, inputs, device):
    cfg.stage2.bn  # read without declaring it
    return representation_stage(cfg, data, inputs, device)


STAGE1_READS = ("stage1.loss", "stage1.loss_params", "stage1.head", "stage1.mixup_alpha", "stage1.sampler", "stage1.fcc",
                "stage1.fcc_start_epoch")  # fmt: skip
BLOCKS = ("toy_pretrain", "toy_probe", "toy_finetune")


@pytest.fixture(autouse=True)
def toy_methods():
    for block in BLOCKS:
        register_block(block, ToyStage)
    register(Method("toy_one", "a one-stage method of its own", (Stage("stage1", "stage1", toy_one_stage, reads=STAGE1_READS),)))
    register(Method("toy_undeclared", "reads a value it does not declare",
                    (Stage("stage1", "stage1", undeclared_reader, reads=STAGE1_READS),)))  # fmt: skip
    register(
        Method(
            "toy_three",
            "contrastive pre-training -> probe -> fine-tune on a redrawn subset",
            (
                Stage("pretrain", "toy_pretrain", pretrain_stage, reads=("toy_pretrain.sampler",)),
                Stage("probe", "toy_probe", probe_stage, ("pretrain",), reads=("toy_probe.loss", "toy_probe.loss_params", "toy_probe.sampler")),
                Stage("finetune", "toy_finetune", finetune_stage, ("probe",),
                      reads=("toy_finetune.loss", "toy_finetune.loss_params", "toy_finetune.redraw_every", "toy_finetune.keep")),
            ),
        )
    )  # fmt: skip
    yield
    for name in ("toy_one", "toy_undeclared", "toy_three"):
        METHODS.unregister(name)
    for block in BLOCKS:
        unregister_block(block)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_new_one_stage_method_gets_its_own_key_and_trains(project):
    params = project / "params.yaml"
    (ce,) = train(params, ["stage1.epochs=1"])
    (toy,) = train(params, ["stage1.epochs=1", "method=toy_one"])
    assert not toy.reused and toy.run_dir != ce.run_dir
    assert json.loads((toy.run_dir / "run.json").read_text())["builder"].endswith(":toy_one_stage")
    (again,) = train(params, ["stage1.epochs=1", "method=toy_one"])
    assert again.reused and again.run_dir == toy.run_dir


def test_a_read_the_stage_does_not_declare_fails_before_training(project):
    with pytest.raises(LtreproError, match="toy_undeclared/stage1 read stage2.bn, which the stage does not declare"):
        train(project / "params.yaml", ["method=toy_undeclared"])
    assert not (project / "runs").exists() or not any((project / "runs").glob("*/best.pt"))


def test_three_stage_method_hands_off_reads_out_without_classifier_and_logs_redraws(project):
    import mlflow

    results = train(project / "params.yaml", ["method=toy_three", "toy_finetune.epochs=3"])
    pretrain, probe, finetune = results
    info = json.loads((pretrain.run_dir / "run.json").read_text())
    assert info["holds"]["readout"] == "NearestClassMean" and not info["final"]
    assert json.loads((finetune.run_dir / "run.json").read_text())["final"]
    assert 0 <= pretrain.metrics["test_top1"] <= 100 and np.isfinite(pretrain.metrics["val_top1"])
    # the probe's frozen backbone is the pre-training's selected encoder, tensor for tensor
    encoder, probed = weights(pretrain.run_dir / "best.pt"), weights(probe.run_dir / "best.pt")
    assert all(torch.equal(encoder[k], probed[k.replace("backbone.", "backbone.backbone.", 1)]) for k in encoder if k.startswith("backbone."))
    redraws = mlflow.MlflowClient().get_metric_history(finetune.run_id, "redraw_seconds")
    assert [m.step for m in redraws] == [0, 2]  # epochs 0 and 2 redraw the subset (every 2)
    keys = [key for _, _, key in plan_method(resolve(load_config(project / "params.yaml", ["method=toy_three"])))]
    assert len(set(keys)) == 3


def test_three_stage_method_killed_after_epoch_1_resumes_bit_for_bit(project, monkeypatch):
    params, overrides = project / "params.yaml", ["method=toy_three", "toy_finetune.epochs=4"]
    full = train(params, [*overrides, "out_dir=uninterrupted"])
    interrupt_at_validation(monkeypatch, 2 + 2 + 3)  # pretrain 2 + probe 2 validations, then the fine-tune's 3rd
    with pytest.raises(KeyboardInterrupt):
        train(params, overrides)
    (killed,) = [d for d in (project / "runs").iterdir() if "finetune" in d.name]
    state = torch.load(killed / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and "train_loader" in state["epoch_state"]
    resumed = train(None, [], resume=killed)
    assert resumed[-1].run_dir == killed and not resumed[-1].reused and all(r.reused for r in resumed[:-1])
    for name in ("last.pt", "best.pt"):
        assert_same_weights(full[-1].run_dir / name, killed / name)
    np.testing.assert_equal(resumed[-1].metrics, full[-1].metrics)
