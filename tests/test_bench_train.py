import json
import math

import numpy as np
import torch

from ltrepro.bench_train import ReferenceImages, random_cifar_lt, reference_epoch
from ltrepro.cli import main
from ltrepro.models import create_model


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
