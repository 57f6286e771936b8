"""The tracking store: several processes opening a fresh store at once all succeed; dead runs end KILLED."""
import multiprocessing
import os
from pathlib import Path

import mlflow

from ltrepro.tracking import Tracker, artifact_location, dead_stage_runs, end_runs, open_store, OWNER_TAG

WORKERS = 4


def open_and_log(root: str, start, results) -> None:
    """One worker: wait for the others, then open the (fresh) store, log a run and end it."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(root) / 'mlflow.db'}"
    os.environ.pop("MLFLOW_RUN_ID", None)
    start.wait()
    try:
        tracker = Tracker(Path(root), "race", f"worker-{os.getpid()}")
        tracker.log_metrics({"x": 1.0})
        tracker.end()
        results.put("ok")
    except Exception as exc:  # reported to the test, which prints it
        results.put(f"{type(exc).__name__}: {exc}")


def test_processes_opening_a_fresh_store_at_once_all_succeed(tmp_path):
    spawn = multiprocessing.get_context("spawn")  # fresh interpreters, as separate `ltrepro train` commands
    start, results = spawn.Barrier(WORKERS), spawn.Queue()
    workers = [spawn.Process(target=open_and_log, args=(str(tmp_path), start, results)) for _ in range(WORKERS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    outcomes = [results.get(timeout=5) for _ in workers]
    assert outcomes == ["ok"] * WORKERS, outcomes
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["race"], output_format="list")
    assert sorted(run.info.status for run in runs) == ["FINISHED"] * WORKERS


def test_a_running_run_of_a_dead_process_is_found_and_ended_killed(project):
    from tests.test_runs import dead_owner

    open_store(project)
    ids = {}
    for name, owner in (("dead", dead_owner()), ("alive", None), ("other-key", dead_owner())):
        tracker = Tracker(project, "ltrepro", name)
        key = "other" if name == "other-key" else "k1"
        tracker.set_tags({"stage_key": key, **({OWNER_TAG: owner} if owner else {})})
        ids[name] = tracker.run_id
        mlflow.end_run(status="RUNNING")  # detach, leaving it RUNNING as a killed process would
        mlflow.MlflowClient().update_run(tracker.run_id, status="RUNNING")
    from ltrepro.runs import process_owner

    mlflow.MlflowClient().set_tag(ids["alive"], OWNER_TAG, process_owner())
    assert dead_stage_runs(project, "ltrepro", "k1") == [ids["dead"]]
    end_runs(project, [ids["dead"]])
    statuses = {name: mlflow.get_run(run_id).info.status for name, run_id in ids.items()}
    assert statuses == {"dead": "KILLED", "alive": "RUNNING", "other-key": "RUNNING"}


def test_a_tracking_server_keeps_artifacts_a_local_store_keeps_them_in_the_project(tmp_path):
    assert artifact_location("http://127.0.0.1:5000", tmp_path) is None  # the server's --artifacts-destination
    assert artifact_location("https://mlflow.example.org", tmp_path) is None
    local = (tmp_path / "mlartifacts").resolve().as_uri()
    assert artifact_location(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path) == local
    assert artifact_location("postgresql+psycopg2://u@db/mlflow", tmp_path) == local  # a database, no server
