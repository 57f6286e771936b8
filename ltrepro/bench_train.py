"""``ltrepro bench train``: training speed of ResNet-32 on a CIFAR-10-LT-sized set, side by side.

Every configuration trains the same model (the registry's ``resnet32``) with the same SGD and
batch on the same images, one warm-up epoch and then timed epochs:

* ``reference``: the training loop as the LDAM-DRW lineage writes it (Cao et al., NeurIPS'19, and
  the FFN / H2T code built on it): a map-style dataset returning PIL images, torchvision's
  ``RandomCrop(32, 4)``, flip, ``ToTensor``, ``Normalize`` in ``DataLoader(shuffle, num_workers=2)``
  workers, fp32, and a per-step ``.item()`` of the loss and the running accuracy (AverageMeter).
* ``engine``: ``ltrepro.engine.run_epoch`` with the device-resident loader (crop and flip run
  batch-wise on the device). On CUDA this is the engine as it runs: bf16 autocast, channels_last.
* ``engine_compiled``: ``engine`` with ``torch.compile`` (inductor), on CUDA only.
* ``model_only``: forward, backward and step on batches made before timing, no augmentation: the
  bound that no loader can beat.

Also: where the engine's epoch goes (batch, forward, backward, step, per step), the ops that take
the most time (``torch.profiler``), what CPU options do to the engine's epoch (``--cpu-options``:
channels_last, ``torch.compile``, the fused SGD step) and the cost of the engine's per-epoch
MLflow logging against its epoch. The images are random pixels: speed does not depend on them.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from ltrepro.bench import bench_optimizer, time_epochs
from ltrepro.config import AugmentConfig
from ltrepro.data import LTData
from ltrepro.data.base import Split
from ltrepro.data.loader import DeviceLoader, fixed_seed_generator
from ltrepro.data.lt import lt_counts
from ltrepro.engine import autocast
from ltrepro.models import Classifier, create_model

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # the reference's Normalize


def random_cifar_lt(n_max: int, imbalance: float = 100.0, num_classes: int = 10, seed: int = 0) -> LTData:
    """Random 3 x 32 x 32 uint8 images with CIFAR-10-LT's class profile (n_max 5000, IF 100: 12,406)."""
    generator = torch.Generator().manual_seed(seed)
    labels = np.repeat(np.arange(num_classes), lt_counts(n_max, imbalance, num_classes))
    images = torch.randint(0, 256, (len(labels), 3, 32, 32), dtype=torch.uint8, generator=generator)
    tiny = Split(labels[:num_classes], images[:num_classes])  # val/test are never read here
    return LTData("random_cifar10_lt", num_classes, [str(c) for c in range(num_classes)], Split(labels, images),
                  tiny, tiny, CIFAR_MEAN, CIFAR_STD, 3, 32)  # fmt: skip


class ReferenceImages(torch.utils.data.Dataset):
    """The reference's dataset: HWC uint8 arrays, each item a PIL image through torchvision transforms."""

    def __init__(self, data: LTData) -> None:
        from torchvision import transforms

        self.images = data.train.images.permute(0, 2, 3, 1).numpy()  # as CIFAR's ``self.data``
        self.labels = data.train.labels
        self.transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(data.mean, data.std),
        ])  # fmt: skip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def reference_epoch(model: Classifier, loader, optimizer: torch.optim.Optimizer, device: torch.device) -> dict:
    """One epoch of the reference loop, worker start-up included as it is there: seconds, images,
    and the running loss and accuracy it syncs for every step (its AverageMeter)."""
    model.train()
    start, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0.0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).float().sum().item()
        seen += len(labels)
    return {"seconds": time.perf_counter() - start, "images": seen, "loss": loss_sum / seen, "accuracy": 100 * correct / seen}


def time_reference(data: LTData, batch_size: int, device: torch.device, epochs: int, workers: int) -> float:
    """Images per second of the reference loop over ``epochs`` epochs after one warm-up epoch."""
    torch.manual_seed(0)
    model = create_model("resnet32", data.num_classes, 3).to(device)
    optimizer = bench_optimizer(model)
    loader = torch.utils.data.DataLoader(ReferenceImages(data), batch_size=batch_size, shuffle=True,
                                         num_workers=workers, pin_memory=device.type == "cuda")  # fmt: skip
    timed = [reference_epoch(model, loader, optimizer, device) for _ in range(epochs + 1)][1:]
    return sum(epoch["images"] for epoch in timed) / sum(epoch["seconds"] for epoch in timed)


