"""BNS + IP-DPP (Lin & Yuan, arXiv:2510.08836): the redraw schedule, the fine-tune's subsets for every
sampler and kernel, the scores p_i, the loader's resume state, the probe's subset and BN modes, the
pre-training's batches, the lr rule, and a killed fine-tune resumed bit for bit.

Loader tests build ``IPDPPLoader`` on small synthetic ``LTData`` (the class sizes they need, 8 x 8
images, a one-conv model); plan tests build the stages from the tiny fmnist_lt project.
"""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from torch import nn

from ltrepro import dpp
from ltrepro.cli import main
from ltrepro.config import load_config
from ltrepro.context import resolve
from ltrepro.data import LTData, Split, load_data
from ltrepro.data.lt import class_indices
from ltrepro.data.loader import fixed_seed_generator
from ltrepro.engine import run_epoch
from ltrepro.errors import LtreproError
from ltrepro.methods.bns_ipdpp import (
    BNSObjective,
    ContrastiveEncoder,
    IPDPPLoader,
    balanced_subset,
    finetune_stage,
    pretrain_stage,
    probe_stage,
    redraw_epochs,
    scaled_lr,
)
from ltrepro.models import Classifier
from ltrepro.readouts import NearestClassMean
from ltrepro.runner import train
from tests.test_runner import interrupt_at_validation

CPU = torch.device("cpu")
FAST = ["method=bns_ipdpp", "stage1.epochs=1", "stage1.batch_size=16", "probe.epochs=1", "stage2.epochs=2",
        "stage2.batch_size=16", "ipdpp.k=5"]  # fmt: skip
