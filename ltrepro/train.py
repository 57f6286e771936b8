"""Stage-1 training run: config -> data -> model -> fit (selected on val) -> one test evaluation.

Everything is validated (config, data files, checkpoint) before a run directory or an MLflow run
is created, so a failed start leaves nothing half-written and overwrites nothing. A run lives in
``<out_dir>/<run name>/`` with ``config.yaml`` (resolved), ``run.json``, ``last.pt`` and ``best.pt``.
"""
from __future__ import annotations

import dataclasses
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from ltrepro.checkpoint import load_checkpoint, load_weights
from ltrepro.config import Config, flatten, load_config, to_dict
from ltrepro.data import LTData, data_hash, load_data, resolve_data_config
from ltrepro.data.loader import make_loader
from ltrepro.engine import fit, mixup_objective, predict
from ltrepro.errors import LtreproError
from ltrepro.evaluate import save_plots, summarize
from ltrepro.models import Classifier, create_model
from ltrepro.tracking import Tracker, run_tags

FINAL_METRICS = ("top1", "many", "medium", "few", "ece", "balanced", "nll")


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise LtreproError("device: 'cuda' was asked for but torch sees no CUDA device; use device=auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve(cfg: Config) -> Config:
    """Fill every ``null`` that has a dataset default, so the logged config is the one that ran."""
    return dataclasses.replace(cfg, data=resolve_data_config(cfg.data))


def build_model(cfg: Config, data: LTData) -> Classifier:
    in_channels = cfg.model.in_channels or data.in_channels
    if in_channels != data.in_channels:
        raise LtreproError(f"model.in_channels={in_channels} but {data.name} images have {data.in_channels}")
    try:
        return create_model(cfg.model.name, data.num_classes, in_channels)
    except LtreproError as exc:
        raise LtreproError(f"model.name: {exc}") from None


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    metrics: dict[str, float]
    tracking_ui: str


def new_run_dir(out_dir: Path, cfg: Config) -> Path:
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-stage1-{cfg.data.name}-{cfg.model.name}-s{cfg.seed}-{secrets.token_hex(2)}"
    run_dir = out_dir / name
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


def locate_run(path: Path) -> Path:
    """A run directory, or a checkpoint inside it, -> the run directory."""
    run_dir = path.parent if path.is_file() else path
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "run.json").is_file():
        raise LtreproError(f"{path}: not an ltrepro run directory (it needs config.yaml and run.json)")
    return run_dir


def train(config_path: Path | None, overrides: list[str], resume: Path | None = None) -> RunResult:
    """Run stage 1 end to end, or continue the killed run at ``resume``."""
    resume_state, run_id = None, None
    if resume is not None:
        if overrides:
            raise LtreproError("--resume continues a run with its saved config; drop the overrides")
        run_dir = locate_run(resume)
        run_info = json.loads((run_dir / "run.json").read_text())
        root, run_id = Path(run_info["project_root"]), run_info["mlflow_run_id"]
        cfg = resolve(load_config(run_dir / "config.yaml"))
        required = ("model", "optimizer", "scheduler", "torch_rng", "epoch", "best_val", "best_epoch", "history")
        resume_state = load_checkpoint(run_dir / "last.pt", required)
    else:
        root = (config_path.parent if config_path else Path.cwd()).resolve()
        cfg = resolve(load_config(config_path, overrides))
    device = select_device(cfg.device)
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data, cfg.seed, root)
    model = build_model(cfg, data).to(device)
    if resume_state is not None:
        load_weights(model, resume_state["model"], run_dir / "last.pt")
    else:
        run_dir = new_run_dir(root / cfg.out_dir, cfg)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    tracker = Tracker(root, cfg.experiment, run_dir.name, run_id)
    if resume_state is None:
        (run_dir / "run.json").write_text(json.dumps({"mlflow_run_id": tracker.run_id, "project_root": str(root)}))
        record_inputs(tracker, cfg, data, run_dir, root, device)
    try:
        metrics = train_and_test(cfg, data, model, device, run_dir, tracker, resume_state)
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    return RunResult(tracker.run_id, run_dir, metrics, tracker.ui_command())


