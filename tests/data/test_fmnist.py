import gzip
import json
import os

import numpy as np
import pytest

from ltrepro.config import DataConfig
from ltrepro.data import fmnist, load_data, resolve_data_config
from ltrepro.errors import LtreproError
from tests.conftest import write_idx


def test_read_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(fmnist.read_idx(write_idx(tmp_path / "a-idx3-ubyte.gz", array)), array)
    assert np.array_equal(fmnist.read_idx(write_idx(tmp_path / "a-idx3-ubyte", array)), array)


def test_truncated_idx_names_the_file(tmp_path):
    path = write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LtreproError, match=r"train-images-idx3-ubyte: truncated or corrupt idx file"):
        fmnist.read_idx(path)


def test_truncated_gzip_and_bad_magic(tmp_path):
    gz = write_idx(tmp_path / "x.gz", np.zeros((50, 28, 28), np.uint8))
    gz.write_bytes(gz.read_bytes()[:40])
    with pytest.raises(LtreproError, match="x.gz: unreadable or truncated gzip"):
        fmnist.read_idx(gz)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(LtreproError, match="bad: not an idx file of unsigned bytes"):
        fmnist.read_idx(bad)


def test_prepare_gunzips_and_writes_manifest(tmp_path, fmnist_source):
    target = fmnist.prepare(tmp_path / "raw", fmnist_source)
    manifest = json.loads((target / "manifest.json").read_text())
    assert set(manifest) == set(fmnist.FILES.values())
    raw = (target / "train-labels-idx1-ubyte").read_bytes()
    assert raw == gzip.decompress((fmnist_source / "train-labels-idx1-ubyte.gz").read_bytes())


def test_bad_source_never_replaces_prepared_data(tmp_path, fmnist_source):
    target = fmnist.prepare(tmp_path / "raw", fmnist_source)
    good = (target / "train-images-idx3-ubyte").read_bytes()
    source = fmnist_source / "train-images-idx3-ubyte.gz"
    source.write_bytes(gzip.compress(gzip.decompress(source.read_bytes())[:-10]))
    with pytest.raises(LtreproError, match="truncated or corrupt"):
        fmnist.prepare(tmp_path / "raw", fmnist_source)
    assert (target / "train-images-idx3-ubyte").read_bytes() == good
    assert not list(target.glob(".*partial"))


def test_missing_source_says_what_to_do(tmp_path):
    with pytest.raises(LtreproError, match="idx .gz files not found"):
        fmnist.prepare(tmp_path / "raw", tmp_path / "empty")


def test_unprepared_data_points_to_prepare(tmp_path):
    with pytest.raises(LtreproError, match="ltrepro data prepare"):
        fmnist.build(DataConfig(root=str(tmp_path), n_max=10, val_per_class=2), 0)


def test_build_lt_subset_val_and_test(tmp_path, fmnist_source):
    fmnist.prepare(tmp_path / "data/raw", fmnist_source)
    cfg = DataConfig(n_max=20, imbalance=10, val_per_class=5, image_size=28)
    data = load_data(cfg, seed=0, root=tmp_path)
    assert data.train_counts.tolist() == [20, 15, 11, 9, 7, 5, 4, 3, 2, 2]
    assert np.bincount(data.val.labels).tolist() == [5] * 10
    assert len(data.test) == 100 and data.train.images.shape[1:] == (1, 28, 28)
    # no validation image is a training image: the fake images carry per-image noise
    train = {bytes(x.numpy()) for x in data.train.images}
    assert not any(bytes(x.numpy()) in train for x in data.val.images)
    assert data.info["split_sizes"] == {"train": 78, "val": 50, "test": 100}
    assert load_data(cfg, seed=0, root=tmp_path).info["index_hash"] == data.info["index_hash"]
    assert load_data(cfg, seed=1, root=tmp_path).info["index_hash"] != data.info["index_hash"]


