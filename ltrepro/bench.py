"""Benchmarks write numbers to files; they are never timed unit tests.

``ltrepro bench loader``: images per second of one training epoch (forward, backward, step) with
the device-resident loader and with a plain torchvision DataLoader doing the same augmentation
per sample in workers, on the same model and data.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from ltrepro.config import Config
from ltrepro.data import LTData
from ltrepro.data.loader import make_loader
from ltrepro.engine import run_epoch
from ltrepro.losses import build_loss
from ltrepro.objectives import Objective
from ltrepro.models import Classifier


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


def time_epochs(model: Classifier, loader, device: torch.device, epochs: int) -> float:
    """Images per second over ``epochs`` training epochs, after one warm-up epoch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    objective = Objective(build_loss("ce", [1]))
    seen, seconds = 0, 0.0
    for epoch in range(epochs + 1):
        _, took, count = run_epoch(model, objective, optimizer, scheduler, loader, device, 0, epoch, epochs + 1)
        if epoch:
            seen, seconds = seen + count, seconds + took
    return seen / seconds


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
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
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
