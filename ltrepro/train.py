"""Run a method: its stages in order, each one MLflow run, finished stages reused.

A stage run: config -> data -> stage plan (model, objective, batches) -> fit, selected on
validation -> one test evaluation. Everything is validated (config, data files, checkpoints)
before a run directory or an MLflow run is created, so a failed start overwrites nothing. A run
lives in ``<out_dir>/<run name>/`` with ``config.yaml`` (resolved), ``run.json`` (method, stage,
inputs, stage key, status), ``last.pt`` and ``best.pt``. A stage whose key (the config that
determines it, and its inputs' keys) matches a FINISHED run is not trained again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from ltrepro.checkpoint import load_checkpoint, load_weights
from ltrepro.config import Config, flatten, load_config, to_dict, with_overrides
from ltrepro.data import LTData, data_hash, load_data, resolve_data_config
from ltrepro.data.loader import make_loader
from ltrepro.engine import fit, predict
from ltrepro.errors import LtreproError
from ltrepro.evaluate import save_plots, summarize
from ltrepro.losses import build_loss
from ltrepro.methods import METHODS, Method, Stage
from ltrepro.tracking import Tracker, run_tags, ui_command

FINAL_METRICS = ("top1", "many", "medium", "few", "ece", "balanced", "nll")


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise LtreproError("device: 'cuda' was asked for but torch sees no CUDA device; use device=auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve(cfg: Config) -> Config:
    """Fill every ``null`` that has a dataset default, so the logged config is the one that ran;
    recipes are already applied and are dropped, so a saved config reloads to itself."""
    return dataclasses.replace(cfg, data=resolve_data_config(cfg.data), recipes={})


def get_method(name: str) -> Method:
    try:
        return METHODS.get(name)
    except LtreproError as exc:
        raise LtreproError(f"method: {exc}") from None


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    stage: str
    metrics: dict[str, float]
    tracking_ui: str
    reused: bool = False


def stage_key(cfg: Config, method: Method, stage: Stage, input_keys: dict[str, str]) -> str:
    """What determines a stage's result: data, model, seed, its config block and its inputs.
    Representation stages leave the method out, so methods share an identical stage 1."""
    payload = {
        "section": stage.section,
        "data": to_dict(cfg.data),
        "model": to_dict(cfg.model),
        "seed": cfg.seed,
        "stage": to_dict(getattr(cfg, stage.section)),
        "inputs": input_keys,
    }
    if stage.inputs:
        payload.update(method=method.name, name=stage.name, ffn=to_dict(cfg.ffn), h2t=to_dict(cfg.h2t))
    for volatile in ("num_workers",):
        payload["data"].pop(volatile)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def find_finished(out_dir: Path, key: str) -> Path | None:
    """The newest run directory with this stage key that finished and kept its checkpoint."""
    for info_path in sorted(out_dir.glob("*/run.json"), reverse=True):
        info = json.loads(info_path.read_text())
        if info.get("stage_key") == key and info.get("status") == "FINISHED" and (info_path.parent / "best.pt").is_file():
            return info_path.parent
    return None


RUN_KEYS = ("mlflow_run_id", "project_root", "method", "stage", "inputs", "stage_key")


def read_run(run_dir: Path) -> dict:
    """run.json of a run directory (or of the directory holding a checkpoint), checked."""
    run_dir = run_dir.parent if run_dir.is_file() else run_dir
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "run.json").is_file():
        raise LtreproError(f"{run_dir}: not an ltrepro run directory (it needs config.yaml and run.json)")
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except json.JSONDecodeError as exc:
        raise LtreproError(f"{run_dir / 'run.json'}: not valid JSON ({exc})") from None
    missing = [key for key in RUN_KEYS if key not in info]
    if missing:
        raise LtreproError(f"{run_dir / 'run.json'}: lacks {', '.join(missing)} (written by an older ltrepro?)")
    return {**info, "run_dir": run_dir}


def find_stage(method: Method, name: str) -> Stage:
    for stage in method.stages:
        if stage.name == name:
            return stage
    raise LtreproError(f"method {method.name!r} has no stage {name!r}; its stages: {[s.name for s in method.stages]}")


def train(config_paths: Path | list[Path] | None, overrides: list[str], resume: Path | None = None) -> list[RunResult]:
    """Run every stage of ``cfg.method``, or finish the killed stage at ``resume`` and go on."""
    if resume is not None:
        if overrides:
            raise LtreproError("--resume continues a run with its saved config; drop the overrides")
        info = read_run(resume)
        root, run_dir = Path(info["project_root"]), info["run_dir"]
        required = ("model", "optimizer", "scheduler", "torch_rng", "epoch", "best_val", "best_epoch", "history")
        state = load_checkpoint(run_dir / "last.pt", required)
        cfg = resolve(load_config(run_dir / "config.yaml"))
        method = get_method(info["method"])
        stage = find_stage(method, info["stage"])
        inputs = {name: Path(path) for name, path in info["inputs"].items()}
        run_stage(cfg, root, method, stage, inputs, info["stage_key"], (run_dir, info["mlflow_run_id"], state))
        method_cfg = run_dir / "method_config.yaml"
        return run_method(resolve(load_config(method_cfg)), root)
    paths = config_paths if isinstance(config_paths, list) else [config_paths] if config_paths else []
    root = (paths[0].parent if paths else Path.cwd()).resolve()
    return run_method(resolve(load_config(paths or None, overrides)), root)


def check_losses(cfg: Config) -> None:
    """Build each stage block's loss on dummy counts, so a bad name or parameter fails before stage 1."""
    for section in ("stage1", "stage2"):
        stage = getattr(cfg, section)
        try:
            build_loss(stage.loss, [2, 1], **stage.loss_params)
        except LtreproError as exc:
            raise LtreproError(f"{section}.loss: {exc}") from None


