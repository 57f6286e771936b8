"""Stage keys: what decides a stage's result, hashed, so a finished stage is reused exactly when
it would be trained again with the same outcome.

A key covers the stage builder's identity (module and name: two builders never share a key), the
values the stage reads (its section's plan fields and its declared ``reads``), the data (but the
loader's worker count), the model, the seed and the keys of the inputs it loads. A value the stage does
not read never enters it. The builder runs on a ``ConfigView`` that lets it read only those
values, so a read the stage forgot to declare fails loudly instead of escaping the key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from fnmatch import fnmatch
from typing import TYPE_CHECKING, Any

from ltrepro.config import Config, config_class, flatten, to_dict
from ltrepro.data.lt import draw_seed
from ltrepro.errors import LtreproError

if TYPE_CHECKING:
    from ltrepro.methods import Method, Stage

KEY_VERSION = 2  # 1: section block + method name; 2: builder identity + declared reads
# Fields of a stage's section that the engine and the shared plan helpers read for every stage.
PLAN_FIELDS = (
    "epochs", "batch_size", "eval_batch_size", "optimizer", "lr", "momentum", "nesterov", "betas", "weight_decay",
    "decay_1d", "update", "sam", "warmup_epochs", "schedule", "milestones", "gamma", "select",
)  # fmt: skip
ALWAYS_READ = ("data", "model", "seed")
NOT_IN_KEY = ("data.num_workers",)  # how fast batches come, not which
# Fields added after version 2, left out of a key while they hold their default: every earlier key
# stays valid, and a run that sets one gets a key of its own.
LATE_FIELDS = {"data.class_order_seed": None, "*.fcc_by_index": False}
# Keys no stage reads that are not method settings: where runs go, how they are tuned and registered.
GLOBAL_KEYS = ("seed", "device", "out_dir", "experiment", "method", "tune", "registry", "distributed", "audit", "recipes")


def builder_id(stage: "Stage") -> str:
    return f"{stage.build.__module__}:{stage.build.__qualname__}"


def stage_reads(stage: "Stage") -> list[str]:
    """Every config key the stage reads, as dotted paths (a path may be a whole block)."""
    return sorted({*ALWAYS_READ, *(f"{stage.section}.{name}" for name in PLAN_FIELDS), *stage.reads})


def covers(paths: list[str] | tuple[str, ...], key: str) -> bool:
    """Whether ``key`` is one of ``paths`` or lies inside one of them."""
    return any(key == path or key.startswith(path + ".") for path in paths)


def read_value(cfg: Any, path: str) -> Any:
    node = cfg
    for part in path.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return to_dict(node) if dataclasses.is_dataclass(node) else node


def without_late_defaults(values: dict, prefix: str = "") -> dict:
    """``values`` without the fields of ``LATE_FIELDS`` that hold their default, at any depth."""
    kept = {}
    for name, value in values.items():
        path = prefix + name
        if isinstance(value, dict):
            value = without_late_defaults(value, path + ".")
        elif any(fnmatch(path, pattern) and type(value) is type(default) and value == default
                 for pattern, default in LATE_FIELDS.items()):  # fmt: skip
            continue
        kept[name] = value
    return kept


def canonical_data(data: dict, seed: int) -> dict:
    """The data block with the LT draw's seed written one way: null when the draw uses the run seed
    (``split_seed`` null or equal to ``seed``) or draws nothing at random (first_n), so two
    configs that draw the same subset share a key."""
    if draw_seed(data["split"], data["split_seed"], seed) in (None, seed):
        return {**data, "split_seed": None}
    return data


def stage_key(cfg: Config, stage: "Stage", input_keys: dict[str, str]) -> str:
    """The key of ``stage`` run with ``cfg`` (already carrying the stage's overrides)."""
    values = {path: read_value(cfg, path) for path in stage_reads(stage)}
    for path in NOT_IN_KEY:
        block, _, name = path.partition(".")
        values[block] = {k: v for k, v in values[block].items() if k != name}
    values["data"] = canonical_data(values["data"], cfg.seed)
    values = without_late_defaults(values)
    loaded = stage.loaded_inputs(cfg)
    payload = {"version": KEY_VERSION, "builder": builder_id(stage), "section": stage.section, "reads": values,
               "inputs": {name: key for name, key in input_keys.items() if name in loaded}}  # fmt: skip
    if cfg.audit.test_every_epoch:  # an audited run is a run of its own; off, every key is as it was
        payload["audit"] = True
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class ConfigView:
    """Read-only access to the parts of a config that ``allowed`` names; anything else raises."""

    def __init__(self, node: Any, allowed: list[str], label: str, prefix: str = "") -> None:
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_allowed", allowed)
        object.__setattr__(self, "_label", label)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._node, name)
        path = self._prefix + name
        if covers(self._allowed, path):
            return value
        if dataclasses.is_dataclass(value):  # a block: its values are checked as they are read
            return ConfigView(value, self._allowed, self._label, path + ".")
        raise LtreproError(
            f"{self._label} read {path}, which the stage does not declare in its reads (so it would not enter "
            f"the stage key); add it to the Stage's reads"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a stage builder's config is read-only")


def builder_view(cfg: Config, method: "Method", stage: "Stage") -> ConfigView:
    return ConfigView(cfg, stage_reads(stage), f"{method.name}/{stage.name}")


def unread_settings(cfg: Config, method: "Method") -> list[str]:
    """Keys whose value differs from its default (params.yaml's, which the dataclasses mirror)
    that no stage of ``method`` reads: setting them changes nothing but the user may think it does."""
    reads = [path for stage in method.stages for path in stage_reads(stage)]
    defaults = flatten(to_dict(config_class()()))
    changed = [key for key, value in flatten(to_dict(cfg)).items() if defaults.get(key, value) != value]
    return [key for key in changed if not covers(reads, key) and not covers(GLOBAL_KEYS, key) and key not in NOT_IN_KEY]
