"""Methods by name: each a small graph of stages with named inputs and tunable parameters.

A method is declared once, here or in a module of this package: its stages (a representation
stage trains a network; a classifier stage loads earlier stages' checkpoints), which config block
drives each, and the parameters Optuna may tune with their search ranges. The stage runner
(``ltrepro.runner``) executes any registered method and reuses a finished stage of the same config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

from ltrepro.config import Config
from ltrepro.data import LTData
from ltrepro.registry import Registry
from ltrepro.stages import StagePlan

StageBuilder = Callable[[Config, LTData, dict[str, Path], torch.device], StagePlan]


@dataclass(frozen=True)
class Stage:
    """One training stage of a method.

    ``section`` is the config block that drives it (its epochs, lr, sampler, loss ...);
    ``overrides`` gives stage-specific values on top (FFN's KPS branch); ``inputs`` names earlier
    stages whose selected checkpoints ``build`` receives.
    """

    name: str
    section: Literal["stage1", "stage2"]
    build: StageBuilder
    inputs: tuple[str, ...] = ()
    overrides: Callable[[Config], dict] = lambda cfg: {}


@dataclass(frozen=True)
class Tunable:
    """A config key Optuna may tune, with its search range."""

    key: str
    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    stages: tuple[Stage, ...]
    tunables: tuple[Tunable, ...] = field(default_factory=tuple)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "summary": self.summary,
            "stages": [{"name": s.name, "config": s.section, "inputs": list(s.inputs)} for s in self.stages],
            "tunables": [{"key": t.key, "low": t.low, "high": t.high, "log": t.log} for t in self.tunables],
        }


METHODS: Registry[Method] = Registry("method")


def register(method: Method) -> Method:
    return METHODS.register(method.name)(method)


# Importing the method modules registers them.
from ltrepro.methods import baselines, ffn, h2t  # noqa: E402,F401
