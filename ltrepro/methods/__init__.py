"""Methods by name: each a small graph of stages with named inputs, declared reads and tunables.

A method is declared once, in a module of its own: its stages (each built by a stage builder from
the config block that drives it and the finished runs it takes as inputs), the config values each
stage reads, its own config blocks (``ltrepro.config.register_block``) and the parameters Optuna
may tune. The runner (``ltrepro.runner``) executes any registered method, keys every stage by what
it reads (``ltrepro.stage_keys``) and reuses a finished stage of the same key. Adding a method is
adding a module here (or anywhere that is imported) that calls ``register``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ltrepro.config import Config
from ltrepro.data import LTData
from ltrepro.errors import LtreproError
from ltrepro.registry import Registry
from ltrepro.stages import StagePlan

StageBuilder = Callable[[Config, LTData, dict[str, Path], torch.device], StagePlan]


@dataclass(frozen=True)
class Stage:
    """One training stage of a method.

    ``section`` is the config block that drives it (its epochs, optimiser, schedule: the plan
    fields every stage reads); ``reads`` names every other value its builder reads, as dotted keys
    (``stage2.loss``, ``ffn.lam``) or whole blocks (``h2t``): these and the section's plan fields,
    with data, model, seed, the builder's identity and the inputs' keys, make the stage key. The
    builder sees only those values, so an undeclared read fails instead of escaping the key.
    ``overrides`` gives stage-specific values on top (FFN's KPS branch); ``inputs`` names earlier
    stages whose selected checkpoints ``build`` receives. ``loads`` says which of them the builder
    loads under a given config (default: all); one it does not load only orders the stages, so it
    enters neither the key nor what ``build`` receives (bns_ipdpp's probe, unless the fine-tune's
    head starts from it).
    """

    name: str
    section: str
    build: StageBuilder
    inputs: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    overrides: Callable[[Config], dict] = lambda cfg: {}
    loads: Callable[[Config], tuple[str, ...]] | None = None

    def loaded_inputs(self, cfg: Config) -> tuple[str, ...]:
        return self.inputs if self.loads is None else self.loads(cfg)


@dataclass(frozen=True)
class Tunable:
    """A config key Optuna may tune, with its search range (``integer``: an int-valued key)."""

    key: str
    low: float
    high: float
    log: bool = False
    integer: bool = False


@dataclass(frozen=True)
class ReferenceBehaviour:
    """A way the method's released code differs from ltrepro's default that changes results, kept
    as a flag: ``overrides`` reproduce the released code. ``label`` is the difference's label in
    the method card (docs/methods/), ``setting`` what both sides of the comparison run with so the
    effect can show (a shuffled class order where rank and index coincide on a sorted profile),
    ``stage`` the stage whose test metrics show it (None: the final one). ``optimism``: the
    released code selects its epoch on the test set; the effect is then the audited run's best test
    epoch against its validation-selected one (``ltrepro report --optimism``), not a second run."""

    label: str
    what: str
    overrides: tuple[str, ...]
    setting: tuple[str, ...] = ()
    stage: str | None = None
    optimism: bool = False



SHUFFLED_CLASSES = ("data.class_order_seed=1",)  # a setting where frequency rank and class index differ


def selection_on_test(label: str, what: str = "best test epoch kept") -> ReferenceBehaviour:
    """The released code keeps the epoch that scores best on the test set (measured by the audit)."""
    return ReferenceBehaviour(label, what, ("audit.test_every_epoch=true",), optimism=True)


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    stages: tuple[Stage, ...]
    tunables: tuple[Tunable, ...] = field(default_factory=tuple)
    reference: tuple[ReferenceBehaviour, ...] = field(default_factory=tuple)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "summary": self.summary,
            "stages": [
                {"name": s.name, "config": s.section, "inputs": list(s.inputs), "reads": list(s.reads)} for s in self.stages
            ],
            "tunables": [
                {"key": t.key, "low": t.low, "high": t.high, "log": t.log, "integer": t.integer} for t in self.tunables
            ],
            "reference": [
                {"label": r.label, "what": r.what, "overrides": list(r.overrides), "setting": list(r.setting),
                 "stage": r.stage, "optimism": r.optimism} for r in self.reference
            ],  # fmt: skip
        }

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise LtreproError(f"method {self.name!r} has no stage {name!r}; its stages: {[s.name for s in self.stages]}")

    def is_final(self, stage: Stage) -> bool:
        """Whether ``stage`` makes the method's model (its last stage: what evaluate and export read)."""
        return stage.name == self.stages[-1].name

    def depth(self, stage: Stage) -> int:
        """1 for a stage without inputs, else one more than its deepest input (dvc.yaml's slots)."""
        return 1 + max((self.depth(self.stage(name)) for name in stage.inputs), default=0)


METHODS: Registry[Method] = Registry("method")


def register(method: Method) -> Method:
    names = [stage.name for stage in method.stages]
    for stage in method.stages:
        missing = [name for name in stage.inputs if name not in names[: names.index(stage.name)]]
        if missing:
            raise ValueError(f"method {method.name}: stage {stage.name} takes {missing}, not an earlier stage")
    return METHODS.register(method.name)(method)


# Importing the method modules registers them.
from ltrepro.methods import baselines, bns_ipdpp, ffn, fsgl, h2t, posthoc  # noqa: E402,F401
