"""Finished stage runs as plain files, so that a campaign's results outlive the store that holds them.

``ltrepro archive export DIR`` writes every FINISHED MLflow run that carries a stage key (each
stage ``ltrepro train`` runs) as ``DIR/<run id>.json``: its experiment, name, start and end times,
tags, params and the whole history of every metric; beside it, in ``DIR/<run id>/``, the small
artifacts that say what the run was and that the report and its page read
(``ARCHIVED_ARTIFACTS``). Checkpoints stay out. ``ltrepro archive import DIR`` recreates those runs
in the current store with their original times, so the report's wall times hold, each tagged
``ARCHIVED_TAG`` with its original id. Both are incremental: a run exported, or imported, before is
skipped; the record is written last, so an interrupted export leaves no record without its files.

An imported run has no checkpoint. The runner only reuses a stage from a run directory under
``out_dir``, never from MLflow, so an imported run is read by ``ltrepro report`` and never
trained on; a stage trained here later is the newer run and the report takes it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ltrepro.errors import LtreproError
from ltrepro.files import write_text_atomic
from ltrepro.tracking import open_store, run_files

ARCHIVED_ARTIFACTS = ("config.yaml", "data_info.json", "run.json", "metrics.json", "plots/reliability.png")
ARCHIVED_TAG = "ltrepro_archived_run"
BATCH = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's limits of one log_batch call


def stage_runs(client) -> list:
    """Every FINISHED run with a stage key, in every experiment."""
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs, token = [], None
    while True:
        page = client.search_runs(experiments, "tags.stage_key != '' and attributes.status = 'FINISHED'",
                                  run_view_type=ViewType.ALL, max_results=1000, page_token=token)  # fmt: skip
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def run_record(client, run) -> dict:
    """What ``import_runs`` needs to recreate ``run``: everything but its artifacts."""
    return {
        "run_id": run.info.run_id,
        "experiment": client.get_experiment(run.info.experiment_id).name,
        "run_name": run.info.run_name,
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
        "tags": dict(sorted(run.data.tags.items())),
        "params": dict(sorted(run.data.params.items())),
        "metrics": {
            key: [[m.step, m.timestamp, m.value] for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))]
            for key in sorted(run.data.metrics)
        },
    }  # fmt: skip


def export_runs(root: Path, folder: Path) -> list[str]:
    """Write each stage run not yet in ``folder``; returns the ids written."""
    import mlflow

    open_store(root)
    client = mlflow.MlflowClient()
    written = []
    for run in stage_runs(client):
        run_id = run.info.run_id
        # a run imported from an archive has its original there already
        if run.data.tags.get(ARCHIVED_TAG) or (folder / f"{run_id}.json").exists():
            continue
        shutil.rmtree(folder / run_id, ignore_errors=True)  # files an interrupted export left without their record
        run_files(run_id, list(ARCHIVED_ARTIFACTS), folder)
        write_text_atomic(folder / f"{run_id}.json", json.dumps(run_record(client, run), separators=(",", ":")) + "\n")
        written.append(run_id)
    return written


def read_record(path: Path) -> dict:
    """One run's record, with a clear error for a file that is not one."""
    try:
        record = json.loads(path.read_text())
        missing = [key for key in ("run_id", "experiment", "start_time", "end_time", "tags", "params", "metrics") if key not in record]
    except (OSError, ValueError) as exc:
        raise LtreproError(f"{path}: not an archived run ({exc})") from None
    if missing:
        raise LtreproError(f"{path}: not an archived run (no {', '.join(missing)})")
    return record


def import_runs(root: Path, folder: Path) -> list[str]:
    """Recreate each archived run of ``folder`` not yet in the store; returns the original ids imported."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    if not folder.is_dir():
        raise LtreproError(f"archive {folder}: no such folder")
    records = [read_record(path) for path in sorted(folder.glob("*.json"))]
    if not records:
        raise LtreproError(f"archive {folder}: holds no archived run (<run id>.json)")
    open_store(root)
    client = mlflow.MlflowClient()
    present = {run.data.tags.get(ARCHIVED_TAG) or run.info.run_id for run in stage_runs(client)}
    imported = []
    for record in records:
        if record["run_id"] in present:
            continue
        open_store(root, record["experiment"])
        experiment = client.get_experiment_by_name(record["experiment"]).experiment_id
        tags = {**record["tags"], ARCHIVED_TAG: record["run_id"]}
        run = client.create_run(experiment, start_time=record["start_time"], run_name=record["run_name"])
        run_id = run.info.run_id
        entries = {
            "metrics": [Metric(key, value, timestamp, step) for key, history in record["metrics"].items() for step, timestamp, value in history],
            "params": [Param(key, value) for key, value in record["params"].items()],
            "tags": [RunTag(key, value) for key, value in tags.items()],
        }  # fmt: skip
        for kind, items in entries.items():
            for start in range(0, len(items), BATCH[kind]):
                client.log_batch(run_id, **{kind: items[start : start + BATCH[kind]]})
        artifacts = folder / record["run_id"]
        for path in sorted(p for p in artifacts.rglob("*") if p.is_file()) if artifacts.is_dir() else []:
            folder_in_run = path.parent.relative_to(artifacts).as_posix()
            client.log_artifact(run_id, str(path), None if folder_in_run == "." else folder_in_run)
        # FINISHED last: a run cut short by an interruption stays RUNNING, which the report never reads
        client.set_terminated(run_id, "FINISHED", end_time=record["end_time"])
        imported.append(record["run_id"])
    return imported
