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


def test_a_class_order_seed_deals_the_same_counts_to_shuffled_classes():
    profile = lt_counts(500, 100, 10)
    shuffled = lt_counts(500, 100, 10, class_order_seed=1)
    perm = np.random.RandomState(1).permutation(10)
    assert shuffled == [profile[k] for k in perm] and sorted(shuffled) == sorted(profile)
    assert shuffled != profile and shuffled[0] != 500  # class 0 is no longer the head
    assert lt_counts(500, 100, 10, class_order_seed=None) == profile
    labels = balanced_labels(40, 5)
    train_idx, _, info = lt_split(labels, 5, 30, 10, 5, seed=0, class_order_seed=2)
    expected = lt_counts(30, 10, 5, class_order_seed=2)
    assert info["train_counts"] == expected == np.bincount(labels[train_idx], minlength=5).tolist()
    assert info["class_order_seed"] == 2 and lt_split(labels, 5, 30, 10, 5, seed=0)[2]["class_order_seed"] is None


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


# --- data.split: which images of the balanced pool form the LT subset --------------------------

SPLITS = ("ldam", "glmc", "first_n")


def test_ldam_draw_is_unchanged_by_the_split_option():
    """Fingerprints computed with lt.py before data.split existed: the default draw must not move."""
    labels = balanced_labels(30, 5)
    expected = {
        (False, 0): "42254f87accf4625",
        (False, 3): "27b94b27bfe8e263",
        (False, 7): "dda4367c3c47be91",
        (True, 0): "790739b8db309c80",
        (True, 3): "6e148a4d965704d6",
        (True, 7): "7af6c328b83b36c8",
    }
    for (reserve, seed), digest in expected.items():
        for kwargs in ({}, {"split": "ldam"}, {"split": "ldam", "split_seed": seed}):
            train_idx, val_idx, info = lt_split(labels, 5, 30, 10, 5, seed=seed, reserve=reserve, **kwargs)
            assert index_hash(train_idx, val_idx) == digest, (reserve, seed, kwargs)
            assert info["split"] == "ldam" and info["split_seed"] == seed
    train_idx, val_idx, _ = lt_split(balanced_labels(50, 10, seed=1), 10, 50, 10, 5, seed=0)
    assert index_hash(train_idx, val_idx) == "e2de647790d1d9f8"


