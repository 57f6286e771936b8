"""``ltrepro rekey``: give finished runs keyed the old way today's keys.

A version-1 key hashed a stage's whole config block and the method name; today's keys hash the
builder's identity and exactly what the stage reads (``ltrepro.stage_keys``). Neither changes what
a run computed, so a finished run is re-keyed from its saved config, never retrained: its config
is migrated (keys that moved, e.g. ``stage2.lam`` to ``ffn.lam``), its inputs are re-keyed first,
and ``run.json`` and the MLflow run's ``stage_key`` tag get the new key. ``ltrepro report`` and
reuse then find these runs again. The same mends runs whose key rule changed within version 2 (a
bns_ipdpp fine-tune once keyed by the probe it does not load).
"""
from __future__ import annotations

from pathlib import Path

import yaml

from ltrepro.config import config_class, with_overrides
from ltrepro.context import get_method, resolve
from ltrepro.errors import LtreproError
from ltrepro.runs import finished_runs, write_run
from ltrepro.stage_keys import KEY_VERSION, builder_id, stage_key
from ltrepro.tracking import open_store

MOVED = {("stage2", "lam"): ("ffn", "lam")}  # keys that moved between blocks since version 1


def migrate(values: dict) -> dict:
    """A saved config with moved keys put where they live now."""
    for (old_block, old_key), (new_block, new_key) in MOVED.items():
        block = values.get(old_block) or {}
        if old_key in block:
            values.setdefault(new_block, {})[new_key] = block.pop(old_key)
    return values


def rekey_runs(root: Path, out_dir: str, dry_run: bool = False) -> list[dict]:
    """Re-key every finished run under ``root / out_dir``; returns what changed (old key, new key)."""
    import mlflow

    open_store(root)
    runs = {run_dir.resolve(): info for run_dir, info in finished_runs(root / out_dir).items()}
    keys: dict[Path, str] = {}
    changes: list[dict] = []

    def rekey(run_dir: Path) -> str:
        run_dir = run_dir.resolve()
        if run_dir in keys:
            return keys[run_dir]
        info = runs[run_dir]
        values = migrate(yaml.safe_load((run_dir / "config.yaml").read_text()))
        cfg = resolve(with_overrides(config_class()(), values))
        method = get_method(info["method"])
        stage = method.stage(info["stage"])
        input_keys = {}
        for name, spec in info["inputs"].items():
            path = Path(spec) if Path(spec).is_absolute() else Path(info["project_root"]) / spec
            if path.resolve() not in runs:
                raise LtreproError(f"{run_dir}: its input {name} ({spec}) is not a finished run under {root / out_dir}")
            input_keys[name] = rekey(path)
        key = stage_key(cfg, stage, input_keys)
        keys[run_dir] = key
        if key != info["stage_key"] or info.get("key_version") != KEY_VERSION:
            changes.append({"run_dir": str(run_dir), "old": info["stage_key"], "new": key})
            if not dry_run:
                (run_dir / "config.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
                update = {"stage_key": key, "key_version": KEY_VERSION, "builder": builder_id(stage), "final": method.is_final(stage)}
                write_run(run_dir, {**info, **update})
                mlflow.MlflowClient().set_tag(info["mlflow_run_id"], "stage_key", key)
        return key

    for run_dir in list(runs):
        rekey(run_dir)
    return changes
