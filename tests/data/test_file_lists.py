"""ImageNet-LT, iNaturalist 2018 and image folders, from tiny images and annotation files on disk."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ltrepro.config import DataConfig
from ltrepro.data.base import DATASETS, IMAGENET_MEAN, IMAGENET_STD
from ltrepro.data.lt import lt_counts
from ltrepro.errors import LtreproError


def write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (len(path.name) * 10 % 256, 0, 0)).save(path)


def write_entries(directory: Path, split: str, sizes: list[int]) -> list[tuple[str, int]]:
    """Write sizes[c] images of class c under ``split/`` and return their (relative path, label)."""
    entries = []
    for c, n in enumerate(sizes):
        for i in range(n):
            rel = f"{split}/n{c:03d}/{split}_{c}_{i}.jpg"
            write_image(directory / rel)
            entries.append((rel, c))
    return entries


def write_txt(path: Path, entries: list[tuple[str, int]]) -> None:
    path.write_text("".join(f"{rel} {label}\n" for rel, label in entries))


def write_json(path: Path, entries: list[tuple[str, int]], num_classes: int) -> None:
    annotations = [{"fpath": rel, "image_id": i, "category_id": label} for i, (rel, label) in enumerate(entries)]
    path.write_text(json.dumps({"annotations": annotations, "num_classes": num_classes}))


def make_imagenet_lt(root: Path, fmt: str = "txt") -> dict[str, list[tuple[str, int]]]:
    directory = root / "imagenet_lt"
    splits = {
        "train": write_entries(directory, "train", [5, 3, 1]),
        "val": write_entries(directory, "heldout", [1, 1, 1]),
        "test": write_entries(directory, "val", [2, 2, 2, 2]),  # class 3 appears only in test
    }
    for split, entries in splits.items():
        if fmt == "txt":
            write_txt(directory / f"ImageNet_LT_{split}.txt", entries)
        else:
            write_json(directory / f"ImageNet_LT_{split}.json", entries, num_classes=5)
    return splits


def config(tmp_path: Path, name: str, **changes) -> DataConfig:
    values = dict(name=name, root=str(tmp_path), n_max=None, imbalance=100.0, val_per_class=20, verify_checksums=False)
    return DataConfig(**{**values, "image_size": 32, **changes})


def build(cfg: DataConfig, seed: int = 0):
    return DATASETS.get(cfg.name).build(cfg, seed)


def test_imagenet_lt_from_list_files(tmp_path):
    splits = make_imagenet_lt(tmp_path)
    data = build(config(tmp_path, "imagenet_lt"))
    directory = tmp_path / "imagenet_lt"
    assert data.num_classes == 4  # max label + 1 over all lists
    assert data.train.paths == [str(directory / rel) for rel, _ in splits["train"]]
    assert data.train.labels.tolist() == [c for _, c in splits["train"]]
    assert data.val.paths == [str(directory / rel) for rel, _ in splits["val"]]
    assert data.test.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert not data.train.in_memory and data.train.images is None
    assert data.info["train_counts"] == [5, 3, 1, 0] and data.info["val_counts"] == [1, 1, 1, 0]
    assert data.info["val_source"].endswith("ImageNet_LT_val.txt")
    assert "not applied" in data.info["note"] and data.info["source"] == str(directory)
    assert (data.mean, data.std, data.in_channels, data.image_size) == (IMAGENET_MEAN, IMAGENET_STD, 3, 32)
    assert data.class_names == ["0", "1", "2", "3"]


def test_imagenet_lt_from_json_files_uses_declared_num_classes(tmp_path):
    splits = make_imagenet_lt(tmp_path, fmt="json")
    data = build(config(tmp_path, "imagenet_lt"))
    assert data.num_classes == 5
    assert data.train.labels.tolist() == [c for _, c in splits["train"]]
    assert data.info["train_counts"] == [5, 3, 1, 0, 0]
    assert data.info["val_source"].endswith("ImageNet_LT_val.json")


def test_imagenet_lt_reads_data_path_and_accepts_absolute_json_paths(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    make_imagenet_lt(elsewhere)
    image = tmp_path / "absolute" / "a.png"
    write_image(image)
    write_json(elsewhere / "imagenet_lt" / "ImageNet_LT_test.json", [(str(image), 1)], num_classes=6)
    (elsewhere / "imagenet_lt" / "ImageNet_LT_test.txt").unlink()
    data = build(config(tmp_path, "imagenet_lt", path=str(elsewhere / "imagenet_lt")))
    assert data.test.paths == [str(image)] and data.num_classes == 6


def test_label_beyond_declared_num_classes_is_located(tmp_path):
    make_imagenet_lt(tmp_path)
    write_json(tmp_path / "imagenet_lt" / "ImageNet_LT_test.json", [("val/n000/val_0_0.jpg", 0)], num_classes=2)
    (tmp_path / "imagenet_lt" / "ImageNet_LT_test.txt").unlink()
    with pytest.raises(LtreproError, match=r"ImageNet_LT_train.txt:9: label 2 is outside \[0, 2\)"):
        build(config(tmp_path, "imagenet_lt"))


def test_missing_image_is_named_with_how_many_are_missing(tmp_path):
    splits = make_imagenet_lt(tmp_path)
    for rel, _ in splits["train"][1:3]:
        (tmp_path / "imagenet_lt" / rel).unlink()
    missing = splits["train"][1][0]
    with pytest.raises(LtreproError, match=rf"ImageNet_LT_train.txt:2: image .*{missing} does not exist \(2 of 9"):
        build(config(tmp_path, "imagenet_lt"))


def test_malformed_line_is_named_with_its_line_number(tmp_path):
    make_imagenet_lt(tmp_path)
    path = tmp_path / "imagenet_lt" / "ImageNet_LT_val.txt"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LtreproError, match=r"ImageNet_LT_val.txt:3: expected `relative/path.jpg label`"):
        build(config(tmp_path, "imagenet_lt"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "the annotation list is empty"),
        ("train/a.jpg -1\n", r"ImageNet_LT_test.txt:1: label -1 is negative"),
        ("train/a.jpg x\n", r"ImageNet_LT_test.txt:1: expected"),
        ("val/n000/val_0_0.jpg 0\n\ntrain/a.jpg --1\n", r"ImageNet_LT_test.txt:3: expected"),
    ],
)
def test_bad_list_files(tmp_path, text, message):
    make_imagenet_lt(tmp_path)
    (tmp_path / "imagenet_lt" / "ImageNet_LT_test.txt").write_text(text)
    with pytest.raises(LtreproError, match=message):
        build(config(tmp_path, "imagenet_lt"))


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"annotations": [', r"ImageNet_LT_train.json:1: invalid JSON"),
        ('{"annotations": [], "num_classes": 5}', "the annotation list is empty"),
        ('{"annotations": [{"fpath": "x.jpg", "category_id": 5}], "num_classes": 5}', r"\[0\]: category_id 5 is"),
        ('{"annotations": [{"fpath": "x.jpg"}], "num_classes": 5}', r"annotations\[0\]: expected"),
        ('[{"fpath": "x.jpg", "category_id": 1}]', r'expected {"annotations"'),
    ],
)
def test_bad_json_files(tmp_path, content, message):
    make_imagenet_lt(tmp_path, fmt="json")
    (tmp_path / "imagenet_lt" / "ImageNet_LT_train.json").write_text(content)
    with pytest.raises(LtreproError, match=message):
        build(config(tmp_path, "imagenet_lt"))


def test_missing_list_file_is_named(tmp_path):
    make_imagenet_lt(tmp_path)
    (tmp_path / "imagenet_lt" / "ImageNet_LT_val.txt").unlink()
    with pytest.raises(LtreproError, match=r"missing annotation list .*ImageNet_LT_val.txt \(or .json\); .* OLTR"):
        build(config(tmp_path, "imagenet_lt"))


def make_inat18(root: Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    directory = root / "inat18"
    train = write_entries(directory, "train_val2018", [30, 10, 4])
    test = write_entries(directory, "official_val", [3, 3, 3])
    write_json(directory / "iNaturalist18_train.json", train, num_classes=3)
    write_json(directory / "iNaturalist18_val.json", test, num_classes=3)
    return train, test


def test_inat18_carves_validation_from_train_and_tests_on_official_val(tmp_path):
    train, test = make_inat18(tmp_path)
    directory = tmp_path / "inat18"
    data = build(config(tmp_path, "inat18", val_per_class=5), seed=0)
    assert data.num_classes == 3
    assert data.info["val_counts"] == [5, 2, 0]  # min(5, floor(0.2 n_c))
    assert data.info["train_counts"] == [25, 8, 4]
    assert not set(data.train.paths) & set(data.val.paths)
    assert sorted(data.train.paths + data.val.paths) == sorted(str(directory / rel) for rel, _ in train)
    for split in (data.train, data.val):
        assert all(f"/n{label:03d}/" in path for path, label in zip(split.paths, split.labels))
    assert data.test.paths == [str(directory / rel) for rel, _ in test]
    assert build(config(tmp_path, "inat18", val_per_class=5), seed=0).info["index_hash"] == data.info["index_hash"]
    assert build(config(tmp_path, "inat18", val_per_class=5), seed=1).info["index_hash"] != data.info["index_hash"]


def make_folder(root: Path, train: dict[str, int], test: dict[str, int], val: dict[str, int] | None = None) -> Path:
    for split, sizes in (("train", train), ("test", test), ("val", val or {})):
        for name, n in sizes.items():
            for i in range(n):
                write_image(root / split / name / f"{i:02d}.{'PNG' if i % 2 else 'jpg'}")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_lt_draws_the_lt_subset(tmp_path):
    folder = make_folder(tmp_path / "pets", {"cat": 10, "dog": 10, "emu": 10}, {"cat": 2, "emu": 1})
    data = build(config(tmp_path, "imagefolder_lt", path=str(folder), imbalance=5.0, val_per_class=3), seed=0)
    assert data.class_names == ["cat", "dog", "emu"]
    assert data.train_counts.tolist() == lt_counts(10, 5, 3) == [10, 4, 2]  # n_max: the largest class
    assert data.info["val_counts"] == [0, 3, 3]
    assert data.info["val_source"] == "spare train/ images the LT draw left over"
    assert not set(data.train.paths) & set(data.val.paths)
    for split in (data.train, data.val, data.test):
        assert all(Path(path).parent.name == data.class_names[label] for path, label in zip(split.paths, split.labels))
    assert data.test.labels.tolist() == [0, 0, 2]
    assert not any(path.endswith(".txt") for path in data.train.paths)
    assert data.info["source"] == str(folder) and len(data.info["index_hash"]) == 16


def test_imagefolder_lt_takes_validation_from_val_folder(tmp_path):
    folder = make_folder(tmp_path / "pets", {"cat": 10, "dog": 10}, {"cat": 2, "dog": 2}, val={"dog": 3})
    cfg = config(tmp_path, "imagefolder_lt", path=str(folder), imbalance=2.0, n_max=8, reserve=True)
    data = build(cfg, seed=0)
    assert data.train_counts.tolist() == [8, 4]  # nothing is reserved out of train/ when val/ exists
    assert data.val.paths == [str(folder / "val" / "dog" / name) for name in ("00.jpg", "01.PNG", "02.jpg")]
    assert data.info["val_counts"] == [0, 3] and data.info["val_source"] == "val/"


def test_imagefolder_lt_balanced_uses_train_as_it_is(tmp_path):
    folder = make_folder(tmp_path / "pets", {"cat": 10, "dog": 6}, {"cat": 1, "dog": 1}, val={"cat": 2})
    data = build(config(tmp_path, "imagefolder_lt", path=str(folder), imbalance=1.0), seed=0)
    assert data.train_counts.tolist() == [10, 6]
    assert data.info["val_counts"] == [2, 0] and data.info["val_source"] == "val/"
    for child in (folder / "val" / "cat").iterdir():
        child.unlink()
    (folder / "val" / "cat").rmdir()
    (folder / "val").rmdir()
    carved = build(config(tmp_path, "imagefolder_lt", path=str(folder), imbalance=1.0, val_per_class=5), seed=0)
    assert carved.info["val_counts"] == [2, 1]  # min(5, floor(0.2 n_c))
    assert carved.train_counts.tolist() == [8, 5]
    assert not set(carved.train.paths) & set(carved.val.paths)


def test_imagefolder_lt_unknown_class_in_test(tmp_path):
    folder = make_folder(tmp_path / "pets", {"cat": 3, "dog": 3}, {"cat": 1, "yak": 1})
    with pytest.raises(LtreproError, match=r"test/yak: class folder is not in train/"):
        build(config(tmp_path, "imagefolder_lt", path=str(folder), imbalance=1.0))


def test_imagefolder_lt_errors(tmp_path):
    with pytest.raises(LtreproError, match=r"set data.path=/your/folder"):
        build(config(tmp_path, "imagefolder_lt"))
    folder = make_folder(tmp_path / "pets", {"cat": 10, "dog": 2}, {"cat": 1})
    with pytest.raises(LtreproError, match=r"pets/train: data.n_max=10 asks class 1 for 5 images but the pool has 2"):
        build(config(tmp_path, "imagefolder_lt", path=str(folder), imbalance=2.0))
    (folder / "train" / "emu").mkdir()
    with pytest.raises(LtreproError, match=r"pets/train/emu: no images"):
        build(config(tmp_path, "imagefolder_lt", path=str(folder), imbalance=1.0))
    (folder / "train" / "emu").rmdir()
    (folder / "test" / "cat" / "00.jpg").unlink()
    with pytest.raises(LtreproError, match=r"pets/test: no images"):
        build(config(tmp_path, "imagefolder_lt", path=str(folder), imbalance=1.0))
    with pytest.raises(LtreproError, match=r"missing .*nowhere/train/"):
        build(config(tmp_path, "imagefolder_lt", path=str(tmp_path / "nowhere")))


def test_registered_specs():
    for name in ("imagenet_lt", "inat18", "imagefolder_lt"):
        spec = DATASETS.get(name)
        assert (spec.n_max, spec.val_per_class, spec.in_memory, spec.image_size) == (None, 20, False, 224)
    assert np.array_equal([DATASETS.get("cifar10_lt").n_max, DATASETS.get("cifar100_lt").n_max], [5000, 500])


AS_RELEASED = r"data.split, data.split_seed and data.class_order_seed apply only to datasets drawn from a balanced pool"


@pytest.mark.parametrize("fmt", ["txt", "json"])
@pytest.mark.parametrize("split", ["glmc", "first_n"])
def test_imagenet_lt_refuses_a_subset_draw(tmp_path, fmt, split):
    make_imagenet_lt(tmp_path, fmt=fmt)
    message = rf"data.split={split}: imagenet_lt is long-tailed as released.*{AS_RELEASED}"
    with pytest.raises(LtreproError, match=message):
        build(config(tmp_path, "imagenet_lt", split=split))
    with pytest.raises(LtreproError, match=r"data.split_seed=3407: imagenet_lt is long-tailed as released"):
        build(config(tmp_path, "imagenet_lt", split_seed=3407))
    with pytest.raises(LtreproError, match=r"data.class_order_seed=1: imagenet_lt is long-tailed as released"):
        build(config(tmp_path, "imagenet_lt", class_order_seed=1))
    assert build(config(tmp_path, "imagenet_lt", split="ldam")).info["train_counts"][:3] == [5, 3, 1]


def test_inat18_refuses_a_subset_draw(tmp_path):
    make_inat18(tmp_path)
    message = rf"data.split=glmc: inat18 is long-tailed as released.*{AS_RELEASED}"
    with pytest.raises(LtreproError, match=message):
        build(config(tmp_path, "inat18", val_per_class=5, split="glmc"))
    assert build(config(tmp_path, "inat18", val_per_class=5)).info["train_counts"] == [25, 8, 4]


def test_imagefolder_lt_honours_data_split_when_it_draws(tmp_path):
    folder = make_folder(tmp_path / "pets", {"cat": 10, "dog": 10, "emu": 10}, {"cat": 2, "emu": 1})
    ldam = build(config(tmp_path, "imagefolder_lt", path=str(folder), imbalance=5.0, val_per_class=3), seed=0)
    assert ldam.info["index_hash"] == "d71b99a5a3abff02"  # computed before data.split existed
    first = build(config(tmp_path, "imagefolder_lt", path=str(folder), imbalance=5.0, val_per_class=3, split="first_n"))
    expected = [str(folder / "train" / name / f"{i:02d}.{'PNG' if i % 2 else 'jpg'}")
                for name, n in zip(first.class_names, [10, 4, 2]) for i in range(n)]
    assert first.train.paths == expected and first.info["split"] == "first_n"
    glmc = build(config(tmp_path, "imagefolder_lt", path=str(folder), imbalance=5.0, val_per_class=3,
                        split="glmc", split_seed=3407))
    for data in (first, glmc):
        assert data.train_counts.tolist() == [10, 4, 2] and data.info["val_counts"] == [0, 3, 3]
        assert not set(data.train.paths) & set(data.val.paths)
    assert glmc.info["split_seed"] == 3407
    assert len({data.info["index_hash"] for data in (ldam, first, glmc)}) == 3
    message = r"data.split=glmc: imagefolder_lt with data.imbalance=1 uses train/ as it is.*" + AS_RELEASED
    with pytest.raises(LtreproError, match=message):
        build(config(tmp_path, "imagefolder_lt", path=str(folder), imbalance=1.0, split="glmc"))
