"""Typed configuration: params.yaml loaded into dataclasses, ``key.sub=value`` overrides, validation.

params.yaml is the one place where defaults live. The CLI, MLproject, dvc.yaml and Optuna only
pass overrides, which are applied to the same dataclasses and validated before any work starts:
an unknown key, a wrong type or an out-of-range value fails at once naming the key path and what
is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
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
    """Training augmentation, run batch-wise on the device for in-memory datasets (docs/methods/README.md#augmentation)."""

    crop_padding: int = bounded(4, 0, 64)  # random crop of the input size after zero padding
    flip: bool = True  # random horizontal flip
    cutout: int = bounded(0, 0, 512)  # side of a random square set to zero; 0 = off


@dataclass
class DataConfig:
    """Which dataset, how its long-tailed subset is drawn, and where validation comes from.

    ``null`` for n_max, val_per_class and image_size means the dataset's own default; the run
    logs the resolved values. ``split``, ``split_seed`` and ``class_order_seed`` apply only to datasets drawn from a
    balanced pool; validation is drawn with the run seed whatever ``split_seed`` says.
    """

    name: str = "fmnist_lt"
    root: str = "data/raw"  # where `ltrepro data prepare` puts files and loaders look for them
    path: str | None = None  # a dataset's own folder when it is not under root (image folders)
    n_max: int | None = bounded(None, 1)  # images in the largest class
    imbalance: float = bounded(100.0, 1.0)  # IF = n_max / n_min
    # which images of each class the LT subset keeps (docs/methods/README.md#long-tailed-cifar):
    # ldam (shuffle, first n_c), glmc (GLMC/FSGL choice without replacement), first_n (file order)
    split: Literal["ldam", "glmc", "first_n"] = "ldam"
    split_seed: int | None = bounded(None, 0, 2**31 - 1)  # seed of the LT draw; null: the run's seed
    # null: class c gets the c-th largest count (sorted ids, as every reference); s: the counts dealt
    # out by RandomState(s).permutation(C), so class index and frequency rank differ
    class_order_seed: int | None = bounded(None, 0, 2**31 - 1)
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
class SamConfig:
    """Sharpness-aware minimisation (Foret et al., ICLR'21, Eq. 2; adaptive: Kwon et al., ICML'21, Eq. 9)."""

    rho: float = bounded(0.05, 0.0)  # radius of the weight perturbation
    adaptive: bool = False  # ASAM: the perturbation scaled by |w| element-wise


@dataclass
class StageConfig:
    """One training stage: optimiser, update rule, schedule, sampler, loss, head, mixup, FCC, selection."""

    epochs: int = bounded(60, 1)
    batch_size: int = bounded(64, 2)
    eval_batch_size: int = bounded(1000, 1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = bounded(0.1, 0.0)
    momentum: float = bounded(0.9, 0.0, 1.0)  # sgd
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    weight_decay: float = bounded(5e-4, 0.0)
    decay_1d: bool = True  # false: 1-d parameters (BN affine, biases, LWS scales) get no weight decay
    update: Literal["plain", "sam"] = "plain"  # sam: two forward/backward passes a step (sam.rho)
    sam: SamConfig = field(default_factory=SamConfig)
    warmup_epochs: int = bounded(5, 0)
    schedule: Literal["cosine", "multistep"] = "cosine"
    milestones: list[int] = field(default_factory=lambda: [160, 180])
    gamma: float = bounded(0.1, 0.0, 1.0)
    mixup_alpha: float = bounded(0.0, 0.0)  # 0 = off
    sampler: Literal["instance", "class_balanced", "sqrt", "progressive"] = "instance"
    select: Literal["best_val", "last"] = "best_val"
    loss: str = "ce"  # a registered loss (ltrepro.losses)
    loss_params: dict[str, Any] = field(default_factory=dict)  # the loss's own parameters
    head: Literal["linear", "cosine"] = "linear"
    fcc: float = bounded(0.0, 0.0)  # FCC gamma (docs/methods/fcc.md); 0 = off
    fcc_start_epoch: int = bounded(0, 0)  # FCC scales features from epoch fcc_start_epoch + 1 (1-based)
    fcc_by_index: bool = False  # true: FCC factors by class id, as the released code (FC2), not by frequency rank


@dataclass
class ClassifierStageConfig(StageConfig):
    """Stage 2: frozen backbone(s), a classifier trained from ``init``, BN handled as ``bn``."""

    init: Literal["stage1", "random"] = "stage1"  # the stage-1 head, or a fresh one (cRT)
    bn: Literal["eval", "shift"] = "eval"  # frozen statistics, or MiSLAS shift (running stats follow)
    head_lr_factor: float = bounded(1.0, 0.0)  # with LWS: classifier lr = lr * factor, scales at lr


def classifier_stage_defaults() -> ClassifierStageConfig:
    """params.yaml's stage2 block: a short class-balanced schedule, no warm-up."""
    return ClassifierStageConfig(
        epochs=10, batch_size=128, lr=0.02, warmup_epochs=0, milestones=[], sampler="class_balanced"
    )


@dataclass
class TuneConfig:
    """An Optuna study over cfg.method's declared tunables (``ltrepro tune``)."""

    study: str | None = None  # null: "<method>-<dataset>"
    storage: str | None = None  # an RDB URL; null: sqlite:///<project root>/optuna.db
    trials: int = bounded(20, 1)  # the study's total of complete + pruned trials (--resume goes on to it)
    pruner: Literal["median", "hyperband", "none"] = "median"
    startup_trials: int = bounded(3, 0)  # median pruner: trials never pruned, to form the median
    warmup_epochs: int = bounded(3, 0)  # epochs a trial runs before it may be pruned
    sampler_seed: int | None = None  # TPE seed; null: cfg.seed (give each worker its own)
    space: dict[str, Any] = field(default_factory=dict)  # narrower ranges, e.g. {"ffn": {"lam": [0.3, 0.9]}}
    best_dir: str = "tuned"  # the best params go to <best_dir>/<study>.yaml


@dataclass
class RegistryConfig:
    """The MLflow model registry that ``ltrepro export`` registers into and ``ltrepro promote`` decides on."""

    name: str | None = None  # null: "ltrepro-<dataset>"
    margin: float = bounded(0.5, 0.0, 100.0)  # champion moves when the challenger's val top-1 is higher by > margin points


@dataclass
class DistributedConfig:
    """Under ``torchrun --nproc_per_node=N`` (ltrepro.distributed). A stage's ``batch_size`` is the
    global batch over all N processes and its ``lr`` belongs to that batch, so N processes train as
    one does; to use N times the batch, raise ``batch_size`` and ``lr`` together (the linear rule,
    Goyal et al. 2017, with the stage's warm-up)."""

    sync_bn: bool = False  # SyncBatchNorm: batch statistics over the global batch, not each rank's share (CUDA only)


@dataclass
class AuditConfig:
    """The test-selection audit (``ltrepro report --optimism``): off by default, and never read by
    model selection, tuning or promotion."""

    test_every_epoch: bool = False  # read the test split after every epoch, logged only as audit/test_top1


@dataclass
class BaseConfig:
    """The blocks every method shares; ``config_class()`` adds the blocks that methods register."""

    seed: int = bounded(0, 0, 2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out_dir: str = "runs"  # checkpoints go to <out_dir>/<run name>/
    experiment: str = "ltrepro"  # MLflow experiment
    method: str = "ffn"  # a registered method (`ltrepro methods`)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: ClassifierStageConfig = field(default_factory=classifier_stage_defaults)
    tune: TuneConfig = field(default_factory=TuneConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    recipes: dict[str, Any] = field(default_factory=dict)  # per-method overrides, applied when it runs


Config = BaseConfig  # for annotations; instances are of ``config_class()``, which has the method blocks too
BLOCKS: dict[str, type] = {}  # method blocks by top-level key (ffn, h2t, ...), added by ``register_block``


def register_block(name: str, cls: type) -> type:
    """Add a method's own config block (a dataclass whose defaults equal params.yaml's) as top-level key ``name``."""
    shared = {f.name for f in dataclasses.fields(BaseConfig)}
    if name in shared or BLOCKS.get(name, cls) is not cls:
        raise ValueError(f"config block {name!r} is registered twice")
    BLOCKS[name] = cls
    config_class.cache_clear()
    return cls


def unregister_block(name: str) -> None:
    """Remove a block (tests register toy methods and their blocks, then remove them)."""
    BLOCKS.pop(name, None)
    config_class.cache_clear()


@functools.cache
def config_class() -> type:
    """The full configuration: the shared blocks plus every registered method block."""
    import ltrepro.methods  # noqa: F401  (registering the methods registers their blocks)

    extra = [(name, cls, field(default_factory=cls)) for name, cls in BLOCKS.items()]
    return dataclasses.make_dataclass("Config", extra, bases=(BaseConfig,))


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}.get(tp, str(tp))


# A number as people write it: 1e-3, 5E-4, 1.0e3, .5, -2. YAML 1.1 reads a float only with a dot
# and a signed exponent, so 1e-3 and 1.0e3 arrive as strings.
DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def read_numbers(value: Any) -> Any:
    """Strings YAML 1.1 leaves unread (1e-3, 5E-4, 1.0e3) as floats, through nested mappings and
    lists: the free-form blocks (loss_params, tune.space) hold numbers the schema cannot name."""
    if isinstance(value, str) and EXPONENT.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {key: read_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [read_numbers(item) for item in value]
    return value


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
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return read_numbers(value)
    elif tp is float:
        if isinstance(value, str) and DECIMAL.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise LtreproError(f"{key}: got {value!r}, expected {_describe(tp)}")


def _build(default: Any, values: Any, prefix: str) -> Any:
    """A copy of the dataclass instance ``default`` with ``values`` validated and applied."""
    if not isinstance(values, dict):
        raise LtreproError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    cls = type(default)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise LtreproError(f"unknown key {prefix}{unknown[0]}; allowed: {', '.join(fields)}")
    changes = {}
    for name, value in values.items():
        key, tp = prefix + name, hints[name]
        if dataclasses.is_dataclass(tp):
            changes[name] = _build(getattr(default, name), value, key + ".")
            continue
        value = _coerce(value, tp, key)
        low, high = fields[name].metadata.get("min"), fields[name].metadata.get("max")
        if value is not None and ((low is not None and value < low) or (high is not None and value > high)):
            allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise LtreproError(f"{key}: {value!r} is out of range; allowed: {allowed}")
        changes[name] = value
    return dataclasses.replace(default, **changes)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``stage1.lr=0.05`` -> (["stage1", "lr"], 0.05); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise LtreproError(f"override {text!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise LtreproError(f"override {text!r}: value is not valid YAML ({yaml_problem(exc)})") from None
    return key.split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Set each ``key.sub=value`` in a nested dict (in place); unknown keys are caught by validation."""
    for text in overrides:
        path, value = parse_override(text)
        set_path(values, path, value, text)
    return values


def set_path(values: dict, path: list[str], value: Any, text: str) -> None:
    """``values[path[0]][path[1]]... = value``, creating sections; ``text`` names the setting in errors."""
    node = values
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise LtreproError(f"override {text!r}: {part} is not a section")
        node = child
    node[path[-1]] = value


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (1-based line and column)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or ' '.join(str(exc).split())}{where}"


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise LtreproError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise LtreproError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None
    if not isinstance(values, dict):
        raise LtreproError(f"{path}: expected a mapping of keys, got {type(values).__name__}")
    return values


def load_config(path: str | Path | None | list = "params.yaml", overrides: list[str] = ()) -> Config:
    """Load params.yaml (or the dataclass defaults when path is None), apply the method's recipe,
    then any further files (``path`` may be a list: params.yaml first, e.g. a paper-recipe file
    after it), then the ``key.sub=value`` overrides."""
    paths = [Path(p) for p in (path if isinstance(path, list) else [path] if path is not None else [])]
    layers = [read_yaml(p) for p in paths]
    return _build(config_class()(), with_recipe(layers[0] if layers else {}, layers[1:], list(overrides)), "")


def with_recipe(values: dict, layers: list[dict], overrides: list[str]) -> dict:
    """params.yaml, then the chosen method's ``recipes`` entry, then later files, then the overrides.

    Every recipe is validated now, so a typo in any method's recipe fails at load, not mid-run.
    """
    recipes = values.get("recipes") or {}
    if not isinstance(recipes, dict):
        raise LtreproError(f"recipes: expected a mapping of method name to overrides, got {recipes!r}")
    for name, recipe in recipes.items():
        _build(config_class()(), recipe, f"recipes.{name}.")
    later = {}
    for layer in layers:
        later = deep_merge(later, layer)
    method = apply_overrides(deep_merge(values, later), overrides).get("method", BaseConfig.method)
    return apply_overrides(deep_merge(deep_merge(values, recipes.get(method) or {}), later), overrides)


def deep_merge(base: dict, extra: dict) -> dict:
    """A copy of ``base`` with ``extra``'s leaves written over it."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def with_overrides(cfg: Config, values: dict) -> Config:
    """``cfg`` with a nested dict of overrides validated and applied (method recipes, trials)."""
    return _build(cfg, values, "")


def is_config_key(key: str) -> bool:
    """Whether ``key`` names a config value (``seed``, ``stage1.lr``, ``ffn.lam``), so the CLI can
    take ``key=value`` anywhere on its command line, and MLflow's ``--key value`` form too."""
    root, dot, _ = key.partition(".")
    hints = typing.get_type_hints(config_class())
    return root in hints and (bool(dot) or not dataclasses.is_dataclass(hints[root]))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def unflatten(flat: dict[str, Any]) -> dict:
    """{"ffn.lam": 0.7} -> {"ffn": {"lam": 0.7}}: the inverse of ``flatten``."""
    values: dict = {}
    for key, value in flat.items():
        set_path(values, key.split("."), value, key)
    return values


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"stage1.lr": 0.1, ...}, the form MLflow params take."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
