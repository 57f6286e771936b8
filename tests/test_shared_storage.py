"""Shared storage on PostgreSQL (and sqlite, for one machine): `ltrepro tune` workers sharing one
Optuna study, a killed worker's trial failed by the next worker (its owner check on this machine,
the heartbeat for another machine's), and an MLflow tracking server with a PostgreSQL backend that
`ltrepro train`, `report`, `export`/`promote` and `mlflow models serve` use.

Each test process starts a throwaway cluster (tests/postgres.py) and each test gets a database of
its own, so pytest-xdist workers never share one. Without PostgreSQL the tests skip, except in CI
(CI=true), where they fail: CI must never pass by skipping them."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import mlflow
import optuna
import pytest
import sqlalchemy
import torch
from optuna.trial import TrialState

from ltrepro.cli import main
from ltrepro.data.loader import make_loader
from ltrepro.model_registry import image_base64
from ltrepro.rebuild import load_run
from ltrepro.serving.server import free_port, mlflow_server, running_server
from ltrepro.tracking import Tracker, open_store
from ltrepro.tune import FINISHED_STATES, GRACE_SECONDS, open_storage
from tests.postgres import Cluster, postgres_bin, start_cluster
from tests.serving.test_serve import post

# ce_fcc: one stage per trial, tuned on stage1.fcc; the cheapest tunable method on the tiny project.
TUNE = ["method=ce_fcc", "stage1.epochs=2", "stage1.warmup_epochs=0", "tune.pruner=none"]
TRAIN = ["stage1.epochs=1", "stage1.warmup_epochs=0"]
ANOTHER_MACHINE = "another-host/another-boot/4242/123456"  # a runs.process_owner() of a process elsewhere
MODEL = "models:/ltrepro-fmnist_lt@champion"
SERVER_START_S = 240  # a fresh backend runs MLflow's migrations first; slow on 2 busy cores


def postgres_missing(reason: str) -> None:
    """Skip here, fail in CI: a CI run that skips these tests would prove nothing."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run the PostgreSQL tests (.ci/run installs postgresql)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """A private PostgreSQL cluster for this test process, removed at the end."""
    try:
        import psycopg2  # noqa: F401  (SQLAlchemy's postgresql+psycopg2 driver)
    except ImportError:
        postgres_missing("psycopg2 is not installed (pip install -e '.[dev]')")
    if postgres_bin() is None:
        postgres_missing("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    cluster = start_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def database(postgres: Cluster) -> str:
    """The SQLAlchemy URL of a new, empty database."""
    return postgres.create_database()


def tune_worker(project: Path, log: Path, *overrides: str) -> subprocess.Popen:
    """`ltrepro tune` as a process of its own (a session, so SIGKILL reaches all of it), output to ``log``
    (a pipe nobody reads while we wait could fill and stall it)."""
    command = [sys.executable, "-m", "ltrepro", "tune", "--config", str(project / "params.yaml"), *TUNE, *overrides]
    with log.open("w") as output:
        return subprocess.Popen(command, cwd=project, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


def trial_runs(study: str) -> dict[int, mlflow.entities.Run]:
    """The study's trial runs in the project's MLflow store, by trial number."""
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    found = mlflow.search_runs(search_all_experiments=True, output_format="list",
                               filter_string=f"tags.optuna_study = '{study}' and tags.optuna_role = 'trial'")  # fmt: skip
    return {int(run.data.tags["optuna_trial"]): run for run in found}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_share_one_study(project: Path, tmp_path: Path, request: pytest.FixtureRequest, backend: str) -> None:
    database = f"sqlite:///{project / 'optuna.db'}" if backend == "sqlite" else request.getfixturevalue("database")
    shared = ["tune.trials=4", "tune.study=shared", f"tune.storage={database}"]
    logs = [tmp_path / f"worker{seed}.log" for seed in (1, 2)]
    workers = [tune_worker(project, log, *shared, f"tune.sampler_seed={seed}", "--resume") for seed, log in zip((1, 2), logs)]
    codes = [worker.wait(timeout=600) for worker in workers]
    assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]
    study = optuna.load_study(study_name="shared", storage=database)
    finished = [t for t in study.trials if t.state in FINISHED_STATES]
    assert 4 <= len(finished) <= 5  # a worker stops at 4 finished; the other one's last trial may still end
    assert Counter(t.state for t in study.trials) == {TrialState.COMPLETE: len(study.trials)}  # no FAIL, none RUNNING
    numbers = sorted(t.number for t in study.trials)
    assert numbers == list(range(len(numbers)))  # unique and without gaps: no trial lost or handed out twice
    assert len({t.user_attrs["owner"] for t in study.trials}) == 2  # both workers ran trials of the one study
    assert sorted(trial_runs("shared")) == numbers  # one MLflow run per trial
    assert len({t.params["stage1.fcc"] for t in study.trials}) == len(numbers)  # no worker replayed another's draws


def wait_for_trial_in_training(worker: subprocess.Popen, log: Path, study: str, storage: str) -> int:
    """The number of a trial the worker is training: RUNNING, owned by it, one epoch reported."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert worker.poll() is None, f"the worker ended before it could be killed:\n{log.read_text()[-3000:]}"
        try:
            running = optuna.load_study(study_name=study, storage=storage).get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the worker has not created the study yet
            running = []
        training = [t.number for t in running if "owner" in t.user_attrs and t.intermediate_values]
        if training:
            return training[0]
        time.sleep(0.2)
    pytest.fail(f"no trial reached its first epoch in 300 s:\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_killed_workers_trial_is_failed_by_the_next_worker(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture, request: pytest.FixtureRequest, backend: str
) -> None:
    """kill -9 mid-trial: the trial stays RUNNING in the study; the next worker on this machine sees
    its owner process is gone and fails it (Optuna and MLflow) at once, then goes on."""
    storage = f"sqlite:///{project / 'optuna.db'}" if backend == "sqlite" else request.getfixturevalue("database")
    study_args = ["tune.study=killed", f"tune.storage={storage}"]
    open_storage(storage)  # the schema exists before we poll it, so our reads never race the worker creating it
    log = tmp_path / "killed.log"
    worker = tune_worker(project, log, *study_args, "tune.trials=3", "stage1.epochs=3")
    killed = wait_for_trial_in_training(worker, log, "killed", storage)
    os.killpg(worker.pid, signal.SIGKILL)
    assert worker.wait(timeout=60) == -signal.SIGKILL
    study = optuna.load_study(study_name="killed", storage=storage)
    assert study.trials[killed].state == TrialState.RUNNING  # what the kill leaves behind
    if backend == "postgresql":  # the dead worker was beating, so another machine's worker could fail it too
        with sqlalchemy.create_engine(storage).connect() as connection:
            beats = connection.execute(sqlalchemy.text("SELECT count(*) FROM trial_heartbeats")).scalar_one()
        assert beats >= 1
    completed = len(study.get_trials(states=(TrialState.COMPLETE,)))

    argv = ["tune", "--config", str(project / "params.yaml"), *TUNE, *study_args, f"tune.trials={completed + 1}", "--resume"]
    assert main(argv) == 0
    assert f"trial {killed} was left RUNNING by a dead worker; marked FAIL" in capsys.readouterr().out
    study = optuna.load_study(study_name="killed", storage=storage)
    states = Counter(t.state for t in study.trials)
    assert study.trials[killed].state == TrialState.FAIL and states[TrialState.RUNNING] == 0
    assert states[TrialState.COMPLETE] == completed + 1  # the resumed worker went on to the target
    assert trial_runs("killed")[killed].info.status == "FAILED"


