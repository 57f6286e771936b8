"""Long-tailed subsets of a balanced pool, and the validation split that never touches test.

The profile follows the LDAM-DRW lineage (Cao et al., NeurIPS'19, and its code's
``imbalance_cifar.py``; docs/methods/README.md#long-tailed-cifar): class c keeps
``int(n_max * (1/IF) ** (c / (C - 1)))`` images. Which images, ``data.split``:

* ``ldam`` (default): each class's indices shuffled, in label order, with one
  ``numpy.random.RandomState(split seed)``, the first n_c kept (LDAM-DRW ``gen_imbalanced_data``).
* ``glmc``: GLMC (Du et al., CVPR'23) and FSGL: per class in label order,
  ``choice(len(class), n_c, replace=False)`` positions into the class's images in file order, from
  one RandomState(split seed) (their ``np.random.seed(3407)`` then ``np.random.choice``; nothing
  else draws from numpy in between). Legacy ``choice`` without replacement is ``permutation(n)[:k]``,
  the same Fisher-Yates draws as ``shuffle``, so the kept images equal ldam's at the same split
  seed; the images left over (and so validation) are taken in file order instead.
* ``first_n``: the first n_c images of each class in file order, no randomness (SHIKE, CVPR'23).

The split seed is ``data.split_seed``, or the run seed when that is null. With the reference's
seed and no reserved validation images each draw reproduces its reference code's subset exactly.

Which class gets which count, ``data.class_order_seed``: null keeps the profile in label order
(class 0 the head, class C-1 the tail), as every reference does, so frequency rank equals class
index. An integer s deals the counts out in the order of ``RandomState(s).permutation(C)``: class c
gets the ``perm[c]``-th largest count. Code that confuses the class index with the frequency rank
(the released FFN's KPS margins, FCC's factors) then gives a different result, which a sorted
profile hides.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

from ltrepro.errors import LtreproError

if TYPE_CHECKING:
    from ltrepro.config import DataConfig


def lt_counts(n_max: int, imbalance: float, num_classes: int, class_order_seed: int | None = None) -> list[int]:
    """Per-class counts of the exponential profile n_k = floor(n_max * (1/IF)^(k/(C-1))) of rank k:
    class c has rank c, or ``perm[c]`` of ``RandomState(class_order_seed).permutation(C)``."""
    if num_classes == 1:
        return [int(n_max)]
    profile = [int(n_max * (1.0 / imbalance) ** (k / (num_classes - 1.0))) for k in range(num_classes)]
    if class_order_seed is None:
        return profile
    return [profile[k] for k in np.random.RandomState(class_order_seed).permutation(num_classes)]


def draw_seed(split: str, split_seed: int | None, seed: int) -> int | None:
    """The seed the LT draw uses: ``split_seed``, or the run seed when null; None for first_n, which
    draws nothing at random."""
    if split == "first_n":
        return None
    return seed if split_seed is None else split_seed


def class_indices(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Indices of each class, in ascending index order."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    return [order[bounds[c] : bounds[c + 1]] for c in range(num_classes)]


def draw_per_class(
    pool: list[np.ndarray], counts: list[int], rng: np.random.RandomState
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Shuffle each class's pool in label order and keep the first counts[c]; return (kept, rest)."""
    kept, rest = [], []
    for idx, n in zip(pool, counts):
        idx = idx.copy()
        rng.shuffle(idx)
        kept.append(idx[:n])
        rest.append(idx[n:])
    return kept, rest


