"""Benchmarks write numbers to files; they are never timed unit tests.

``ltrepro bench serve``: ONNX Runtime vs PyTorch eager latency, and HTTP latency and throughput of
``mlflow models serve``, for a registered model (see ``bench_serve``).

``ltrepro bench loader``: images per second of one training epoch (forward, backward, step) with
the device-resident loader and with a plain torchvision DataLoader doing the same augmentation
per sample in workers, on the same model and data.
"""
from __future__ import annotations

import itertools
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ltrepro.config import Config
from ltrepro.data import LTData
from ltrepro.data.loader import make_loader
from ltrepro.engine import run_epoch
from ltrepro.losses import build_loss
from ltrepro.objectives import Objective
from ltrepro.models import Classifier
from ltrepro.optim import PlainUpdate
from ltrepro.readouts import LogitReadout
from ltrepro.stages import StagePlan
from ltrepro.tracking import device_name


class TorchvisionTensorLoader:
    """The baseline: per-sample v2 transforms (crop with padding, flip, normalise) in DataLoader workers."""

    def __init__(self, data: LTData, cfg: Config, device: torch.device) -> None:
        from torchvision.transforms import v2

        size = data.train.images.shape[-1]
        steps = [v2.RandomCrop(size, padding=cfg.data.augment.crop_padding)] if cfg.data.augment.crop_padding else []
        steps += [v2.RandomHorizontalFlip()] if cfg.data.augment.flip else []
        transform = v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(data.mean, data.std)])
        images, labels = data.train.images, torch.from_numpy(data.train.labels)

        class Images(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return len(labels)

            def __getitem__(self, index: int):
                return transform(images[index]), labels[index]

        self.loader = torch.utils.data.DataLoader(
            Images(), batch_size=cfg.stage1.batch_size, shuffle=True, num_workers=cfg.data.num_workers
        )
        self.device = device

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int = 0, generator: torch.Generator | None = None):
        for images, labels in self.loader:
            yield images.to(self.device), labels.to(self.device)


def bench_optimizer(model: torch.nn.Module, fused: bool = False) -> torch.optim.SGD:
    """The SGD of every speed benchmark; ``fused`` takes the one-kernel step instead of foreach."""
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=fused or None)


def engine_epochs(model: torch.nn.Module, loader, device: torch.device, optimizer: torch.optim.Optimizer | None = None):
    """A function that trains one more epoch with ``engine.run_epoch`` (constant lr) and returns
    (seconds, images)."""
    optimizer = optimizer or bench_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    plan = StagePlan(model, Objective(build_loss("ce", [1])), loader, optimizer, PlainUpdate(), LogitReadout())
    epochs = itertools.count()

    def one_epoch() -> tuple[float, int]:
        epoch = next(epochs)
        _, seconds, images = run_epoch(plan, scheduler, device, 0, epoch, epoch + 1)
        return seconds, images

    return one_epoch


def time_epochs(model: Classifier, loader, device: torch.device, epochs: int) -> float:
    """Images per second of ``engine.run_epoch`` over ``epochs`` training epochs, after one warm-up epoch."""
    one_epoch = engine_epochs(model, loader, device)
    one_epoch()
    timed = [one_epoch() for _ in range(epochs)]
    return sum(images for _, images in timed) / sum(seconds for seconds, _ in timed)


