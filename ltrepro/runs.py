"""Run records: a stage run's directory, its ``run.json``, and finding a finished run to reuse.

A run lives in ``<out_dir>/<run name>/`` (or a fixed ``run_dir``, as DVC needs) with
``config.yaml`` (resolved), ``method_config.yaml`` (the method's whole config, for ``--resume``),
``run.json``, ``last.pt`` and ``best.pt``. ``run.json`` says which method and stage made it, the
builder that built its model, what the model holds (for the stages that take it as input), its
inputs, its stage key, whether it is the method's final stage, and its status and metrics.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ltrepro.errors import LtreproError

RUN_KEYS = ("mlflow_run_id", "project_root", "method", "stage", "inputs", "stage_key")


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    stage: str
    metrics: dict[str, float]
    tracking_ui: str
    reused: bool = False


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


def write_run(run_dir: Path, info: dict) -> None:
    (run_dir / "run.json").write_text(to_json({k: v for k, v in info.items() if k != "run_dir"}))


def finished_runs(out_dir: Path) -> dict[Path, dict]:
    """Run directories under ``out_dir`` that finished and kept their checkpoint, newest first,
    with their run.json."""
    found = {}
    for info_path in sorted(out_dir.glob("*/run.json"), reverse=True):
        info = json.loads(info_path.read_text())
        if info.get("status") == "FINISHED" and (info_path.parent / "best.pt").is_file():
            found[info_path.parent] = info
    return found


def find_finished(out_dir: Path, key: str) -> Path | None:
    """The newest finished run directory with this stage key."""
    return next((run_dir for run_dir, info in finished_runs(out_dir).items() if info.get("stage_key") == key), None)


def new_run_dir(out_dir: Path, name: str, fixed: Path | None = None) -> Path:
    """``<out_dir>/<time>-<name>-<id>``, or ``fixed`` (DVC's outs), which must not hold a run yet."""
    if fixed is not None:
        if (fixed / "run.json").exists():
            raise LtreproError(f"{fixed} already holds a run; remove it, or continue it with --resume {fixed}")
        fixed.mkdir(parents=True, exist_ok=True)
        return fixed
    run_dir = out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{secrets.token_hex(2)}"
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


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


def final_run(specs: list[str]) -> str:
    """The one of ``specs`` that is its method's final stage; UNUSED slot markers are skipped. One
    spec is returned as it is (it may be an MLflow run id or URI)."""
    if len(specs) == 1:
        return specs[0]
    finals = []
    for spec in specs:
        path = Path(spec) / "run.json"
        if not path.is_file():
            raise LtreproError(f"{spec}: no run.json there (several runs are given as run directories)")
        info = json.loads(path.read_text())
        if info.get("status") != "UNUSED" and info.get("final"):
            finals.append(spec)
    if len(finals) != 1:
        raise LtreproError(f"{' '.join(specs)}: expected exactly one final stage run among them, found {len(finals)}")
    return finals[0]
