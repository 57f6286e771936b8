"""Run a method: its stages in order, each one MLflow run, finished stages reused.

A stage run: config -> data -> stage plan (model, objective, batches) -> fit, selected on
validation -> one test evaluation. Everything is validated (config, data files, checkpoints)
before a run directory or an MLflow run is created, so a failed start overwrites nothing. A run
lives in ``<out_dir>/<run name>/`` (or a fixed ``run_dir``, as DVC needs) with ``config.yaml``
(resolved), ``run.json`` (method, stage, inputs, stage key, status), ``last.pt`` and ``best.pt``;
the MLflow run's artifacts hold the same files, so ``runs:/<run id>`` is a run directory too. A
stage whose key (the config that determines it, and its inputs' keys) matches a FINISHED run is not
trained again. Inputs are run directories or MLflow artifact URIs of earlier stages.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from ltrepro.checkpoint import load_checkpoint, load_weights
from ltrepro.config import Config, flatten, load_config, to_dict, with_overrides
from ltrepro.data import LTData, data_hash, load_data, resolve_data_config
from ltrepro.data.loader import make_loader
from ltrepro.engine import fit, predict
from ltrepro.errors import LtreproError, RunStopped
from ltrepro.evaluate import save_plots, summarize
from ltrepro.losses import build_loss
from ltrepro.methods import METHODS, Method, Stage
from ltrepro.tracking import Tracker, run_tags, tracking_uri, ui_command

FINAL_METRICS = ("top1", "many", "medium", "few", "ece", "balanced", "nll")
INPUT_CACHE = ".ltrepro/inputs"  # MLflow artifacts of input runs, under the project root

# Called after every validation pass: (stage name, that epoch's metrics, 0-based epoch).
EpochHook = Callable[[str, dict, int], None]


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


def is_uri(spec: str) -> bool:
    return "://" in spec or spec.startswith(("runs:/", "models:/"))


def download_run(uri: str, root: Path) -> Path:
    """The artifacts of an MLflow stage run (``runs:/<run id>``), downloaded once and cached."""
    import mlflow

    target = root / INPUT_CACHE / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (target / "run.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
    mlflow.set_tracking_uri(tracking_uri(root))
    try:
        run_id, _, path = uri.removeprefix("runs:/").strip("/").partition("/")
        if uri.startswith("runs:/"):  # runs:/<id> (the whole run) is not a URI MLflow downloads itself
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path or None, dst_path=str(staging))
        else:
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(staging))
    except Exception as exc:  # MLflow raises several types for a bad id, path or store
        shutil.rmtree(staging, ignore_errors=True)
        raise LtreproError(f"input {uri}: cannot download its artifacts ({type(exc).__name__}: {exc})") from None
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def run_directory(spec: str, root: Path, base: Path = Path()) -> Path:
    """A run as a local directory, given as a path (relative to ``base``), a ``runs:/<id>`` URI or a
    bare 32-hex MLflow run id (as the MLflow UI shows it); MLflow artifacts are downloaded under root."""
    if re.fullmatch(r"[0-9a-f]{32}", spec) and not (base / spec).exists():
        spec = f"runs:/{spec}"
    return download_run(spec, root) if is_uri(spec) else base / spec


def resolve_input(spec: str, root: Path) -> Path:
    """A stage input as a local run directory: a path (absolute or relative to the project root),
    an MLflow run id or artifact URI of a stage run; it must have finished and kept ``best.pt``."""
    path = run_directory(spec, root, base=root)
    info = read_run(path)
    if info.get("status") != "FINISHED" or not (path / "best.pt").is_file():
        raise LtreproError(f"input {spec}: not a finished stage run with best.pt (status {info.get('status')})")
    return path


def resolve_inputs(specs: dict[str, str], root: Path) -> dict[str, Path]:
    return {name: resolve_input(spec, root) for name, spec in specs.items()}


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
        resumed = (run_dir, info["mlflow_run_id"], state)
        run_stage(cfg, root, method, stage, info["inputs"], info["stage_key"], resumed, run_dir=run_dir)
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


def run_method(cfg: Config, root: Path, on_epoch: EpochHook | None = None) -> list[RunResult]:
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
            inputs = {name: str(done[name].run_dir) for name in stage.inputs}
            done[stage.name] = run_stage(stage_cfg, root, method, stage, inputs, key, method_cfg=cfg, on_epoch=on_epoch)
    return list(done.values())


def select_stage(method: Method, ref: str) -> Stage | None:
    """A stage by name, or by slot ``stage1:N``: the method's N-th stage-1 network, None when it
    has fewer. Slots let one dvc.yaml DAG (two stage-1 slots, then stage 2) serve every method."""
    section, sep, index = ref.partition(":")
    if not sep:
        return find_stage(method, ref)
    if section != "stage1" or not index.isdigit() or int(index) < 1:
        raise LtreproError(f"stage {ref!r}: a slot is written stage1:N with N >= 1")
    networks = [stage for stage in method.stages if not stage.inputs]
    return networks[int(index) - 1] if int(index) <= len(networks) else None


def run_named_stage(
    cfg: Config, root: Path, stage: Stage, input_specs: dict[str, str], run_dir: Path | None = None
) -> RunResult:
    """Train one stage of cfg.method; inputs not given are the finished runs of this config."""
    method = get_method(cfg.method)
    check_losses(cfg)
    planned = {planned.name: (stage_cfg, key) for planned, stage_cfg, key in plan_method(cfg)}
    unexpected = sorted(set(input_specs) - set(stage.inputs))
    if unexpected:
        raise LtreproError(f"{method.name}/{stage.name} has no input {unexpected[0]!r}; its inputs: {list(stage.inputs)}")
    specs = dict(input_specs)
    for name in stage.inputs:
        if name not in specs:
            found = find_finished(root / cfg.out_dir, planned[name][1])
            if found is None:
                raise LtreproError(
                    f"{method.name}/{stage.name} needs input {name}: pass --input {name}=RUN_DIR (or runs:/RUN_ID), "
                    f"or train it first (ltrepro stage {name})"
                )
            specs[name] = str(found)
    input_keys = {name: read_run(path)["stage_key"] for name, path in resolve_inputs(specs, root).items()}
    stage_cfg = planned[stage.name][0]
    key = stage_key(stage_cfg, method, stage, input_keys)
    return run_stage(stage_cfg, root, method, stage, specs, key, method_cfg=cfg, run_dir=run_dir)


def new_run_dir(out_dir: Path, cfg: Config, method: Method, stage: Stage, fixed: Path | None = None) -> Path:
    """``<out_dir>/<time>-<method>-<stage>-<data>-<model>-s<seed>-<id>``, or ``fixed`` (DVC's outs),
    which must not hold a run yet."""
    if fixed is not None:
        if (fixed / "run.json").exists():
            raise LtreproError(f"{fixed} already holds a run; remove it, or continue it with --resume {fixed}")
        fixed.mkdir(parents=True, exist_ok=True)
        return fixed
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
    input_specs: dict[str, str],
    key: str,
    resumed: tuple[Path, str, dict] | None = None,
    method_cfg: Config | None = None,
    run_dir: Path | None = None,
    on_epoch: EpochHook | None = None,
) -> RunResult:
    """Train one stage (or finish it from ``resumed`` = (run_dir, mlflow run id, last.pt state)).

    A ``RunStopped`` (a pruned trial) or Ctrl-C ends the MLflow run as KILLED, any other error as
    FAILED; ``last.pt`` keeps the last finished epoch either way."""
    device = select_device(cfg.device)
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data, cfg.seed, root)
    inputs = resolve_inputs(input_specs, root)
    plan = stage.build(cfg, data, inputs, device)
    _, run_id, state = resumed if resumed else (None, None, None)
    if state is not None:
        load_weights(plan.model, state["model"], run_dir / "last.pt")
    else:
        run_dir = new_run_dir(root / cfg.out_dir, cfg, method, stage, run_dir)
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
        "inputs": dict(input_specs),
        "stage_key": key,
        "status": "RUNNING",
    }
    if state is None:
        (run_dir / "run.json").write_text(json.dumps(info, indent=2))
        record_inputs(tracker, cfg, data, run_dir, root, device, method, stage, inputs, key)

    def per_epoch(metrics: dict, epoch: int) -> None:
        tracker.log_metrics(metrics, epoch)
        if on_epoch is not None:
            on_epoch(stage.name, metrics, epoch)

    try:
        metrics = train_and_test(cfg, data, plan, stage.section, device, run_dir, tracker, state, per_epoch)
        (run_dir / "run.json").write_text(to_json({**info, "status": "FINISHED", "metrics": metrics}))
        tracker.log_artifact(run_dir / "run.json")
    except (KeyboardInterrupt, RunStopped):
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    return RunResult(tracker.run_id, run_dir, stage.name, metrics, tracker.ui_command())


def record_inputs(
    tracker: Tracker, cfg: Config, data: LTData, run_dir: Path, root: Path, device: torch.device,
    method: Method, stage: Stage, inputs: dict[str, Path], key: str,
) -> None:  # fmt: skip
    """Params, tags (with every input stage's run id), the resolved config and the data description."""
    tracker.log_params(flatten(to_dict(cfg)))
    tags = run_tags(root, data_hash(data), device) | {"method": method.name, "stage": stage.name, "stage_key": key}
    for name, path in inputs.items():
        tags[f"input.{name}.run_id"] = read_run(path)["mlflow_run_id"]
    tracker.set_tags(tags)
    info = {**data.info, "class_names": data.class_names, "train_counts": data.train_counts.tolist()}
    (run_dir / "data_info.json").write_text(json.dumps(info, indent=2))
    tracker.log_artifact(run_dir / "config.yaml")
    tracker.log_artifact(run_dir / "data_info.json")


def train_and_test(
    cfg: Config, data: LTData, plan, section: str, device: torch.device, run_dir: Path, tracker: Tracker, state,
    per_epoch: Callable[[dict, int], None],
) -> dict[str, float]:  # fmt: skip
    stage = getattr(cfg, section)
    val_loader = make_loader(data, "val", stage.eval_batch_size, device, num_workers=cfg.data.num_workers)
    result = fit(
        plan.model, plan.objective, stage, plan.train_loader, val_loader, run_dir, device, cfg.seed, data.num_classes,
        log_metrics=per_epoch, resume_state=state, param_groups=plan.param_groups,
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
    tracker.log_artifact(result.checkpoint)  # at the root, so the artifacts form a run directory
    return metrics


def test_summary(batch_size: int, cfg: Config, data: LTData, model, device: torch.device) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics of ``model`` on the test split, with the logits and labels they came from."""
    loader = make_loader(data, "test", batch_size, device, num_workers=cfg.data.num_workers)
    logits, labels = predict(model, loader, device)
    return summarize(logits, labels, data.train_counts), logits, labels


@dataclass
class LoadedRun:
    """A finished stage run's model rebuilt from its saved config and inputs, weights loaded."""

    model: torch.nn.Module
    cfg: Config
    data: LTData
    info: dict
    device: torch.device
    checkpoint: Path
    epoch: int | None


def load_run(run_dir: Path, checkpoint: str = "best.pt", root: Path | None = None) -> LoadedRun:
    """Rebuild a run's model. ``root`` (data and relative inputs) defaults to the run's project
    root; DVC passes the workspace, since a ``dvc exp run --temp`` root no longer exists."""
    info = read_run(run_dir)
    run_dir, root = info["run_dir"], root or Path(info["project_root"])
    cfg = resolve(load_config(run_dir / "config.yaml"))
    stage = find_stage(get_method(info["method"]), info["stage"])
    path = run_dir / checkpoint
    state = load_checkpoint(path)
    device = select_device(cfg.device)
    data = load_data(cfg.data, cfg.seed, root)
    model = stage.build(cfg, data, resolve_inputs(info["inputs"], root), device).model
    load_weights(model, state["model"], path)
    return LoadedRun(model.eval(), cfg, data, {**info, "section": stage.section}, device, path, state.get("epoch"))


def step_tracker(run: LoadedRun, root: Path | None, step: str, device: torch.device) -> Tracker:
    """The MLflow run of a step on a finished stage run (evaluate, export), tagged like a stage
    run (commit, data hash, device) plus the step and the stage run it read."""
    info, project = run.info, root or Path(run.info["project_root"])
    tracker = Tracker(project, run.cfg.experiment, f"{step}-{info['method']}-{run.data.name}-{info['mlflow_run_id'][:8]}")
    tags = run_tags(project, data_hash(run.data), device) | {"method": info["method"], "stage": step}
    tracker.set_tags(tags | {f"input.{info['stage']}.run_id": info["mlflow_run_id"]})
    return tracker


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
    summary, logits, labels = test_summary(batch_size, run.cfg, run.data, run.model, run.device)
    metrics = {f"test_{key}": summary[key] for key in FINAL_METRICS}
    if plots_dir is not None:
        write_plot_data(plots_dir, summary["per_class"], logits.argmax(1), labels, run.data)
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