def data_only(loader, epochs: int) -> float:
    """Images per second of producing augmented batches alone."""
    start, seen = time.perf_counter(), 0
    for epoch in range(epochs):
        for _, labels in loader.epoch(epoch, torch.Generator().manual_seed(epoch)):
            seen += len(labels)
    if loader.device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def bench_loader(cfg: Config, data: LTData, model_factory, device: torch.device, epochs: int, out: Path) -> dict:
    """Measure both loaders; write and return the result."""
    stage = cfg.stage1
    device_loader = make_loader(data, "train", stage.batch_size, device, cfg.data.augment)
    baseline = TorchvisionTensorLoader(data, cfg, device)
    result = {
        "dataset": data.name,
        "train_images": len(data.train),
        "model": cfg.model.name,
        "batch_size": stage.batch_size,
        "epochs_timed": epochs,
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "num_workers_baseline": cfg.data.num_workers,
        "img_per_s": {
            "device_loader_data_only": data_only(device_loader, epochs),
            "torchvision_dataloader_data_only": data_only(baseline, epochs),
            "device_loader_train": time_epochs(model_factory().to(device), device_loader, device, epochs),
            "torchvision_dataloader_train": time_epochs(model_factory().to(device), baseline, device, epochs),
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def median_latency_ms(run_once, repeats: int) -> float:
    """Median wall time of ``run_once()`` over ``repeats`` calls, after 3 warm-up calls."""
    for _ in range(3):
        run_once()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_once()
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def http_figures(url: str, singles: list[bytes], batches: list[bytes]) -> dict:
    """Latency and throughput of one server: single images from 1 and from 8 clients (a burst of
    1000 requests), and batches of 64 from 4 clients, after 20 warm-up requests."""
    from ltrepro.serving.loadtest import run_load

    run_load(url, singles, 1, 20, 1)
    return {
        "single_1_client": run_load(url, singles, 1, 300, 1),
        "single_8_clients": run_load(url, singles, 8, 1000, 1),
        "batch64_4_clients": run_load(url, batches, 4, 80, 64),
    }


def bench_serve(model_uri: str, root: Path, out: Path, repeats: int = 50) -> dict:
    """ONNX Runtime vs PyTorch eager latency of a registered model at batch 1 and 256, then HTTP
    latency and throughput of ``mlflow models serve`` on real test images (``http_figures``) in two
    set-ups: one worker with ORT's default threads (one per core), and one worker per core with
    one ORT thread each (``LTREPRO_ORT_THREADS=1``)."""
    import os

    import mlflow
    import onnxruntime as ort

    from ltrepro.model_registry import image_base64
    from ltrepro.serving.loadtest import request_body
    from ltrepro.serving.onnx_pyfunc import THREADS_ENV
    from ltrepro.serving.server import mlflow_server
    from ltrepro.tracking import open_store, tracking_uri
    from ltrepro.artifacts import download_run
    from ltrepro.rebuild import load_run

    open_store(root)
    onnx_path = next(Path(mlflow.artifacts.download_artifacts(model_uri)).glob("artifacts/*.onnx"))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    source = session.get_modelmeta().custom_metadata_map["source_run_id"]
    run = load_run(download_run(f"runs:/{source}", root), root=root)
    model = run.model.cpu().eval()
    test_images, _ = next(iter(make_loader(run.data, "test", 256, torch.device("cpu"), num_workers=0).epoch()))
    latency = {}
    for batch in (1, 256):
        inputs = test_images[:batch].contiguous()
        with torch.inference_mode():
            latency[f"eager_b{batch}_ms"] = median_latency_ms(lambda: model(inputs), repeats)
        feed = {"images": inputs.numpy()}
        latency[f"ort_b{batch}_ms"] = median_latency_ms(lambda: session.run(["logits"], feed), repeats)
        latency[f"ort_over_eager_b{batch}"] = latency[f"ort_b{batch}_ms"] / latency[f"eager_b{batch}_ms"]

    pngs = [image_base64(run.data.test, i) for i in range(256)]
    singles = [request_body([image]) for image in pngs]
    batches = [request_body(pngs[i : i + 64]) for i in range(0, 256, 64)]
    cores = len(os.sched_getaffinity(0))
    setups = {"workers_1_ort_threads_default": (1, {}), f"workers_{cores}_ort_threads_1": (cores, {THREADS_ENV: "1"})}
    http = {}
    for name, (workers, env) in setups.items():
        with mlflow_server(model_uri, tracking_uri(root), out.with_suffix(f".{name}.log"), workers, env=env) as url:
            http[name] = http_figures(url, singles, batches)
    result = {
        "model_uri": model_uri, "onnx": str(onnx_path), "method": run.info["method"], "dataset": run.data.name,
        "device": device_name(torch.device("cpu")), "torch": torch.__version__, "onnxruntime": ort.__version__,
        "torch_threads": torch.get_num_threads(), "cores": cores, "python": platform.python_version(), "repeats": repeats,
        "latency": latency, "http": http,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result
