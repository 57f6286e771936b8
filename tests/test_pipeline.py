"""MLproject entry points and the DVC pipeline, run for real (mlflow run, dvc repro) on a tiny
copy of this repository: every step as a subprocess, as a user runs it. The copy prepares the
tiny Fashion-MNIST of ``fmnist_source`` (real idx.gz files) instead of Debian's 70,000 images, so a
step costs its start-up, not a pass over the 10,000 test images; the serving tests prepare Debian's."""
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.projects._project_spec import load_project

from ltrepro.cli import build_parser, split_overrides
from tests.conftest import new_mlflow_store

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENTRY_POINTS = {"main", "prepare", "stage1", "stage2", "evaluate", "tune", "export", "promote"}


def test_mlproject_entry_points_parse_into_ltrepro_commands():
    project = load_project(str(REPO))
    assert set(project._entry_points) == ENTRY_POINTS
    for name, entry in project._entry_points.items():
        given = {key: "runs:/0123abcd" for key, p in entry.parameters.items() if p.default is None}
        command = shlex.split(entry.compute_command({**given, "ffn.lam": "0.7"}, None))
        assert command[0] == "ltrepro", name
        rest, overrides = split_overrides(command[1:])
        args = build_parser().parse_args(rest)  # exits on a command the CLI does not accept
        assert args.command == {"main": "pipeline", "prepare": "data", "stage1": "stage", "stage2": "stage"}.get(name, name)
        assert overrides == ["ffn.lam=0.7"]  # an undeclared -P reaches the config as an override
        for key, parameter in entry.parameters.items():
            assert parameter.type in ("string", "float", "path", "uri"), (name, key)


