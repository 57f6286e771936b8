"""Losses by name: ``build_loss("ldam", class_counts, drw_epoch=160)`` -> a ``LossModule``.

A factory turns the training class counts and its keyword parameters into a module whose
``forward(logits, labels)`` returns a float32 scalar. The engine calls ``set_epoch(epoch)``
(0-based) at the start of every epoch; only DRW and KPS gradient adjustment use it. The math
lives in ``ltrepro.losses.functional``; the modules here only hold the per-class tables.
LDAM and KPS expect cosine logits in [-1, 1] (a normalised classifier); the others take any logits.
"""
from __future__ import annotations

import inspect
import numbers
from typing import Callable, Sequence

import torch
from torch import nn

from ltrepro.errors import LtreproError
from ltrepro.losses import functional as LF
from ltrepro.registry import Registry


class LossModule(nn.Module):
    """``forward(logits, labels)`` -> scalar float32 loss; ``set_epoch`` is a no-op unless overridden."""

    def set_epoch(self, epoch: int) -> None:
        """Called with the 0-based epoch before it starts; this loss does not change with it."""


LossFactory = Callable[..., LossModule]
LOSSES: Registry[LossFactory] = Registry("loss")


class CrossEntropy(LossModule):
    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return LF.cross_entropy(logits, labels)


class Focal(LossModule):
    def __init__(self, gamma: float) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return LF.focal_loss(logits, labels, self.gamma)


class LDAM(LossModule):
    """LDAM with deferred re-weighting: class weights ``drw_weights`` from epoch ``drw_epoch`` on."""

    def __init__(self, margins: torch.Tensor, s: float, drw_weights: torch.Tensor, drw_epoch: int | None) -> None:
        super().__init__()
        self.register_buffer("margins", margins.float(), persistent=False)
        self.register_buffer("drw_weights", drw_weights.float(), persistent=False)
        self.s = s
        self.drw_epoch = drw_epoch
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.reweighted = self.drw_epoch is not None and epoch >= self.drw_epoch

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = self.drw_weights if self.reweighted else None
        return LF.ldam_loss(cosine, labels, self.margins, self.s, weight)


class KPS(LossModule):
    """KPS with gradient adjustment: per-sample scales ``ga_scales[y]`` instead of ``s`` from ``ga_epoch`` on."""

    def __init__(
        self, sensitivity: torch.Tensor, margins: torch.Tensor, ga_scales: torch.Tensor, s: float, ga_epoch: int | None
    ) -> None:
        super().__init__()
        self.register_buffer("sensitivity", sensitivity.float(), persistent=False)
        self.register_buffer("margins", margins.float(), persistent=False)
        self.register_buffer("ga_scales", ga_scales.float(), persistent=False)
        self.s = s
        self.ga_epoch = ga_epoch
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.gradient_adjusted = self.ga_epoch is not None and epoch >= self.ga_epoch

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        scale = self.ga_scales.to(labels.device)[labels] if self.gradient_adjusted else self.s
        return LF.kps_loss(cosine, labels, self.sensitivity, self.margins, scale)


