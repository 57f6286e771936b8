"""A stage's optimiser and update rule, built from its config block; the engine only calls them.

``build_optimizer``: SGD (momentum, Nesterov) or AdamW (Loshchilov & Hutter, ICLR'19), with an
option to exempt 1-d parameters (BN affine parameters, biases, LWS scales) from weight decay.
``PlainUpdate``: one forward/backward/step. ``SharpnessAwareUpdate``: SAM (Foret et al., ICLR'21,
Eq. 2) around any optimiser, or ASAM (Kwon et al., ICML'21, Eq. 9) with ``adaptive``.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from ltrepro.config import StageConfig

LossFn = Callable[[bool], torch.Tensor]  # loss_fn(perturbation_pass) -> loss, with the step's draws fixed


def exempt_1d_from_decay(groups: list[dict]) -> list[dict]:
    """Each group split in two: parameters of 2+ dimensions keep the decay, 1-d ones get none."""
    split = []
    for group in groups:
        params = list(group["params"])
        rest = {key: value for key, value in group.items() if key != "params"}
        split.append({**rest, "params": [p for p in params if p.ndim > 1]})
        split.append({**rest, "params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0})
    return [group for group in split if group["params"]]


def build_optimizer(stage: StageConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimiser ``stage.optimizer`` names over ``groups`` (a group's own ``lr`` is kept)."""
    groups = groups if stage.decay_1d else exempt_1d_from_decay(groups)
    if stage.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=stage.lr, betas=tuple(stage.betas), weight_decay=stage.weight_decay)
    return torch.optim.SGD(groups, lr=stage.lr, momentum=stage.momentum, weight_decay=stage.weight_decay, nesterov=stage.nesterov)


class UpdateRule(Protocol):
    def step(self, optimizer: torch.optim.Optimizer, loss_fn: LossFn) -> torch.Tensor: ...


class PlainUpdate:
    """loss -> backward -> optimiser step."""

    def step(self, optimizer: torch.optim.Optimizer, loss_fn: LossFn) -> torch.Tensor:
        loss = loss_fn(False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss


class SharpnessAwareUpdate:
    """SAM: the gradient at w + eps, applied at w.

    eps = rho g / ||g||_2 (SAM), or rho T^2 g / ||T g||_2 with T = |w| element-wise (ASAM); g is the
    first pass's gradient, the norm global over the parameters that have one. Only those are
    perturbed and restored: a parameter without a first-pass gradient (a projector that only the
    second pass's loss reaches) is left in place and still takes the second-pass gradient, the case
    that crashes the SAM of FSGL's released code (KeyError on the unsaved weights). Both passes see the same random draws
    (``loss_fn`` replays them); the first pass may use a different loss (``perturbation_loss`` of
    the objective). Returns the first pass's loss, the loss at w.
    """

    def __init__(self, rho: float, adaptive: bool = False, eps: float = 1e-12) -> None:
        self.rho, self.adaptive, self.eps = rho, adaptive, eps

    def step(self, optimizer: torch.optim.Optimizer, loss_fn: LossFn) -> torch.Tensor:
        loss = loss_fn(True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        with torch.no_grad():
            scaled = [p.abs() * p.grad if self.adaptive else p.grad for p in params]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in scaled])) if params else None
            saved = [p.detach().clone() for p in params]
            for p, g in zip(params, scaled):
                p.add_((p.abs() * g if self.adaptive else g) * (self.rho / (norm + self.eps)))
        optimizer.zero_grad(set_to_none=True)
        loss_fn(False).backward()
        with torch.no_grad():
            for p, original in zip(params, saved):
                p.copy_(original)
        optimizer.step()
        return loss


def build_update(stage: StageConfig) -> UpdateRule:
    if stage.update == "sam":
        return SharpnessAwareUpdate(stage.sam.rho, stage.sam.adaptive)
    return PlainUpdate()
