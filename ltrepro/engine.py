"""The training loop shared by every stage: epochs, checkpoint/resume, AMP, progress, NaN guard.

What a stage trains is passed in as a ``StagePlan`` (``ltrepro.stages``): the model, the objective
that forms each step's loss, the loader, the optimiser, the update rule (plain or SAM) and the
readout that turns the model into class scores. The loop names no optimiser and never changes
when a method is added. Each epoch ends with a validation pass through the readout; the
checkpoint kept for the final test is chosen on validation only (``select: best_val | last``).

Epoch hooks, all optional: the loader's ``set_epoch(epoch, model)`` runs before an epoch (a
subset redrawn from the current model); ``epoch_metrics()`` of the objective and the loader adds
to the epoch's logged metrics; ``epoch_state()`` / ``load_epoch_state(state)`` keep their state
(tensors and primitives) in ``last.pt``, so a resumed run equals an uninterrupted one.

Under torchrun (``ltrepro.distributed``) the objective runs behind DistributedDataParallel on each
rank's share of every global batch; rank 0 alone validates, selects and writes checkpoints.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Protocol

import numpy as np
import torch
from torch import nn

from ltrepro import distributed
from ltrepro.checkpoint import load_weights, save_atomic
from ltrepro.config import StageConfig
from ltrepro.data.loader import fixed_seed_generator
from ltrepro.errors import LtreproError
from ltrepro.evaluate import balanced_accuracy

if TYPE_CHECKING:
    from ltrepro.stages import StagePlan


class Objective(Protocol):
    """A stage's loss: called every step with the step's random source ``rng`` (every draw a step
    makes comes from it, so SAM's second pass can replay them); ``set_epoch`` (0-based) before
    every epoch. An objective may define ``perturbation_loss`` (same signature) for SAM's first pass."""

    def __call__(self, model: nn.Module, images, labels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor: ...
    def set_epoch(self, epoch: int) -> None: ...


class Loader(Protocol):
    def __len__(self) -> int: ...
    def epoch(self, epoch: int = 0, generator: torch.Generator | None = None) -> Iterable: ...


HOOKED = ("objective", "train_loader")  # the plan parts whose epoch hooks the engine calls


def lr_factor(step: int, steps_per_epoch: int, stage: StageConfig) -> float:
    """Linear warm-up over ``warmup_epochs``, then cosine to 0 or steps of ``gamma`` at milestones."""
    warmup = stage.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if stage.schedule == "multistep":
        epoch = step // steps_per_epoch
        return stage.gamma ** sum(epoch >= m for m in stage.milestones)
    total = stage.epochs * steps_per_epoch
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


@torch.inference_mode()
def predict(model: nn.Module, loader: Loader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Logits (float32) and labels of a whole split, in eval mode."""
    model.eval()
    logits, labels = [], []
    with autocast(device):
        for images, target in loader.epoch():
            logits.append(model(images).float().cpu())
            labels.append(target.cpu())
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; plain fp32 on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def validation_accuracy(plan: StagePlan, loader: Loader, device: torch.device, num_classes: int) -> float:
    """Class-balanced validation accuracy (%) of the plan's readout, the only number selection reads."""
    scores, labels = plan.readout.predict(plan.model, loader, device)
    return balanced_accuracy(scores.argmax(1), labels, num_classes)


class Progress:
    """A tqdm bar with loss and img/s on a TTY; one line per epoch otherwise."""

    def __init__(self, epoch: int, epochs: int, steps: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not sys.stderr.isatty())

    def update(self, loss: float, images_per_second: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{images_per_second:.0f}", refresh=False)

    def step(self) -> None:
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


@dataclass
class FitResult:
    selected_epoch: int
    val_top1: float
    checkpoint: Path
    history: list[dict] = field(default_factory=list)


def fit(
    plan: StagePlan,
    stage: StageConfig,
    val_loader: Loader | None,
    run_dir: Path,
    device: torch.device,
    seed: int,
    num_classes: int,
    log_metrics: Callable[[dict, int], None] = lambda metrics, step: None,
    resume_state: dict | None = None,
    sync_bn: bool = False,
) -> FitResult:
    """Train ``plan.model`` for ``stage.epochs`` epochs and return the checkpoint selected on validation.

    The optimiser's groups are the trainable parameters, each group's lr scaled by the schedule.
    ``last.pt`` (full state, every epoch) makes the run resumable; ``best.pt`` holds the weights
    that ``stage.select`` picks. Epoch e draws its batches and mixup from generators seeded by
    (seed, e), so a resumed run repeats an uninterrupted one exactly on CPU. Under torchrun the
    other ranks train in step with rank 0 and skip validation and checkpoints (``val_top1`` NaN).
    A stage of 0 epochs is post-hoc (``fit_post_hoc``).
    """
    if stage.epochs == 0:
        return fit_post_hoc(plan, val_loader, run_dir, device, num_classes, log_metrics)
    model, optimizer = plan.model, plan.optimizer
    world = distributed.current()
    if world.distributed and stage.batch_size < world.size:
        raise LtreproError(f"batch_size {stage.batch_size} is the global batch: it must be at least the {world.size} torchrun processes")
    ddp = distributed.data_parallel(model, world, device, sync_bn) if world.distributed else None
    steps_per_epoch = len(plan.train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, stage))
    start_epoch, best_val, best_epoch, history = 0, -1.0, -1, []
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    hooked = {name: getattr(plan, name) for name in HOOKED}
    if resume_state is not None:
        load_weights(model, resume_state["model"], last_path)
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        torch.set_rng_state(resume_state["torch_rng"])
        for name, state in resume_state.get("epoch_state", {}).items():
            hooked[name].load_epoch_state(state)
        start_epoch, best_val, best_epoch = resume_state["epoch"] + 1, resume_state["best_val"], resume_state["best_epoch"]
        history = list(resume_state["history"])
    for epoch in range(start_epoch, stage.epochs):
        if hasattr(plan.train_loader, "set_epoch"):
            plan.train_loader.set_epoch(epoch, model)
        train_loss, seconds, seen = run_epoch(plan, scheduler, device, seed, epoch, stage.epochs, ddp)
        raise_if_nonfinite_weights(model, epoch)  # a finite loss can still leave NaN weights behind
        if not world.is_main:
            continue
        val_top1 = validation_accuracy(plan, val_loader, device, num_classes)
        metrics = {
            "train_loss": train_loss,
            "val_acc": val_top1,
            "lr": optimizer.param_groups[0]["lr"],
            "throughput": seen / seconds,
        }
        for part in hooked.values():
            metrics.update(part.epoch_metrics() if hasattr(part, "epoch_metrics") else {})
        history.append({"epoch": epoch, **metrics})
        log_metrics(metrics, epoch)
        if stage.select == "last" or val_top1 > best_val:
            best_val, best_epoch = val_top1, epoch
            save_atomic({"model": model.state_dict(), "epoch": epoch, "val_top1": val_top1}, best_path)
        save_atomic(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "epoch": epoch,
                "best_val": best_val,
                "best_epoch": best_epoch,
                "history": history,
                "epoch_state": {name: part.epoch_state() for name, part in hooked.items() if hasattr(part, "epoch_state")},
            },
            last_path,
        )
        remaining = (stage.epochs - epoch - 1) * seconds
        print(
            f"epoch {epoch + 1}/{stage.epochs}  loss {train_loss:.4f}  val {val_top1:.2f}%  "
            f"{seen / seconds:.0f} img/s  eta {remaining / 60:.1f} min",
            flush=True,
        )
    return FitResult(best_epoch, best_val, best_path, history)


def fit_post_hoc(
    plan: StagePlan, val_loader: Loader | None, run_dir: Path, device: torch.device, num_classes: int,
    log_metrics: Callable[[dict, int], None],
) -> FitResult:  # fmt: skip
    """A stage that trains nothing (post-hoc logit adjustment, tau-normalisation): ``plan.choose``
    sets the model's free values on validation, and the model, validated once, is the selection
    (epoch 0 of ``best.pt``). Nothing else is saved: there is no training state to resume."""
    best_path = run_dir / "best.pt"
    if not distributed.current().is_main:
        return FitResult(0, float("nan"), best_path)
    chosen = plan.choose(plan.model, val_loader, device) if plan.choose is not None else {}
    val_top1 = validation_accuracy(plan, val_loader, device, num_classes)
    metrics = {"val_acc": val_top1, **chosen}
    log_metrics(metrics, 0)
    save_atomic({"model": plan.model.state_dict(), "epoch": 0, "val_top1": val_top1}, best_path)
    print(f"post-hoc  val {val_top1:.2f}%  " + "  ".join(f"{k} {v:g}" for k, v in chosen.items()), flush=True)
    return FitResult(0, val_top1, best_path, [{"epoch": 0, **metrics}])


def run_epoch(
    plan: StagePlan, scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device, seed: int, epoch: int, epochs: int,
    ddp: nn.Module | None = None,
) -> tuple[float, float, int]:
    """One training epoch; returns (mean loss, seconds, images seen by all ranks).

    Each step hands the update rule a loss function that replays the step's random draws, so a
    two-pass rule (SAM) sees the same mixup lambda, permutation and views in both passes. The
    finiteness check runs on device without a sync per step; the first non-finite step is
    reported when the bar refreshes and at the end of the epoch, before any checkpoint is written.
    With ``ddp`` (torchrun) each rank draws the whole global batch, keeps its share and calls the
    objective through DDP, which averages the gradients; the epoch's loss is averaged over ranks.
    """
    model, objective, loader = plan.model, plan.objective, plan.train_loader
    world = distributed.current()
    model.train()
    objective.set_epoch(epoch)
    first_pass = getattr(objective, "perturbation_loss", objective)
    rng = np.random.default_rng([seed, epoch, 1])
    progress = Progress(epoch, epochs, len(loader))
    total = torch.zeros((), device=device)
    first_bad = torch.full((), -1, device=device)
    start, seen = time.perf_counter(), 0
    for step, (images, labels) in enumerate(loader.epoch(epoch, fixed_seed_generator(seed, epoch))):
        draws = rng.bit_generator.state
        seen += len(labels)
        if ddp is not None:
            images, labels = distributed.take((images, labels), distributed.shard_window(0, len(labels), world))

        def loss_fn(perturbation_pass: bool) -> torch.Tensor:
            rng.bit_generator.state = draws
            call = first_pass if perturbation_pass else objective
            with autocast(device):
                return call(model, images, labels, rng) if ddp is None else ddp(call, images, labels, rng)

        loss = plan.update.step(plan.optimizer, loss_fn)
        scheduler.step()
        loss = loss.detach().float()
        bad = ~torch.isfinite(loss) & (first_bad < 0)
        first_bad = torch.where(bad, step, first_bad)
        total += loss
        progress.step()
        if step % 20 == 0 or step == len(loader) - 1:
            raise_if_nonfinite(first_bad, epoch)
            progress.update(loss.item(), seen / (time.perf_counter() - start))
    progress.close()
    raise_if_nonfinite(first_bad, epoch)
    if ddp is not None:
        torch.distributed.all_reduce(total)
        total /= world.size
    return (total / max(step + 1, 1)).item(), time.perf_counter() - start, seen


def raise_if_nonfinite_weights(model: nn.Module, epoch: int) -> None:
    """Refuse to go on (and so to checkpoint) when any weight or buffer is NaN or infinite: one
    device sync per epoch. The last good epoch stays in ``last.pt`` / ``best.pt``."""
    tensors = {name: t for name, t in model.state_dict().items() if t.is_floating_point()}
    finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist() if tensors else []
    bad = [name for name, ok in zip(tensors, finite) if not ok]
    if bad:
        raise LtreproError(
            f"epoch {epoch + 1} left NaN or infinite values in {len(bad)} weight tensors (first: {bad[0]}); "
            f"nothing of that epoch was saved; lower the stage's lr"
        )


def raise_if_nonfinite(first_bad: torch.Tensor, epoch: int) -> None:
    step = int(first_bad)
    if step >= 0:
        raise LtreproError(
            f"loss became NaN or infinite at epoch {epoch + 1}, step {step + 1}; lower stage lr or check the data"
        )