class LabelAwareSmoothing(LossModule):
    def __init__(self, smoothing: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("smoothing", smoothing.float(), persistent=False)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return LF.las_loss(logits, labels, self.smoothing)


class OffsetCrossEntropy(LossModule):
    """CE(z + b, y) with a fixed per-class offset b (balanced softmax, logit adjustment)."""

    def __init__(self, offsets: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("offsets", offsets.float(), persistent=False)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return LF.offset_cross_entropy(logits, labels, self.offsets)


@LOSSES.register("ce")
def ce(class_counts: Sequence[int]) -> LossModule:
    """Plain cross-entropy, no class weights, as every reference CE config (docs/methods/losses.md#ce)."""
    return CrossEntropy()


@LOSSES.register("focal")
def focal(class_counts: Sequence[int], *, gamma: float = 1.0) -> LossModule:
    """Focal loss with p_y detached as in FFN's code only; gamma = 1 as FFN's ``--loss_type Focal``.

    Lin et al., ICCV'17, Eq. 4; the paper and the LDAM-DRW code do not detach p_y (docs/methods/losses.md#focal).
    """
    return Focal(gamma)


@LOSSES.register("ldam")
def ldam(
    class_counts: Sequence[int],
    *,
    s: float = 30.0,
    max_m: float = 0.5,
    drw_epoch: int | None = None,
    beta: float = 0.9999,
) -> LossModule:
    """LDAM (Cao et al., NeurIPS'19, Eq. 13; s = 30, max_m = 0.5: FFN stage 2); DRW off unless ``drw_epoch`` is set.

    LDAM-DRW as in FFN's ``--train_rule DRW`` is ``drw_epoch=160`` (epochs >= 160, 0-based) with
    beta = 0.9999; before that epoch all class weights are 1 (docs/methods/losses.md#drw).
    """
    counts = LF.as_counts(class_counts)
    return LDAM(LF.ldam_margins(counts, max_m), s, LF.effective_number_weights(counts, beta), drw_epoch)


@LOSSES.register("kps")
def kps(
    class_counts: Sequence[int],
    *,
    max_m: float = 0.5,
    s: float = 15.0,
    ga_epoch: int | None = 120,
    ga_max: float = 50.0,
    mirror: str = "rank",
) -> LossModule:
    """KPS, FFN stage 1 (docs/methods/losses.md#kps): s = 15, GA from epoch 120 (0-based), scales in [s, 50].

    max_m = 0.5 is FFN's CIFAR-100 value (0.2 CIFAR-10, 0.35 ImageNet-LT). ``mirror``: ``rank`` pairs
    head and tail by frequency rank; ``index`` by reversed class index, as the released code (L1).
    """
    if ga_max < s:
        raise LtreproError(f"loss 'kps': bad value {ga_max!r} for parameter 'ga_max'; allowed: a number >= s ({s})")
    counts = LF.as_counts(class_counts)
    pairing = LF.index_mirror(len(counts)) if mirror == "index" else LF.frequency_mirror(counts)
    sensitivity, margins = LF.kps_sensitivity(counts), LF.kps_margins(counts, max_m, pairing)
    return KPS(sensitivity, margins, LF.kps_ga_scales(counts, s, ga_max, pairing), s, ga_epoch)


@LOSSES.register("las")
def las(class_counts: Sequence[int], *, smooth_head: float = 0.4, smooth_tail: float = 0.1) -> LossModule:
    """MiSLAS label-aware smoothing (docs/methods/losses.md#las); 0.4 / 0.1: MiSLAS's CIFAR-100-LT IF 100 config.

    MiSLAS uses 0.3 / 0.0 for CIFAR-10-LT IF 100, CIFAR-100-LT IF 50, ImageNet-LT and iNat 2018.
    """
    return LabelAwareSmoothing(LF.las_smoothing(LF.as_counts(class_counts), smooth_head, smooth_tail))


@LOSSES.register("balanced_softmax")
def balanced_softmax(class_counts: Sequence[int]) -> LossModule:
    """Balanced softmax CE(z + log n, y).

    Ren et al. 2020 ("Balanced Meta-Softmax for Long-Tailed Visual Recognition").
    """
    return OffsetCrossEntropy(torch.log(LF.as_counts(class_counts)))


@LOSSES.register("logit_adjusted")
def logit_adjusted(class_counts: Sequence[int], *, tau: float = 1.0) -> LossModule:
    """Logit-adjusted CE(z + tau log pi, y), Menon et al. 2021; tau = 1 equals balanced softmax."""
    return OffsetCrossEntropy(LF.logit_adjustment(LF.as_counts(class_counts), tau))


def _real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and abs(float(value)) < float("inf")


def _epoch(value: object) -> bool:
    return value is None or (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0)


def _fraction(value: object) -> bool:
    return _real(value) and 0 <= value <= 1


# Every factory parameter, with what build_loss accepts for it.
PARAMETER_RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "s": (lambda v: _real(v) and v > 0, "a number > 0"),
    "max_m": (lambda v: _real(v) and v >= 0, "a number >= 0"),
    "beta": (lambda v: _real(v) and 0 <= v < 1, "a number in [0, 1)"),
    "gamma": (lambda v: _real(v) and v >= 0, "a number >= 0"),
    "tau": (_real, "a finite number"),
    "drw_epoch": (_epoch, "null (off) or an epoch >= 0"),
    "ga_epoch": (_epoch, "null (never) or an epoch >= 0"),
    "ga_max": (lambda v: _real(v) and v > 0, "a number > 0"),
    "smooth_head": (_fraction, "a number in [0, 1]"),
    "smooth_tail": (_fraction, "a number in [0, 1]"),
    "mirror": (lambda v: v in ("rank", "index"), "'rank' (frequency rank) or 'index' (the released code's reversed class index)"),
}


def loss_parameters(name: str) -> list[str]:
    """The keyword parameters that loss ``name`` accepts, in signature order."""
    return [p for p in inspect.signature(LOSSES.get(name)).parameters if p != "class_counts"]


def build_loss(name: str, class_counts: Sequence[int], **params: object) -> LossModule:
    """Build loss ``name`` for these training class counts (class-index order).

    Raises LtreproError for an unknown loss, an unknown or out-of-range parameter (naming the
    allowed ones), or counts that are not integers >= 1.
    """
    allowed = loss_parameters(name)
    for key, value in params.items():
        if key not in allowed:
            raise LtreproError(f"loss {name!r}: unknown parameter {key!r}; allowed: {', '.join(allowed) or 'none'}")
        accepts, requirement = PARAMETER_RULES[key]
        if not accepts(value):
            raise LtreproError(f"loss {name!r}: bad value {value!r} for parameter {key!r}; allowed: {requirement}")
    counts = LF.as_counts(class_counts)
    bad = torch.nonzero((counts < 1) | (counts != counts.round())).flatten()
    if counts.numel() == 0 or len(bad):
        detail = "none given" if counts.numel() == 0 else f"class {int(bad[0])} has {counts[bad[0]].item():g}"
        raise LtreproError(f"loss {name!r}: class_counts must be integers >= 1, one per class; {detail}")
    return LOSSES.get(name)(class_counts, **params)


__all__ = ["LOSSES", "PARAMETER_RULES", "LossModule", "build_loss", "loss_parameters"]
