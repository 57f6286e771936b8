"""What every dataset builder returns, and the registry of datasets by name."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ltrepro.errors import LtreproError
from ltrepro.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Split:
    """One split's images: in memory as a uint8 N x C x H x W tensor, or on disk as file paths."""

    labels: np.ndarray
    images: torch.Tensor | None = None
    paths: list[str] | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.images) if self.images is not None else len(self.paths or [])
        if n != len(self.labels):
            raise ValueError(f"split has {n} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def digest(self) -> str:
        """sha256 of what this split holds: its labels and pixels (in memory) or file paths (on disk)."""
        content = hashlib.sha256(self.labels.tobytes())
        if self.images is not None:
            content.update(self.images.contiguous().numpy())  # hashed in place, not copied
        for path in self.paths or []:
            content.update(path.encode() + b"\0")
        return content.hexdigest()

    def subset(self, indices: np.ndarray) -> "Split":
        images = self.images[torch.from_numpy(indices)] if self.images is not None else None
        paths = [self.paths[i] for i in indices] if self.paths is not None else None
        return Split(self.labels[indices], images, paths)


@dataclass
class LTData:
    """A long-tailed dataset ready for training: train (LT), val (for selection) and test splits.

    ``info`` carries what a run logs as artifacts: class counts, val counts, the LT index hash,
    the effective n_max and any carve-out that was made.
    """

    name: str
    num_classes: int
    class_names: list[str]
    train: Split
    val: Split
    test: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_channels: int
    image_size: int
    info: dict = field(default_factory=dict)

    @property
    def train_counts(self) -> np.ndarray:
        return np.bincount(self.train.labels, minlength=self.num_classes)


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its builder and the defaults that ``null`` in params.yaml resolves to.

    ``build(cfg, seed)`` takes the resolved ``DataConfig`` and the run seed and returns ``LTData``.
    ``n_max`` is None for datasets that are long-tailed as released (ImageNet-LT, iNat-2018).
    """

    build: Callable[..., LTData]
    n_max: int | None
    val_per_class: int
    in_memory: bool
    image_size: int


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else fail with a message naming it and how to get it."""
    if not path.is_file():
        raise LtreproError(f"missing {what}: {path}")
    return path