def silent_trial_from_another_machine(storage: str, study_name: str, mlflow_run_id: str | None = None) -> tuple[int, int]:
    """Two RUNNING trials of workers on another machine: one silent for longer than the grace period
    (its worker died), one that beat just now (its worker is alive). Returns their numbers."""
    rdb = open_storage(storage)  # ltrepro's storage: heartbeat every HEARTBEAT_SECONDS, GRACE_SECONDS grace
    study = optuna.create_study(study_name=study_name, storage=rdb, direction="maximize")
    silent, beating = study.ask(), study.ask()
    for trial in (silent, beating):
        trial.set_user_attr("owner", ANOTHER_MACHINE)  # this machine's owner check cannot judge it
        rdb.record_heartbeat(trial._trial_id)  # what Optuna's heartbeat thread records
    if mlflow_run_id is not None:
        silent.set_user_attr("mlflow_run_id", mlflow_run_id)
    with sqlalchemy.create_engine(storage).begin() as connection:
        connection.execute(
            sqlalchemy.text("UPDATE trial_heartbeats SET heartbeat = heartbeat - make_interval(secs => :age) WHERE trial_id = :id"),
            {"age": GRACE_SECONDS + 60, "id": silent._trial_id},
        )  # fmt: skip
    return silent.number, beating.number


def resume_one_trial(project: Path, study: str, storage: str) -> int:
    """`ltrepro tune --resume` to one finished trial: a worker joining the study, then training once."""
    argv = ["tune", "--config", str(project / "params.yaml"), *TUNE, "stage1.epochs=1", "tune.trials=1",
            f"tune.study={study}", f"tune.storage={storage}", "--resume"]  # fmt: skip
    return main(argv)


def test_a_trial_silent_past_the_grace_period_is_failed_by_a_worker_on_another_machine(
    project: Path, database: str
) -> None:
    """The heartbeat path: the trial's owner is another machine's process, so only its heartbeat tells
    whether it lives. Its last beat is older than GRACE_SECONDS, which a test cannot wait for (180 s,
    a module constant, not a config key), so it is dated back in the database."""
    silent, beating = silent_trial_from_another_machine(database, "heartbeat")
    assert resume_one_trial(project, "heartbeat", database) == 0
    study = optuna.load_study(study_name="heartbeat", storage=database)
    assert study.trials[silent].state == TrialState.FAIL
    assert study.trials[beating].state == TrialState.RUNNING  # a live worker elsewhere keeps its trial
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 1


