"""MLflow tracking: where the store is, and what every run records.

The default store is ``sqlite:///<absolute project root>/mlflow.db`` (this MLflow refuses the
file store, and a relative URI breaks under ``dvc exp run --temp``); ``MLFLOW_TRACKING_URI``
overrides it. Artifacts go to ``<project root>/mlartifacts``, except on a tracking server
(``http(s)://``), where the server's artifact root (``--artifacts-destination``) keeps them, so
that every machine using the server reads them.

A new sqlite store gets its schema on first use; processes starting together on a fresh clone
(``dvc queue start --jobs 3``, tuning workers) would race to create it, so ``open_store`` creates it
once under a file lock beside the database, and every command opens the store through it.
"""
from __future__ import annotations

import logging
import os
import platform
import subprocess
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from ltrepro.errors import LtreproError, first_line
from ltrepro.files import locked


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def sqlite_lock(url: str) -> AbstractContextManager:
    """An exclusive lock on ``<database>.lock`` for a ``sqlite:///`` URL (MLflow's or Optuna's),
    held while a process creates the schema; other URLs (a server, PostgreSQL) need none."""
    database = Path(url.removeprefix("sqlite:///"))
    # without the database's folder there is nothing to create: the store's own error names it
    return locked(database.with_name(database.name + ".lock")) if url.startswith("sqlite:///") and database.parent.is_dir() else nullcontext()


def artifact_location(uri: str, root: Path) -> str | None:
    """A new experiment's artifact root: the project's folder for a local store, the server's own
    (None) for a tracking server, which may proxy them to ``--artifacts-destination``."""
    return None if uri.startswith(("http://", "https://")) else (root / "mlartifacts").resolve().as_uri()


READY_STORES: set[str] = set()  # stores this process has opened (their schema exists)


def create_tables(client) -> None:
    """The tracking and the registry tables of ``client``'s store, which MLflow creates on first use."""
    client.search_experiments(max_results=1)
    client.search_registered_models(max_results=1)


def open_store(root: Path, experiment: str | None = None) -> str:
    """Point MLflow at the project's store (and ``experiment``, created if new), creating the store's
    tables under ``sqlite_lock`` the first time; returns the tracking URI."""
    import mlflow

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    if uri in READY_STORES and experiment is None:
        return uri
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial tables ..." is noise
    try:
        with sqlite_lock(uri):
            client = mlflow.MlflowClient()
            create_tables(client)
            if experiment is not None and client.get_experiment_by_name(experiment) is None:
                client.create_experiment(experiment, artifact_location=artifact_location(uri, root))
    except Exception as exc:  # MLflow, SQLAlchemy, drivers and the file system raise many types
        raise LtreproError(f"MLflow tracking store {uri}: cannot be opened ({first_line(exc)})") from None
    READY_STORES.add(uri)
    return uri


def run_files(run_id: str, paths: list[str], folder: Path) -> dict[str, Path]:
    """The run's artifacts at ``paths`` (those it has), downloaded to ``folder/<run id>/<path>``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # one bar per file downloaded is noise
    found = {}
    for path in paths:
        try:
            # MLflow downloads a file by its name alone: its folder in the run is kept by naming it here
            local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(folder / run_id / Path(path).parent)))
        except (MlflowException, OSError):  # an artifact the run never logged
            continue
        found[path] = local
    return found


def ui_command(root: Path) -> str:
    """The command that opens the MLflow UI on this project's store."""
    return f"mlflow ui --backend-store-uri {tracking_uri(root)}"


