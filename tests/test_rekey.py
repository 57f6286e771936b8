"""Runs keyed by an older ltrepro (stage-key version 1, FFN's weight under stage2) are re-keyed from
their saved configs, so reuse and `ltrepro report` find them again without retraining."""
import json

import mlflow
import yaml

from ltrepro.cli import main
from ltrepro.report import collect
from ltrepro.runner import train

OVERRIDES = ["method=crt", "stage1.epochs=1", "stage2.epochs=1"]


def as_version_1(run_dir):
    """What the run directory looked like before: lam in stage2, no optimiser keys, an old key."""
    values = yaml.safe_load((run_dir / "config.yaml").read_text())
    values["stage2"]["lam"] = values["ffn"].pop("lam")
    for section in ("stage1", "stage2"):
        for key in ("optimizer", "betas", "decay_1d", "update", "sam"):
            values[section].pop(key)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    info = json.loads((run_dir / "run.json").read_text())
    for key in ("builder", "final", "key_version", "holds"):
        info.pop(key)
    info["stage_key"] = "v1" + info["stage_key"][2:]
    (run_dir / "run.json").write_text(json.dumps(info))
    mlflow.MlflowClient().set_tag(info["mlflow_run_id"], "stage_key", info["stage_key"])
    return info["stage_key"]


def test_rekey_restores_reuse_and_the_report(project, capsys):
    params = project / "params.yaml"
    results = train(params, OVERRIDES)
    keys = [json.loads((r.run_dir / "run.json").read_text())["stage_key"] for r in results]
    old = [as_version_1(r.run_dir) for r in results]
    assert collect([params], project, ["crt"], [0], OVERRIDES[1:])["crt"][0] is None  # the report no longer finds it

    assert main(["rekey", "--config", str(params), "--dry-run"]) == 0
    assert "2 run(s) would be re-keyed" in capsys.readouterr().out
    assert json.loads((results[0].run_dir / "run.json").read_text())["stage_key"] == old[0]
    assert main(["rekey", "--config", str(params)]) == 0
    out = capsys.readouterr().out
    assert f"{old[0]} -> {keys[0]}" in out and f"{old[1]} -> {keys[1]}" in out
    for result, key in zip(results, keys):
        info = json.loads((result.run_dir / "run.json").read_text())
        assert info["stage_key"] == key and info["key_version"] == 2
        assert mlflow.get_run(result.run_id).data.tags["stage_key"] == key
        assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["ffn"]["lam"] == 0.5

    again = train(params, OVERRIDES)
    assert all(r.reused for r in again) and [r.run_dir for r in again] == [r.run_dir for r in results]
    found = collect([params], project, ["crt"], [0], OVERRIDES[1:])["crt"][0]
    assert found["test_top1"] == results[-1].metrics["test_top1"]
    assert main(["rekey", "--config", str(params)]) == 0 and "0 run(s) re-keyed" in capsys.readouterr().out