def plan_method(cfg: Config) -> list[tuple[Stage, Config, str]]:
    """Each stage of cfg.method with its config and key; keys depend on config alone, so a
    report can find a method's finished runs without running anything."""
    method = get_method(cfg.method)
    plan, keys = [], {}
    for stage in method.stages:
        stage_cfg = with_overrides(cfg, stage.overrides(cfg))
        keys[stage.name] = stage_key(stage_cfg, method, stage, {name: keys[name] for name in stage.inputs})
        plan.append((stage, stage_cfg, keys[stage.name]))
    return plan


def run_method(cfg: Config, root: Path) -> list[RunResult]:
    method = get_method(cfg.method)
    check_losses(cfg)
    done: dict[str, RunResult] = {}
    for stage, stage_cfg, key in plan_method(cfg):
        finished = find_finished(root / cfg.out_dir, key)
        if finished is not None:
            info = json.loads((finished / "run.json").read_text())
            metrics = {k: float("nan") if v is None else v for k, v in info.get("metrics", {}).items()}
            done[stage.name] = RunResult(info["mlflow_run_id"], finished, stage.name, metrics, ui_command(root), True)
            print(f"{method.name}/{stage.name}: reusing finished run {finished.name}", flush=True)
        else:
            inputs = {name: done[name].run_dir for name in stage.inputs}
            done[stage.name] = run_stage(stage_cfg, root, method, stage, inputs, key, method_cfg=cfg)
    return list(done.values())


def new_run_dir(out_dir: Path, cfg: Config, method: Method, stage: Stage) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{method.name}-{stage.name}-{cfg.data.name}-{cfg.model.name}-s{cfg.seed}-{secrets.token_hex(2)}"
    run_dir = out_dir / name
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


