import json

import pytest

from ltrepro.cli import main


@pytest.mark.parametrize("command", [["--help"], ["train", "--help"], ["data", "prepare", "--help"], ["evaluate", "--help"], ["bench", "loader", "--help"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    assert exit_info.value.code == 0 and "usage: ltrepro" in capsys.readouterr().out


def test_prepare_reports_counts(project, fmnist_source, capsys):
    assert main(["data", "prepare", "--config", str(project / "params.yaml"), "--source", str(fmnist_source)]) == 0
    out = capsys.readouterr().out
    assert "fmnist_lt: 10 classes, train 78 (n_max 20, min 2), val 50, test 100" in out


def test_missing_dataset_file_is_one_line(project, capsys):
    (project / "data/raw/fashion-mnist/t10k-labels-idx1-ubyte").unlink()
    assert main(["train", "--config", str(project / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ltrepro: error: missing dataset file:") and "t10k-labels-idx1-ubyte" in err


def test_bench_loader_writes_both_figures(project, tmp_path, capsys):
    out = tmp_path / "loader.json"
    args = ["bench", "loader", "--config", str(project / "params.yaml"), "--epochs", "1", "--out", str(out)]
    assert main([*args, "data.num_workers=0"]) == 0
    result = json.loads(out.read_text())
    assert set(result["img_per_s"]) == {
        "device_loader_data_only", "torchvision_dataloader_data_only", "device_loader_train", "torchvision_dataloader_train",
    }  # fmt: skip
    assert all(value > 0 for value in result["img_per_s"].values()) and result["train_images"] == 78


def test_a_store_that_cannot_be_opened_is_one_line(project, capsys, monkeypatch):
    (project / "a-file").write_text("")  # the store's folder cannot be created under a file
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'a-file' / 'mlflow.db'}")
    assert main(["train", "--config", str(project / "params.yaml"), "stage1.epochs=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ltrepro: error: MLflow tracking store sqlite:///") and "cannot be opened" in err and "\n" not in err
