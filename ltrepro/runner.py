"""Run a method: its stages in order, each one MLflow run, finished stages reused.

A stage run: config -> data -> stage plan (model, objective, batches, optimiser, update rule,
readout) from the stage's builder -> fit, selected on validation -> one test read. Everything is
validated (config, data files, checkpoints) before a run directory or an MLflow run is created,
so a failed start overwrites nothing. A stage whose key (``ltrepro.stage_keys``) matches a
FINISHED run is not trained again. Inputs are run directories or MLflow artifact URIs of earlier
stages; each is rebuilt by the builder that produced it (``ltrepro.rebuild``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import torch
import yaml

from ltrepro.artifacts import resolve_inputs
from ltrepro.checkpoint import load_checkpoint, load_weights
from ltrepro.config import Config, flatten, load_config, to_dict, with_overrides
from ltrepro.context import get_method, resolve, select_device
from ltrepro.data import LTData, data_hash, load_data
from ltrepro.data.loader import make_loader
from ltrepro.engine import fit
from ltrepro.errors import LtreproError, RunStopped
from ltrepro.evaluate import save_plots
from ltrepro.losses import build_loss
from ltrepro.methods import Method, Stage
from ltrepro.runs import RunResult, find_finished, new_run_dir, read_run, to_json, write_run
from ltrepro.scoring import FINAL_METRICS, test_summary
from ltrepro.stage_keys import KEY_VERSION, builder_id, builder_view, stage_key, unread_settings
from ltrepro.tracking import Tracker, run_tags, ui_command

# Called after every validation pass: (stage name, that epoch's metrics, 0-based epoch).
EpochHook = Callable[[str, dict, int], None]


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
        resumed = (run_dir, info["mlflow_run_id"], state)
        run_stage(cfg, root, method, method.stage(info["stage"]), info["inputs"], info["stage_key"], resumed, run_dir=run_dir)
        return run_method(resolve(load_config(run_dir / "method_config.yaml")), root)
    paths = config_paths if isinstance(config_paths, list) else [config_paths] if config_paths else []
    root = (paths[0].parent if paths else Path.cwd()).resolve()
    return run_method(resolve(load_config(paths or None, overrides)), root)


def check_method(cfg: Config) -> Method:
    """The method, with each stage's loss built on dummy counts (so a bad loss name or parameter
    fails before the first stage trains) and one warning naming the set values it never reads."""
    method = get_method(cfg.method)
    for stage, stage_cfg, _ in plan_method(cfg):
        block = getattr(stage_cfg, stage.section)
        try:
            build_loss(block.loss, [2, 1], **block.loss_params)
        except LtreproError as exc:
            raise LtreproError(f"{stage.section}.loss: {exc}") from None
    unread = unread_settings(cfg, method)
    if unread:
        what = "it changes" if len(unread) == 1 else "they change"
        print(f"ltrepro: warning: {method.name} never reads {', '.join(unread)}; {what} nothing", file=sys.stderr)
    return method


def plan_method(cfg: Config) -> list[tuple[Stage, Config, str]]:
    """Each stage of cfg.method with its config and key; keys depend on config alone, so a
    report can find a method's finished runs without running anything."""
    method = get_method(cfg.method)
    plan, keys = [], {}
    for stage in method.stages:
        stage_cfg = with_overrides(cfg, stage.overrides(cfg))
        keys[stage.name] = stage_key(stage_cfg, stage, {name: keys[name] for name in stage.inputs})
        plan.append((stage, stage_cfg, keys[stage.name]))
    return plan


def reused(finished: Path, stage: Stage, root: Path) -> RunResult:
    info = json.loads((finished / "run.json").read_text())
    metrics = {k: float("nan") if v is None else v for k, v in info.get("metrics", {}).items()}
    print(f"{info['method']}/{stage.name}: reusing finished run {finished.name}", flush=True)
    return RunResult(info["mlflow_run_id"], finished, stage.name, metrics, ui_command(root), True)