def test_same_size_corruption_is_caught_and_changes_the_data_hash(tmp_path, fmnist_source):
    """Bytes flipped in a prepared file keep its size and its idx header; the sha256 in
    manifest.json catches them, and without the check the data hash (of what was read) moves."""
    import dataclasses

    from ltrepro.data import data_hash

    fmnist.prepare(tmp_path / "data/raw", fmnist_source)
    cfg = DataConfig(n_max=20, imbalance=10, val_per_class=5, image_size=28)
    before = data_hash(load_data(cfg, seed=0, root=tmp_path))
    path = tmp_path / "data/raw/fashion-mnist/t10k-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[-100:-90] = bytes(255 - b for b in raw[-100:-90])
    path.write_bytes(bytes(raw))
    with pytest.raises(LtreproError, match="t10k-images-idx3-ubyte: its sha256 differs from manifest.json's"):
        load_data(cfg, seed=0, root=tmp_path)
    unchecked = dataclasses.replace(cfg, verify_checksums=False)
    assert data_hash(load_data(unchecked, seed=0, root=tmp_path)) != before
    (tmp_path / "data/raw/fashion-mnist/manifest.json").unlink()
    with pytest.raises(LtreproError, match="manifest.json is missing, so the data files cannot be checked"):
        load_data(cfg, seed=0, root=tmp_path)


def test_ldam_subset_is_unchanged(tmp_path, fmnist_source):
    """index_hash of the fixture's data, computed before data.split existed."""
    fmnist.prepare(tmp_path / "data/raw", fmnist_source)
    cfg = DataConfig(n_max=20, imbalance=10, val_per_class=5, image_size=28)
    assert load_data(cfg, seed=0, root=tmp_path).info["index_hash"] == "529deada3720d7c2"
    reserved = DataConfig(n_max=20, imbalance=10, val_per_class=5, image_size=28, reserve=True)
    assert load_data(reserved, seed=0, root=tmp_path).info["index_hash"] == "39f1f352fa4e483c"


@pytest.mark.parametrize("reserve", [False, True])
def test_every_split_draws_the_same_counts_and_keeps_val_apart(tmp_path, fmnist_source, reserve):
    fmnist.prepare(tmp_path / "data/raw", fmnist_source)
    labels = fmnist.load_arrays(tmp_path / "data/raw")["train_labels"]
    hashes = set()
    for split in ("ldam", "glmc", "first_n"):
        cfg = DataConfig(n_max=20, imbalance=10, val_per_class=5, image_size=28, reserve=reserve, split=split)
        data = load_data(cfg, seed=0, root=tmp_path)
        assert data.info["split"] == split and data.info["split_seed"] == (None if split == "first_n" else 0)
        assert data.train_counts.tolist() == data.info["train_counts"] == [20, 15, 11, 9, 7, 5, 4, 3, 2, 2]
        assert np.bincount(data.val.labels).tolist() == [5] * 10
        train = {bytes(x.numpy()) for x in data.train.images}
        assert len(train) == len(data.train) and not any(bytes(x.numpy()) in train for x in data.val.images)
        hashes.add(data.info["index_hash"])
        if split == "first_n" and not reserve:
            images = fmnist.load_arrays(tmp_path / "data/raw")["train_images"]
            expected = [images[np.flatnonzero(labels == c)[:n]] for c, n in enumerate(data.info["train_counts"])]
            assert np.array_equal(data.train.images[:, 0].numpy(), np.concatenate(expected))
    assert len(hashes) == 3


def test_debian_package_gives_the_default_subset(tmp_path):
    """The real files (Debian's dataset-fashion-mnist, which .ci/run installs): every other test
    writes tiny idx files, so this one pins what the README's fmnist_lt runs train on."""
    if not (fmnist.DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have Debian's dataset-fashion-mnist in {fmnist.DEBIAN_DIR}")
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    fmnist.prepare(tmp_path / "data/raw")
    data = load_data(resolve_data_config(DataConfig()), seed=0, root=tmp_path)
    assert data.train_counts.tolist() == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    assert data.info["split_sizes"] == {"train": 1236, "val": 1000, "test": 10000}
    assert np.bincount(data.test.labels).tolist() == [1000] * 10 and data.class_names == fmnist.CLASS_NAMES
    assert data.info["index_hash"] == "d924e3d49abc809c"  # the LDAM draw of seed 0 on the real files
