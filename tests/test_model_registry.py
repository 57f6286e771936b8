"""Export registers a pyfunc version as challenger; promote moves champion only on a real win."""
import json

import mlflow
import pytest
import torch
import yaml

from ltrepro import model_registry
from ltrepro.cli import main
from ltrepro.config import load_config
from ltrepro.errors import LtreproError
from ltrepro.export import export_run
from ltrepro.model_registry import promote
from ltrepro.runner import train

FAST = ["method=crt", "stage1.epochs=2", "stage2.epochs=2", "stage2.batch_size=16"]
NAME = "ltrepro-fmnist_lt"


def test_export_registers_a_pyfunc_challenger(project, tmp_path):
    final = train(project / "params.yaml", FAST)[-1]
    result = export_run(str(final.run_dir), tmp_path / "m.onnx", None)
    assert result["registered_model"] == NAME and result["version"] == "1" and 0 <= result["onnx_val_top1"] <= 100

    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(NAME, "challenger")
    assert str(version.version) == "1" and version.tags["source_run_id"] == final.run_id and version.tags["method"] == "crt"
    assert version.tags["val_top1"] == f"{final.metrics['val_top1']:.2f}"  # ORT on val = PyTorch's selection figure
    folder = mlflow.artifacts.download_artifacts(f"models:/{NAME}@challenger", dst_path=str(tmp_path / "dl"))
    mlmodel = yaml.safe_load(open(f"{folder}/MLmodel"))
    assert mlmodel["flavors"]["python_function"]["model_code_path"].endswith("onnx_pyfunc.py")
    assert "image" in mlmodel["signature"]["inputs"] and "top_k" in mlmodel["signature"]["params"]
    requirements = [line.split("==")[0] for line in open(f"{folder}/requirements.txt").read().split()]
    assert "onnxruntime-gpu" in requirements and not {"onnxruntime", "torch", "ltrepro"} & set(requirements)

    model = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger")  # the logged input example round-trips
    example = mlflow.models.Model.load(folder).load_input_example(folder)
    predictions = model.predict(example, params={"top_k": 2})
    assert len(predictions) == len(example) and [list(p) for p in predictions] == [
        ["label", "class_name", "score", "top_labels", "top_classes", "top_scores"]] * len(example)  # fmt: skip


def test_promote_needs_a_win_by_the_margin_on_one_split(project, monkeypatch, tmp_path):
    final = train(project / "params.yaml", FAST)[-1]
    for _ in range(3):  # versions 1, 2, 3; a bare MLflow run id names the run as well as its directory
        export_run(final.run_id, tmp_path / "m.onnx", project)
    figures = {"1": 80.0, "2": 80.4, "3": 80.6}  # val top-1 by version, so the rule is what is tested
    monkeypatch.setattr(model_registry, "onnx_val_top1", lambda onnx, data: figures[onnx.parts[-3]])
    cfg = load_config(project / "params.yaml")
    client = mlflow.MlflowClient()

    first = promote(cfg, project, version="1")
    assert first["decision"] == "promoted" and first["champion_version"] is None
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    with pytest.raises(LtreproError, match="version 1 is already the champion"):
        promote(cfg, project, version="1")

    kept = promote(cfg, project, version="2")  # +0.4 is within the 0.5 margin
    assert kept["decision"] == "kept" and str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    logged = mlflow.get_run(kept["mlflow_run_id"]).data
    assert logged.tags["decision"] == "kept" and logged.metrics["challenger_val_top1"] == 80.4
    assert logged.metrics["champion_val_top1"] == 80.0 and logged.params["margin"] == "0.5"

    won = promote(cfg, project)  # the challenger alias: version 3, +0.6
    assert won["decision"] == "promoted" and won["challenger_version"] == "3"
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "3"
    assert client.get_model_version(NAME, "2").tags["promotion"].startswith("kept")


def test_promote_refuses_a_champion_from_another_split(project, tmp_path, capsys):
    export_run(str(train(project / "params.yaml", FAST)[-1].run_dir), tmp_path / "a.onnx", None)
    assert main(["promote", "--config", str(project / "params.yaml")]) == 0
    export_run(str(train(project / "params.yaml", [*FAST, "seed=1"])[-1].run_dir), tmp_path / "b.onnx", None)
    assert main(["promote", "--config", str(project / "params.yaml")]) == 2
    assert "champion v1 was trained on another split" in capsys.readouterr().err
    assert main(["promote", "--config", str(project / "params.yaml"), "--version", "9"]) == 2
    assert f"model {NAME} version 9:" in capsys.readouterr().err


def test_a_model_that_diverged_never_reaches_the_registry(project, capsys):
    """The chain of the reliability issue: at lr 1e6 epoch 1 is finite and kept as best.pt, then
    epoch 2's loss stays finite but leaves NaN weights. The run ends FAILED with nothing of epoch 2
    saved, and evaluate, export and promote refuse it although it has a best.pt."""
    params = ["--config", str(project / "params.yaml")]
    assert main(["train", *params, "stage1.lr=1000000", "stage1.epochs=3", "stage1.batch_size=64"]) == 2
    assert "epoch 2 left NaN or infinite values in" in capsys.readouterr().err
    (run_dir,) = (project / "runs").iterdir()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "FAILED"
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert best["epoch"] == 0 and all(torch.isfinite(t).all() for t in best["model"].values() if t.is_floating_point())
    assert mlflow.search_runs(experiment_names=["ltrepro"], output_format="list")[0].info.status == "FAILED"
    for command in (["evaluate", str(run_dir)], ["export", str(run_dir)]):
        assert main(command) == 2
        assert "the run is FAILED, not FINISHED" in capsys.readouterr().err
    assert main(["promote", *params]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(mlflow.exceptions.MlflowException):
        mlflow.MlflowClient().get_registered_model(NAME)


def test_promote_refuses_a_challenger_whose_stage_run_did_not_finish(project, tmp_path, capsys):
    final = train(project / "params.yaml", FAST)[-1]
    export_run(str(final.run_dir), tmp_path / "m.onnx", None)
    mlflow.MlflowClient().set_terminated(final.run_id, "FAILED")  # e.g. marked after the fact
    assert main(["promote", "--config", str(project / "params.yaml")]) == 2
    assert f"{NAME} version 1: its stage run is FAILED, not FINISHED" in capsys.readouterr().err
    with pytest.raises(mlflow.exceptions.MlflowException):
        mlflow.MlflowClient().get_model_version_by_alias(NAME, "champion")
