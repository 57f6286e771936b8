"""Shared fixtures: a tiny Fashion-MNIST written in the real gzipped idx format, and a project
folder (params.yaml + prepared data + its own MLflow store) to train on it in seconds."""
from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path


def share_cpus_among_workers() -> None:
    """Each pytest-xdist worker gets its share of the CPUs as OMP_NUM_THREADS, inherited by every
    process its tests start (ltrepro, dvc, mlflow run); a value the user exported wins. torch's
    OpenMP pool defaults to every core, so N workers on N cores oversubscribe them N-fold: on 2
    cores that doubled the suite's time."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        share = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
        os.environ.setdefault("OMP_NUM_THREADS", str(share))


# Before numpy and torch are imported: they size their thread pools from it then (torch.set_num_threads
# later was measured 25% slower on the runner and export tests).
share_cpus_among_workers()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from ltrepro.data import fmnist  # noqa: E402


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` (uint8) as an idx file: 0, 0, 0x08, ndim, big-endian dims, data; gzip by suffix."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def class_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """28x28 images whose class is easy to see: a bright bar at a class-specific row, plus noise."""
    images = rng.integers(0, 60, size=(len(labels), 28, 28), dtype=np.uint8)
    for index, label in enumerate(labels):
        images[index, 2 + 2 * label : 4 + 2 * label, 4:24] = 250
    return images


@pytest.fixture(autouse=True)
def isolated_mlflow_environment():
    """mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID; left behind, a later test's subprocess
    (`mlflow run` on a fresh store) would inherit an experiment id its store lacks."""
    names = ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI")
    saved = {name: os.environ.get(name) for name in names}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def write_fmnist_source(source: Path, train_per_class: int = 40, test_per_class: int = 10) -> Path:
    """Write the four Debian-style .gz idx files of a tiny Fashion-MNIST into ``source``."""
    source.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
        rng.shuffle(labels)
        write_idx(source / f"{split}-images-idx3-ubyte.gz", class_images(labels, rng))
        write_idx(source / f"{split}-labels-idx1-ubyte.gz", labels)
    return source


@pytest.fixture
def fmnist_source(tmp_path: Path) -> Path:
    """A folder with the four Debian-style .gz idx files: 40 train and 10 test images a class."""
    return write_fmnist_source(tmp_path / "debian")


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new MLflow sqlite store, its tables created as ``open_store`` creates them, nothing else.
    Creating them takes MLflow 1.5-2 s (every schema migration); tests copy this file instead, once
    a worker. A client of its own, not ``open_store``: that would point MLflow's global tracking URI here."""
    import mlflow

    from ltrepro.tracking import create_tables

    path = tmp_path_factory.mktemp("mlflow-store") / "mlflow.db"
    create_tables(mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}"))
    return path


def new_mlflow_store(root: Path, empty_db: Path) -> str:
    """``root``/mlflow.db as a copy of the empty store; returns its tracking URI."""
    shutil.copyfile(empty_db, root / "mlflow.db")
    return f"sqlite:///{root / 'mlflow.db'}"


@pytest.fixture
def project(tmp_path: Path, fmnist_source: Path, monkeypatch: pytest.MonkeyPatch, empty_mlflow_db: Path) -> Path:
    """A project folder with prepared tiny data, a fast params.yaml and a private MLflow store."""
    root = tmp_path / "project"
    root.mkdir()
    fmnist.prepare(root / "data/raw", fmnist_source)
    params = {
        "seed": 0,
        "device": "cpu",
        "method": "ce",
        "data": {"name": "fmnist_lt", "n_max": 20, "imbalance": 10, "val_per_class": 5},
        "model": {"name": "resnet32"},
        "stage1": {"epochs": 3, "batch_size": 16, "eval_batch_size": 64, "lr": 0.05, "warmup_epochs": 1},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", new_mlflow_store(root, empty_mlflow_db))
    return root
