"""The test split, read once per stage run on its selected checkpoint, and ``ltrepro evaluate``.

Scores come from the stage's readout (a classifier's logits, or e.g. nearest class mean for a
stage without one), so every stage is scored the way it was selected. The audit mode
(``audit.test_every_epoch``) alone reads it after every epoch too, logged under a name that
nothing selecting a model reads.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

import numpy as np

from ltrepro.artifacts import run_directory
from ltrepro.config import Config
from ltrepro.data import LTData
from ltrepro.data.loader import make_loader
from ltrepro.evaluate import summarize
from ltrepro.rebuild import load_run
from ltrepro.tracking import step_tracker

FINAL_METRICS = ("top1", "many", "medium", "few", "ece", "balanced", "nll")


def test_summary(batch_size: int, cfg: Config, data: LTData, model, readout, device) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics of ``model`` (read out by ``readout``) on the test split, with the scores and labels."""
    loader = make_loader(data, "test", batch_size, device, num_workers=cfg.data.num_workers)
    scores, labels = readout.predict(model, loader, device)
    return summarize(scores, labels, data.train_counts), scores, labels


AUDIT_METRIC = "audit/test_top1"


def test_audit(cfg: Config, data: LTData, plan, batch_size: int, device) -> Callable[[], dict[str, float]]:
    """``audit.test_every_epoch``: the test top-1 of the plan's current model, read after each epoch
    and logged apart (``AUDIT_METRIC``), so the test-selection optimism can be measured; the runner
    never hands it to selection or to the epoch hook that tuning reads."""
    loader = make_loader(data, "test", batch_size, device, num_workers=cfg.data.num_workers)

    def read() -> dict[str, float]:
        scores, labels = plan.readout.predict(plan.model, loader, device)
        return {AUDIT_METRIC: 100.0 * float((scores.argmax(1) == labels).mean())}

    return read


def evaluate_run(
    run_spec: str | Path, checkpoint: str = "best.pt", root: Path | None = None, plots_dir: Path | None = None,
    track: bool = False,
) -> dict:  # fmt: skip
    """Test metrics of a finished run's checkpoint (a run directory or ``runs:/ID``); with
    ``plots_dir``, also the data DVC plots (``per_class.csv``: class, training count, accuracy;
    ``confusion.csv``: actual, predicted); with ``track``, logged as an MLflow run of its own (or
    into the run ``mlflow run -e evaluate`` opened)."""
    run_dir = run_directory(str(run_spec), root or Path.cwd())
    run = load_run(run_dir, checkpoint, root)
    batch_size = getattr(run.cfg, run.info["section"]).eval_batch_size
    summary, scores, labels = test_summary(batch_size, run.cfg, run.data, run.model, run.readout, run.device)
    metrics = {f"test_{key}": summary[key] for key in FINAL_METRICS}
    if plots_dir is not None:
        write_plot_data(plots_dir, summary["per_class"], scores.argmax(1), labels, run.data)
    if track:
        tracker = step_tracker(run, root, "evaluate", run.device)
        tracker.log_params({"source_run": str(run_spec), "checkpoint": checkpoint})
        tracker.log_metrics(metrics)
        for path in sorted(plots_dir.glob("*.csv")) if plots_dir else []:
            tracker.log_artifact(path, "plots")
        tracker.end()
    result = {"run_dir": str(run.info["run_dir"]), "checkpoint": str(run.checkpoint), "epoch": run.epoch, **metrics}
    return result | {"per_class": summary["per_class"]}


def write_plot_data(plots_dir: Path, per_class: list, pred: np.ndarray, labels: np.ndarray, data: LTData) -> None:
    plots_dir.mkdir(parents=True, exist_ok=True)
    names = data.class_names
    with open(plots_dir / "per_class.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["class", "train_count", "accuracy"])
        for c, accuracy in enumerate(per_class):
            writer.writerow([names[c], int(data.train_counts[c]), "" if not np.isfinite(accuracy) else round(accuracy, 4)])
    with open(plots_dir / "confusion.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["actual", "predicted"])
        writer.writerows([names[a], names[p]] for a, p in zip(labels.tolist(), pred.tolist()))