def git_commit(root: Path) -> str:
    """HEAD's sha, suffixed ``-dirty`` when tracked files differ from it; ``unknown`` outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def device_name(device: torch.device) -> str:
    """What a run or a benchmark records as its device: the GPU's name, or the CPU's core count."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run_tags(root: Path, data_hash: str, device: torch.device) -> dict[str, str]:
    """Git commit, data hash, versions, device, CPU and intra-op threads, and DVC's DVC_* variables
    when DVC runs us. fp32 results on CPU depend on the thread count (reductions split differently),
    so a run records it to be repeated to the digit."""
    tags = {
        "git_commit": git_commit(root),
        "data_hash": data_hash,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": device_name(device),
        "cpu": cpu_name(),
        "torch_threads": str(torch.get_num_threads()),
    }
    tags.update({key: value for key, value in os.environ.items() if key.startswith("DVC_")})
    return tags


class Tracker:
    """One MLflow run: params, per-epoch and final metrics, artifacts, tags.

    ``run_id`` reopens an existing run, which is how ``--resume`` continues logging where a killed
    run stopped. Started while another run is active (an Optuna trial), the run nests under it.
    """

    def __init__(self, root: Path, experiment: str, run_name: str, run_id: str | None = None) -> None:
        import mlflow

        self.mlflow, self.root = mlflow, root
        project_run = os.environ.get("MLFLOW_RUN_ID")
        if project_run and mlflow.active_run() is None:
            # `mlflow run` opened this run in the experiment it was given; log into it as it is,
            # also when resuming (the stopped run's history is then copied into it).
            open_store(root)
            self.run = mlflow.start_run(run_id=project_run)
            mlflow.set_tag("mlflow.runName", run_name)
        else:
            open_store(root, experiment)
            mlflow.set_experiment(experiment)
            nested = mlflow.active_run() is not None
            self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, nested=nested)
        self.run_id = self.run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params; keys ``mlflow run`` already logged from ``-P`` (as typed) are left as they are,
        since MLflow refuses to change a param (the resolved values are in config.yaml)."""
        logged = self.mlflow.get_run(self.run_id).data.params
        self.mlflow.log_params({key: "null" if value is None else value for key, value in params.items() if key not in logged})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Numbers only; NaN is kept (MLflow stores it), so an empty shot group still has its key."""
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.mlflow.set_tags(tags)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path=folder)

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)

    def ui_command(self) -> str:
        return ui_command(self.root)


def end_runs(root: Path, run_ids: Iterable[str], status: str = "KILLED") -> None:
    """Mark MLflow runs that are still RUNNING as ``status`` (runs found dead or superseded)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    open_store(root)
    client = mlflow.MlflowClient()
    for run_id in run_ids:
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status)
        except MlflowException:  # a run deleted from the store meanwhile has nothing to end
            continue


def dead_stage_runs(root: Path, experiment: str, key: str) -> list[str]:
    """RUNNING MLflow runs of stage key ``key`` whose owner process is gone (a ``kill -9``, also of
    a DVC stage whose run directory DVC has since removed)."""
    import mlflow

    from ltrepro.runs import owner_alive

    open_store(root, experiment)
    found = mlflow.search_runs(
        experiment_names=[experiment], filter_string=f"tags.stage_key = '{key}' and attributes.status = 'RUNNING'",
        output_format="list",
    )  # fmt: skip
    return [run.info.run_id for run in found if owner_alive(run.data.tags.get(OWNER_TAG)) is False]


OWNER_TAG = "ltrepro_owner"  # the process that trains a stage run (``runs.process_owner``)


def step_tracker(run, root: Path | None, step: str, device: torch.device) -> Tracker:
    """The MLflow run of a step on a finished stage run (``run``: a ``rebuild.LoadedRun``; evaluate,
    export), tagged like a stage run (commit, data hash, device) plus the step and the stage run it read."""
    from ltrepro.data import data_hash

    info, project = run.info, root or Path(run.info["project_root"])
    tracker = Tracker(project, run.cfg.experiment, f"{step}-{info['method']}-{run.data.name}-{info['mlflow_run_id'][:8]}")
    tags = run_tags(project, data_hash(run.data), device) | {"method": info["method"], "stage": step}
    tracker.set_tags(tags | {f"input.{info['stage']}.run_id": info["mlflow_run_id"]})
    return tracker