def record_inputs(tracker: Tracker, cfg: Config, data: LTData, run_dir: Path, root: Path, device: torch.device) -> None:
    """Params, tags, the resolved config and the data description (counts, index hash, sizes)."""
    tracker.log_params(flatten(to_dict(cfg)))
    tracker.set_tags(run_tags(root, data_hash(data), device))
    info = {**data.info, "class_names": data.class_names, "train_counts": data.train_counts.tolist()}
    (run_dir / "data_info.json").write_text(json.dumps(info, indent=2))
    tracker.log_artifact(run_dir / "config.yaml")
    tracker.log_artifact(run_dir / "data_info.json")


def train_and_test(
    cfg: Config, data: LTData, model: Classifier, device: torch.device, run_dir: Path, tracker: Tracker, resume_state
) -> dict[str, float]:
    stage = cfg.stage1
    train_loader = make_loader(
        data, "train", stage.batch_size, device, cfg.data.augment, stage.sampler, stage.epochs, cfg.data.num_workers
    )
    val_loader = make_loader(data, "val", stage.eval_batch_size, device, num_workers=cfg.data.num_workers)
    objective = mixup_objective(torch.nn.functional.cross_entropy, stage.mixup_alpha)
    result = fit(
        model, objective, stage, train_loader, val_loader, run_dir, device, cfg.seed, data.num_classes,
        log_metrics=tracker.log_metrics, resume_state=resume_state,
    )  # fmt: skip
    # The test set is read once, here, on the checkpoint chosen on validation.
    load_weights(model, load_checkpoint(result.checkpoint)["model"], result.checkpoint)
    summary, logits, labels = test_summary(cfg, data, model, device)
    metrics = {"val_top1": result.val_top1, "selected_epoch": result.selected_epoch}
    metrics.update({f"test_{key}": summary[key] for key in FINAL_METRICS})
    tracker.log_metrics(metrics)
    evaluation = {**metrics, "per_class": summary["per_class"], "train_counts": data.train_counts.tolist()}
    (run_dir / "metrics.json").write_text(to_json(evaluation))
    for path in save_plots(logits, labels, data.train_counts, data.class_names, run_dir / "plots"):
        tracker.log_artifact(path, "plots")
    tracker.log_artifact(run_dir / "metrics.json")
    tracker.log_artifact(result.checkpoint, "checkpoints")
    return metrics


def test_summary(cfg: Config, data: LTData, model: Classifier, device: torch.device) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics of ``model`` on the test split, with the logits and labels they came from."""
    loader = make_loader(data, "test", cfg.stage1.eval_batch_size, device, num_workers=cfg.data.num_workers)
    logits, labels = predict(model, loader, device)
    return summarize(logits, labels, data.train_counts), logits, labels


def evaluate_run(run_dir: Path, checkpoint: str = "best.pt") -> dict:
    """Test metrics of a finished run's checkpoint, rebuilt from its saved config and seed."""
    run_dir = locate_run(run_dir)
    root = Path(json.loads((run_dir / "run.json").read_text())["project_root"])
    cfg = resolve(load_config(run_dir / "config.yaml"))
    path = run_dir / checkpoint
    state = load_checkpoint(path)
    device = select_device(cfg.device)
    data = load_data(cfg.data, cfg.seed, root)
    model = build_model(cfg, data).to(device)
    load_weights(model, state["model"], path)
    summary, _, _ = test_summary(cfg, data, model, device)
    metrics = {f"test_{key}": summary[key] for key in FINAL_METRICS}
    return {"checkpoint": str(path), "epoch": state.get("epoch"), **metrics, "per_class": summary["per_class"]}


def to_json(values: dict) -> str:
    """JSON with NaN (an empty shot group, a class absent from test) written as null."""
    def clean(value):
        if isinstance(value, float) and not np.isfinite(value):
            return None
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    return json.dumps(clean(values), indent=2) + "\n"
