"""Datasets by name; ``load_data`` resolves a config's dataset defaults and builds the splits."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from ltrepro.config import DataConfig
from ltrepro.data.base import DATASETS, DatasetSpec, LTData, Split
from ltrepro.errors import LtreproError

# Importing the source modules registers their datasets.
from ltrepro.data import cifar, file_lists, fmnist  # noqa: E402,F401


def resolve_data_config(cfg: DataConfig) -> DataConfig:
    """Replace ``null`` n_max / val_per_class / image_size with the dataset's own defaults."""
    try:
        spec: DatasetSpec = DATASETS.get(cfg.name)
    except LtreproError as exc:
        raise LtreproError(f"data.name: {exc}") from None
    return dataclasses.replace(
        cfg,
        n_max=cfg.n_max if cfg.n_max is not None else spec.n_max,
        val_per_class=cfg.val_per_class if cfg.val_per_class is not None else spec.val_per_class,
        image_size=cfg.image_size if cfg.image_size is not None else spec.image_size,
    )


def load_data(cfg: DataConfig, seed: int, root: Path) -> LTData:
    """Build the dataset of a resolved config, with data.root / data.path relative to ``root``."""
    located = dataclasses.replace(
        cfg, root=str(root / cfg.root), path=str(root / cfg.path) if cfg.path is not None else None
    )
    data = DATASETS.get(cfg.name).build(located, seed)
    data.info.update(split_sizes={"train": len(data.train), "val": len(data.val), "test": len(data.test)})
    return data


def data_hash(data: LTData) -> str:
    """Fingerprint of what a run trained and was evaluated on, from what was read: every split's
    labels and pixels (or image paths, for sets on disk), the LT indices and the split sizes. The
    split digests are computed on first use and kept in ``data.info`` (and so in data_info.json)."""
    if "content_digest" not in data.info:
        splits = {"train": data.train, "val": data.val, "test": data.test}
        data.info["content_digest"] = {name: split.digest() for name, split in splits.items()}
    keys = ("index_hash", "content_digest", "split_sizes")
    payload = json.dumps({"name": data.name, **{k: data.info.get(k) for k in keys}}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


__all__ = ["DATASETS", "DatasetSpec", "LTData", "Split", "data_hash", "load_data", "resolve_data_config"]
