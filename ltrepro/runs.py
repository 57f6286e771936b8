"""Run records: a stage run's directory, its ``run.json``, and finding a finished run to reuse.

A run lives in ``<out_dir>/<run name>/`` (or a fixed ``run_dir``, as DVC needs) with
``config.yaml`` (resolved), ``method_config.yaml`` (the method's whole config, for ``--resume``),
``run.json``, ``last.pt`` and ``best.pt``. ``run.json`` says which method and stage made it, the
builder that built its model, what the model holds (for the stages that take it as input), its
inputs, its stage key, whether it is the method's final stage, and its status and metrics.

Status: RUNNING while a process trains it (``owner`` names that process), FINISHED, FAILED (an
error; not resumed, since it would fail again), KILLED (Ctrl-C, a pruned trial, or a run found
dead and superseded) or UNUSED (an empty dvc.yaml slot). A RUNNING run whose owner process is gone
was killed outright (``kill -9``, a lost machine): ``unfinished_runs`` finds it with the KILLED
ones, so that the runner resumes it instead of starting beside it. ``run.json`` is written
atomically; one that cannot be read is named in one line and treated as a dead run.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ltrepro.errors import LtreproError, first_line
from ltrepro.files import write_text_atomic

RUN_KEYS = ("mlflow_run_id", "project_root", "method", "stage", "inputs", "stage_key")


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    stage: str
    metrics: dict[str, float]
    tracking_ui: str
    reused: bool = False


def read_run_json(path: Path) -> dict:
    """A run.json as a dict; unreadable or not an object is one line naming the file."""
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LtreproError(f"{path}: unreadable run record ({first_line(exc)}); a torn write or a hand edit") from None
    if not isinstance(info, dict):
        raise LtreproError(f"{path}: unreadable run record (a JSON {type(info).__name__}, not an object)")
    return info


def read_run(run_dir: Path) -> dict:
    """run.json of a run directory (or of the directory holding a checkpoint), checked."""
    run_dir = run_dir.parent if run_dir.is_file() else run_dir
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "run.json").is_file():
        raise LtreproError(f"{run_dir}: not an ltrepro run directory (it needs config.yaml and run.json)")
    info = read_run_json(run_dir / "run.json")
    missing = [key for key in RUN_KEYS if key not in info]
    if missing:
        raise LtreproError(f"{run_dir / 'run.json'}: lacks {', '.join(missing)} (written by an older ltrepro?)")
    return {**info, "run_dir": run_dir}


def write_run(run_dir: Path, info: dict) -> None:
    write_text_atomic(run_dir / "run.json", to_json({k: v for k, v in info.items() if k != "run_dir"}))


REPORTED: set[Path] = set()  # unreadable run.json files already named by this process


def scan_runs(out_dir: Path) -> dict[Path, dict]:
    """Every run directory under ``out_dir`` with a readable run.json, newest first; an unreadable
    one is named once and skipped, so it never blocks the folder."""
    found = {}
    for info_path in sorted(out_dir.glob("*/run.json"), reverse=True):
        try:
            found[info_path.parent] = read_run_json(info_path)
        except LtreproError as exc:
            if info_path not in REPORTED:
                REPORTED.add(info_path)
                print(f"ltrepro: warning: {exc}; treating that run as dead", file=sys.stderr)
    return found


def finished_runs(out_dir: Path) -> dict[Path, dict]:
    """Run directories under ``out_dir`` that finished and kept their checkpoint, newest first,
    with their run.json."""
    runs = scan_runs(out_dir).items()
    return {run_dir: info for run_dir, info in runs if info.get("status") == "FINISHED" and (run_dir / "best.pt").is_file()}


def find_finished(out_dir: Path, key: str) -> Path | None:
    """The newest finished run directory with this stage key."""
    return next((run_dir for run_dir, info in finished_runs(out_dir).items() if info.get("stage_key") == key), None)


def unfinished_runs(out_dir: Path, key: str) -> dict[Path, dict]:
    """Runs with this stage key that stopped before their end and that no process trains: KILLED,
    or RUNNING with a dead owner. Newest first."""
    runs = scan_runs(out_dir).items()
    return {run_dir: info for run_dir, info in runs if info.get("stage_key") == key and is_stopped(info)}


def is_stopped(info: dict) -> bool:
    """KILLED (and not superseded by a later run), or RUNNING while its owner process is known to be gone."""
    if info.get("status") == "KILLED":
        return not info.get("superseded")
    return info.get("status") == "RUNNING" and owner_alive(info.get("owner")) is False


def process_owner() -> str:
    """This process as ``host/boot id/pid/start time``: unique across reboots and pid reuse."""
    return f"{socket.gethostname()}/{boot_id()}/{os.getpid()}/{process_start(os.getpid())}"


def owner_alive(owner: str | None) -> bool | None:
    """Whether the process ``owner`` (from ``process_owner``) still runs; None when it is another
    machine's, or unrecorded (an older ltrepro), since only this machine's processes can be seen."""
    parts = (owner or "").split("/")
    if len(parts) != 4 or parts[0] != socket.gethostname() or not parts[2].isdigit():
        return None
    if parts[1] != boot_id():
        return False
    return process_start(int(parts[2])) == parts[3]


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), "" when no
    such process runs; without /proc, "alive" when the pid exists."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        return ""
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return ""
        return "alive"


@functools.cache
def code_version() -> str:
    """A hash of ltrepro's own source files, read once per process: a stopped run is resumed only by
    the code that began it."""
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def new_run_dir(out_dir: Path, name: str, fixed: Path | None = None) -> Path:
    """``<out_dir>/<time>-<name>-<id>``, or ``fixed`` (DVC's outs), which must not hold a run yet."""
    if fixed is not None:
        if (fixed / "run.json").exists():
            raise LtreproError(f"{fixed} already holds a run that is not resumed here (finished, running, or of another config); remove it first")
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
        info = read_run_json(path)
        if info.get("status") != "UNUSED" and info.get("final"):
            finals.append(spec)
    if len(finals) != 1:
        raise LtreproError(f"{' '.join(specs)}: expected exactly one final stage run among them, found {len(finals)}")
    return finals[0]
