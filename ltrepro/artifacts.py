"""Runs named by path, MLflow run id or artifact URI, as local run directories.

A stage run's MLflow artifacts are its run directory, so ``runs:/<run id>`` (or the bare 32-hex
id the MLflow UI shows) is downloaded once under ``<project>/.ltrepro/inputs`` and used like a
local directory.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from ltrepro.errors import LtreproError
from ltrepro.runs import read_run
from ltrepro.tracking import open_store

INPUT_CACHE = ".ltrepro/inputs"  # MLflow artifacts of input runs, under the project root


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
    open_store(root)
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
