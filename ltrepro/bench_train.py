"""``ltrepro bench train``: training speed of ResNet-32 on a CIFAR-10-LT-sized set, side by side.

Every configuration trains the same model (the registry's ``resnet32``) with the same SGD and
batch on the same images, one warm-up epoch and then timed epochs:

* ``reference``: the training loop as the LDAM-DRW lineage writes it (Cao et al., NeurIPS'19, and
  the FFN / H2T code built on it): a map-style dataset returning PIL images, torchvision's
  ``RandomCrop(32, 4)``, flip, ``ToTensor``, ``Normalize`` in ``DataLoader(shuffle, num_workers=2)``
  workers, fp32, and a per-step ``.item()`` of the loss and the running accuracy (AverageMeter).
* ``engine``: ``ltrepro.engine.run_epoch`` with the device-resident loader (crop and flip run
  batch-wise on the device). On CUDA this is the engine as it runs: bf16 autocast, channels_last.
* ``engine_compiled``: ``engine`` with ``torch.compile`` (inductor): on CUDA, and on CPU with
  ``--cpu-options``, which also times ``engine_channels_last``, ``engine_fused_sgd`` and
  ``model_only_bf16_channels_last``.
* ``model_only``: forward, backward and step on batches made before timing, no augmentation: the
  bound that no loader can beat.

Also: where the engine's epoch goes (batch, forward, backward, step, per step), the ops that take
the most time (``torch.profiler``) and the cost of the engine's per-epoch
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

from ltrepro.bench import bench_optimizer, engine_epochs
from ltrepro.config import AugmentConfig, StageConfig
from ltrepro.data import LTData
from ltrepro.data.base import Split
from ltrepro.data.loader import DeviceLoader, fixed_seed_generator, make_loader
from ltrepro.data.lt import lt_counts
from ltrepro.engine import autocast, fit
from ltrepro.losses import build_loss
from ltrepro.models import Classifier, create_model
from ltrepro.objectives import Objective
from ltrepro.stages import make_plan
from ltrepro.tracking import cpu_name, device_name

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # the reference's Normalize


def random_cifar_lt(n_max: int, imbalance: float = 100.0, num_classes: int = 10, seed: int = 0, val_size: int = 0) -> LTData:
    """Random 3 x 32 x 32 uint8 images with CIFAR-LT's class profile (CIFAR-10-LT, n_max 5000 at IF 100:
    12,406; CIFAR-100-LT, n_max 500: 10,847). val/test are ``val_size`` training images drawn at random
    (a split that is read for its cost, not its accuracy), or the first ``num_classes`` with 0."""
    generator = torch.Generator().manual_seed(seed)
    labels = np.repeat(np.arange(num_classes), lt_counts(n_max, imbalance, num_classes))
    images = torch.randint(0, 256, (len(labels), 3, 32, 32), dtype=torch.uint8, generator=generator)
    held = torch.randperm(len(labels), generator=generator)[:val_size].numpy() if val_size else np.arange(num_classes)
    val = Split(labels[held], images[held])
    return LTData(f"random_cifar{num_classes}_lt", num_classes, [str(c) for c in range(num_classes)], Split(labels, images),
                  val, val, CIFAR_MEAN, CIFAR_STD, 3, 32)  # fmt: skip


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


def reference_epochs(data: LTData, batch_size: int, device: torch.device, workers: int):
    """A function that trains the reference loop one more epoch and returns (seconds, images)."""
    model = bench_model(data, device, channels_last=False, compiled=False)
    optimizer = bench_optimizer(model)
    loader = torch.utils.data.DataLoader(ReferenceImages(data), batch_size=batch_size, shuffle=True,
                                         num_workers=workers, pin_memory=device.type == "cuda")  # fmt: skip

    def one_epoch() -> tuple[float, int]:
        epoch = reference_epoch(model, loader, optimizer, device)
        return epoch["seconds"], epoch["images"]

    return one_epoch


def engine_loader(data: LTData, batch_size: int, device: torch.device, channels_last: bool | None = None) -> DeviceLoader:
    """The engine's training loader with the reference's augmentation (crop after 4-pixel padding, flip)."""
    loader = DeviceLoader(data.train, batch_size, device, data.mean, data.std, AugmentConfig(crop_padding=4, flip=True))
    if channels_last is not None:
        loader.channels_last = channels_last
    return loader


def bench_model(data: LTData, device: torch.device, channels_last: bool, compiled: bool) -> Classifier:
    """The registry's ResNet-32 with seed-0 weights, the same in every row. ``compiled`` compiles
    the backbone in place: the objectives call ``model.features`` and ``model.head``, never
    ``model(x)``, so a ``torch.compile(model)`` wrapper would leave every training step eager."""
    torch.manual_seed(0)
    model = create_model("resnet32", data.num_classes, 3).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compiled:
        model.backbone.compile(dynamic=False)  # the last, smaller batch gets its own graph
    return model


def engine_runner(data: LTData, batch_size: int, device: torch.device, channels_last: bool | None = None,
                  compiled: bool = False, fused: bool = False):  # fmt: skip
    """``engine_epochs`` on the benchmark's model and loader; channels_last None is the engine's own
    choice (on CUDA only)."""
    loader = engine_loader(data, batch_size, device, channels_last)
    model = bench_model(data, device, loader.channels_last, compiled)
    return engine_epochs(model, loader, device, bench_optimizer(model, fused=fused))


def model_only_epochs(data: LTData, batch_size: int, device: torch.device, cpu_bf16: bool = False):
    """A function that runs forward + backward + step over one epoch of normalised batches made
    before timing and returns (seconds, images). ``cpu_bf16``: bf16 autocast and channels_last on
    CPU too, which the engine does not offer (it changes results; on CPUs with AMX it is faster)."""
    loader = engine_loader(data, batch_size, device, channels_last=True if cpu_bf16 else None)
    model = bench_model(data, device, loader.channels_last, compiled=False)
    optimizer = bench_optimizer(model)
    batches = list(loader.epoch(0, fixed_seed_generator(0, 0)))
    precision = torch.autocast(device.type, dtype=torch.bfloat16) if cpu_bf16 else autocast(device)

    def one_epoch() -> tuple[float, int]:
        start = time.perf_counter()
        for images, labels in batches:
            with precision:
                loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return synchronized_time(device) - start, len(data.train)

    return one_epoch


def interleaved_img_per_s(runners: dict, rounds: int) -> dict[str, list[float]]:
    """Images per second of each runner in each round, after one warm-up epoch each (worker start,
    compilation, first touch). Round r times every runner once, so a drift of the host's speed
    over the run (a shared VM) touches every configuration alike."""
    for one_epoch in runners.values():
        one_epoch()
    speeds = {name: [] for name in runners}
    for _ in range(rounds):
        for name, one_epoch in runners.items():
            seconds, images = one_epoch()
            speeds[name].append(images / seconds)
    return speeds


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
    model = bench_model(data, device, loader.channels_last, compiled=False)
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
            if step:
                for name, begin, end in zip(names, marks, marks[1:]):
                    phases[name] += (end - begin) * 1000 / steps
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


def hardware(device: torch.device) -> dict:
    return {
        "device": device_name(device),
        "cpu": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def bench_train(device: torch.device, out: Path, quick: bool = False, epochs: int = 1, cpu_options: bool = False) -> dict:
    """Run every configuration, ``epochs`` interleaved rounds of one epoch each (the median per
    configuration is its figure), write the result to ``out`` and return it.

    ``quick``: 740 images (CIFAR-10-LT's profile at n_max 300, six batches) and a 5-step profile,
    which takes about half a minute on 2 CPU cores; otherwise the 12,406 images of CIFAR-10-LT IF 100.
    """
    data = random_cifar_lt(300 if quick else 5000)
    batch_size, workers = 128, 2
    runners = {
        "reference": reference_epochs(data, batch_size, device, workers),
        "engine": engine_runner(data, batch_size, device),
        "engine_compiled": engine_runner(data, batch_size, device, compiled=True) if device.type == "cuda" else None,
        "model_only": model_only_epochs(data, batch_size, device),
    }
    if cpu_options and device.type == "cpu":
        runners.update({
            "engine_channels_last": engine_runner(data, batch_size, device, channels_last=True),
            "engine_compiled": engine_runner(data, batch_size, device, compiled=True),
            "engine_fused_sgd": engine_runner(data, batch_size, device, fused=True),
            "model_only_bf16_channels_last": model_only_epochs(data, batch_size, device, cpu_bf16=True),
        })  # fmt: skip
    rounds = interleaved_img_per_s({name: run for name, run in runners.items() if run is not None}, epochs)
    img_per_s = {name: float(np.median(rounds[name])) if name in rounds else None for name in runners}
    fast = img_per_s["engine_compiled"] if device.type == "cuda" else None
    result = {
        **hardware(device),
        "model": "resnet32",
        "train_images": len(data.train),
        "batch_size": batch_size,
        "reference_workers": workers,
        "epochs_timed": epochs,
        "quick": quick,
        "img_per_s": img_per_s,
        "img_per_s_per_round": rounds,
        "seconds_per_epoch": {name: (len(data.train) / v if v else None) for name, v in img_per_s.items()},
        "ratio_engine_vs_reference": img_per_s["engine"] / img_per_s["reference"],
        "ratio_engine_vs_reference_per_round": [e / r for e, r in zip(rounds["engine"], rounds["reference"])],
        "ratio_fast_vs_reference": fast / img_per_s["reference"] if fast else None,
        "profile": profile_engine(data, batch_size, device, 5 if quick else 20),
        "mlflow_logging": mlflow_logging_cost(len(data.train) / img_per_s["engine"], 10 if quick else 30),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def bench_schedule(device: torch.device, out: Path, epochs: int = 200, compiled: bool = False, quick: bool = False) -> dict:
    """A whole stage-1 schedule through ``engine.fit``, as ``ltrepro train`` runs it: ResNet-32 on a
    CIFAR-100-LT-sized set (IF 100, 10,847 images; ``quick``: n_max 8 at IF 8, 293 images) with LDAM-DRW's
    stage-1 recipe (batch 128, SGD lr 0.1, momentum 0.9, weight decay 2e-4, 5 warm-up epochs, lr x 0.01
    at 80 % and 90 % of the epochs), validation on 1,000 images and both checkpoints written every
    epoch. ``training_seconds`` sums the epochs' training passes (compilation falls in the first);
    ``wall_seconds`` is the whole ``fit``, validation and checkpoints included."""
    data = random_cifar_lt(8, 8.0, 100, val_size=100) if quick else random_cifar_lt(500, 100.0, 100, val_size=1000)
    stage = StageConfig(epochs=epochs, batch_size=128, lr=0.1, weight_decay=2e-4, warmup_epochs=min(5, epochs - 1),
                        schedule="multistep", milestones=[int(0.8 * epochs), int(0.9 * epochs)], gamma=0.01)  # fmt: skip
    loader = engine_loader(data, stage.batch_size, device)
    model = bench_model(data, device, loader.channels_last, compiled)
    plan = make_plan(stage, model, Objective(build_loss("ce", data.train_counts.tolist())), loader)
    val_loader = make_loader(data, "val", 1000, device)
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        history = fit(plan, stage, val_loader, Path(run_dir), device, 0, data.num_classes).history
        wall = synchronized_time(device) - start
    epoch_seconds = [len(data.train) / epoch["throughput"] for epoch in history]
    result = {
        **hardware(device),
        "model": "resnet32",
        "compiled": compiled,
        "train_images": len(data.train),
        "val_images": len(data.val),
        "batch_size": stage.batch_size,
        "epochs": epochs,
        "quick": quick,
        "training_seconds": sum(epoch_seconds),
        "wall_seconds": wall,
        "first_epoch_seconds": epoch_seconds[0],
        "median_epoch_seconds": float(np.median(epoch_seconds)),
        "img_per_s_after_first_epoch": len(data.train) * (epochs - 1) / sum(epoch_seconds[1:]) if epochs > 1 else None,
        "final_train_loss": history[-1]["train_loss"],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def markdown_table(result: dict) -> str:
    """The result's throughput rows, the ratios and the profile, as markdown."""
    rows = ["| configuration | img/s | s per epoch |", "|---|---|---|"]
    for name, value in result["img_per_s"].items():
        seconds = result["seconds_per_epoch"][name]
        rows.append(f"| {name} | {value:.0f} | {seconds:.1f} |" if value else f"| {name} | not measured (CUDA, or --cpu-options) | - |")
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
