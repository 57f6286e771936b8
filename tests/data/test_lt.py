"""The LT profile, the LT draw and the validation carve-out, checked against the reference numbers."""
import numpy as np
import pytest

from ltrepro.data.lt import carve_validation, index_hash, lt_counts, lt_split
from ltrepro.errors import LtreproError


def balanced_labels(per_class: int, num_classes: int, seed: int = 0) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    np.random.default_rng(seed).shuffle(labels)
    return labels


def test_lt_counts_match_the_published_totals():
    assert sum(lt_counts(5000, 100, 10)) == 12406
    assert sum(lt_counts(500, 100, 100)) == 10847
    assert sum(lt_counts(6000, 100, 10)) == 14886
    assert lt_counts(500, 200, 100)[-1] == 2
    assert lt_counts(7, 10, 1) == [7]


def test_lt_split_reproduces_the_reference_draw():
    labels = balanced_labels(30, 5)
    counts = lt_counts(30, 10, 5)
    train_idx, _, info = lt_split(labels, 5, 30, 10, 5, seed=3)
    rng = np.random.RandomState(3)  # LDAM-DRW: one RandomState, shuffle each class in label order
    expected = []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        expected.append(idx[:n])
    np.testing.assert_array_equal(train_idx, np.concatenate(expected))
    assert info["train_counts"] == counts


def test_lt_split_spare_mode_val_takes_what_the_draw_left():
    labels = balanced_labels(30, 5)
    train_idx, val_idx, info = lt_split(labels, 5, 30, 10, 5, seed=0)
    counts = lt_counts(30, 10, 5)
    assert counts == [30, 16, 9, 5, 3]
    assert info["val_counts"] == [min(5, 30 - n) for n in counts] == [0, 5, 5, 5, 5]
    assert np.bincount(labels[val_idx], minlength=5).tolist() == info["val_counts"]
    assert np.bincount(labels[train_idx], minlength=5).tolist() == counts
    assert not set(train_idx) & set(val_idx)


def test_lt_split_reserve_mode_shrinks_n_max_and_stays_disjoint():
    labels = balanced_labels(30, 5)
    train_idx, val_idx, info = lt_split(labels, 5, 30, 10, 5, seed=0, reserve=True)
    assert info["n_max"] == 25 and info["n_max_requested"] == 30
    assert info["train_counts"] == lt_counts(25, 10, 5)
    assert info["val_counts"] == [5] * 5
    assert np.bincount(labels[train_idx], minlength=5).tolist() == lt_counts(25, 10, 5)
    assert not set(train_idx) & set(val_idx)


def test_lt_split_names_the_short_class():
    labels = np.concatenate([np.zeros(30, int), np.ones(5, int)])
    with pytest.raises(LtreproError, match="class 1"):
        lt_split(labels, 2, 30, 2, 0, seed=0)


def test_carve_validation_keeps_most_of_each_tail_class():
    sizes = [100, 30, 12, 4]
    labels = np.repeat(np.arange(4), sizes)
    train_idx, val_idx = carve_validation(labels, 4, 10, seed=0)
    assert np.bincount(labels[val_idx], minlength=4).tolist() == [10, 6, 2, 0]
    assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(len(labels)))
    again = carve_validation(labels, 4, 10, seed=0)
    np.testing.assert_array_equal(again[1], val_idx)


def test_index_hash_is_stable_and_order_sensitive():
    a, b = np.array([1, 2, 3]), np.array([4])
    assert index_hash(a, b) == index_hash(a.copy(), b.copy())
    assert index_hash(a, b) != index_hash(a[::-1], b)
    assert index_hash(a, b) != index_hash(np.array([1, 2]), np.array([3, 4]))
