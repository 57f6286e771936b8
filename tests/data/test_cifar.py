"""CIFAR-10-LT / CIFAR-100-LT built from small pickles written in the real on-disk formats.

Every image carries a unique id in its first 4 bytes, so overlaps and pixel mix-ups are visible.
CIFAR-10 files are written like the originals (protocol 2, bytes keys); CIFAR-100 files with
Python 3's default protocol and str keys, the other form a re-pickled file can take.
"""
import dataclasses
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import datasets

from ltrepro.config import DataConfig
from ltrepro.data import cifar
from ltrepro.data.base import DATASETS
from ltrepro.data.cifar import CIFAR_MEAN, CIFAR_STD
from ltrepro.data.lt import lt_counts, lt_split
from ltrepro.errors import LtreproError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_batch(num_classes: int, per_class: int, first_id: int, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    labels = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(labels)
    data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    ids = np.arange(first_id, first_id + len(labels)).astype(">u4")
    data[:, :4] = ids.view(np.uint8).reshape(-1, 4)
    return data, labels.tolist()


def image_ids(images: torch.Tensor) -> np.ndarray:
    return images.reshape(len(images), -1)[:, :4].numpy().copy().view(">u4").ravel().astype(np.int64)


def write_cifar10(root: Path, per_class: int = 50, test_per_class: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Five training batches and a test batch; returns the concatenated training data and labels."""
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    parts = []
    for b in range(1, 6):
        data, labels = make_batch(10, per_class, first_id=len(parts) * 10 * per_class, rng=rng)
        content = {b"batch_label": f"training batch {b} of 5".encode(), b"labels": labels, b"data": data}
        (directory / f"data_batch_{b}").write_bytes(pickle.dumps(content, protocol=2))
        parts.append((data, labels))
    data, labels = make_batch(10, test_per_class, first_id=1_000_000, rng=rng)
    (directory / "test_batch").write_bytes(pickle.dumps({b"labels": labels, b"data": data}, protocol=2))
    names = [name.encode() for name in CIFAR10_NAMES]
    (directory / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))
    return np.concatenate([d for d, _ in parts]), np.concatenate([l for _, l in parts])


def write_cifar100(root: Path, per_class: int = 12, test_per_class: int = 2) -> None:
    directory = root / "cifar-100-python"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n, first_id in (("train", per_class, 0), ("test", test_per_class, 1_000_000)):
        data, labels = make_batch(100, n, first_id, rng)
        content = {"data": data, "fine_labels": labels, "coarse_labels": [c // 5 for c in labels]}
        (directory / name).write_bytes(pickle.dumps(content))
    names = {"fine_label_names": [f"class{c}" for c in range(100)], "coarse_label_names": [str(c) for c in range(20)]}
    (directory / "meta").write_bytes(pickle.dumps(names))


def cifar_config(tmp_path: Path, name: str = "cifar10_lt", **changes) -> DataConfig:
    values = dict(name=name, root=str(tmp_path), n_max=200, imbalance=10.0, val_per_class=20, verify_checksums=False)
    return DataConfig(**{**values, "image_size": 32, **changes})


def build(cfg: DataConfig, seed: int = 0):
    return DATASETS.get(cfg.name).build(cfg, seed)


def test_cifar10_lt_counts_val_and_pixels(tmp_path):
    train_data, train_labels = write_cifar10(tmp_path)
    data = build(cifar_config(tmp_path), seed=0)
    counts = lt_counts(200, 10, 10)
    assert data.train_counts.tolist() == counts == data.info["train_counts"]
    assert data.info["val_counts"] == [min(20, 250 - n) for n in counts]
    assert np.bincount(data.val.labels, minlength=10).tolist() == data.info["val_counts"]

    train_ids, val_ids = image_ids(data.train.images), image_ids(data.val.images)
    assert len(set(train_ids)) == len(train_ids)
    assert not set(train_ids) & set(val_ids)
    np.testing.assert_array_equal(train_labels[train_ids], data.train.labels)
    np.testing.assert_array_equal(train_labels[val_ids], data.val.labels)

    train_idx, val_idx, _ = lt_split(train_labels, 10, 200, 10.0, 20, 0)
    expected = torch.from_numpy(train_data[train_idx].reshape(-1, 3, 32, 32))
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape == (sum(counts), 3, 32, 32)
    assert torch.equal(data.train.images, expected)
    assert torch.equal(data.train.images[5, 2, 31, 31], torch.tensor(train_data[train_idx[5], 3071]))

    assert len(data.test) == 200 and np.bincount(data.test.labels).tolist() == [20] * 10
    assert image_ids(data.test.images).tolist() == list(range(1_000_000, 1_000_200))
    assert data.class_names == CIFAR10_NAMES
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 3, 32)
    assert (data.mean, data.std) == (CIFAR_MEAN, CIFAR_STD) == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    assert data.info["source"] == str(tmp_path / "cifar-10-batches-py")


def test_cifar10_lt_seed_decides_the_subset(tmp_path):
    write_cifar10(tmp_path)
    cfg = cifar_config(tmp_path)
    first, again, other = build(cfg, 0), build(cfg, 0), build(cfg, 1)
    assert first.info["index_hash"] == again.info["index_hash"]
    assert torch.equal(first.train.images, again.train.images)
    assert first.info["index_hash"] != other.info["index_hash"]
    assert first.train_counts.tolist() == other.train_counts.tolist()


def test_cifar10_lt_reserve_holds_validation_out_of_every_class(tmp_path):
    write_cifar10(tmp_path)
    data = build(cifar_config(tmp_path, n_max=250, reserve=True), seed=0)
    assert data.info["val_counts"] == [20] * 10
    assert data.train_counts.tolist() == lt_counts(230, 10, 10)
    assert not set(image_ids(data.train.images)) & set(image_ids(data.val.images))


def test_cifar100_lt_with_str_keys(tmp_path):
    write_cifar100(tmp_path)
    data = build(cifar_config(tmp_path, name="cifar100_lt", n_max=10, imbalance=5.0, val_per_class=3), seed=0)
    counts = lt_counts(10, 5, 100)
    assert data.train_counts.tolist() == counts
    assert np.bincount(data.val.labels, minlength=100).tolist() == [min(3, 12 - n) for n in counts]
    assert not set(image_ids(data.train.images)) & set(image_ids(data.val.images))
    assert len(data.test) == 200 and data.test.images.shape == (200, 3, 32, 32)
    assert data.class_names[:2] == ["class0", "class1"] and data.num_classes == 100


def test_checksum_mismatch_names_the_file(tmp_path):
    write_cifar10(tmp_path)
    expected = r"data_batch_1: md5 [0-9a-f]{32} does not match the official c99cafc152244af753f735de768cd75f"
    with pytest.raises(LtreproError, match=expected + ".*verify_checksums=false"):
        build(cifar_config(tmp_path, verify_checksums=True))


def test_truncated_pickle_names_the_file(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LtreproError, match="data_batch_2: truncated or corrupt"):
        build(cifar_config(tmp_path))


def test_wrong_shape_names_the_file(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, protocol=2))
    with pytest.raises(LtreproError, match=r"test_batch: 'data' should be an N x 3072 uint8 array"):
        build(cifar_config(tmp_path))


class RunsAShellCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_with_a_forbidden_global_is_refused_unexecuted(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "executed"
    payload = {b"data": RunsAShellCommand(marker), b"labels": [0]}
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(LtreproError, match="data_batch_1: refusing to load .*system"):
        build(cifar_config(tmp_path))
    assert not marker.exists()


def test_missing_file_says_how_to_get_it(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(LtreproError, match=r"data_batch_3; download cifar-10-python.tar.gz from https://www.cs"):
        build(cifar_config(tmp_path))


def test_data_path_overrides_root(tmp_path):
    write_cifar100(tmp_path / "elsewhere")
    cfg = cifar_config(tmp_path, name="cifar100_lt", path=str(tmp_path / "elsewhere"), n_max=10, val_per_class=2)
    assert len(build(cfg).test) == 200


@pytest.mark.parametrize(
    "layout, dataset",
    [(cifar.CIFAR10, datasets.CIFAR10), (cifar.CIFAR100, datasets.CIFAR100)],
    ids=["cifar10", "cifar100"],
)
def test_checksum_tables_match_torchvisions_published_lists(layout, dataset):
    published = dict(dataset.train_list + dataset.test_list)
    assert layout.md5 == published
    assert layout.folder == dataset.base_folder
    assert set(layout.train_files) | {layout.test_file} == set(published)


def test_cifar10_lt_ldam_subset_is_unchanged(tmp_path):
    """index_hash of these files and settings, computed before data.split existed."""
    write_cifar10(tmp_path)
    assert build(cifar_config(tmp_path), seed=0).info["index_hash"] == "c06df42eb871b5ce"
    assert build(cifar_config(tmp_path, split="ldam"), seed=1).info["index_hash"] == "bb52648418f8c671"
    assert build(cifar_config(tmp_path, n_max=250, reserve=True), seed=0).info["index_hash"] == "30a904c3c226dbbc"
    write_cifar100(tmp_path)
    cfg = cifar_config(tmp_path, name="cifar100_lt", n_max=10, imbalance=5.0, val_per_class=3)
    assert build(cfg, seed=0).info["index_hash"] == "581702624fbdf9c7"


@pytest.mark.parametrize("reserve", [False, True])
def test_cifar10_lt_honours_data_split(tmp_path, reserve):
    train_data, train_labels = write_cifar10(tmp_path)
    n_max = 250 if reserve else 200
    built = {
        split: build(cifar_config(tmp_path, n_max=n_max, reserve=reserve, split=split, split_seed=seed), seed=0)
        for split, seed in (("ldam", None), ("glmc", 3407), ("first_n", None))
    }
    counts = built["ldam"].info["train_counts"]
    for split, data in built.items():
        assert data.info["split"] == split and data.info["train_counts"] == counts == data.train_counts.tolist()
        train_ids, val_ids = image_ids(data.train.images), image_ids(data.val.images)
        assert not set(train_ids) & set(val_ids) and len(set(train_ids)) == len(train_ids)
        np.testing.assert_array_equal(train_labels[train_ids], data.train.labels)
    assert built["ldam"].info["split_seed"] == 0 and built["first_n"].info["split_seed"] is None
    assert built["glmc"].info["split_seed"] == 3407
    assert len({data.info["index_hash"] for data in built.values()}) == 3

    train_idx, _, _ = lt_split(train_labels, 10, n_max, 10.0, 20, 0, reserve, split="glmc", split_seed=3407)
    np.testing.assert_array_equal(image_ids(built["glmc"].train.images), train_idx)
    first = image_ids(built["first_n"].train.images)
    left = np.setdiff1d(np.arange(len(train_labels)), image_ids(built["first_n"].val.images)) if reserve else None
    for c, n in enumerate(counts):
        in_class = np.flatnonzero(train_labels == c)  # image ids are positions in file order
        if reserve:
            in_class = np.intersect1d(in_class, left)
        assert first[built["first_n"].train.labels == c].tolist() == in_class[:n].tolist()


def test_cifar100_lt_glmc_with_the_paper_seed(tmp_path):
    write_cifar100(tmp_path)
    cfg = cifar_config(tmp_path, name="cifar100_lt", n_max=10, imbalance=5.0, val_per_class=3)
    ldam, glmc = build(cfg, seed=0), build(dataclasses.replace(cfg, split="glmc", split_seed=3407), seed=0)
    assert glmc.info["train_counts"] == ldam.info["train_counts"] == lt_counts(10, 5, 100)
    assert glmc.info["index_hash"] != ldam.info["index_hash"]
    assert not set(image_ids(glmc.train.images)) & set(image_ids(glmc.val.images))