def test_the_mlflow_run_of_a_trial_failed_by_the_heartbeat_ends_failed(project: Path, database: str) -> None:
    open_store(project, "ltrepro")
    client = mlflow.MlflowClient()
    run = client.create_run(client.get_experiment_by_name("ltrepro").experiment_id)  # RUNNING, as the dead worker left it
    silent, _ = silent_trial_from_another_machine(database, "heartbeat", run.info.run_id)
    assert resume_one_trial(project, "heartbeat", database) == 0
    assert optuna.load_study(study_name="heartbeat", storage=database).trials[silent].state == TrialState.FAIL
    assert client.get_run(run.info.run_id).info.status == "FAILED"


@pytest.fixture(scope="module")
def tracking_server(postgres: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`mlflow server` on a fresh PostgreSQL database, artifacts proxied to a temp folder."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    backend, artifacts, port = postgres.create_database("mlflow"), folder / "artifacts", free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination",
               str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    with running_server("mlflow server", command, port, folder / "server.log", "health", SERVER_START_S) as url:
        yield {"url": url, "backend": backend, "artifacts": artifacts, "root": folder}


def run_status_in_postgres(backend: str, run_id: str) -> str:
    """The run's status as the server stored it: read from PostgreSQL itself, not through MLflow."""
    with sqlalchemy.create_engine(backend).connect() as connection:
        return connection.execute(sqlalchemy.text("SELECT status FROM runs WHERE run_uuid = :id"), {"id": run_id}).scalar_one()


def printed_json(out: str) -> dict:
    """The JSON object a command printed last (export, promote), after MLflow's own lines."""
    return json.loads(out[re.search(r"^\{$", out, re.MULTILINE).start():])


def test_train_report_export_and_serve_through_a_tracking_server_on_postgresql(
    project: Path, tracking_server: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, params = tracking_server["url"], str(project / "params.yaml")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    client = mlflow.MlflowClient(url)

    assert main(["train", "--config", params, *TRAIN]) == 0
    out = capsys.readouterr().out
    assert "stage1: finished" in out
    run_id = re.search(r"MLflow run\s+([0-9a-f]{32})", out).group(1)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run_status_in_postgres(tracking_server["backend"], run_id) == "FINISHED"
    assert {"val_top1", "test_top1", "test_balanced"} <= set(run.data.metrics)
    assert {"best.pt", "config.yaml", "run.json"} <= {a.path for a in client.list_artifacts(run_id)}
    run_json = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="run.json", tracking_uri=url)
    assert json.loads(Path(run_json).read_text())["mlflow_run_id"] == run_id  # the artifacts come back through it

    assert main(["train", "--config", params, *TRAIN]) == 0
    out = capsys.readouterr().out
    assert "stage1: reused" in out and run_id in out
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == 1  # nothing trained again

    assert main(["report", "--config", params, "--methods", "ce", "--seeds", "0", *TRAIN]) == 0
    assert f"| ce | 0 | {run.data.metrics['test_top1']:.2f} |" in capsys.readouterr().out

    run_dir = Path(re.search(r"checkpoint\s+(\S+)/best\.pt", out).group(1))
    assert main(["export", str(run_dir), "--out", str(project / "model.onnx"), "--config", params]) == 0
    exported = printed_json(capsys.readouterr().out)
    assert exported["registered_model"] == "ltrepro-fmnist_lt" and exported["source_run_id"] == run_id
    assert main(["promote", "--config", params]) == 0
    assert printed_json(capsys.readouterr().out)["decision"] == "promoted"
    champion = client.get_model_version_by_alias("ltrepro-fmnist_lt", "champion")
    assert champion.version == exported["version"] and champion.tags["source_run_id"] == run_id

    loaded = load_run(run_dir)
    images, _ = next(iter(make_loader(loaded.data, "test", 1, torch.device("cpu"), num_workers=0).epoch()))
    with torch.no_grad():
        expected = int(loaded.model.cpu().eval()(images).argmax(1)[0])  # PyTorch's label for test image 0
    with mlflow_server(MODEL, url, tracking_server["root"] / "serve.log") as served:
        status, answer = post(served, {"inputs": {"image": [image_base64(loaded.data.test, 0)]}})
    assert status == 200 and answer["predictions"][0]["label"] == expected


def test_artifacts_go_to_the_servers_artifact_destination(project: Path, tracking_server: dict, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server["url"])
    (project / "probe.txt").write_text("artifact")
    run = Tracker(project, "ltrepro", "artifact-probe")
    run.log_artifact(project / "probe.txt")
    run.end()
    assert list(tracking_server["artifacts"].rglob("probe.txt")), "the server's --artifacts-destination holds no artifact"
