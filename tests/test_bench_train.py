import json
import math
from unittest import mock

import numpy as np
import torch

from ltrepro.bench_train import ReferenceImages, bench_model, random_cifar_lt, reference_epoch
from ltrepro.cli import main
from ltrepro.losses import build_loss
from ltrepro.models import create_model
from ltrepro.objectives import Objective


def test_the_benchmark_set_has_cifar10_lt_if100s_size_and_profile():
    data = random_cifar_lt(5000)
    counts = np.bincount(data.train.labels)
    assert len(data.train) == 12406  # CIFAR-10-LT at IF 100 (LDAM-DRW's count)
    assert counts[0] == 5000 and counts[-1] == 50
    assert data.train.images.shape[1:] == (3, 32, 32) and data.train.images.dtype == torch.uint8


def test_the_reference_dataset_gives_normalised_crops_of_the_stored_image():
    data = random_cifar_lt(20)
    image, label = ReferenceImages(data)[0]
    assert image.shape == (3, 32, 32) and label == data.train.labels[0]
    stored = data.train.images[0].float() / 255
    mean, std = torch.tensor(data.mean)[:, None, None], torch.tensor(data.std)[:, None, None]
    restored = image * std + mean
    padded = torch.nn.functional.pad(stored, (4, 4, 4, 4))
    crops = [padded[:, y : y + 32, x : x + 32] for y in range(9) for x in range(9)]
    assert any(torch.allclose(restored, crop.flip(2) if flip else crop, atol=1e-5) for crop in crops for flip in (False, True))


def test_a_reference_epoch_trains_and_reports_every_image():
    data = random_cifar_lt(20)
    torch.manual_seed(0)
    model = create_model("resnet32", data.num_classes, 3)
    loader = torch.utils.data.DataLoader(ReferenceImages(data), batch_size=16, shuffle=True)
    before = [p.detach().clone() for p in model.parameters()]
    epoch = reference_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.01), torch.device("cpu"))
    assert epoch["images"] == len(data.train) and epoch["seconds"] > 0
    assert math.isfinite(epoch["loss"]) and 0 <= epoch["accuracy"] <= 100
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_bench_train_quick_writes_sane_figures(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    speeds = result["img_per_s"]
    assert result["train_images"] == 740 and result["quick"] is True
    assert all(speeds[name] > 0 for name in ("reference", "engine", "model_only"))
    assert speeds["engine_compiled"] is None and result["ratio_fast_vs_reference"] is None  # CPU: no compiled row
    assert math.isclose(result["ratio_engine_vs_reference"], speeds["engine"] / speeds["reference"])
    assert math.isclose(result["seconds_per_epoch"]["engine"], 740 / speeds["engine"])
    profile = result["profile"]
    assert math.isclose(sum(profile["share"].values()), 1.0, abs_tol=1e-3)
    assert profile["ms_per_step"]["backward"] > 0 and profile["top_ops_self_ms_per_step"]
    assert 0 < result["mlflow_logging"]["share_of_engine_epoch"] < 1
    printed = capsys.readouterr().out
    assert "| reference |" in printed and "engine / reference" in printed and str(out) in printed


def test_the_schedule_set_has_cifar100_lt_if100s_size_and_a_held_out_split():
    data = random_cifar_lt(500, 100.0, 100, val_size=1000)
    counts = np.bincount(data.train.labels)
    assert len(data.train) == 10847 and counts[0] == 500 and counts[-1] == 5  # CIFAR-100-LT at IF 100
    assert len(data.val) == 1000 and len(np.unique(data.val.labels)) > 50  # drawn across classes, not the head's first images
    first = data.val.images[0]
    assert any(torch.equal(first, image) for image in data.train.images[data.train.labels == data.val.labels[0]])


def test_a_compiled_bench_model_sends_the_objectives_calls_through_the_compiled_backbone():
    data = random_cifar_lt(20)
    calls = []

    def recording_compile(function, **options):
        def compiled(*args, **kwargs):
            calls.append(options)
            return function(*args, **kwargs)

        return compiled

    with mock.patch("torch.compile", recording_compile):
        model = bench_model(data, torch.device("cpu"), channels_last=False, compiled=True)
    plain = bench_model(data, torch.device("cpu"), channels_last=False, compiled=False)
    objective = Objective(build_loss("ce", [2] * 10))
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    loss = objective(model, images, labels, np.random.default_rng(0))
    assert calls == [{"dynamic": False}]  # model.features -> the backbone's compiled call
    assert list(model.state_dict()) == list(plain.state_dict())  # checkpoints keep their keys
    assert torch.equal(loss, objective(plain, images, labels, np.random.default_rng(0)))


def test_bench_schedule_quick_trains_every_epoch_and_writes_its_figures(tmp_path, capsys):
    out = tmp_path / "schedule.json"
    assert main(["bench", "schedule", "--quick", "--epochs", "2", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["train_images"] == 293 and result["val_images"] == 100 and result["epochs"] == 2
    assert 0 < result["first_epoch_seconds"] < result["training_seconds"] < result["wall_seconds"]
    second_epoch = result["training_seconds"] - result["first_epoch_seconds"]
    assert math.isclose(result["img_per_s_after_first_epoch"], 293 / second_epoch)
    assert math.isfinite(result["final_train_loss"]) and result["compiled"] is False
    assert "2 epochs of 293 images" in capsys.readouterr().out


def test_bench_schedule_refuses_a_schedule_without_a_timed_epoch(tmp_path, capsys):
    assert main(["bench", "schedule", "--quick", "--epochs", "1", "--out", str(tmp_path / "s.json")]) != 0
    assert "--epochs must be at least 2" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()
