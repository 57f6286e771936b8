"""Fashion-MNIST-LT, the embedded default, from Debian's ``dataset-fashion-mnist`` package.

``ltrepro data prepare`` gunzips the package's idx files into ``<data.root>/fashion-mnist/``
(the Debian files are re-gzipped, so torchvision's md5 checks would not match them) and writes
a manifest with their sha256, against which every load checks the bytes it reads
(``data.verify_checksums``; about 0.06 s for the 55 MB on a 2-core VM). The LT subset is drawn from the 60,000 training images and the
validation split from the images it did not take (data.split chooses the draw, as for CIFAR);
the 10,000 test images stay balanced.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

from ltrepro.config import DataConfig
from ltrepro.data.base import DATASETS, DatasetSpec, LTData, Split
from ltrepro.data.lt import index_hash, lt_split
from ltrepro.errors import LtreproError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
INSTALL_HINT = "install it with: sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"


def read_idx(path: Path, sha256: str | None = None) -> np.ndarray:
    """Read an idx file (optionally gzipped): 2 zero bytes, dtype code 0x08 (uint8), ndim, dims.
    With ``sha256``, the bytes read must have that digest (same-size corruption is caught too)."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise LtreproError(f"missing dataset file: {path}") from None
    except (OSError, EOFError) as exc:
        raise LtreproError(f"{path}: unreadable or truncated gzip ({exc})") from None
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise LtreproError(
            f"{path}: its sha256 differs from manifest.json's: the file changed after `ltrepro data prepare`; "
            f"prepare it again (or set data.verify_checksums=false)"
        )
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise LtreproError(f"{path}: not an idx file of unsigned bytes (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise LtreproError(f"{path}: truncated idx header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise LtreproError(
            f"{path}: truncated or corrupt idx file: header promises {expected} bytes of data "
            f"for shape {tuple(dims)}, file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def raw_dir(root: str | Path) -> Path:
    return Path(root) / "fashion-mnist"


def ensure_debian_package(source: Path) -> None:
    """Install ``dataset-fashion-mnist`` when its files are absent and we are root; else explain."""
    if all((source / f"{name}.gz").is_file() for name in FILES.values()):
        return
    if source != DEBIAN_DIR:
        raise LtreproError(f"Fashion-MNIST idx .gz files not found in {source}")
    if os.geteuid() != 0:
        raise LtreproError(f"Fashion-MNIST not found in {source}; {INSTALL_HINT}")
    print("Fashion-MNIST not found; installing Debian's dataset-fashion-mnist ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"]):
        if subprocess.run(command, env=env).returncode != 0:
            raise LtreproError(f"`{' '.join(command)}` failed; {INSTALL_HINT}")


def prepare(root: str | Path, source: Path = DEBIAN_DIR) -> Path:
    """Gunzip the four idx files into ``<root>/fashion-mnist`` and write ``manifest.json``.

    Each file is checked (idx header against size) before it is moved into place, so a bad
    source never replaces good prepared data. Returns the raw directory.
    """
    ensure_debian_package(source)
    target = raw_dir(root)
    target.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name in FILES.values():
        partial = target / f".{name}.partial"
        try:
            with gzip.open(source / f"{name}.gz", "rb") as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            read_idx(partial)
        except (OSError, EOFError) as exc:
            partial.unlink(missing_ok=True)
            raise LtreproError(f"{source / name}.gz: unreadable or truncated gzip ({exc})") from None
        except LtreproError:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, target / name)
        manifest[name] = hashlib.sha256((target / name).read_bytes()).hexdigest()
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return target


def load_arrays(root: str | Path, verify: bool = True) -> dict[str, np.ndarray]:
    """The four arrays; with ``verify``, each file checked against the sha256 in manifest.json."""
    directory = raw_dir(root)
    if not (directory / FILES["train_images"]).is_file():
        raise LtreproError(f"Fashion-MNIST is not prepared under {directory}; run `ltrepro data prepare`")
    manifest = read_manifest(directory) if verify else {}
    arrays = {key: read_idx(directory / name, manifest.get(name)) for key, name in FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels) or images.shape[1:] != (28, 28):
            raise LtreproError(f"{directory}: {split} images {images.shape} do not match labels {labels.shape}")
    return arrays


def read_manifest(directory: Path) -> dict[str, str]:
    """manifest.json of a prepared folder: file name -> sha256, one entry per idx file."""
    path = directory / "manifest.json"
    hint = "run `ltrepro data prepare` (or set data.verify_checksums=false)"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise LtreproError(f"{path} is missing, so the data files cannot be checked; {hint}") from None
    except (OSError, ValueError) as exc:
        raise LtreproError(f"{path}: unreadable ({exc}); {hint}") from None
    if not isinstance(manifest, dict) or set(FILES.values()) - set(manifest):
        raise LtreproError(f"{path}: does not list a sha256 for each of {', '.join(FILES.values())}; {hint}")
    return manifest


def build(cfg: DataConfig, seed: int) -> LTData:
    arrays = load_arrays(cfg.path or cfg.root, cfg.verify_checksums)
    labels = arrays["train_labels"].astype(np.int64)
    pool = Split(labels, torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1))
    train_idx, val_idx, info = lt_split(
        labels, 10, cfg.n_max, cfg.imbalance, cfg.val_per_class, seed, cfg.reserve,
        split=cfg.split, split_seed=cfg.split_seed, class_order_seed=cfg.class_order_seed,
    )
    test = Split(arrays["test_labels"], torch.from_numpy(arrays["test_images"].copy()).unsqueeze(1))
    info.update(index_hash=index_hash(train_idx, val_idx), source=str(raw_dir(cfg.path or cfg.root)))
    return LTData(
        name="fmnist_lt",
        num_classes=10,
        class_names=CLASS_NAMES,
        train=pool.subset(train_idx),
        val=pool.subset(val_idx),
        test=test,
        mean=(0.2860,),
        std=(0.3530,),
        in_channels=1,
        image_size=28,
        info=info,
    )


DATASETS.register("fmnist_lt")(DatasetSpec(build=build, n_max=500, val_per_class=100, in_memory=True, image_size=28))
