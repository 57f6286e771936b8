"""ONNX export of a finished stage run's whole model, checked against PyTorch with ONNX Runtime.

The file holds one graph (``external_data=False``) with input ``images``, float32 N x C x H x W
normalised as in training with a dynamic batch axis, and output ``logits``. What a client needs
to preprocess travels as metadata: mean, std, image size, channels, resize rule, class names, and
where the model came from. For FFN the graph holds both backbones and the fused cosine head.

Every export runs a parity check on a validation batch (ONNX Runtime on CPU against PyTorch
eager); it fails when the largest logit difference exceeds ``atol * max(1, max |logit|)`` or when
top-1 agreement falls below 99%, and on any non-finite logit. The figures are written to an MLflow run of their own.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ltrepro.config import RegistryConfig
from ltrepro.data import data_hash
from ltrepro.data.loader import make_loader
from ltrepro.errors import LtreproError

MIN_AGREEMENT = 0.99
PARITY_BATCH = 256


def preprocessing(run) -> dict[str, str]:
    """The metadata a client needs to turn an image into the ``images`` input."""
    data = run.data
    resize_shorter = 0 if data.train.in_memory else round(data.image_size * 256 / 224)  # loader.py's eval transform
    return {
        "mean": json.dumps(list(data.mean)),
        "std": json.dumps(list(data.std)),
        "image_size": str(data.image_size),
        "in_channels": str(data.in_channels),
        "color_mode": "L" if data.in_channels == 1 else "RGB",
        "resize_shorter": str(resize_shorter),  # 0: images are image_size square (resized if not)
        "scale": "pixel / 255, then (x - mean) / std per channel",
        "class_names": json.dumps(list(data.class_names)),
    }


def to_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str]) -> None:
    """Export with the dynamo exporter (onnxscript) as one file, then attach ``metadata``."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        torch.onnx.export(
            model, (example,), str(path), input_names=["images"], output_names=["logits"],
            dynamic_shapes=({0: batch},), external_data=False, dynamo=True,
        )  # fmt: skip
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, metadata)
    onnx.save(graph, str(path))


def parity(model: torch.nn.Module, path: Path, images: torch.Tensor, atol: float) -> dict[str, float]:
    """ORT (CPU) vs PyTorch on ``images``, and on its first image alone (the dynamic axis)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(images).float().numpy()
    got = session.run(["logits"], {"images": images.numpy()})[0]
    single = session.run(["logits"], {"images": images[:1].numpy()})[0]
    max_diff = float(max(np.abs(got - expected).max(), np.abs(single - expected[:1]).max()))
    tolerance = atol * max(1.0, float(np.abs(expected).max()))
    agreement = float((got.argmax(1) == expected.argmax(1)).mean())
    figures = {"parity_max_abs_diff": max_diff, "parity_tolerance": tolerance, "parity_top1_agreement": agreement,
               "parity_images": float(len(images))}  # fmt: skip
    if not (np.isfinite(expected).all() and np.isfinite(got).all() and np.isfinite(single).all()):
        raise LtreproError(f"ONNX parity check failed: the model gives NaN or infinite logits on validation images; {path} is not usable")
    if max_diff > tolerance or agreement < MIN_AGREEMENT:
        raise LtreproError(
            f"ONNX parity check failed on {len(images)} validation images: max |logit diff| {max_diff:.3g} "
            f"(tolerance {tolerance:.3g}), top-1 agreement {agreement:.2%} (minimum {MIN_AGREEMENT:.0%}); {path} is not usable"
        )
    return figures


def export_run(
    run_spec: str, out: Path | None, root: Path | None, atol: float = 1e-3, registry: RegistryConfig | None = None
) -> dict:
    """Export the run (directory, ``runs:/ID`` or run id) to ``out``, check it, and register it as a new
    version (alias challenger) of ``registry.name``; returns the figures and the version."""
    from ltrepro.model_registry import log_and_register, onnx_val_top1, registered_name
    from ltrepro.artifacts import run_directory
    from ltrepro.rebuild import load_run
    from ltrepro.tracking import step_tracker

    root = root.resolve() if root else None
    run_dir = run_directory(run_spec, root or Path.cwd())
    run = load_run(run_dir, root=root)
    if not run.readout.has_logits:
        raise LtreproError(
            f"{run_dir}: {run.info['method']}/{run.info['stage']} has no classifier (it is read out by "
            f"{type(run.readout).__name__}); export a stage that gives class logits"
        )
    model = run.model.cpu().eval()
    images, _ = next(iter(make_loader(run.data, "val", PARITY_BATCH, torch.device("cpu"), num_workers=0).epoch()))
    path = (out or run_dir / "model.onnx").resolve()
    info = run.info
    metadata = {**preprocessing(run), "method": info["method"], "stage": info["stage"], "dataset": run.data.name,
                "source_run_id": info["mlflow_run_id"], "stage_key": info["stage_key"]}  # fmt: skip
    temp = path.with_name(f".{path.name}.tmp")
    try:
        to_onnx(model, images[:2], temp, metadata)
        figures = parity(model, temp, images, atol)
    except LtreproError:
        temp.unlink(missing_ok=True)
        raise
    except Exception as exc:  # the exporter raises many kinds; name the model and the cause
        temp.unlink(missing_ok=True)
        raise LtreproError(f"ONNX export of {run_dir} failed: {type(exc).__name__}: {exc}") from None
    temp.replace(path)  # a failed export never overwrites a good file

    tracker = step_tracker(run, root, "export", torch.device("cpu"))
    tracker.log_params({"source_run": run_spec, "atol": atol, "method": info["method"]})
    val_top1 = onnx_val_top1(path, run.data)
    tracker.log_metrics(figures | {"onnx_val_top1": val_top1})
    tracker.log_artifact(path)
    name = registered_name(registry or RegistryConfig(), run.data.name)
    version_tags = {"source_run_id": info["mlflow_run_id"], "data_hash": data_hash(run.data), "method": info["method"],
                    "stage_key": info["stage_key"], "val_top1": f"{val_top1:.2f}", "export_run_id": tracker.run_id}  # fmt: skip
    model_version = log_and_register(path, name, run.data, version_tags)
    tracker.end()
    return {"onnx": str(out or path), "mlflow_run_id": tracker.run_id, "source_run_id": info["mlflow_run_id"],
            "size_mb": round(path.stat().st_size / 2**20, 3), **figures, "onnx_val_top1": val_top1,
            "registered_model": name, "version": model_version}  # fmt: skip
