"""Typed configuration: params.yaml loaded into dataclasses, ``key.sub=value`` overrides, validation.

params.yaml is the one place where defaults live. The CLI, MLproject, dvc.yaml and Optuna only
pass overrides, which are applied to the same dataclasses and validated before any work starts:
an unknown key, a wrong type or an out-of-range value fails at once naming the key path and what
is allowed.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ltrepro.errors import LtreproError


def bounded(default: Any, low: float | None = None, high: float | None = None, **kw: Any) -> Any:
    """A dataclass field with an inclusive allowed range, checked on load."""
    return field(default=default, metadata={"min": low, "max": high}, **kw)


@dataclass
class AugmentConfig:
    """Training augmentation, run batch-wise on the device for in-memory datasets (spec §1.2)."""

    crop_padding: int = bounded(4, 0, 64)  # random crop of the input size after zero padding
    flip: bool = True  # random horizontal flip
    cutout: int = bounded(0, 0, 512)  # side of a random square set to zero; 0 = off


@dataclass
class DataConfig:
    """Which dataset, how its long-tailed subset is drawn, and where validation comes from.

    ``null`` for n_max, val_per_class and image_size means the dataset's own default; the run
    logs the resolved values.
    """

    name: str = "fmnist_lt"
    root: str = "data/raw"  # where `ltrepro data prepare` puts files and loaders look for them
    path: str | None = None  # a dataset's own folder when it is not under root (image folders)
    n_max: int | None = bounded(None, 1)  # images in the largest class
    imbalance: float = bounded(100.0, 1.0)  # IF = n_max / n_min
    val_per_class: int | None = bounded(None, 0)
    reserve: bool = False  # hold validation out of every class before the LT draw
    verify_checksums: bool = True
    image_size: int | None = bounded(None, 8, 1024)
    num_workers: int = bounded(2, 0, 64)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    name: str = "resnet32"
    in_channels: int | None = bounded(None, 1, 16)  # null: the dataset's channels


@dataclass
class StageConfig:
    """One training stage: optimiser, schedule, sampler, mixup and checkpoint selection."""

    epochs: int = bounded(200, 1)
    batch_size: int = bounded(128, 2)
    eval_batch_size: int = bounded(512, 1)
    lr: float = bounded(0.1, 0.0)
    momentum: float = bounded(0.9, 0.0, 1.0)
    nesterov: bool = False
    weight_decay: float = bounded(2e-4, 0.0)
    warmup_epochs: int = bounded(5, 0)
    schedule: Literal["cosine", "multistep"] = "cosine"
    milestones: list[int] = field(default_factory=lambda: [160, 180])
    gamma: float = bounded(0.1, 0.0, 1.0)
    mixup_alpha: float = bounded(0.0, 0.0)  # 0 = off
    sampler: Literal["instance", "class_balanced", "sqrt", "progressive"] = "instance"
    select: Literal["best_val", "last"] = "best_val"


@dataclass
class Config:
    seed: int = bounded(0, 0, 2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out_dir: str = "runs"  # checkpoints go to <out_dir>/<run name>/
    experiment: str = "ltrepro"  # MLflow experiment
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: StageConfig = field(default_factory=StageConfig)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
            if option is not type(None) and value is not None:
                return _coerce(value, option, key)
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise LtreproError(f"{key}: got {value!r}, expected {_describe(tp)}")


def _build(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise LtreproError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise LtreproError(f"unknown key {prefix}{unknown[0]}; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        key, tp = prefix + name, hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".")
            continue
        value = _coerce(value, tp, key)
        low, high = fields[name].metadata.get("min"), fields[name].metadata.get("max")
        if value is not None and ((low is not None and value < low) or (high is not None and value > high)):
            allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise LtreproError(f"{key}: {value!r} is out of range; allowed: {allowed}")
        kwargs[name] = value
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``stage1.lr=0.05`` -> (["stage1", "lr"], 0.05); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise LtreproError(f"override {text!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise LtreproError(f"override {text!r}: value is not valid YAML ({exc.problem})") from None
    return key.split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Set each ``key.sub=value`` in a nested dict; unknown keys are caught by validation."""
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise LtreproError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return values


def load_config(path: str | Path | None = "params.yaml", overrides: list[str] = ()) -> Config:
    """Load params.yaml (or start from the dataclass defaults when path is None), apply overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LtreproError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise LtreproError(f"{path}: not valid YAML ({exc})") from None
    return _build(Config, apply_overrides(values, list(overrides)), "")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"stage1.lr": 0.1, ...}, the form MLflow params take."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
