"""ltrepro archive: finished stage runs exported to files and imported into another store give the same report."""
import json

import mlflow

from ltrepro.archive import ARCHIVED_TAG
from ltrepro.cli import main
from ltrepro.runner import train
from tests.conftest import new_mlflow_store

FAST = ["stage1.epochs=2", "stage1.batch_size=16", "stage2.epochs=2", "stage2.batch_size=16"]


def report(project, out, capsys) -> str:
    argv = ["report", "--config", str(project / "params.yaml"), *FAST, "--methods", "crt", "ce", "--seeds", "0", "--baseline", "ce"]
    assert main([*argv, "--out", str(out)]) == 0
    capsys.readouterr()
    return out.read_text()


def test_exported_runs_imported_elsewhere_report_the_same_table_and_nothing_twice(project, tmp_path, monkeypatch, empty_mlflow_db, capsys):
    _, stage2 = train(project / "params.yaml", ["method=crt", *FAST])
    before = report(project, tmp_path / "before.md", capsys)
    archive = tmp_path / "archive"
    assert main(["archive", "export", "--config", str(project / "params.yaml"), str(archive)]) == 0
    assert "2 run(s) exported" in capsys.readouterr().out
    record = json.loads((archive / f"{stage2.run_id}.json").read_text())
    assert record["tags"]["stage_key"] and len(record["metrics"]["val_acc"]) == 2  # each epoch's, not the last alone
    files = {p.relative_to(archive / stage2.run_id).as_posix() for p in (archive / stage2.run_id).rglob("*") if p.is_file()}
    assert {"metrics.json", "config.yaml", "plots/reliability.png"} <= files and not any(f.endswith(".pt") for f in files)
    assert main(["archive", "export", "--config", str(project / "params.yaml"), str(archive)]) == 0
    assert "0 run(s) exported" in capsys.readouterr().out

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", new_mlflow_store(elsewhere, empty_mlflow_db))
    assert main(["archive", "import", "--config", str(project / "params.yaml"), str(archive)]) == 0
    assert "2 run(s) imported" in capsys.readouterr().out
    assert report(project, tmp_path / "after.md", capsys) == before  # metrics, seeds and wall times alike
    imported = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.{ARCHIVED_TAG} = '{stage2.run_id}'", output_format="list")
    assert len(imported) == 1 and len(mlflow.MlflowClient().get_metric_history(imported[0].info.run_id, "val_acc")) == 2
    assert main(["archive", "import", "--config", str(project / "params.yaml"), str(archive)]) == 0
    assert "0 run(s) imported" in capsys.readouterr().out
    # the imported runs are not exported again as runs of their own
    assert main(["archive", "export", "--config", str(project / "params.yaml"), str(tmp_path / "again")]) == 0
    assert "0 run(s) exported" in capsys.readouterr().out


def test_a_file_that_is_not_an_archived_run_is_named(project, tmp_path, capsys):
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "abc.json").write_text(json.dumps({"run_id": "abc", "tags": {}}))
    assert main(["archive", "import", "--config", str(project / "params.yaml"), str(archive)]) == 2
    assert "abc.json: not an archived run (no experiment, start_time, end_time, params, metrics)" in capsys.readouterr().err