def engine_loader(data: LTData, batch_size: int, device: torch.device, channels_last: bool | None = None) -> DeviceLoader:
    """The engine's training loader with the reference's augmentation (crop after 4-pixel padding, flip)."""
    loader = DeviceLoader(data.train, batch_size, device, data.mean, data.std, AugmentConfig(crop_padding=4, flip=True))
    if channels_last is not None:
        loader.channels_last = channels_last
    return loader


def engine_model(data: LTData, device: torch.device, channels_last: bool, compiled: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet32", data.num_classes, 3).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model, dynamic=False) if compiled else model  # the last, smaller batch gets its own graph


def time_engine(data: LTData, batch_size: int, device: torch.device, epochs: int, channels_last: bool | None = None,
                compiled: bool = False, fused: bool = False) -> float:  # fmt: skip
    """Images per second of ``run_epoch``; channels_last None is the engine's own choice (CUDA only)."""
    loader = engine_loader(data, batch_size, device, channels_last)
    model = engine_model(data, device, loader.channels_last, compiled)
    return time_epochs(model, loader, device, epochs, bench_optimizer(model, fused=fused))


def time_model_only(data: LTData, batch_size: int, device: torch.device, epochs: int) -> float:
    """Images per second of forward + backward + step on normalised batches made before timing."""
    loader = engine_loader(data, batch_size, device)
    model = engine_model(data, device, loader.channels_last, compiled=False)
    optimizer = bench_optimizer(model)
    batches = list(loader.epoch(0, fixed_seed_generator(0, 0)))
    seconds, seen = 0.0, 0
    for epoch in range(epochs + 1):
        start = time.perf_counter()
        for images, labels in batches:
            with autocast(device):
                loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch:
            seconds, seen = seconds + synchronized_time(device) - start, seen + len(data.train)
    return seen / seconds


def synchronized_time(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def profile_engine(data: LTData, batch_size: int, device: torch.device, steps: int) -> dict:
    """Where an engine step's time goes: milliseconds per step of making the batch (index, convert,
    crop, flip, normalise), forward + loss, backward and the optimiser step (synchronised on CUDA),
    and the ops with the most self time over the same steps (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    loader = engine_loader(data, batch_size, device)
    model = engine_model(data, device, loader.channels_last, compiled=False)
    optimizer = bench_optimizer(model)
    names = ("batch", "forward", "backward", "step")
    phases = dict.fromkeys(names, 0.0)
    batches = loader.epoch(0, fixed_seed_generator(0, 0))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for step in range(steps + 1):  # step 0 (with the epoch's up-front draws) warms up, not counted
            marks = [time.perf_counter()]
            images, labels = next(batches)
            marks.append(synchronized_time(device))
            with autocast(device):
                loss = F.cross_entropy(model(images), labels)
            marks.append(synchronized_time(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            marks.append(synchronized_time(device))
            optimizer.step()
            marks.append(synchronized_time(device))
            for name, begin, end in zip(names, marks, marks[1:]):
                phases[name] += (end - begin) * 1000 / steps if step else 0.0
    total = sum(phases.values())
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = sorted(profiler.key_averages(), key=lambda event: getattr(event, sort_key), reverse=True)[:10]
    return {
        "steps": steps,
        "ms_per_step": {name: round(ms, 3) for name, ms in phases.items()},
        "share": {name: round(ms / total, 4) for name, ms in phases.items()},
        "top_ops_self_ms_per_step": {op.key: round(getattr(op, sort_key) / 1000 / (steps + 1), 3) for op in ops},
    }


def mlflow_logging_cost(epoch_seconds: float, epochs: int) -> dict:
    """Seconds of the engine's per-epoch ``log_metrics`` call (the metrics ``engine.fit`` logs) into a
    fresh sqlite store, as ``ltrepro train`` writes by default, and its share of one engine epoch."""
    from ltrepro.tracking import Tracker

    with tempfile.TemporaryDirectory() as folder:
        uri = f"sqlite:///{Path(folder) / 'mlflow.db'}"
        with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": uri}):
            os.environ.pop("MLFLOW_RUN_ID", None)
            tracker = Tracker(Path(folder), "bench", "bench-train")  # creates the store's tables: not timed
            times = []
            for epoch in range(epochs):
                start = time.perf_counter()
                tracker.log_metrics({"train_loss": 1.0, "val_acc": 50.0, "lr": 0.1, "throughput": 1000.0}, epoch)
                times.append(time.perf_counter() - start)
            tracker.end()
    seconds = float(np.median(times))
    return {"store": "sqlite (fresh)", "calls": epochs, "seconds_per_epoch": seconds, "share_of_engine_epoch": seconds / epoch_seconds}


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> dict:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({len(os.sched_getaffinity(0))} usable cores)",
        "cpu": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def bench_train(device: torch.device, out: Path, quick: bool = False, epochs: int = 1, cpu_options: bool = False) -> dict:
    """Run every configuration, write the result to ``out`` and return it.

    ``quick``: 1,236 images (CIFAR-10-LT's profile at n_max 500) and a 5-step profile, which takes
    about a minute on 2 CPU cores; otherwise the 12,406 images of CIFAR-10-LT IF 100.
    """
    data = random_cifar_lt(500 if quick else 5000)
    batch_size, workers = 128, 2
    img_per_s = {
        "reference": time_reference(data, batch_size, device, epochs, workers),
        "engine": time_engine(data, batch_size, device, epochs),
        "engine_compiled": time_engine(data, batch_size, device, epochs, compiled=True) if device.type == "cuda" else None,
        "model_only": time_model_only(data, batch_size, device, epochs),
    }
    options = {}
    if cpu_options and device.type == "cpu":
        options = {
            "channels_last": time_engine(data, batch_size, device, epochs, channels_last=True),
            "compiled": time_engine(data, batch_size, device, epochs, compiled=True),
            "fused_sgd": time_engine(data, batch_size, device, epochs, fused=True),
        }
    fast = img_per_s["engine_compiled"]
    result = {
        **hardware(device),
        "model": "resnet32",
        "train_images": len(data.train),
        "batch_size": batch_size,
        "reference_workers": workers,
        "epochs_timed": epochs,
        "quick": quick,
        "img_per_s": img_per_s,
        "seconds_per_epoch": {name: (len(data.train) / v if v else None) for name, v in img_per_s.items()},
        "ratio_engine_vs_reference": img_per_s["engine"] / img_per_s["reference"],
        "ratio_fast_vs_reference": fast / img_per_s["reference"] if fast else None,
        "cpu_options_img_per_s": options or None,
        "profile": profile_engine(data, batch_size, device, 5 if quick else 20),
        "mlflow_logging": mlflow_logging_cost(len(data.train) / img_per_s["engine"], 10 if quick else 30),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def markdown_table(result: dict) -> str:
    """The result's throughput rows, the ratios and the profile, as markdown."""
    rows = ["| configuration | img/s | s per epoch |", "|---|---|---|"]
    for name, value in result["img_per_s"].items():
        rows.append(f"| {name} | {value:.0f} | {result['seconds_per_epoch'][name]:.1f} |" if value else f"| {name} | not measured (no GPU) | - |")
    for name, value in (result["cpu_options_img_per_s"] or {}).items():
        rows.append(f"| engine + {name} | {value:.0f} | {result['train_images'] / value:.1f} |")
    fast = result["ratio_fast_vs_reference"]
    lines = [*rows, "", f"engine / reference: {result['ratio_engine_vs_reference']:.2f}x; "
             f"compiled engine / reference: {f'{fast:.2f}x' if fast else 'not measured (no GPU)'}"]  # fmt: skip
    profile = result["profile"]
    lines += ["", "| engine step | ms | share |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.1f} | {profile['share'][name]:.0%} |" for name, ms in profile["ms_per_step"].items()]
    logging = result["mlflow_logging"]
    lines += ["", f"MLflow logging per epoch: {logging['seconds_per_epoch'] * 1000:.1f} ms, "
              f"{logging['share_of_engine_epoch']:.2%} of an engine epoch"]  # fmt: skip
    return "\n".join(lines)