CIFAR10_LT = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]  # training counts, IF 100
CIFAR100_LT = [int(500 * (1 / 100) ** (c / 99)) for c in range(100)]
MEAN, STD = (0.4,), (0.3,)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def synthetic(counts: list[int], side: int = 8, shuffle: bool = True, seed: int = 0) -> LTData:
    """An in-memory 1-channel dataset with these training counts; labels shuffled unless told not to,
    so positions within a class are not positions in the split."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(counts)), counts)
    if shuffle:
        rng.shuffle(labels)
    images = torch.from_numpy(rng.integers(0, 256, size=(len(labels), 1, side, side), dtype=np.uint8))
    small = Split(np.arange(len(counts)), torch.zeros(len(counts), 1, side, side, dtype=torch.uint8))
    return LTData("synthetic", len(counts), [str(c) for c in range(len(counts))], Split(labels, images), small, small,
                  MEAN, STD, 1, side)  # fmt: skip


def tiny_model(num_classes: int, seed: int = 0) -> Classifier:
    """conv -> BN -> ReLU, 4 features, a linear head; BN running statistics moved off their defaults so
    that a forward in train mode (batch statistics) differs from one in eval mode."""
    torch.manual_seed(seed)
    model = Classifier(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()), 4, num_classes)
    bn = model.backbone[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        model.head.weight.mul_(5.0)  # spread p_i over (0, 1)
    return model


def loader_config(*overrides: str, epochs=4, every=2, k=4, sampler="exact", eval_batch=7):
    """A config for ``IPDPPLoader``; scoring batches of 7 images by default, so classes straddle batches."""
    values = [f"stage2.epochs={epochs}", f"ipdpp.every={every}", f"ipdpp.k={k}", f"ipdpp.sampler={sampler}",
              f"stage2.eval_batch_size={eval_batch}"]  # fmt: skip
    return load_config(None, ["method=bns_ipdpp", "device=cpu", *values, *overrides])


def per_class(subset: np.ndarray, data: LTData) -> dict[int, np.ndarray]:
    labels = data.train.labels[subset]
    return {c: np.sort(subset[labels == c]) for c in range(data.num_classes)}


def assert_balanced(subset: np.ndarray, data: LTData, k: int) -> None:
    """Classes of at most k images whole; larger ones exactly k distinct images of that class."""
    assert len(np.unique(subset)) == len(subset), "an image was drawn twice"
    parts = per_class(subset, data)
    for c, idx in enumerate(class_indices(data.train.labels, data.num_classes)):
        if len(idx) <= k:
            np.testing.assert_array_equal(parts[c], idx)
        else:
            assert len(parts[c]) == k and np.isin(parts[c], idx).all()


def clean_scores(model: nn.Module, data: LTData) -> tuple[np.ndarray, np.ndarray]:
    """p_i and pooled features of every training image: a plain eval-mode forward of the un-augmented,
    normalised images."""
    model.eval()
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (data.mean, data.std))
    x = (data.train.images.float() / 255 - mean) / std
    with torch.no_grad():
        features = model.features(x)
        p = model.head(features).softmax(1)[torch.arange(len(x)), torch.from_numpy(data.train.labels)]
    return p.double().numpy(), features.numpy()


INPUTS = {"pretrain": Path("pretrain-run"), "probe": Path("probe-run")}


@pytest.fixture
def stub_inputs(monkeypatch):
    """The probe and fine-tune builders read a freshly built pre-training encoder instead of a finished
    run's (the hand-off from checkpoints is tests/test_methods.py's): ``stub_inputs(cfg, data)`` returns
    the encoder; every ``load_input`` gets a copy of it, as a rebuild would."""
    import copy

    import ltrepro.methods.bns_ipdpp as module

    made = {}

    def install(cfg, data):
        torch.manual_seed(0)
        made["pretrain"] = pretrain_stage(cfg, data, {}, CPU).model
        return made["pretrain"]

    def load_input(run_dir, data, device):
        assert run_dir == INPUTS["pretrain"], f"unexpected input {run_dir}"
        return copy.deepcopy(made["pretrain"]).to(device)

    monkeypatch.setattr(module, "load_input", load_input)
    return install


def project_config(project, *overrides: str):
    return resolve(load_config(project / "params.yaml", [*FAST, *overrides]))


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def frozen_backbone(model: Classifier) -> dict[str, torch.Tensor]:
    """The probe's frozen encoder backbone (``FrozenBackbone.backbone``), as copies."""
    prefix = "backbone.backbone."
    return {k.removeprefix(prefix): v.clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------------------
# 1. the redraw schedule
# --------------------------------------------------------------------------------------------------


def test_redraw_schedule_matches_the_reference():
    assert redraw_epochs(100, 10) == [0, 9, 19, 29, 39, 49, 59, 69, 79, 89]
    assert redraw_epochs(100, 20) == [0, 19, 39, 59, 79]
    assert redraw_epochs(4, 1) == [0, 1, 2]  # never before the last epoch
    assert redraw_epochs(3, 5) == [0]


@pytest.mark.parametrize("sampler", ["exact", "uniform", "repo"])
@pytest.mark.parametrize("epochs, every", [(10, 3), (6, 1)])
def test_loader_redraws_exactly_on_the_schedule(sampler, epochs, every):
    data = synthetic([20, 13, 6, 3])
    loader = IPDPPLoader(loader_config(epochs=epochs, every=every, sampler=sampler), data, CPU)
    model = tiny_model(4)
    expected = redraw_epochs(epochs, every) if sampler != "repo" else [0]  # repo: one fixed subset
    redrawn, logged, previous = [], [], None
    for epoch in range(epochs):
        loader.set_epoch(epoch, model)
        if loader.subset is not previous:
            redrawn.append(epoch)
        previous = loader.subset
        metrics = loader.epoch_metrics()
        if "redraw_seconds" in metrics:
            logged.append(epoch)
            assert metrics["subset_size"] == len(loader.subset) == 4 + 4 + 4 + 3
            assert ("redraw_mean_p" in metrics) == (sampler == "exact")
        else:
            assert metrics == {}
        assert torch.equal(loader.loader.images, data.train.images[loader.subset])  # batches of the current subset
        batches = list(loader.epoch(epoch, fixed_seed_generator(0, epoch)))
        seen = torch.cat([labels for _, labels in batches])
        assert len(batches) == len(loader) and len(seen) == len(loader.subset)  # one pass over the subset
        np.testing.assert_array_equal(np.bincount(seen.numpy(), minlength=4), [4, 4, 4, 3])
    assert redrawn == logged == expected


# --------------------------------------------------------------------------------------------------
# 2. subset composition and sizes
# --------------------------------------------------------------------------------------------------


def test_subset_sizes_of_the_reference_settings():
    cifar10 = synthetic(CIFAR10_LT, side=2)
    loader = IPDPPLoader(loader_config(k=500, sampler="uniform"), cifar10, CPU)
    assert loader.size == 3391 and len(loader) == -(-3391 // loader.stage.batch_size)
    loader.set_epoch(0, None)
    assert len(loader.subset) == 3391
    assert len(balanced_subset(cifar10.train.labels, 10, 100, 0)) == 933
    cifar100 = synthetic(CIFAR100_LT, side=2)
    assert len(balanced_subset(cifar100.train.labels, 100, 50, 0)) == 3446
    loader = IPDPPLoader(loader_config(k=50, sampler="uniform"), cifar100, CPU)
    loader.set_epoch(0, None)
    assert loader.size == len(loader.subset) == 3446


@pytest.mark.parametrize("sampler", ["exact", "uniform"])
def test_random_samplers_keep_k_of_each_large_class_and_redraw_anew(sampler):
    data = synthetic(CIFAR10_LT, side=4)
    loader = IPDPPLoader(loader_config(k=500, sampler=sampler, eval_batch=4096), data, CPU)  # redraws before 0 and 1
    model = tiny_model(10)
    loader.set_epoch(0, model)
    first = loader.subset.numpy().copy()
    loader.set_epoch(1, model)
    second = loader.subset.numpy()
    for subset in (first, second):
        assert len(subset) == 3391 and subset.dtype == np.int64
        assert_balanced(subset, data, 500)
    a, b = per_class(first, data), per_class(second, data)
    for c in range(5):  # the five classes above k
        assert not np.array_equal(a[c], b[c]), f"class {c} was not redrawn"
    for c in range(5, 10):
        np.testing.assert_array_equal(a[c], b[c])


@pytest.mark.parametrize("shuffle", [False, True])
def test_repo_sampler_reproduces_the_released_subsets_at_every_redraw(shuffle):
    data = synthetic(CIFAR10_LT, side=2, shuffle=shuffle)  # the real training split is class-contiguous
    classes = class_indices(data.train.labels, 10)
    released = dpp.repo_subsets(CIFAR10_LT, 500, 42)
    expected = np.sort(np.concatenate([classes[c][released[c]] if c in released else classes[c] for c in range(10)]))
    subsets = []
    for seed, model in ((0, tiny_model(10, 0)), (1, tiny_model(10, 1))):  # independent of the model and the run seed
        loader = IPDPPLoader(loader_config(f"seed={seed}", epochs=6, every=1, k=500, sampler="repo"), data, CPU)
        for epoch in range(6):  # every epoch but the last is a redraw epoch
            loader.set_epoch(epoch, model)
            subsets.append(loader.subset.numpy().copy())
    for subset in subsets:
        np.testing.assert_array_equal(subset, expected)
    assert_balanced(expected, data, 500)


def test_repo_sampler_on_the_project_plan_uses_positions_within_each_class(project, stub_inputs):
    cfg = project_config(project, "ipdpp.sampler=repo", "stage2.epochs=3", "ipdpp.every=1")
    data = load_data(cfg.data, cfg.seed, project)
    stub_inputs(cfg, data)
    plan = finetune_stage(cfg, data, INPUTS, CPU)
    counts = data.train_counts.tolist()
    classes = class_indices(data.train.labels, data.num_classes)
    released = dpp.repo_subsets(counts, 5, 42)
    assert set(released) == {c for c, n in enumerate(counts) if n > 5}
    expected = np.sort(np.concatenate([classes[c][released.get(c, np.arange(n))] for c, n in enumerate(counts)]))
    for epoch in range(3):
        plan.train_loader.set_epoch(epoch, plan.model)
        np.testing.assert_array_equal(plan.train_loader.subset.numpy(), expected)


# --------------------------------------------------------------------------------------------------
# 3. the features kernel
# --------------------------------------------------------------------------------------------------


def test_features_kernel_draws_k_per_large_class_with_the_spectral_sampler(monkeypatch):
    data = synthetic([30, 12, 6, 3])
    model = tiny_model(4)
    kernels = []
    real_spectral = dpp.sample_k_dpp_spectral

    def spectral(kernel, k, rng):
        kernels.append((kernel, k))
        return real_spectral(kernel, k, rng)

    monkeypatch.setattr(dpp, "sample_k_dpp_spectral", spectral)
    monkeypatch.setattr(dpp, "sample_k_dpp_rejection", lambda *args: pytest.fail("the reference kernel's sampler ran"))
    cfg = loader_config("ipdpp.kernel=features", "ipdpp.ridge=0.2", "ipdpp.quality_floor=0.05", k=8)
    loader = IPDPPLoader(cfg, data, CPU)
    loader.set_epoch(0, model)
    assert [(kernel.shape, k) for kernel, k in kernels] == [((30, 30), 8), ((12, 12), 8)]
    assert len(loader.subset) == 8 + 8 + 6 + 3
    assert_balanced(loader.subset.numpy(), data, 8)
    # each class's kernel: quality from this model's clean p_i, diversity from its pooled features
    p, features = clean_scores(model, data)
    classes = class_indices(data.train.labels, 4)
    for (kernel, _), c in zip(kernels, (0, 1)):
        expected = dpp.feature_kernel(features[classes[c]], p[classes[c]], 0.2, 0.05)
        np.testing.assert_allclose(kernel, expected, rtol=1e-4, atol=1e-6)
    assert not np.allclose(kernels[0][0], np.diag(np.diag(kernels[0][0])))  # not a diagonal (p-only) kernel


# --------------------------------------------------------------------------------------------------
# 4. the scores p_i
# --------------------------------------------------------------------------------------------------


def test_clean_scores_are_the_eval_mode_probability_of_the_true_label(monkeypatch):
    data = synthetic([23, 11, 4])
    model = tiny_model(3)
    p, _ = clean_scores(model, data)
    classes = class_indices(data.train.labels, 3)
    loader = IPDPPLoader(loader_config(k=5), data, CPU)
    model.train()  # the scoring pass must switch to eval mode itself
    scores, features = loader.score(model)
    assert sorted(scores) == sorted(features) == [0, 1]  # only the classes larger than k are scored
    for c in (0, 1):
        assert scores[c].dtype == np.float64 and features[c].shape == (len(classes[c]), 4)
        np.testing.assert_allclose(scores[c], p[classes[c]], rtol=1e-5, atol=1e-7)
    assert np.ptp(p) > 0.1  # the check above can tell images apart

    received = {}
    real = dpp.sample_k_dpp_rejection

    def rejection(scores, k, rng):
        received[len(scores)] = np.asarray(scores)
        return real(scores, k, rng)

    monkeypatch.setattr(dpp, "sample_k_dpp_rejection", rejection)
    model.train()
    loader.set_epoch(0, model)  # the k-DPP of each large class gets exactly those scores
    assert sorted(received) == [11, 23]
    np.testing.assert_allclose(received[23], p[classes[0]], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(received[11], p[classes[1]], rtol=1e-5, atol=1e-7)
    mean_p = np.mean(np.concatenate([p[classes[0]], p[classes[1]]]))
    assert loader.epoch_metrics()["redraw_mean_p"] == pytest.approx(mean_p)


def test_augmented_scores_differ_from_clean_ones():
    data = synthetic([23, 11, 4])
    model = tiny_model(3)
    clean, _ = IPDPPLoader(loader_config(k=5), data, CPU).score(model)
    augmented, _ = IPDPPLoader(loader_config("ipdpp.scores=augmented", k=5), data, CPU).score(model)
    again, _ = IPDPPLoader(loader_config("ipdpp.scores=augmented", k=5), data, CPU).score(model)
    for c in (0, 1):
        assert augmented[c].shape == clean[c].shape and ((augmented[c] >= 0) & (augmented[c] <= 1)).all()
        assert not np.allclose(augmented[c], clean[c], atol=1e-4)
        np.testing.assert_array_equal(augmented[c], again[c])  # the views come from the seeded generator


# --------------------------------------------------------------------------------------------------
# 5. resume
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["exact", "uniform"])
def test_restored_epoch_state_gives_the_uninterrupted_subsets(tmp_path, sampler):
    data = synthetic([20, 13, 6, 3])
    model = tiny_model(4)
    make = lambda: IPDPPLoader(loader_config(epochs=6, every=2, k=4, sampler=sampler), data, CPU)  # noqa: E731
    assert redraw_epochs(6, 2) == [0, 1, 3]
    full, subsets, batches = make(), {}, {}
    for epoch in range(6):
        full.set_epoch(epoch, model)
        subsets[epoch] = full.subset.clone()
        batches[epoch] = list(full.epoch(epoch, fixed_seed_generator(0, epoch)))
        if epoch == 1:  # what last.pt keeps after epoch 1
            torch.save(full.epoch_state(), tmp_path / "state.pt")
    assert not torch.equal(subsets[0], subsets[1]) and not torch.equal(subsets[1], subsets[3])

    resumed = make()
    resumed.load_epoch_state(torch.load(tmp_path / "state.pt", weights_only=True))
    resumed.set_epoch(2, model)  # not a redraw epoch: the restored subset is used
    assert torch.equal(resumed.subset, subsets[2]) and torch.equal(subsets[2], subsets[1])
    assert resumed.epoch_metrics() == {}
    for (a, la), (b, lb) in zip(batches[2], resumed.epoch(2, fixed_seed_generator(0, 2)), strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)  # the same batches
    for epoch in (3, 4, 5):  # the next redraw equals the uninterrupted one
        resumed.set_epoch(epoch, model)
        assert torch.equal(resumed.subset, subsets[epoch]), f"epoch {epoch}"

    fresh = make()  # without the state, epoch 2 would get a new draw, not epoch 1's subset
    fresh.set_epoch(2, model)
    assert not torch.equal(fresh.subset, subsets[2])


# --------------------------------------------------------------------------------------------------
# 6. the probe's subset
# --------------------------------------------------------------------------------------------------


def test_balanced_subset_is_seeded_with_min_n_per_class():
    labels = synthetic([30, 12, 6, 3]).train.labels
    a, b, other = (balanced_subset(labels, 4, 8, seed) for seed in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, other)
    for subset in (a, other):
        assert subset.dtype == np.int64 and np.all(np.diff(subset) > 0)  # sorted, distinct training indices
        np.testing.assert_array_equal(np.bincount(labels[subset], minlength=4), [8, 8, 6, 3])
    for c in (2, 3):  # smaller classes whole
        np.testing.assert_array_equal(np.sort(a[labels[a] == c]), np.flatnonzero(labels == c))


# --------------------------------------------------------------------------------------------------
# 7. pre-training: full batches of two views
# --------------------------------------------------------------------------------------------------


def test_pretrain_refuses_a_batch_larger_than_the_training_set(project):
    cfg = project_config(project, "stage1.batch_size=79")
    data = load_data(cfg.data, cfg.seed, project)
    assert len(data.train) == 78
    with pytest.raises(LtreproError, match=r"stage1\.batch_size=79 exceeds the 78 training images"):
        pretrain_stage(cfg, data, {}, CPU)
    whole = pretrain_stage(project_config(project, "stage1.batch_size=78"), data, {}, CPU)
    assert len(whole.train_loader) == 1
    with pytest.raises(LtreproError, match="exceeds the 78 training images"):
        train(project / "params.yaml", [*FAST, "stage1.batch_size=79"])
    assert not (project / "runs").exists() or not list((project / "runs").glob("*/run.json"))  # nothing started


def test_pretrain_batch_error_is_one_line_on_the_command_line(project, capsys):
    assert main(["train", "--config", str(project / "params.yaml"), *FAST, "stage1.batch_size=79"]) == 2
    assert "exceeds the 78 training images" in capsys.readouterr().err


def test_pretrain_plan_yields_two_views_of_one_batch_and_full_batches_only(project):
    cfg = project_config(project)
    data = load_data(cfg.data, cfg.seed, project)
    plan = pretrain_stage(cfg, data, {}, CPU)
    assert isinstance(plan.model, ContrastiveEncoder) and isinstance(plan.objective, BNSObjective)
    assert isinstance(plan.readout, NearestClassMean) and plan.objective.tau == cfg.bns.tau
    assert len(plan.train_loader) == 78 // 16 == 4
    batches = list(plan.train_loader.epoch(0, fixed_seed_generator(cfg.seed, 0)))
    assert len(batches) == 4
    for (first, second), labels in batches:
        assert first.shape == second.shape == (16, 1, 28, 28) and labels.shape == (16,)
        assert not torch.equal(first, second)  # independently augmented views
    seen = torch.cat([labels for _, labels in batches]).numpy()
    assert (np.bincount(seen, minlength=10) <= data.train_counts).all()  # each image at most once an epoch
    (views, labels) = batches[0]
    loss = plan.objective(plan.model, views, labels, np.random.default_rng(0))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_projector_of_the_reference_size():
    encoder = ContrastiveEncoder(nn.Identity(), 512, 2048, 128)
    assert sum(p.numel() for p in encoder.projector.parameters()) == 1_312_896
    layers = [m for m in encoder.projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(512, 2048), (2048, 128)]
    assert encoder(torch.randn(3, 512, 2, 2)).shape == (3, 128)  # pooled, then projected


# --------------------------------------------------------------------------------------------------
# the lr rule
# --------------------------------------------------------------------------------------------------


def test_every_stage_scales_its_lr_by_batch_size_over_256(project, stub_inputs):
    sizes = ["stage1.lr=0.001", "stage1.batch_size=64", "probe.lr=0.001", "probe.batch_size=1024",
             "stage2.lr=0.001", "stage2.batch_size=64"]  # fmt: skip
    cfg = project_config(project, *sizes)
    data = load_data(cfg.data, cfg.seed, project)
    encoder = stub_inputs(cfg, data)
    assert scaled_lr(cfg, cfg.probe) == pytest.approx(0.004) and scaled_lr(cfg, cfg.stage2) == pytest.approx(0.00025)
    unscaled = project_config(project, *sizes, "bns.scale_lr=false")
    plans = {}
    for build, expected in ((pretrain_stage, 0.00025), (probe_stage, 0.004), (finetune_stage, 0.00025)):
        plans[build] = plan = build(cfg, data, INPUTS, CPU)
        lrs = [group["lr"] for group in plan.optimizer.param_groups]
        assert lrs and all(lr == pytest.approx(expected, rel=1e-12) for lr in lrs), (build.__name__, lrs)
        plain = build(unscaled, data, INPUTS, CPU)
        assert all(group["lr"] == 0.001 for group in plain.optimizer.param_groups), build.__name__
    probe, tune = plans[probe_stage], plans[finetune_stage]
    trained = {id(p) for group in probe.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in probe.model.head.parameters()}  # the probe trains its head only
    trained = {id(p) for group in tune.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in tune.model.parameters()} and all(p.requires_grad for p in tune.model.parameters())
    # the fine-tune starts from the encoder's backbone, its projector dropped
    tuned = tune.model.state_dict()
    assert all(torch.equal(tuned[f"backbone.{k}"], v) for k, v in encoder.backbone.state_dict().items())
    assert not any(k.startswith("projector") for k in tuned) and isinstance(tune.train_loader, IPDPPLoader)


# --------------------------------------------------------------------------------------------------
# 8. the probe's BN modes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bn", ["eval", "shift"])
def test_probe_bn_eval_freezes_running_statistics_and_shift_moves_them(project, stub_inputs, bn):
    cfg = project_config(project, f"probe.bn={bn}", "probe.per_class=5", "probe.batch_size=16")
    data = load_data(cfg.data, cfg.seed, project)
    encoder = {k: v.clone() for k, v in stub_inputs(cfg, data).backbone.state_dict().items()}
    plan = probe_stage(cfg, data, INPUTS, CPU)
    before = frozen_backbone(plan.model)
    assert before.keys() == encoder.keys() and all(torch.equal(before[k], encoder[k]) for k in encoder)  # the encoder's
    head = {k: v.clone() for k, v in plan.model.head.state_dict().items()}
    scheduler = torch.optim.lr_scheduler.LambdaLR(plan.optimizer, lambda step: 1.0)
    loss, _, seen = run_epoch(plan, scheduler, CPU, cfg.seed, 0, 1)  # the engine's epoch: model.train(), then steps
    assert np.isfinite(loss) and seen == np.minimum(data.train_counts, 5).sum() == 41  # the balanced subset, 3 steps
    after = frozen_backbone(plan.model)
    statistics = [k for k in encoder if "running_" in k or "num_batches_tracked" in k]
    assert len(statistics) == 3 * len([k for k in encoder if k.endswith("running_mean")]) > 0
    for key in encoder:
        if key in statistics and bn == "shift":
            continue
        assert torch.equal(after[key], encoder[key]), f"probe.bn={bn}: {key} changed"
    if bn == "shift":  # every BN layer's statistics follow the probe's batches
        assert all(not torch.equal(after[k], encoder[k]) for k in statistics), "shift: a BN statistic did not move"
    assert any(not torch.equal(v, head[k]) for k, v in plan.model.head.state_dict().items())  # the head trained


# --------------------------------------------------------------------------------------------------
# 9. kill and resume the fine-tune
# --------------------------------------------------------------------------------------------------


def test_finetune_killed_mid_run_resumes_bit_for_bit(project, monkeypatch):
    # half the tiny project (35 training images), fine-tune redraws before epochs 0 and 1
    params = project / "params.yaml"
    overrides = [*FAST, "data.n_max=10", "ipdpp.k=3", "stage2.epochs=3", "ipdpp.every=1"]
    full = train(params, overrides)
    uninterrupted = project / "uninterrupted"  # out of runs/, so the fine-tune is trained again on the same inputs
    full[-1].run_dir.rename(uninterrupted)
    interrupt_at_validation(monkeypatch, 2)  # the fine-tune's 2nd validation: last.pt holds epoch 0
    with pytest.raises(KeyboardInterrupt):
        train(params, overrides)
    (killed,) = [d for d in (project / "runs").iterdir() if "finetune" in d.name]
    state = torch.load(killed / "last.pt", weights_only=True)
    assert state["epoch"] == 0 and set(state["epoch_state"]["train_loader"]) == {"rng", "subset"}
    assert json.loads((killed / "run.json").read_text())["status"] == "KILLED"
    resumed = train(None, [], resume=killed)  # epoch 1 redraws from the restored generator and model
    assert [r.reused for r in resumed] == [True, True, False] and resumed[-1].run_dir == killed
    for name in ("last.pt", "best.pt"):
        a, b = weights(uninterrupted / name), weights(killed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a = torch.load(uninterrupted / "last.pt", weights_only=True)
    b = torch.load(killed / "last.pt", weights_only=True)
    assert torch.equal(a["epoch_state"]["train_loader"]["subset"], b["epoch_state"]["train_loader"]["subset"])
    assert a["epoch_state"]["train_loader"]["rng"] == b["epoch_state"]["train_loader"]["rng"]
    timed = ("throughput", "redraw_seconds", "redraw_score_seconds", "redraw_draw_seconds")
    timeless = [[{k: v for k, v in e.items() if k not in timed} for e in state["history"]] for state in (a, b)]
    assert timeless[0] == timeless[1]
    assert [("redraw_mean_p" in e) for e in timeless[1]] == [True, True, False]
    np.testing.assert_equal(resumed[-1].metrics, full[-1].metrics)


def test_finetune_is_reused_when_only_the_probe_changes_unless_its_head_starts_from_the_probe(project):
    params = project / "params.yaml"
    overrides = [*FAST, "data.n_max=10", "ipdpp.k=3", "stage2.epochs=1"]
    first = train(params, overrides)
    other_probe = train(params, [*overrides, "probe.lr=0.01"])
    assert [r.reused for r in other_probe] == [True, False, True] and other_probe[2].run_dir == first[2].run_dir
    seeded = train(params, [*overrides, "probe.lr=0.01", "ipdpp.init_head_from_probe=true"])
    assert [r.reused for r in seeded] == [True, True, False]
    loaded = [{k for k in mlflow.get_run(r[2].run_id).data.tags if k.startswith("input.")} for r in (first, seeded)]
    assert loaded == [{"input.pretrain.run_id"}, {"input.pretrain.run_id", "input.probe.run_id"}]


def test_exact_sampler_with_no_class_above_k_keeps_the_whole_split():
    data = synthetic([20, 10, 5])
    loader = IPDPPLoader(loader_config(k=20), data, CPU)
    loader.set_epoch(0, tiny_model(3))
    np.testing.assert_array_equal(loader.subset.numpy(), np.arange(35))
