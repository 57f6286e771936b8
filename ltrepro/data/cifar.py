"""CIFAR-10-LT and CIFAR-100-LT from the official "python version" pickles.

Profile and draw: docs/methods/README.md#long-tailed-cifar; augmentation: docs/methods/README.md#augmentation.

The files are the extracted archives from https://www.cs.toronto.edu/~kriz/cifar.html under
``<root>/cifar-10-batches-py/`` and ``<root>/cifar-100-python/``. The LT subset is drawn from the
50,000 training images with the LDAM-DRW profile and the draw data.split names (``lt_split``:
ldam, glmc or first_n, seeded by data.split_seed or the run seed), validation comes from the
images that draw left over (or is held out first with data.reserve), and the 10,000 test images
stay complete and balanced.

The pickles are read with an unpickler that can only rebuild numpy arrays, so a tampered file
cannot run code; with data.verify_checksums the data files must also match torchvision's md5s.
"""
from __future__ import annotations

import functools
import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ltrepro.config import DataConfig
from ltrepro.data.base import DATASETS, DatasetSpec, LTData, Split
from ltrepro.data.lt import index_hash, lt_split
from ltrepro.errors import LtreproError

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
DOWNLOAD_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its files and under which keys its pickles store labels."""

    name: str
    folder: str
    archive: str
    num_classes: int
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str
    md5: dict[str, str]


CIFAR10 = CifarLayout(
    name="cifar10_lt",
    folder="cifar-10-batches-py",
    archive="cifar-10-python.tar.gz",
    num_classes=10,
    train_files=("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"),
    test_file="test_batch",
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    md5={
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
    },
)
CIFAR100 = CifarLayout(
    name="cifar100_lt",
    folder="cifar-100-python",
    archive="cifar-100-python.tar.gz",
    num_classes=100,
    train_files=("train",),
    test_file="test",
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    md5={"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
)


def _encode_latin1(text: str, encoding: str) -> bytes:
    """Stand-in for ``_codecs.encode``, which Python 3 uses to write bytes into protocol-2 pickles."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# Everything a CIFAR pickle may name: numpy's array rebuild (module path of numpy 1 and 2), and
# how Python 3 writes bytes in protocol 2. Nothing here can reach the file system or a shell.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _encode_latin1,
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global outside ``ALLOWED_GLOBALS`` before it is imported."""

    def __init__(self, handle: Any, path: Path) -> None:
        super().__init__(handle, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise LtreproError(
                f"{self.path}: refusing to load {module}.{name} from the pickle; "
                f"a CIFAR file holds only numpy arrays, lists and strings"
            )
        return ALLOWED_GLOBALS[(module, name)]


def cifar_file(directory: Path, name: str, layout: CifarLayout) -> Path:
    """The path of one file of the extracted archive, or an error saying how to get it."""
    path = directory / name
    if not path.is_file():
        raise LtreproError(
            f"missing CIFAR file {path}; download {layout.archive} from {DOWNLOAD_URL} "
            f"and extract it under {directory.parent}/"
        )
    return path


def load_pickle(path: Path, layout: CifarLayout) -> dict[str, Any]:
    """Safely unpickle one CIFAR file into a dict with str keys (Python 2 files may give bytes)."""
    try:
        with open(path, "rb") as handle:
            content = SafeUnpickler(handle, path).load()
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise LtreproError(f"{path}: truncated or corrupt pickle ({exc}); re-download {layout.archive}") from None
    if not isinstance(content, dict):
        raise LtreproError(f"{path}: expected a pickled dict, got {type(content).__name__}")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in content.items()}


def md5sum(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def verify_md5(path: Path, layout: CifarLayout) -> None:
    expected, actual = layout.md5[path.name], md5sum(path)
    if actual != expected:
        raise LtreproError(
            f"{path}: md5 {actual} does not match the official {expected}; re-download {layout.archive} "
            f"from {DOWNLOAD_URL} or set data.verify_checksums=false"
        )


def read_batch(path: Path, layout: CifarLayout, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x 3 x 32 x 32 uint8) and labels (N int64) of one data file, checked for shape and range."""
    if verify:
        verify_md5(path, layout)
    content = load_pickle(path, layout)
    for key in ("data", layout.label_key):
        if key not in content:
            raise LtreproError(f"{path}: no {key!r} entry; is this a {layout.folder} file?")
    data, labels = content["data"], np.asarray(content[layout.label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"shape {data.shape} dtype {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        raise LtreproError(f"{path}: 'data' should be an N x 3072 uint8 array, got {got}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise LtreproError(f"{path}: {layout.label_key!r} should hold {len(data)} integer labels, got {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= layout.num_classes):
        got = f"{labels.min()}..{labels.max()}"
        raise LtreproError(f"{path}: labels should lie in [0, {layout.num_classes}), got {got}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_split(directory: Path, files: tuple[str, ...], layout: CifarLayout, verify: bool) -> Split:
    batches = [read_batch(cifar_file(directory, name, layout), layout, verify) for name in files]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    return Split(labels, torch.from_numpy(images))


def read_class_names(directory: Path, layout: CifarLayout) -> list[str]:
    path = cifar_file(directory, layout.meta_file, layout)
    names = load_pickle(path, layout).get(layout.names_key)
    if not isinstance(names, list) or len(names) != layout.num_classes:
        raise LtreproError(f"{path}: expected {layout.num_classes} names under {layout.names_key!r}")
    return [name.decode("latin1") if isinstance(name, bytes) else str(name) for name in names]


def build(layout: CifarLayout, cfg: DataConfig, seed: int) -> LTData:
    directory = Path(cfg.path or cfg.root) / layout.folder
    pool = read_split(directory, layout.train_files, layout, cfg.verify_checksums)
    test = read_split(directory, (layout.test_file,), layout, cfg.verify_checksums)
    class_names = read_class_names(directory, layout)
    train_idx, val_idx, info = lt_split(
        pool.labels, layout.num_classes, cfg.n_max, cfg.imbalance, cfg.val_per_class, seed, cfg.reserve,
        split=cfg.split, split_seed=cfg.split_seed, class_order_seed=cfg.class_order_seed,
    )
    info.update(index_hash=index_hash(train_idx, val_idx), source=str(directory))
    return LTData(
        name=layout.name,
        num_classes=layout.num_classes,
        class_names=class_names,
        train=pool.subset(train_idx),
        val=pool.subset(val_idx),
        test=test,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        in_channels=3,
        image_size=32,
        info=info,
    )


DATASETS.register("cifar10_lt")(
    DatasetSpec(build=functools.partial(build, CIFAR10), n_max=5000, val_per_class=20, in_memory=True, image_size=32)
)
DATASETS.register("cifar100_lt")(
    DatasetSpec(build=functools.partial(build, CIFAR100), n_max=500, val_per_class=20, in_memory=True, image_size=32)
)