@pytest.fixture
def repo(tmp_path, monkeypatch, fmnist_source, empty_mlflow_db):
    """A git + DVC repository holding this project's code and pipeline files, with a tiny params.yaml
    and the prepare step (DVC stage and MLproject entry point) reading the tiny ``fmnist_source``."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "ltrepro", root / "ltrepro", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("MLproject", "python_env.yaml", "dvc.yaml", ".dvcignore", ".gitignore", "pyproject.toml"):
        shutil.copy(REPO / name, root / name)
    for name, command in (("dvc.yaml", "ltrepro data prepare"), ("MLproject", "ltrepro data prepare --config {config}")):
        text = (root / name).read_text()
        assert text.count(command) == 1, f"{name} no longer runs `{command}`"
        (root / name).write_text(text.replace(command, f"{command} --source {fmnist_source}"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["device"] = "cpu"
    params["data"].update(n_max=20, imbalance=10, val_per_class=5)
    params["stage1"].update(epochs=1, warmup_epochs=0)
    params["recipes"]["ffn"]["stage2"]["epochs"] = 2
    params["recipes"]["bns_ipdpp"]["stage1"].update(epochs=1, batch_size=16)
    params["recipes"]["bns_ipdpp"]["stage2"].update(epochs=2, batch_size=16)
    params["probe"]["epochs"], params["ipdpp"]["k"] = 1, 5
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", new_mlflow_store(root, empty_mlflow_db))
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # an id from another store breaks `mlflow run`
    monkeypatch.setenv("GIT_AUTHOR_NAME", "test")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "test@example.com")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "test")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "test@example.com")
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"]):
        subprocess.run(command, cwd=root, check=True)
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return root


def run(root: Path, *command: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=900)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def runs(filter_string: str):
    return mlflow.search_runs(search_all_experiments=True, filter_string=filter_string, output_format="list")


def test_dvc_pipeline_validates(repo):
    dag = run(repo, "dvc", "dag").stdout
    for stage in ("prepare", "stage1@1", "stage1@2", "stage2", "stage3", "evaluate", "export"):
        assert stage in dag
    for out in ("data/raw/fashion-mnist", "models/stage1-1", "models/stage1-2", "models/stage2", "models/stage3"):
        (repo / out).mkdir(parents=True)  # --dry hashes every dep, so each must exist
    dry = run(repo, "dvc", "repro", "--dry").stdout
    assert "ltrepro stage stage1:2 --run-dir models/stage1-2" in dry
    assert "ltrepro export models/stage1-1 models/stage1-2 models/stage2 models/stage3" in dry


def test_dvc_repro_runs_the_pipeline_then_does_nothing_and_exp_run_is_tracked(repo):
    run(repo, "dvc", "repro")
    for name in ("stage1-1", "stage1-2", "stage2", "test", "export"):
        assert (repo / "metrics" / f"{name}.json").is_file()
    assert json.loads((repo / "metrics/export.json").read_text())["parity_top1_agreement"] >= 0.99
    assert (repo / "models/model.onnx").is_file() and (repo / "plots/confusion.csv").is_file()
    stage2 = json.loads((repo / "models/stage2/run.json").read_text())
    tags = mlflow.get_run(stage2["mlflow_run_id"]).data.tags
    assert tags["input.stage1_ce.run_id"] == json.loads((repo / "models/stage1-1/run.json").read_text())["mlflow_run_id"]
    assert tags["input.stage1_kps.run_id"] == json.loads((repo / "models/stage1-2/run.json").read_text())["mlflow_run_id"]

    again = run(repo, "dvc", "repro").stdout
    assert "Data and pipelines are up to date." in again
    assert len(runs("tags.stage = 'stage2'")) == 1

    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "pipeline outputs")
    run(repo, "dvc", "exp", "run", "-n", "lam07", "-S", "ffn.lam=0.7")
    stage2_runs = runs("tags.stage = 'stage2'")
    assert len(stage2_runs) == 2 and len(runs("tags.stage = 'stage1_ce'")) == 1  # stage 1 not retrained
    newest = max(stage2_runs, key=lambda r: r.info.start_time)
    assert newest.data.tags["DVC_EXP_NAME"] == "lam07" and newest.data.params["ffn.lam"] == "0.7"

    bad = run(repo, "dvc", "exp", "run", "-S", "ffn.lamda=0.7", check=False)
    assert bad.returncode != 0

    # the slots of one- and three-stage methods: tests/test_stage.py, in process (each pipeline here costs ~60 s)


def test_mlflow_run_main_chains_steps_and_a_stage2_sweep_reuses_stage1(repo):
    mlflow_run = ("mlflow", "run", ".", "--env-manager", "local", "--experiment-name", "pipeline")
    run(repo, *mlflow_run, "-e", "main")
    (main_run,) = runs("tags.stage = 'main'")
    steps = {key.split(".")[1]: value for key, value in main_run.data.tags.items() if key.endswith(".run_id")}
    assert set(steps) == {"prepare", "stage1_ce", "stage1_kps", "stage2", "evaluate", "export"}
    for name, run_id in steps.items():
        step = mlflow.get_run(run_id)
        assert step.info.status == "FINISHED" and step.data.tags["mlflow.parentRunId"] == main_run.info.run_id
    stage2 = mlflow.get_run(steps["stage2"])
    assert stage2.data.tags["input.stage1_ce.run_id"] == steps["stage1_ce"]
    assert stage2.data.tags["input.stage1_kps.run_id"] == steps["stage1_kps"]
    assert stage2.data.params["inputs"] == f"stage1_ce=runs:/{steps['stage1_ce']},stage1_kps=runs:/{steps['stage1_kps']}"
    assert "test_top1" in mlflow.get_run(steps["evaluate"]).data.metrics
    assert mlflow.get_run(steps["export"]).data.metrics["parity_top1_agreement"] >= 0.99

    out = run(repo, *mlflow_run, "-e", "main", "-P", "ffn.lam=0.7").stdout
    assert "stage1_ce: reusing FINISHED run" in out and "stage1_kps: reusing FINISHED run" in out
    assert len(runs("tags.stage = 'stage1_ce'")) == 1 and len(runs("tags.stage = 'stage2'")) == 2
    newest = max(runs("tags.stage = 'main'"), key=lambda r: r.info.start_time)
    assert newest.data.tags["step.stage1_ce.reused"] == "true" and newest.data.tags["step.stage2.reused"] == "false"
    assert mlflow.get_run(newest.data.tags["step.stage2.run_id"]).data.params["ffn.lam"] == "0.7"


@pytest.mark.parametrize(
    "parameter, message",
    [("foo=1", "ltrepro: error: unrecognized arguments: --foo 1"), ("ffn.lamb=1", "ltrepro: error: unknown key ffn.lamb")],
)
def test_unknown_entry_point_parameter_is_one_line(repo, parameter, message):
    done = run(repo, "mlflow", "run", ".", "-e", "stage1", "--env-manager", "local", "-P", parameter, check=False)
    assert done.returncode != 0 and message in done.stdout + done.stderr
    assert not (repo / "runs").exists()


def test_every_dvc_slot_tracks_the_params_its_stages_read():
    """`dvc exp run -S fsgl.contrast_weight=2` must rerun the slot that reads it: each slot's params
    cover the top-level blocks that every stage of that depth, and its inputs, read."""
    from ltrepro.methods import METHODS
    from ltrepro.stage_keys import stage_reads

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for method in map(METHODS.get, METHODS.names()):
        for stage in method.stages:
            tracked = set(stages[f"stage{method.depth(stage)}"]["params"])
            needed, todo = set(), [stage]
            while todo:
                current = todo.pop()
                needed |= {path.split(".")[0] for path in stage_reads(current)}
                todo += [method.stage(name) for name in current.inputs]
            missing = {block for block in needed if block not in tracked and not any(p.startswith(block + ".") for p in tracked)}
            assert not missing, f"dvc.yaml stage{method.depth(stage)} misses {sorted(missing)} read by {method.name}/{stage.name}"
