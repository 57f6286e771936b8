"""Datasets whose images stay on disk: ImageNet-LT, iNaturalist 2018 and a folder of your own images.

Annotation lists come in two formats, chosen by the file suffix (``.txt`` wins when both exist):

* list: one ``relative/path.jpg label`` per line, as released with OLTR (ImageNet-LT) and the
  Decoupling/MiSLAS code (iNaturalist 2018);
* json, BagofTricks-LT style: ``{"annotations": [{"fpath": ..., "category_id": ...}, ...],
  "num_classes": N}``.

Image paths are read relative to the dataset directory; absolute json paths are kept as they are.

* ``imagenet_lt``: ``data.path`` or ``<root>/imagenet_lt/`` holds ``ImageNet_LT_{train,val,test}.txt``
  (or ``.json``) next to the ImageNet ``train/`` and ``val/`` image folders that the lists name
  (``train/n01440764/n01440764_10026.JPEG``). ImageNet-LT is long-tailed as released, so data.n_max
  and data.imbalance are not applied; validation is the official 20-per-class val list.
* ``inat18``: ``data.path`` or ``<root>/inat18/`` holds ``iNaturalist18_{train,val}.txt`` (or
  ``.json``) and the image folders they name. The official val list is the test split, as in the
  literature; having no spare images, validation is carved out of train: class c gives
  min(data.val_per_class, floor(0.2 n_c)) images, so classes with fewer than 5 images give none.
* ``imagefolder_lt``: ``data.path`` holds ``train/<class>/*.jpg``, ``test/<class>/...`` and an optional
  ``val/<class>/...``; classes are train/'s sorted subfolder names. With data.imbalance > 1 the LT
  subset is drawn from train/ as for CIFAR (class 0, the first name, is the head; data.split and
  data.split_seed apply, file order being sorted file names); with 1, train/ is used as it is.

ImageNet-LT and iNaturalist 2018 are long-tailed as released, so a non-default data.split or a
data.split_seed fails at load rather than being ignored (so does imagefolder_lt with imbalance 1).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ltrepro.config import DataConfig
from ltrepro.data.base import DATASETS, IMAGENET_MEAN, IMAGENET_STD, DatasetSpec, LTData, Split
from ltrepro.data.lt import carve_validation, index_hash, lt_split, refuse_split
from ltrepro.errors import LtreproError

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
IMAGENET_LT_HINT = "the lists are released with OLTR (github.com/zhmiao/OpenLongTailRecognition-OLTR)"
INAT18_HINT = "the lists are released with classifier-balancing (github.com/facebookresearch/classifier-balancing)"


@dataclass
class FileList:
    """One annotation file read into image paths and labels; ``where`` locates an entry in the file."""

    file: Path
    paths: list[str]
    labels: np.ndarray
    lines: np.ndarray  # the line number (list) or annotations index (json) of each entry
    num_classes: int | None  # declared by a json file, None for a list file

    def where(self, i: int) -> str:
        if self.file.suffix == ".json":
            return f"{self.file}: annotations[{self.lines[i]}]"
        return f"{self.file}:{self.lines[i]}"

    def split(self) -> Split:
        return Split(self.labels, paths=self.paths)


def find_list(directory: Path, stem: str, hint: str) -> Path:
    """``<stem>.txt``, else ``<stem>.json``, in ``directory``; ``hint`` says where to get them."""
    for suffix in (".txt", ".json"):
        if (directory / f"{stem}{suffix}").is_file():
            return directory / f"{stem}{suffix}"
    raise LtreproError(f"missing annotation list {directory / stem}.txt (or .json); {hint}")


def read_list_txt(file: Path, image_root: Path) -> FileList:
    """Read ``relative/path label`` lines; the path may contain spaces, the label is the last field."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LtreproError(f"{file}: not UTF-8 text ({exc.reason})") from None
    paths, labels, lines = [], [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rsplit(maxsplit=1)
        try:
            label = int(fields[1]) if len(fields) == 2 else None
        except ValueError:
            label = None
        if label is None:
            raise LtreproError(f"{file}:{number}: expected `relative/path.jpg label`, got {line.strip()!r}")
        if label < 0:
            raise LtreproError(f"{file}:{number}: label {label} is negative")
        paths.append(str(image_root / fields[0]))
        labels.append(label)
        lines.append(number)
    return FileList(file, paths, np.asarray(labels, dtype=np.int64), np.asarray(lines, dtype=np.int64), None)


def read_list_json(file: Path, image_root: Path) -> FileList:
    """Read a BagofTricks-LT json: ``annotations`` entries with ``fpath`` and ``category_id``."""
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LtreproError(f"{file}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise LtreproError(f"{file}: not UTF-8 text ({exc.reason})") from None
    if not isinstance(content, dict) or not isinstance(content.get("annotations"), list):
        raise LtreproError(f'{file}: expected {{"annotations": [...], "num_classes": N}}')
    num_classes = content.get("num_classes")
    if num_classes is not None and (type(num_classes) is not int or num_classes < 1):
        raise LtreproError(f"{file}: num_classes should be a positive integer, got {num_classes!r}")
    paths, labels = [], []
    for i, entry in enumerate(content["annotations"]):
        fpath = entry.get("fpath") if isinstance(entry, dict) else None
        label = entry.get("category_id") if isinstance(entry, dict) else None
        if not isinstance(fpath, str) or type(label) is not int:
            expected = '{"fpath": str, "category_id": int}'
            raise LtreproError(f"{file}: annotations[{i}]: expected {expected}, got {entry!r}")
        if label < 0 or (num_classes is not None and label >= num_classes):
            raise LtreproError(f"{file}: annotations[{i}]: category_id {label} is outside [0, {num_classes})")
        paths.append(str(image_root / fpath))
        labels.append(label)
    return FileList(file, paths, np.asarray(labels, dtype=np.int64), np.arange(len(labels)), num_classes)


def read_annotations(file: Path, image_root: Path) -> FileList:
    """Read a list (.txt) or json annotation file; image paths are joined to ``image_root``."""
    annotations = read_list_json(file, image_root) if file.suffix == ".json" else read_list_txt(file, image_root)
    if not annotations.paths:
        raise LtreproError(f"{file}: the annotation list is empty")
    return annotations


def resolve_num_classes(lists: list[FileList]) -> int:
    """The json files' num_classes when declared (they must agree), else max label + 1 over all lists."""
    declared = {fl.num_classes for fl in lists if fl.num_classes is not None}
    if len(declared) > 1:
        raise LtreproError(f"annotation files disagree on num_classes: {sorted(declared)}")
    num_classes = declared.pop() if declared else max(int(fl.labels.max()) for fl in lists) + 1
    for fl in lists:
        top = int(fl.labels.argmax())
        if fl.labels[top] >= num_classes:
            raise LtreproError(f"{fl.where(top)}: label {fl.labels[top]} is outside [0, {num_classes})")
    return num_classes


def check_images_exist(annotations: FileList, image_root: Path) -> None:
    """Fail before training starts, not at the first batch that touches a missing image."""
    missing = [i for i, path in enumerate(annotations.paths) if not os.path.isfile(path)]
    if missing:
        raise LtreproError(
            f"{annotations.where(missing[0])}: image {annotations.paths[missing[0]]} does not exist "
            f"({len(missing)} of {len(annotations.paths)} listed images are missing; "
            f"paths are relative to {image_root})"
        )


def read_checked(directory: Path, stem: str, hint: str) -> FileList:
    annotations = read_annotations(find_list(directory, stem, hint), directory)
    check_images_exist(annotations, directory)
    return annotations


def class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(labels, minlength=num_classes).tolist()


def on_disk(
    name: str, cfg: DataConfig, class_names: list[str], train: Split, val: Split, test: Split, info: dict
) -> LTData:
    """Assemble an ImageNet-normalised LTData and add the counts every run logs to ``info``."""
    num_classes = len(class_names)
    info.update(train_counts=class_counts(train.labels, num_classes), val_counts=class_counts(val.labels, num_classes))
    return LTData(
        name=name,
        num_classes=num_classes,
        class_names=class_names,
        train=train,
        val=val,
        test=test,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        in_channels=3,
        image_size=cfg.image_size,
        info=info,
    )


def build_imagenet_lt(cfg: DataConfig, seed: int) -> LTData:
    refuse_split("imagenet_lt", cfg)
    directory = Path(cfg.path) if cfg.path else Path(cfg.root) / "imagenet_lt"
    train, val, test = (read_checked(directory, f"ImageNet_LT_{s}", IMAGENET_LT_HINT) for s in ("train", "val", "test"))
    num_classes = resolve_num_classes([train, val, test])
    info = {
        "index_hash": index_hash(train.labels, val.labels),
        "source": str(directory),
        "val_source": str(val.file),
        "note": "ImageNet-LT is long-tailed as released: data.n_max and data.imbalance are not applied",
    }
    class_names = [str(i) for i in range(num_classes)]
    return on_disk("imagenet_lt", cfg, class_names, train.split(), val.split(), test.split(), info)


def build_inat18(cfg: DataConfig, seed: int) -> LTData:
    refuse_split("inat18", cfg)
    directory = Path(cfg.path) if cfg.path else Path(cfg.root) / "inat18"
    train = read_checked(directory, "iNaturalist18_train", INAT18_HINT)
    test = read_checked(directory, "iNaturalist18_val", INAT18_HINT)
    num_classes = resolve_num_classes([train, test])
    train_idx, val_idx = carve_validation(train.labels, num_classes, cfg.val_per_class, seed)
    pool = train.split()
    info = {
        "index_hash": index_hash(train_idx, val_idx),
        "source": str(directory),
        "val_source": f"carved from {train.file}: min({cfg.val_per_class}, floor(0.2 n_c)) per class",
        "note": "iNaturalist 2018 is long-tailed as released: data.n_max and data.imbalance are not applied; "
        f"the official val list {test.file.name} is the test split",
    }
    class_names = [str(i) for i in range(num_classes)]
    return on_disk("inat18", cfg, class_names, pool.subset(train_idx), pool.subset(val_idx), test.split(), info)


def class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_folder(split_dir: Path, class_names: list[str]) -> Split:
    """Images of ``split_dir/<class>/`` for each class folder present, labelled by index in ``class_names``."""
    folders = class_folders(split_dir)
    label_of = {name: c for c, name in enumerate(class_names)}
    unknown = [name for name in folders if name not in label_of]
    if unknown:
        raise LtreproError(f"{split_dir / unknown[0]}: class folder is not in train/; use train/'s class names")
    paths, labels = [], []
    for name in folders:
        files = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        paths += [str(p) for p in files]
        labels += [label_of[name]] * len(files)
    return Split(np.asarray(labels, dtype=np.int64), paths=paths)


def build_imagefolder_lt(cfg: DataConfig, seed: int) -> LTData:
    if not cfg.path:
        raise LtreproError("data.path is null: imagefolder_lt reads a folder of your own; set data.path=/your/folder")
    folder = Path(cfg.path)
    for split in ("train", "test"):
        if not (folder / split).is_dir():
            expected = "train/<class>/*.jpg and test/<class>/*.jpg"
            raise LtreproError(f"missing {folder / split}/; imagefolder_lt expects {expected}")
    class_names = class_folders(folder / "train")
    if not class_names:
        raise LtreproError(f"{folder / 'train'}: no class subfolders")
    pool = scan_folder(folder / "train", class_names)
    sizes = class_counts(pool.labels, len(class_names))
    if 0 in sizes:
        empty = class_names[sizes.index(0)]
        raise LtreproError(f"{folder / 'train' / empty}: no images ({', '.join(IMAGE_SUFFIXES)})")
    test = scan_folder(folder / "test", class_names)
    if len(test) == 0:
        raise LtreproError(f"{folder / 'test'}: no images ({', '.join(IMAGE_SUFFIXES)})")
    val_folder = scan_folder(folder / "val", class_names) if (folder / "val").is_dir() else None
    if cfg.imbalance > 1:
        val_per_class = 0 if val_folder is not None else cfg.val_per_class
        try:
            train_idx, val_idx, info = lt_split(
                pool.labels, len(class_names), cfg.n_max or max(sizes), cfg.imbalance, val_per_class, seed, cfg.reserve,
                split=cfg.split, split_seed=cfg.split_seed, class_order_seed=cfg.class_order_seed,
            )
        except LtreproError as exc:
            raise LtreproError(f"{folder / 'train'}: {exc} (classes in sorted folder order)") from None
        info["val_source"] = "spare train/ images the LT draw left over"
    else:
        refuse_split("imagefolder_lt", cfg, why="with data.imbalance=1 uses train/ as it is")
        if val_folder is not None:
            train_idx, val_idx = np.arange(len(pool)), np.zeros(0, dtype=np.int64)
        else:
            train_idx, val_idx = carve_validation(pool.labels, len(class_names), cfg.val_per_class, seed)
        info = {
            "val_source": f"carved from train/: min({cfg.val_per_class}, floor(0.2 n_c)) per class",
            "note": "data.imbalance=1: train/ is used as it is and data.n_max is not applied",
        }
    if val_folder is not None:
        val, val_idx = val_folder, np.arange(len(val_folder))  # the hash then covers all of val/
        info["val_source"] = "val/"
    else:
        val = pool.subset(val_idx)
    info.update(index_hash=index_hash(train_idx, val_idx), source=str(folder))
    return on_disk("imagefolder_lt", cfg, class_names, pool.subset(train_idx), val, test, info)


DATASETS.register("imagenet_lt")(
    DatasetSpec(build=build_imagenet_lt, n_max=None, val_per_class=20, in_memory=False, image_size=224)
)
DATASETS.register("inat18")(
    DatasetSpec(build=build_inat18, n_max=None, val_per_class=20, in_memory=False, image_size=224)
)
DATASETS.register("imagefolder_lt")(
    DatasetSpec(build=build_imagefolder_lt, n_max=None, val_per_class=20, in_memory=False, image_size=224)
)