def run_method(cfg: Config, root: Path, on_epoch: EpochHook | None = None) -> list[RunResult]:
    method = check_method(cfg)
    done: dict[str, RunResult] = {}
    for stage, stage_cfg, key in plan_method(cfg):
        finished = find_finished(root / cfg.out_dir, key)
        if finished is not None:
            done[stage.name] = reused(finished, stage, root)
        else:
            inputs = {name: str(done[name].run_dir) for name in stage.inputs}
            done[stage.name] = run_stage(stage_cfg, root, method, stage, inputs, key, method_cfg=cfg, on_epoch=on_epoch)
    return list(done.values())


def select_stage(method: Method, ref: str) -> Stage | None:
    """A stage by name, or by slot ``stageL:N``: the method's N-th stage at depth L (1: no inputs;
    L: its deepest input is at L - 1), None when it has fewer. Slots let one dvc.yaml DAG (two
    depth-1 slots, then depths 2 and 3) serve every method."""
    prefix, sep, index = ref.partition(":")
    if not sep:
        return method.stage(ref)
    depth = prefix.removeprefix("stage")
    if not prefix.startswith("stage") or not depth.isdigit() or int(depth) < 1 or not index.isdigit() or int(index) < 1:
        raise LtreproError(f"stage {ref!r}: a slot is written stageL:N with L, N >= 1 (stage1:2, stage2:1)")
    at_depth = [stage for stage in method.stages if method.depth(stage) == int(depth)]
    return at_depth[int(index) - 1] if int(index) <= len(at_depth) else None


def run_named_stage(
    cfg: Config, root: Path, stage: Stage, input_specs: dict[str, str], run_dir: Path | None = None
) -> RunResult:
    """Train one stage of cfg.method; inputs not given are the finished runs of this config."""
    method = check_method(cfg)
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
    key = stage_key(stage_cfg, stage, input_keys)
    return run_stage(stage_cfg, root, method, stage, specs, key, method_cfg=cfg, run_dir=run_dir)


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
    plan = stage.build(builder_view(cfg, method, stage), data, inputs, device)
    _, run_id, state = resumed if resumed else (None, None, None)
    if state is not None:
        load_weights(plan.model, state["model"], run_dir / "last.pt")
    else:
        name = f"{method.name}-{stage.name}-{cfg.data.name}-{cfg.model.name}-s{cfg.seed}"
        run_dir = new_run_dir(root / cfg.out_dir, name, run_dir)
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
        "builder": builder_id(stage),
        "holds": {"model": f"{type(plan.model).__module__}.{type(plan.model).__qualname__}",
                  "readout": type(plan.readout).__name__},  # fmt: skip
        "final": method.is_final(stage),
        "inputs": dict(input_specs),
        "stage_key": key,
        "key_version": KEY_VERSION,
        "status": "RUNNING",
    }
    if state is None:
        write_run(run_dir, info)
        record_inputs(tracker, cfg, data, run_dir, root, device, method, stage, inputs, key)

    def per_epoch(metrics: dict, epoch: int) -> None:
        tracker.log_metrics(metrics, epoch)
        if on_epoch is not None:
            on_epoch(stage.name, metrics, epoch)

    try:
        metrics = train_and_test(cfg, data, plan, stage.section, device, run_dir, tracker, state, per_epoch)
        write_run(run_dir, {**info, "status": "FINISHED", "metrics": metrics})
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
    result = fit(plan, stage, val_loader, run_dir, device, cfg.seed, data.num_classes, log_metrics=per_epoch, resume_state=state)
    # The test set is read once, here, on the checkpoint chosen on validation.
    load_weights(plan.model, load_checkpoint(result.checkpoint)["model"], result.checkpoint)
    summary, scores, labels = test_summary(stage.eval_batch_size, cfg, data, plan.model, plan.readout, device)
    metrics = {"val_top1": result.val_top1, "selected_epoch": result.selected_epoch}
    metrics.update({f"test_{key}": summary[key] for key in FINAL_METRICS})
    tracker.log_metrics(metrics)
    evaluation = {**metrics, "per_class": summary["per_class"], "train_counts": data.train_counts.tolist()}
    (run_dir / "metrics.json").write_text(to_json(evaluation))
    for path in save_plots(scores, labels, data.train_counts, data.class_names, run_dir / "plots"):
        tracker.log_artifact(path, "plots")
    tracker.log_artifact(run_dir / "metrics.json")
    tracker.log_artifact(result.checkpoint)  # at the root, so the artifacts form a run directory
    return metrics