def glmc_reference(labels: np.ndarray, num_cls: int, imbanlance_rate: float, seed: int) -> tuple[np.ndarray, list[int]]:
    """A transcription of GLMC's ``Cifar10Imbanlance.produce_imbanlance_data`` (ynu-yangpeng/GLMC,
    GLMC-2023/imbalance_data/cifar10Imbanlance.py; FSGL's copy is the same) after main.py's
    ``np.random.seed(args.seed)``, on the global numpy RNG, returning the kept pool positions."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        data_percent = []
        data_num = int(labels.shape[0] / num_cls)
        for cls_idx in range(num_cls):
            num = data_num * (imbanlance_rate ** (cls_idx / (num_cls - 1)))
            data_percent.append(int(num))
        kept = []
        for i in range(1, num_cls + 1):
            a1 = labels >= i - 1
            a2 = labels < i
            index = a1 & a2
            positions = np.flatnonzero(index)  # task_train_x = x_train[index]: the class in file order
            data_num = positions.shape[0]
            index = np.random.choice(data_num, data_percent[i - 1], replace=False)
            kept.append(positions[index])
        return np.concatenate(kept), data_percent
    finally:
        np.random.set_state(state)


@pytest.mark.parametrize("num_classes, per_class, imbalance", [(10, 50, 100), (10, 60, 50), (20, 30, 10)])
def test_glmc_equals_a_transcription_of_the_reference(num_classes, per_class, imbalance):
    labels = balanced_labels(per_class, num_classes, seed=num_classes + per_class)
    expected, data_percent = glmc_reference(labels, num_classes, 1 / imbalance, seed=3407)
    before = np.random.get_state()
    train_idx, _, info = lt_split(
        labels, num_classes, per_class, imbalance, 5, seed=0, split="glmc", split_seed=3407
    )
    after = np.random.get_state()
    np.testing.assert_array_equal(train_idx, expected)  # the same images, in the same order
    assert info["train_counts"] == data_percent == lt_counts(per_class, imbalance, num_classes)
    assert info["split"] == "glmc" and info["split_seed"] == 3407
    # the draw is made on a local RandomState: the global numpy RNG is left as it was
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:]


def test_glmc_keeps_ldams_images_at_the_same_seed_but_not_its_leftovers():
    """Legacy ``choice(n, k, replace=False)`` is ``permutation(n)[:k]``: the same Fisher-Yates draws
    as ldam's ``shuffle``, so at one split seed both keep the same images. What differs: the seed
    the papers use (GLMC/FSGL 3407 vs the run seed) and the order of the leftover images, file
    order for glmc, from which validation is then drawn with RandomState(seed + 1)."""
    labels = balanced_labels(30, 5)
    counts = lt_counts(30, 10, 5)
    ldam_train, ldam_val, _ = lt_split(labels, 5, 30, 10, 5, seed=0)
    glmc_train, glmc_val, _ = lt_split(labels, 5, 30, 10, 5, seed=0, split="glmc")
    np.testing.assert_array_equal(glmc_train, ldam_train)
    assert index_hash(glmc_train, glmc_val) != index_hash(ldam_train, ldam_val)
    val_rng, expected_val = np.random.RandomState(1), []
    for c, n in enumerate(counts):
        rest = np.setdiff1d(np.flatnonzero(labels == c), glmc_train)  # file order
        val_rng.shuffle(rest)
        expected_val.append(rest[: min(5, len(rest))])
    np.testing.assert_array_equal(glmc_val, np.concatenate(expected_val))

    paper_train, _, _ = lt_split(labels, 5, 30, 10, 5, seed=0, split="glmc", split_seed=3407)
    assert not np.array_equal(np.sort(paper_train), np.sort(ldam_train))  # the FSGL configs' subset


@pytest.mark.parametrize("reserve", [False, True])
def test_first_n_keeps_the_first_images_of_each_class_in_file_order(reserve):
    labels = balanced_labels(30, 5)
    train_idx, val_idx, info = lt_split(labels, 5, 30, 10, 5, seed=0, reserve=reserve, split="first_n")
    counts = info["train_counts"]
    assert info["split"] == "first_n" and info["split_seed"] is None
    expected = []
    for c, n in enumerate(counts):
        left = np.setdiff1d(np.flatnonzero(labels == c), val_idx) if reserve else np.flatnonzero(labels == c)
        expected.append(left[:n])
    np.testing.assert_array_equal(train_idx, np.concatenate(expected))
    if not reserve:
        assert train_idx.tolist() == [i for c, n in enumerate(counts) for i in np.flatnonzero(labels == c)[:n]]
    for seed in (1, 5):
        again, _, _ = lt_split(labels, 5, 30, 10, 5, seed=seed, reserve=reserve, split="first_n", split_seed=seed + 9)
        if reserve:  # the reserved validation images move with the run seed, the rule does not
            assert np.bincount(labels[again], minlength=5).tolist() == counts
        else:
            np.testing.assert_array_equal(again, train_idx)


@pytest.mark.parametrize("split", ["ldam", "glmc"])
def test_split_seed_null_is_the_run_seed_and_validation_keeps_the_run_seed(split):
    labels = balanced_labels(30, 5)
    default = lt_split(labels, 5, 30, 10, 5, seed=4, split=split)
    explicit = lt_split(labels, 5, 30, 10, 5, seed=4, split=split, split_seed=4)
    np.testing.assert_array_equal(default[0], explicit[0])
    np.testing.assert_array_equal(default[1], explicit[1])
    assert default[2]["split_seed"] == explicit[2]["split_seed"] == 4

    other = lt_split(labels, 5, 30, 10, 5, seed=4, split=split, split_seed=9)
    np.testing.assert_array_equal(other[0], lt_split(labels, 5, 30, 10, 5, seed=9, split=split)[0])
    assert not np.array_equal(other[0], default[0]) and other[2]["split_seed"] == 9
    # reserved validation is drawn before the LT draw, with RandomState(run seed + 1) only
    reserved = lt_split(labels, 5, 30, 10, 5, seed=4, reserve=True, split=split, split_seed=9)
    np.testing.assert_array_equal(reserved[1], lt_split(labels, 5, 30, 10, 5, seed=4, reserve=True, split=split)[1])
    assert not np.array_equal(reserved[1], lt_split(labels, 5, 30, 10, 5, seed=9, reserve=True, split=split)[1])


@pytest.mark.parametrize("reserve", [False, True])
def test_every_split_keeps_the_same_counts_and_a_disjoint_validation(reserve):
    labels = balanced_labels(40, 6, seed=2)
    results = {split: lt_split(labels, 6, 40, 20, 6, seed=1, reserve=reserve, split=split) for split in SPLITS}
    counts = lt_counts(34 if reserve else 40, 20, 6)
    for split, (train_idx, val_idx, info) in results.items():
        assert info["train_counts"] == counts, split
        assert np.bincount(labels[train_idx], minlength=6).tolist() == counts, split
        assert np.bincount(labels[val_idx], minlength=6).tolist() == info["val_counts"], split
        assert info["val_counts"] == ([6] * 6 if reserve else [min(6, 40 - n) for n in counts]), split
        assert len(set(train_idx)) == len(train_idx) and len(set(val_idx)) == len(val_idx), split
        assert not set(train_idx) & set(val_idx), split
    hashes = {split: index_hash(*result[:2]) for split, result in results.items()}
    assert len(set(hashes.values())) == 3


def test_unknown_split_is_refused_naming_the_allowed_values():
    with pytest.raises(LtreproError, match=r"data.split: got 'random', expected one of 'ldam', 'glmc', 'first_n'"):
        lt_split(balanced_labels(30, 5), 5, 30, 10, 5, seed=0, split="random")


def test_config_validates_split_and_split_seed():
    from ltrepro.config import DataConfig, load_config

    assert (DataConfig().split, DataConfig().split_seed) == ("ldam", None)
    cfg = load_config(None, ["data.split=glmc", "data.split_seed=3407"])
    assert (cfg.data.split, cfg.data.split_seed, cfg.seed) == ("glmc", 3407, 0)
    with pytest.raises(LtreproError, match=r"data.split: got 'glmcc', expected one of 'ldam', 'glmc', 'first_n'"):
        load_config(None, ["data.split=glmcc"])
    with pytest.raises(LtreproError, match=r"data.split_seed: -1 is out of range; allowed: in \[0, 2147483647\]"):
        load_config(None, ["data.split_seed=-1"])
    with pytest.raises(LtreproError, match=r"data.split_seed: got 'x', expected an integer"):
        load_config(None, ["data.split_seed=x"])
