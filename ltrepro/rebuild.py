"""Finished stage runs rebuilt as models: for ``evaluate`` and ``export``, and as the inputs of
later stages (the hand-off).

A run is rebuilt by the builder of the stage that produced it (``run.json`` names the method, the
stage and the builder), from its saved config and its own inputs, then its selected weights are
loaded. So any stage can take any earlier run as input (an FSGL or contrastive backbone into a
classifier stage, a pre-trained encoder into fine-tuning) without knowing how it was made.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ltrepro.artifacts import resolve_inputs
from ltrepro.checkpoint import load_checkpoint, load_weights
from ltrepro.config import Config, load_config
from ltrepro.context import get_method, resolve, select_device
from ltrepro.data import LTData, load_data
from ltrepro.errors import LtreproError
from ltrepro.runs import read_run
from ltrepro.stage_keys import builder_id, builder_view


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
    readout: object


def rebuild(info: dict, cfg: Config, data: LTData, root: Path, device: torch.device, checkpoint: str):
    """The stage and plan of the run ``info`` describes, built by the builder that made it, with the
    weights of ``checkpoint`` loaded; also returns that checkpoint's state."""
    method = get_method(info["method"])
    stage = method.stage(info["stage"])
    recorded = info.get("builder")
    if recorded is not None and recorded != builder_id(stage):
        raise LtreproError(
            f"{info['run_dir']}: built by {recorded}, but {method.name}/{stage.name} is now built by "
            f"{builder_id(stage)}; retrain it (its stage key no longer matches)"
        )
    path = info["run_dir"] / checkpoint
    state = load_checkpoint(path)
    plan = stage.build(builder_view(cfg, method, stage), data, resolve_inputs(info["inputs"], root), device)
    load_weights(plan.model, state["model"], path)
    return stage, plan, state


def load_run(run_dir: Path, checkpoint: str = "best.pt", root: Path | None = None) -> LoadedRun:
    """Rebuild a run's model. ``root`` (data and relative inputs) defaults to the run's project
    root; DVC passes the workspace, since a ``dvc exp run --temp`` root no longer exists."""
    info = read_run(run_dir)
    if info.get("status") != "FINISHED":
        raise LtreproError(f"{info['run_dir']}: the run is {info.get('status')}, not FINISHED; only a finished run is evaluated or exported")
    run_dir, root = info["run_dir"], root or Path(info["project_root"])
    cfg = resolve(load_config(run_dir / "config.yaml"))
    device = select_device(cfg.device)
    data = load_data(cfg.data, cfg.seed, root)
    stage, plan, state = rebuild(info, cfg, data, root, device, checkpoint)
    info = {**info, "section": stage.section}
    return LoadedRun(plan.model.eval(), cfg, data, info, device, run_dir / checkpoint, state.get("epoch"), plan.readout)


def load_input(run_dir: Path, data: LTData, device: torch.device) -> torch.nn.Module:
    """The selected model of a finished input run (``best.pt``), rebuilt on ``data`` and ``device``."""
    info = read_run(run_dir)
    cfg = resolve(load_config(info["run_dir"] / "config.yaml"))
    return rebuild(info, cfg, data, Path(info["project_root"]), device, "best.pt")[1].model
