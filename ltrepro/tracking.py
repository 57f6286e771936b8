"""MLflow tracking: where the store is, and what every run records.

The default store is ``sqlite:///<absolute project root>/mlflow.db`` (this MLflow refuses the
file store, and a relative URI breaks under ``dvc exp run --temp``); ``MLFLOW_TRACKING_URI``
overrides it. Artifacts go to ``<project root>/mlartifacts``.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


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


def run_tags(root: Path, data_hash: str, device: torch.device) -> dict[str, str]:
    """Git commit, data hash, versions, device, and DVC's DVC_* variables when DVC runs us."""
    tags = {
        "git_commit": git_commit(root),
        "data_hash": data_hash,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
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
        mlflow.set_tracking_uri(tracking_uri(root))
        if run_id is None and os.environ.get("MLFLOW_RUN_ID"):
            # `mlflow run` opened this run in the experiment it was given; log into it as it is.
            self.run = mlflow.start_run()
            mlflow.set_tag("mlflow.runName", run_name)
        else:
            if mlflow.get_experiment_by_name(experiment) is None:
                mlflow.create_experiment(experiment, artifact_location=(root / "mlartifacts").resolve().as_uri())
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


def step_tracker(run, root: Path | None, step: str, device: torch.device) -> Tracker:
    """The MLflow run of a step on a finished stage run (``run``: a ``rebuild.LoadedRun``; evaluate,
    export), tagged like a stage run (commit, data hash, device) plus the step and the stage run it read."""
    from ltrepro.data import data_hash

    info, project = run.info, root or Path(run.info["project_root"])
    tracker = Tracker(project, run.cfg.experiment, f"{step}-{info['method']}-{run.data.name}-{info['mlflow_run_id'][:8]}")
    tags = run_tags(project, data_hash(run.data), device) | {"method": info["method"], "stage": step}
    tracker.set_tags(tags | {f"input.{info['stage']}.run_id": info["mlflow_run_id"]})
    return tracker