def draw_glmc(
    pool: list[np.ndarray], counts: list[int], rng: np.random.RandomState
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """GLMC / FSGL ``imbalance_data/cifar*Imbanlance.py``: per class in label order, ``counts[c]``
    positions ``rng.choice(len, counts[c], replace=False)`` into the class's indices in file order;
    return (kept, in choice order; rest, in file order)."""
    kept, rest = [], []
    for idx, n in zip(pool, counts):
        idx = np.sort(idx)
        chosen = rng.choice(len(idx), n, replace=False)
        kept.append(idx[chosen])
        rest.append(np.delete(idx, chosen))
    return kept, rest


def draw_first_n(pool: list[np.ndarray], counts: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The first ``counts[c]`` indices of each class in file order (SHIKE); return (kept, rest)."""
    ordered = [np.sort(idx) for idx in pool]
    return [idx[:n] for idx, n in zip(ordered, counts)], [idx[n:] for idx, n in zip(ordered, counts)]


SPLITS = ("ldam", "glmc", "first_n")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise LtreproError(f"data.split: got {split!r}, expected one of {', '.join(map(repr, SPLITS))}")


def refuse_split(dataset: str, cfg: "DataConfig", why: str = "is long-tailed as released") -> None:
    """Fail when a dataset that draws no LT subset is given a draw: data.split / data.split_seed /
    data.class_order_seed would otherwise be ignored without a word."""
    if cfg.split != "ldam":
        key = f"data.split={cfg.split}"
    elif cfg.split_seed is not None:
        key = f"data.split_seed={cfg.split_seed}"
    elif cfg.class_order_seed is not None:
        key = f"data.class_order_seed={cfg.class_order_seed}"
    else:
        return
    raise LtreproError(
        f"{key}: {dataset} {why}, so it has no LT subset to draw; data.split, data.split_seed and "
        f"data.class_order_seed apply only to datasets drawn from a balanced pool (fmnist_lt, cifar10_lt, "
        f"cifar100_lt, imagefolder_lt with data.imbalance > 1); leave data.split=ldam and the seeds null"
    )


def lt_split(
    labels: np.ndarray,
    num_classes: int,
    n_max: int,
    imbalance: float,
    val_per_class: int,
    seed: int,
    reserve: bool = False,
    split: str = "ldam",
    split_seed: int | None = None,
    class_order_seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Draw the LT training subset and a validation split from one balanced training pool.

    ``split`` chooses the draw (module docstring) and ``split_seed`` seeds it (None: ``seed``);
    ``class_order_seed`` deals the profile's counts to the classes in a shuffled order.
    Without ``reserve`` the LT subset is drawn first (the reference draw) and validation takes up to
    ``val_per_class`` of the images each class has left over; head classes of CIFAR may have none.
    With ``reserve`` validation is held out of every class first and n_max shrinks to what is left.
    Validation is always drawn with RandomState(seed + 1) of the run seed. Returns (train indices,
    val indices, info) with the counts that a run logs, the split, the resolved split seed
    (None for first_n, which draws nothing at random) and the class order seed.
    """
    check_split(split)
    pool = class_indices(labels, num_classes)
    available = [len(p) for p in pool]
    if min(available) == 0:
        raise LtreproError(f"class {available.index(0)} has no training images in the pool")
    rng = np.random.RandomState(draw_seed("ldam", split_seed, seed))
    val_rng = np.random.RandomState(seed + 1)
    info: dict = {
        "n_max_requested": int(n_max),
        "imbalance": float(imbalance),
        "reserve": reserve,
        "split": split,
        "split_seed": draw_seed(split, split_seed, seed),
        "class_order_seed": class_order_seed,
    }
    if reserve:
        val_parts, pool = draw_per_class(pool, [min(val_per_class, a - 1) for a in available], val_rng)
        n_max = min(n_max, max(len(p) for p in pool))
    counts = lt_counts(n_max, imbalance, num_classes, class_order_seed)
    short = [c for c, (n, p) in enumerate(zip(counts, pool)) if n > len(p)]
    if short:
        c = short[0]
        raise LtreproError(
            f"data.n_max={n_max} asks class {c} for {counts[c]} images but the pool has {len(pool[c])}; "
            f"lower data.n_max or data.imbalance"
        )
    if split == "glmc":
        train_parts, spare = draw_glmc(pool, counts, rng)
    elif split == "first_n":
        train_parts, spare = draw_first_n(pool, counts)
    else:
        train_parts, spare = draw_per_class(pool, counts, rng)
    if not reserve:
        val_parts, _ = draw_per_class(spare, [min(val_per_class, len(s)) for s in spare], val_rng)
    train_idx = np.concatenate(train_parts).astype(np.int64)
    val_idx = np.concatenate(val_parts).astype(np.int64)
    info.update(
        n_max=int(n_max),
        train_counts=[len(p) for p in train_parts],
        val_counts=[len(p) for p in val_parts],
    )
    return train_idx, val_idx, info


def carve_validation(
    labels: np.ndarray, num_classes: int, val_per_class: int, seed: int, max_fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """Hold validation out of a dataset that is long-tailed as released and has no spare images.

    Class c gives min(val_per_class, floor(max_fraction * n_c)) images, so a tail class keeps at
    least 80% of its few images and classes with fewer than 5 images give none (iNat-2018).
    Returns (train indices, val indices).
    """
    pool = class_indices(labels, num_classes)
    counts = [min(val_per_class, int(max_fraction * len(p))) for p in pool]
    val_parts, train_parts = draw_per_class(pool, counts, np.random.RandomState(seed + 1))
    return np.concatenate(train_parts).astype(np.int64), np.concatenate(val_parts).astype(np.int64)


def index_hash(*arrays: np.ndarray) -> str:
    """A short, stable fingerprint of index arrays: the same LT subset gives the same hash."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]