def run_stage(
    cfg: Config,
    root: Path,
    method: Method,
    stage: Stage,
    inputs: dict[str, Path],
    key: str,
    resumed: tuple[Path, str, dict] | None = None,
    method_cfg: Config | None = None,
) -> RunResult:
    """Train one stage (or finish it from ``resumed`` = (run_dir, mlflow run id, last.pt state))."""
    device = select_device(cfg.device)
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data, cfg.seed, root)
    plan = stage.build(cfg, data, inputs, device)
    run_dir, run_id, state = resumed if resumed else (None, None, None)
    if state is not None:
        load_weights(plan.model, state["model"], run_dir / "last.pt")
    else:
        run_dir = new_run_dir(root / cfg.out_dir, cfg, method, stage)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (run_dir / "method_config.yaml").write_text(yaml.safe_dump(to_dict(method_cfg or cfg), sort_keys=False))
    if device.type == "cuda":
        plan.model = plan.model.to(memory_format=torch.channels_last)

    tracker = Tracker(root, cfg.experiment, run_dir.name, run_id)
    info = {
        "mlflow_run_id": tracker.run_id,
        "project_root": str(root),
        "method": method.name,
        "stage": stage.name,
        "inputs": {name: str(path) for name, path in inputs.items()},
        "stage_key": key,
        "status": "RUNNING",
    }
    if state is None:
        (run_dir / "run.json").write_text(json.dumps(info, indent=2))
        record_inputs(tracker, cfg, data, run_dir, root, device, method, stage, inputs)
    try:
        metrics = train_and_test(cfg, data, plan, stage.section, device, run_dir, tracker, state)
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    (run_dir / "run.json").write_text(to_json({**info, "status": "FINISHED", "metrics": metrics}))
    return RunResult(tracker.run_id, run_dir, stage.name, metrics, tracker.ui_command())


def record_inputs(
    tracker: Tracker, cfg: Config, data: LTData, run_dir: Path, root: Path, device: torch.device,
    method: Method, stage: Stage, inputs: dict[str, Path],
) -> None:  # fmt: skip
    """Params, tags (with every input stage's run id), the resolved config and the data description."""
    tracker.log_params(flatten(to_dict(cfg)))
    tags = run_tags(root, data_hash(data), device) | {"method": method.name, "stage": stage.name}
    for name, path in inputs.items():
        tags[f"input.{name}.run_id"] = json.loads((path / "run.json").read_text())["mlflow_run_id"]
    tracker.set_tags(tags)
    info = {**data.info, "class_names": data.class_names, "train_counts": data.train_counts.tolist()}
    (run_dir / "data_info.json").write_text(json.dumps(info, indent=2))
    tracker.log_artifact(run_dir / "config.yaml")
    tracker.log_artifact(run_dir / "data_info.json")


def train_and_test(
    cfg: Config, data: LTData, plan, section: str, device: torch.device, run_dir: Path, tracker: Tracker, state
) -> dict[str, float]:
    stage = getattr(cfg, section)
    val_loader = make_loader(data, "val", stage.eval_batch_size, device, num_workers=cfg.data.num_workers)
    result = fit(
        plan.model, plan.objective, stage, plan.train_loader, val_loader, run_dir, device, cfg.seed, data.num_classes,
        log_metrics=tracker.log_metrics, resume_state=state, param_groups=plan.param_groups,
    )  # fmt: skip
    # The test set is read once, here, on the checkpoint chosen on validation.
    load_weights(plan.model, load_checkpoint(result.checkpoint)["model"], result.checkpoint)
    summary, logits, labels = test_summary(stage.eval_batch_size, cfg, data, plan.model, device)
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


def test_summary(batch_size: int, cfg: Config, data: LTData, model, device: torch.device) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics of ``model`` on the test split, with the logits and labels they came from."""
    loader = make_loader(data, "test", batch_size, device, num_workers=cfg.data.num_workers)
    logits, labels = predict(model, loader, device)
    return summarize(logits, labels, data.train_counts), logits, labels


def evaluate_run(run_dir: Path, checkpoint: str = "best.pt") -> dict:
    """Test metrics of a finished run's checkpoint, rebuilt from its saved config, seed and inputs."""
    info = read_run(run_dir)
    run_dir, root = info["run_dir"], Path(info["project_root"])
    cfg = resolve(load_config(run_dir / "config.yaml"))
    stage = find_stage(get_method(info["method"]), info["stage"])
    path = run_dir / checkpoint
    state = load_checkpoint(path)
    device = select_device(cfg.device)
    data = load_data(cfg.data, cfg.seed, root)
    model = stage.build(cfg, data, {name: Path(p) for name, p in info["inputs"].items()}, device).model
    load_weights(model, state["model"], path)
    summary, _, _ = test_summary(getattr(cfg, stage.section).eval_batch_size, cfg, data, model, device)
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
