"""Run a method: its stages in order, each one MLflow run, finished stages reused.

A stage run: config -> data -> stage plan (model, objective, batches, optimiser, update rule,
readout) from the stage's builder -> fit, selected on validation -> one test read. Everything is
validated (config, data files, checkpoints) before a run directory or an MLflow run is created,
so a failed start overwrites nothing. A stage whose key (``ltrepro.stage_keys``) matches a
FINISHED run is not trained again; one whose key matches a stopped run (Ctrl-C, a pruned trial,
``kill -9``) resumes it from ``last.pt``, unless ``restart`` is asked or ltrepro's code changed since
it began. Every other stopped run of that key, and any MLflow run of it left RUNNING by a dead
process, is marked KILLED, so neither the folder nor the MLflow UI keeps zombies. Inputs are run
directories or MLflow artifact URIs of earlier stages; each is rebuilt by the builder that
produced it (``ltrepro.rebuild``).

Under torchrun, rank 0 runs all of this and sends its decisions (reuse, the run to resume, the
finished run) to the other ranks, which only build the same plan and train in step
(``ltrepro.distributed``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import torch
import yaml

from ltrepro import distributed
from ltrepro.artifacts import resolve_inputs
from ltrepro.checkpoint import load_checkpoint, load_weights
from ltrepro.config import Config, flatten, load_config, to_dict, with_overrides
from ltrepro.context import get_method, resolve, select_device
from ltrepro.data import LTData, data_hash, load_data
from ltrepro.data.loader import make_loader
from ltrepro.engine import fit
from ltrepro.errors import LtreproError, RunStopped
from ltrepro.evaluate import save_plots
from ltrepro.files import locked
from ltrepro.losses import build_loss
from ltrepro.methods import Method, Stage
from ltrepro.runs import (
    RunResult, code_version, find_finished, new_run_dir, owner_alive, process_owner, read_run,
    read_run_json, to_json, unfinished_runs, write_run,
)  # fmt: skip
from ltrepro.scoring import FINAL_METRICS, test_audit, test_summary
from ltrepro.stage_keys import KEY_VERSION, builder_id, builder_view, stage_key, unread_settings
from ltrepro.tracking import OWNER_TAG, Tracker, dead_stage_runs, end_runs, run_tags, ui_command

# Called after every validation pass: (stage name, that epoch's metrics, 0-based epoch).
EpochHook = Callable[[str, dict, int], None]


# What last.pt must hold for a run to be resumed from it.
RESUME_STATE = ("model", "optimizer", "scheduler", "torch_rng", "epoch", "best_val", "best_epoch", "history")


def train(
    config_paths: Path | list[Path] | None, overrides: list[str], resume: Path | None = None, restart: bool = False
) -> list[RunResult]:
    """Run every stage of ``cfg.method``, resuming a stopped run of a stage where one exists (or,
    with ``resume``, that run), then going on with the stages after it."""
    if resume is not None:
        if overrides or restart:
            raise LtreproError("--resume continues a run with its saved config; drop the overrides and --restart")
        info = read_run(resume)
        cfg = resolve(load_config(info["run_dir"] / "method_config.yaml"))
        if distributed.start(cfg.device).is_main:  # under torchrun rank 0 may have claimed it already
            resumable(info)
        get_method(info["method"]).stage(info["stage"])  # the stage it names must still exist
        if info["stage_key"] not in {key for _, _, key in plan_method(cfg)}:
            raise LtreproError(f"{resume}: its stage key matches no stage of its saved config (re-key it: ltrepro rekey)")
        return run_method(cfg, Path(info["project_root"]), resume_dir=info["run_dir"])
    paths = config_paths if isinstance(config_paths, list) else [config_paths] if config_paths else []
    root = (paths[0].parent if paths else Path.cwd()).resolve()
    return run_method(resolve(load_config(paths or None, overrides)), root, restart=restart)


def resumable(info: dict) -> dict:
    """``info`` if its run can be resumed on request: not finished, not trained by a live process."""
    run_dir, status = info["run_dir"], info.get("status")
    if status == "FINISHED":
        raise LtreproError(f"{run_dir}: already FINISHED; nothing to resume")
    if status == "RUNNING" and owner_alive(info.get("owner")):
        raise LtreproError(f"{run_dir}: still being trained by process {info['owner'].split('/')[2]}; wait for it or stop it")
    if not (run_dir / "last.pt").is_file():
        raise LtreproError(f"{run_dir}: no last.pt (it stopped in its first epoch); run the command again for a fresh run")
    return info


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
    for message, _ in inert_settings(cfg):
        print(f"ltrepro: warning: {message}", file=sys.stderr)
    return method


def inert_settings(cfg: Config) -> list[tuple[str, tuple[str, ...]]]:
    """Settings of cfg.method's stages that can never act, because they switch on at an epoch the
    stage does not reach: (message, the keys they leave without effect). ``ltrepro tune`` refuses a
    study over such a key, whose trials would all score the same."""
    found = []
    for stage, stage_cfg, _ in plan_method(cfg):
        name, block = stage.section, getattr(stage_cfg, stage.section)
        last = f"{name}.epochs is {block.epochs}"
        if block.fcc > 0 and block.fcc_start_epoch >= block.epochs:
            found.append((f"{stage.name}: FCC never switches on ({name}.fcc_start_epoch {block.fcc_start_epoch}, {last})", (f"{name}.fcc",)))
        for param, value in block.loss_params.items():
            if param.endswith("_epoch") and isinstance(value, int) and value >= block.epochs:
                found.append((f"{stage.name}: loss {block.loss} never reaches {param} {value} ({last})", (f"{name}.loss_params",)))
        if block.update != "sam" and block.sam != type(block.sam)():  # a SAM setting given without SAM
            found.append((f"{stage.name}: {name}.update is {block.update!r}, so {name}.sam is never used", (f"{name}.sam.rho",)))
        if block.schedule == "multistep" and block.milestones and min(block.milestones) >= block.epochs:
            found.append((f"{stage.name}: the lr never decays (milestones {block.milestones}, {last})", (f"{name}.gamma",)))
    return found


def plan_method(cfg: Config) -> list[tuple[Stage, Config, str]]:
    """Each stage of cfg.method with its config and key; keys depend on config alone, so a
    report can find a method's finished runs without running anything. ``audit`` acts on the
    final stage only: the stages before it are the same runs as without it."""
    method = get_method(cfg.method)
    plan, keys = [], {}
    for stage in method.stages:
        stage_cfg = with_overrides(cfg, stage.overrides(cfg))
        if not method.is_final(stage):  # the audit reads test for the reported stage; its inputs are the usual runs
            stage_cfg = with_overrides(stage_cfg, {"audit": {"test_every_epoch": False}})
        keys[stage.name] = stage_key(stage_cfg, stage, {name: keys[name] for name in stage.inputs})
        plan.append((stage, stage_cfg, keys[stage.name]))
    return plan


def reused(finished: Path, stage: Stage, root: Path) -> RunResult:
    info = read_run_json(finished / "run.json")
    metrics = {k: float("nan") if v is None else v for k, v in info.get("metrics", {}).items()}
    print(f"{info['method']}/{stage.name}: reusing finished run {finished.name}", flush=True)
    return RunResult(info["mlflow_run_id"], finished, stage.name, metrics, ui_command(root), True)


def run_method(
    cfg: Config, root: Path, on_epoch: EpochHook | None = None, restart: bool = False, resume_dir: Path | None = None
) -> list[RunResult]:
    """Every stage in order: reused when finished, else resumed when stopped (``resume_dir`` first),
    else trained."""
    method = check_method(cfg)
    world = distributed.start(cfg.device)
    done: dict[str, RunResult] = {}
    for stage, stage_cfg, key in plan_method(cfg):
        finished = distributed.share(find_finished(root / cfg.out_dir, key) if world.is_main else None)
        if finished is not None:
            done[stage.name] = reused(finished, stage, root)
            continue
        inputs = {name: str(done[name].run_dir) for name in stage.inputs}
        done[stage.name] = run_stage(stage_cfg, root, method, stage, inputs, key, cfg, None, on_epoch, restart, resume_dir)
    return list(done.values())


def claim_stopped_run(
    cfg: Config, root: Path, key: str, restart: bool = False, prefer: Path | None = None, fixed: Path | None = None
) -> tuple[Path, dict, dict] | None:
    """The stopped run of stage key ``key`` to resume, with its last.pt state: ``prefer`` when it has
    that key, else the newest one with a last.pt begun by this code; with a ``fixed`` run directory
    (DVC's outs), only the run that folder holds; None with ``restart``. The chosen run is marked
    RUNNING by this process at once, under a lock, so two workers never take the same one. Every
    other stopped run of the key is marked KILLED (run.json and MLflow), as is any MLflow run of it
    that a dead process left RUNNING. A last.pt that cannot be read fails here, before anything
    is changed."""
    (root / ".ltrepro").mkdir(parents=True, exist_ok=True)
    with locked(root / ".ltrepro" / "claim.lock"):
        folder = root / cfg.out_dir if fixed is None else fixed.parent
        stopped = unfinished_runs(folder, key)
        if fixed is not None:
            stopped = {d: i for d, i in stopped.items() if d.resolve() == fixed.resolve()}
        preferred = read_run(prefer) if prefer is not None else {}
        if preferred.get("stage_key") == key:
            stopped = {prefer: preferred} | {d: i for d, i in stopped.items() if d.resolve() != prefer.resolve()}
        chosen = None
        for run_dir, info in stopped.items():
            same_code = run_dir == prefer or info.get("code_version") == code_version()
            if chosen is None and not restart and same_code and (run_dir / "last.pt").is_file():
                chosen = run_dir, info, load_checkpoint(run_dir / "last.pt", RESUME_STATE)
                write_run(run_dir, {**info, "status": "RUNNING", "owner": process_owner()})
                continue
            why = (
                "--restart" if restart else "a newer stopped run is resumed" if chosen
                else "ltrepro's code changed since it began" if not same_code else "it has no last.pt"
            )  # fmt: skip
            print(f"ltrepro: stopped run {run_dir.name} is not resumed ({why}); marked KILLED", file=sys.stderr)
            write_run(run_dir, {**info, "status": "KILLED", "superseded": True})
    keep = chosen[1]["mlflow_run_id"] if chosen else None
    zombies = [info["mlflow_run_id"] for info in stopped.values()] + dead_stage_runs(root, cfg.experiment, key)
    end_runs(root, [run_id for run_id in zombies if run_id != keep])
    return chosen


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
    cfg: Config, root: Path, stage: Stage, input_specs: dict[str, str], run_dir: Path | None = None, restart: bool = False
) -> RunResult:
    """Train one stage of cfg.method (or resume its stopped run); inputs not given are the finished
    runs of this config. A fixed ``run_dir`` (DVC's outs) is resumed when it holds a stopped run
    of the same stage key."""
    method = check_method(cfg)
    distributed.start(cfg.device)
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
    return run_stage(stage_cfg, root, method, stage, specs, key, cfg, run_dir, restart=restart)


def run_stage(
    cfg: Config,
    root: Path,
    method: Method,
    stage: Stage,
    input_specs: dict[str, str],
    key: str,
    method_cfg: Config | None = None,
    run_dir: Path | None = None,
    on_epoch: EpochHook | None = None,
    restart: bool = False,
    prefer: Path | None = None,
) -> RunResult:
    """Train one stage, or finish its stopped run from last.pt (``claim_stopped_run``; ``prefer``:
    the run to resume, e.g. ``--resume``'s; ``restart``: resume none). A fixed ``run_dir`` (DVC's
    outs) must be empty unless it is the run resumed.

    A ``RunStopped`` (a pruned trial) or Ctrl-C ends the run KILLED (resumable), any other error
    FAILED, in run.json and in MLflow alike; ``last.pt`` keeps the last finished epoch either way."""
    world = distributed.current()
    device = distributed.device_for(world, select_device(cfg.device))
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data, cfg.seed, root)
    loaded = stage.loaded_inputs(cfg)
    inputs = resolve_inputs({name: spec for name, spec in input_specs.items() if name in loaded}, root)
    plan = stage.build(builder_view(cfg, method, stage), data, inputs, device)
    if not world.is_main:
        return follow_stage(cfg, data, plan, stage, device)
    stopped = claim_stopped_run(cfg, root, key, restart, prefer, run_dir)  # after every check: a bad start changes nothing
    distributed.share(stopped[0] if stopped else None)
    state, previous_run_id = None, None
    if stopped is not None:
        run_dir, previous, state = stopped
        previous_run_id = previous["mlflow_run_id"]
        load_weights(plan.model, state["model"], run_dir / "last.pt")
        print(f"{method.name}/{stage.name}: resuming {run_dir} after epoch {state['epoch'] + 1} "
              f"(it was {previous['status']}; --restart starts a fresh run)", flush=True)  # fmt: skip
    else:
        name = f"{method.name}-{stage.name}-{cfg.data.name}-{cfg.model.name}-s{cfg.seed}"
        run_dir = new_run_dir(root / cfg.out_dir, name, run_dir)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (run_dir / "method_config.yaml").write_text(yaml.safe_dump(to_dict(method_cfg or cfg), sort_keys=False))
    if device.type == "cuda":
        plan.model = plan.model.to(memory_format=torch.channels_last)

    tracker = Tracker(root, cfg.experiment, run_dir.name, previous_run_id)
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
        "code_version": code_version(),
        "owner": process_owner(),
        "status": "RUNNING",
    }
    write_run(run_dir, info)
    if tracker.run_id != previous_run_id:  # a new run, or a resume logged into the run `mlflow run` opened
        record_inputs(tracker, cfg, data, run_dir, root, device, method, stage, inputs, key)
        for entry in state["history"] if state else []:
            tracker.log_metrics({k: v for k, v in entry.items() if k != "epoch"}, entry["epoch"])
        if previous_run_id:
            tracker.set_tags({"resumed_from_run_id": previous_run_id})
            end_runs(root, [previous_run_id])
    tracker.set_tags({OWNER_TAG: info["owner"]})

    audit = test_audit(cfg, data, plan, getattr(cfg, stage.section).eval_batch_size, device) if cfg.audit.test_every_epoch else None

    def per_epoch(metrics: dict, epoch: int) -> None:
        tracker.log_metrics(metrics, epoch)
        if audit is not None:  # logged apart: neither selection (in fit) nor on_epoch (tuning) sees it
            tracker.log_metrics(audit(), epoch)
        if on_epoch is not None:
            on_epoch(stage.name, metrics, epoch)

    try:
        metrics = train_and_test(cfg, data, plan, stage.section, device, run_dir, tracker, state, per_epoch)
        write_run(run_dir, {**info, "status": "FINISHED", "metrics": metrics})
        tracker.log_artifact(run_dir / "run.json")
        distributed.share((tracker.run_id, run_dir, metrics))
    except (KeyboardInterrupt, RunStopped) as exc:
        write_run(run_dir, {**info, "status": "KILLED"})
        tracker.end("KILLED")
        if isinstance(exc, RunStopped):
            raise
        raise KeyboardInterrupt(
            f"{method.name}/{stage.name} stopped; {run_dir}/last.pt keeps its last finished epoch: run the same "
            f"command again to resume it (--restart for a fresh run)"
        ) from None
    except BaseException as exc:
        write_run(run_dir, {**info, "status": "FAILED", "error": " ".join(str(exc).split())[:500] or type(exc).__name__})
        tracker.end("FAILED")
        raise
    tracker.end()
    return RunResult(tracker.run_id, run_dir, stage.name, metrics, tracker.ui_command())


def follow_stage(cfg: Config, data: LTData, plan, stage: Stage, device: torch.device) -> RunResult:
    """A rank other than 0: resume where rank 0 resumes, train in step with it, and return the run
    it finished (the next stage's input)."""
    resumed = distributed.share(None)
    state = load_checkpoint(resumed / "last.pt", RESUME_STATE) if resumed is not None else None
    if state is not None:
        load_weights(plan.model, state["model"], resumed / "last.pt")
    block = getattr(cfg, stage.section)
    fit(plan, block, None, Path(), device, cfg.seed, data.num_classes, resume_state=state, sync_bn=cfg.distributed.sync_bn)
    run_id, run_dir, metrics = distributed.share(None)
    return RunResult(run_id, run_dir, stage.name, metrics, "")


def record_inputs(
    tracker: Tracker, cfg: Config, data: LTData, run_dir: Path, root: Path, device: torch.device,
    method: Method, stage: Stage, inputs: dict[str, Path], key: str,
) -> None:  # fmt: skip
    """Params, tags (with every input stage's run id), the resolved config and the data description."""
    tracker.log_params(flatten(to_dict(cfg)))
    tags = run_tags(root, data_hash(data), device) | {"method": method.name, "stage": stage.name, "stage_key": key,
                                                      "world_size": str(distributed.current().size)}
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
    result = fit(plan, stage, val_loader, run_dir, device, cfg.seed, data.num_classes, log_metrics=per_epoch,
                 resume_state=state, sync_bn=cfg.distributed.sync_bn)
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
