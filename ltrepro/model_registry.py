"""Exported models in the MLflow model registry, and champion/challenger promotion.

An export is logged as a pyfunc model from code (``serving/onnx_pyfunc.py``: an ONNX Runtime
session cannot be pickled) and registered as ``registry.name`` (default ``ltrepro-<dataset>``);
each new version gets the alias ``challenger``. ``promote`` scores the challenger and the current
``champion`` on the same validation split with ONNX Runtime and moves ``champion`` only when the
challenger's class-balanced validation top-1 beats the champion's by ``registry.margin`` points.
Aliases only: registry stages are deprecated. The test set is never read here.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np
import torch

from ltrepro.config import Config, RegistryConfig
from ltrepro.data import LTData, data_hash, load_data
from ltrepro.data.loader import make_loader
from ltrepro.errors import LtreproError
from ltrepro.evaluate import balanced_accuracy
from ltrepro.tracking import Tracker, open_store

PYFUNC_CODE = Path(__file__).parent / "serving" / "onnx_pyfunc.py"
CHALLENGER, CHAMPION = "challenger", "champion"
EXAMPLE_IMAGES = 2


def registered_name(registry: RegistryConfig, dataset: str) -> str:
    return registry.name or f"ltrepro-{dataset}"


def onnx_val_top1(onnx_path: Path, data: LTData, batch_size: int = 512) -> float:
    """Class-balanced top-1 (%) of an ONNX model on the validation split, as training selects."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    preds, labels = [], []
    for images, targets in make_loader(data, "val", batch_size, torch.device("cpu"), num_workers=0).epoch():
        logits = session.run(["logits"], {"images": images.numpy()})[0]
        if not np.isfinite(logits).all():  # argmax of NaN is 0: a broken model would still get a score
            raise LtreproError(f"{onnx_path}: the model gives NaN or infinite logits on validation images")
        preds.append(logits.argmax(1))
        labels.append(targets.numpy())
    return balanced_accuracy(np.concatenate(preds), np.concatenate(labels), data.num_classes)


def image_base64(split, index: int) -> str:
    """Image ``index`` of a data split as base64 text, the serving input: PNG of the uint8 pixels
    for in-memory sets, the file's own bytes for sets on disk."""
    from PIL import Image

    if not split.in_memory:
        return base64.b64encode(Path(split.paths[index]).read_bytes()).decode("ascii")
    pixels = split.images[index].numpy()
    picture = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema([ColSpec("long", "label"), ColSpec("string", "class_name"), ColSpec("double", "score")]),
        params=ParamSchema([ParamSpec("top_k", "long", 0)]),
    )


def log_and_register(onnx_path: Path, name: str, data: LTData, tags: dict[str, str]) -> str:
    """Log the pyfunc into the active run, register it as a new version of ``name`` with alias
    challenger and ``tags``; returns the version. The input example is real validation images."""
    import mlflow
    import pandas as pd

    examples = [image_base64(data.val, i) for i in range(EXAMPLE_IMAGES)]
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PYFUNC_CODE),
        artifacts={"onnx": str(onnx_path)},
        signature=signature(),
        input_example=pd.DataFrame({"image": examples}),
        pip_requirements=[f"onnxruntime-gpu=={package_version('onnxruntime-gpu')}"],
        registered_model_name=name,
    )
    client = mlflow.MlflowClient()
    model_version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, model_version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, model_version)
    return model_version


@dataclass
class Contender:
    version: str
    tags: dict[str, str]
    onnx: Path


def contender(client, name: str, alias: str | None, version: str | None, root: Path) -> Contender | None:
    """A registered version by alias or number with its ONNX file; None when the alias is unset."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if version is None and alias == CHAMPION and "alias" in str(exc).lower():
            return None
        raise LtreproError(f"model {name} {'version ' + version if version else '@' + alias}: {exc.message}") from None
    target = root / ".ltrepro" / "registry" / name / str(found.version)
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{found.version}", dst_path=str(target)))
    onnx_files = sorted(folder.glob("artifacts/*.onnx"))
    if not onnx_files or "source_run_id" not in found.tags:
        raise LtreproError(f"model {name} version {found.version} was not made by ltrepro export (no ONNX file or source run)")
    return Contender(str(found.version), dict(found.tags), onnx_files[0])


def validation_data(source_run_id: str, root: Path) -> LTData:
    """The validation split the challenger was selected on: its stage run's data config and seed."""
    from ltrepro.config import load_config
    from ltrepro.artifacts import download_run
    from ltrepro.context import resolve

    cfg = resolve(load_config(download_run(f"runs:/{source_run_id}", root) / "config.yaml"))
    return load_data(cfg.data, cfg.seed, root)


def promote(cfg: Config, root: Path, version: str | None = None) -> dict:
    """Champion/challenger: score both on one validation split, move ``champion`` on a win by
    ``registry.margin`` points, and log the decision and both figures in an MLflow run."""
    import mlflow

    open_store(root)
    client = mlflow.MlflowClient()
    name = registered_name(cfg.registry, cfg.data.name)
    challenger = contender(client, name, CHALLENGER, version, root)
    champion = contender(client, name, CHAMPION, None, root)
    if champion is not None and champion.version == challenger.version:
        raise LtreproError(f"{name} version {challenger.version} is already the champion")
    source = client.get_run(challenger.tags["source_run_id"]).info.status
    if source != "FINISHED":
        raise LtreproError(f"{name} version {challenger.version}: its stage run is {source}, not FINISHED; it cannot be promoted")
    data = validation_data(challenger.tags["source_run_id"], root)
    split = data_hash(data)
    if champion is not None and champion.tags.get("data_hash") != split:
        raise LtreproError(
            f"{name}: champion v{champion.version} was trained on another split (data hash "
            f"{champion.tags.get('data_hash')}, challenger v{challenger.version} {split}); its training images may "
            f"be in this validation split, so the two cannot be compared fairly"
        )
    challenger_top1 = onnx_val_top1(challenger.onnx, data)
    if not np.isfinite(challenger_top1):
        raise LtreproError(f"{name} version {challenger.version}: validation top-1 is {challenger_top1}; it cannot be promoted")
    champion_top1 = onnx_val_top1(champion.onnx, data) if champion is not None else None
    margin = cfg.registry.margin
    promoted = champion_top1 is None or challenger_top1 > champion_top1 + margin
    decision = "promoted" if promoted else "kept"
    tracker = Tracker(root, cfg.experiment, f"promote-{name}-v{challenger.version}")
    tracker.log_params({"model": name, "challenger_version": challenger.version, "margin": margin,
                        "champion_version": champion.version if champion else "none"})  # fmt: skip
    figures = {"challenger_val_top1": challenger_top1}
    if champion_top1 is not None:
        figures |= {"champion_val_top1": champion_top1, "val_top1_gain": challenger_top1 - champion_top1}
    tracker.log_metrics(figures)
    tracker.set_tags({"stage": "promote", "decision": decision, "data_hash": split})
    tracker.end()
    client.set_model_version_tag(name, challenger.version, "promotion", f"{decision} (run {tracker.run_id})")
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, challenger.version)
    return {"model": name, "decision": decision, "challenger_version": challenger.version,
            "champion_version": champion.version if champion else None, "challenger_val_top1": challenger_top1,
            "champion_val_top1": champion_top1, "margin": margin, "mlflow_run_id": tracker.run_id}  # fmt: skip
