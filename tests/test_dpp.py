"""ltrepro.dpp: IP-DPP's reference kernel, exact k-DPP samplers (rejection and Kulesza & Taskar's
spectral one), the feature kernel, exact marginals, and the released code's subsets."""
from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from ltrepro import dpp

CIFAR10_LT_IF100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
CIFAR100_LT_IF100 = [int(500 * (1 / 100) ** (c / 99)) for c in range(100)]


def brute_force(L: np.ndarray, k: int) -> dict[tuple[int, ...], float]:
    """P(S) = det L_S / sum_{|T| = k} det L_T by enumerating every k-subset."""
    dets = {s: float(np.linalg.det(L[np.ix_(s, s)])) for s in itertools.combinations(range(len(L)), k)}
    total = sum(dets.values())
    return {s: d / total for s, d in dets.items()}


def random_psd(n: int, rank: int, seed: int) -> np.ndarray:
    """A PSD kernel far from uniform: Gram matrix of random vectors with very uneven lengths."""
    rng = np.random.default_rng(seed)
    b = rng.normal(size=(n, rank)) * np.geomspace(0.3, 3.0, n)[:, None]
    return b @ b.T


def empirical(sampler, draws: int) -> Counter:
    return Counter(tuple(int(i) for i in sampler()) for _ in range(draws))


def max_deviation(counts: Counter, exact: dict[tuple[int, ...], float], draws: int) -> float:
    assert set(counts) <= set(exact)
    return max(abs(counts.get(s, 0) / draws - q) for s, q in exact.items())


# --- reference kernel ----------------------------------------------------------------------------


def test_reference_kernel_three_images():
    S = dpp.reference_kernel([1.0, 0.5, 0.0])
    expected = [[0.94444, 0.05556, 0.0], [0.05556, 0.94444, 0.0], [0.0, 0.0, 1.0]]
    np.testing.assert_allclose(np.round(S, 5), expected, atol=0)
    np.testing.assert_allclose(S.sum(axis=1), 1.0, atol=1e-15)
    np.testing.assert_allclose(np.linalg.eigvalsh(S), [0.88889, 1.0, 1.0], atol=5e-6)
    exact = brute_force(S, 2)
    assert exact[(0, 1)] == pytest.approx(0.32, abs=1e-12)
    assert exact[(0, 2)] == pytest.approx(0.34, abs=1e-12)
    assert exact[(1, 2)] == pytest.approx(0.34, abs=1e-12)


def test_reference_kernel_four_images_pairs():
    exact = brute_force(dpp.reference_kernel([0.9, 0.9, 0.1, 0.1]), 2)
    assert exact[(0, 1)] == pytest.approx(0.157778, abs=5e-7)
    assert exact[(2, 3)] == pytest.approx(0.175556, abs=5e-7)
    for pair in [(0, 2), (0, 3), (1, 2), (1, 3)]:
        assert exact[pair] == pytest.approx(0.166667, abs=5e-7)


def test_reference_kernel_structure_and_spectrum_bounds():
    rng = np.random.default_rng(3)
    n = 40
    p = rng.random(n)
    S = dpp.reference_kernel(p)
    u = p / n
    np.testing.assert_allclose(S, np.diag(1 - p * p.sum() / n**2) + np.outer(u, u), atol=1e-15)
    np.testing.assert_allclose(S @ np.ones(n), np.ones(n), atol=1e-14)
    lam = np.linalg.eigvalsh(S)
    assert lam.min() >= 1 - 2 / n and lam.max() <= 1 + 1e-12
    with pytest.raises(ValueError, match="probabilities"):
        dpp.reference_kernel([0.5, 1.5])


def test_reference_submatrix_matches_full_kernel():
    p = np.random.default_rng(4).random(30)
    subset = np.array([17, 2, 29, 5, 11, 0])
    np.testing.assert_allclose(
        dpp.reference_submatrix(p, subset), dpp.reference_kernel(p)[np.ix_(subset, subset)], atol=1e-15
    )


# --- elementary symmetric polynomials and marginals ----------------------------------------------


def test_log_esps_equal_plain_esps_and_survive_large_sizes():
    lam = np.array([0.5, 2.0, 0.0, 3.0, 1.5])
    log_e = dpp.log_elementary_symmetric_polynomials(lam, 3)
    for n in range(len(lam) + 1):
        for size in range(4):
            plain = sum(math.prod(c) for c in itertools.combinations(lam[:n], size))
            assert np.exp(log_e[size, n]) == pytest.approx(plain, rel=1e-12, abs=0)
    # e_500 of 5000 ones is C(5000, 500) ~ e^1600: far beyond float64, fine in log space.
    big = dpp.log_elementary_symmetric_polynomials(np.ones(5000), 500)
    assert big[500, 5000] == pytest.approx(math.lgamma(5001) - math.lgamma(501) - math.lgamma(4501), rel=1e-10)


@pytest.mark.parametrize("kind", ["random", "reference"])
def test_inclusion_probabilities_match_enumeration(kind):
    if kind == "random":
        L, k = random_psd(6, 6, seed=5), 3
    else:
        L, k = dpp.reference_kernel([1.0, 0.9, 0.5, 0.2, 0.0, 0.0]), 3
    exact = brute_force(L, k)
    marginals = np.array([sum(q for s, q in exact.items() if i in s) for i in range(len(L))])
    got = dpp.k_dpp_inclusion_probabilities(L, k)
    np.testing.assert_allclose(got, marginals, atol=1e-12)
    assert got.sum() == pytest.approx(k, abs=1e-12)
    if kind == "random":
        assert np.abs(marginals - k / len(L)).max() > 0.1  # a kernel far from uniform


# --- samplers against enumeration ----------------------------------------------------------------


def test_spectral_sampler_frequencies_match_enumeration():
    L, k, draws = random_psd(5, 5, seed=0), 2, 4000
    exact = brute_force(L, k)
    tolerance = 0.03  # ~4 standard deviations of a frequency at 4000 draws
    assert max(abs(q - 1 / len(exact)) for q in exact.values()) > 2 * tolerance  # uniform would fail
    rng = np.random.default_rng(7)
    counts = empirical(lambda: dpp.sample_k_dpp_spectral(L, k, rng), draws)
    assert max_deviation(counts, exact, draws) < tolerance


def test_rejection_sampler_frequencies_match_enumeration():
    # The reference kernel is within 2/N of the identity: only a tiny class is visibly non-uniform.
    p, k, draws = [1.0, 1.0, 0.0], 2, 20000
    exact = brute_force(dpp.reference_kernel(p), k)
    assert exact[(0, 1)] == pytest.approx(0.30435, abs=1e-5)
    tolerance = 0.012  # ~3.7 standard deviations of a frequency at 20000 draws
    assert max(abs(q - 1 / 3) for q in exact.values()) > 2 * tolerance  # uniform would fail
    rng = np.random.default_rng(8)
    counts = empirical(lambda: dpp.sample_k_dpp_rejection(p, k, rng), draws)
    assert max_deviation(counts, exact, draws) < tolerance


def test_rejection_sampler_falls_back_to_spectral():
    p = np.random.default_rng(9).random(12)
    with pytest.warns(RuntimeWarning, match="falling back to the spectral sampler"):
        got = dpp.sample_k_dpp_rejection(p, 5, np.random.default_rng(1), max_proposals=0)
    np.testing.assert_array_equal(got, dpp.sample_k_dpp_spectral(dpp.reference_kernel(p), 5, np.random.default_rng(1)))


def test_samplers_edge_sizes_and_output_format():
    p = np.random.default_rng(10).random(20)
    rng = np.random.default_rng(0)
    for sample in (dpp.sample_k_dpp_rejection(p, 7, rng), dpp.sample_k_dpp_spectral(dpp.reference_kernel(p), 7, rng)):
        assert sample.dtype == np.int64 and len(np.unique(sample)) == 7
        assert np.all(np.diff(sample) > 0) and 0 <= sample.min() and sample.max() < 20
    assert dpp.sample_k_dpp_rejection(p, 0, rng).size == 0
    np.testing.assert_array_equal(dpp.sample_k_dpp_rejection(p, 20, rng), np.arange(20))
    np.testing.assert_array_equal(dpp.sample_k_dpp_spectral(dpp.reference_kernel(p), 20, rng), np.arange(20))
    with pytest.raises(ValueError, match="k must lie"):
        dpp.sample_k_dpp_rejection(p, 21, rng)


def test_spectral_sampler_large_class_no_overflow():
    # N=1200 rather than a full CIFAR class keeps the O(N^3) eigh quick on a busy CPU, while
    # e_500 ~ C(1200, 500) ~ e^812 would already overflow float64 (max ~ e^709) outside log space.
    n, k = 1200, 500
    assert math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) > math.log(np.finfo(np.float64).max)
    p = np.random.default_rng(11).random(n)
    with np.errstate(over="raise", invalid="raise"):
        sample = dpp.sample_k_dpp_spectral(dpp.reference_kernel(p), k, np.random.default_rng(12))
    assert sample.shape == (k,) and len(np.unique(sample)) == k
    assert np.all(np.diff(sample) > 0) and sample.min() >= 0 and sample.max() < n


def test_spectral_sampler_rejects_k_above_rank():
    L = random_psd(5, 2, seed=13)
    assert len(dpp.sample_k_dpp_spectral(L, 2, np.random.default_rng(0))) == 2
    with pytest.raises(ValueError, match=r"N=5, k=3, rank=2"):
        dpp.sample_k_dpp_spectral(L, 3, np.random.default_rng(0))


def test_samplers_are_deterministic_per_seed():
    p = np.random.default_rng(14).random(300)
    L = dpp.reference_kernel(p[:60])
    for draw in (lambda s: dpp.sample_k_dpp_rejection(p, 100, np.random.default_rng(s)),
                 lambda s: dpp.sample_k_dpp_spectral(L, 20, np.random.default_rng(s))):
        np.testing.assert_array_equal(draw(5), draw(5))
        assert not np.array_equal(draw(5), draw(6))


# --- feature kernel ------------------------------------------------------------------------------


def test_feature_kernel_psd_full_rank_and_diagonal():
    rng = np.random.default_rng(15)
    features = rng.normal(size=(30, 4)) * rng.uniform(0.1, 10, size=(30, 1))  # rank 4 < 30 before the ridge
    p = rng.random(30)
    p[0] = 1.0
    ridge, floor = 0.1, 0.1
    L = dpp.feature_kernel(features, p, ridge=ridge, quality_floor=floor)
    q = 1 - p + floor
    np.testing.assert_allclose(np.diag(L), q**2 * (1 + ridge), atol=1e-14)
    np.testing.assert_allclose(L, L.T, atol=0)
    lam = np.linalg.eigvalsh(L)
    assert lam.min() >= ridge * q.min() ** 2 * (1 - 1e-9)  # PSD and full rank
    assert len(dpp.sample_k_dpp_spectral(L, 30, rng)) == 30  # any k <= N is drawable
    assert np.linalg.matrix_rank(dpp.feature_kernel(features, p, ridge=0.0)) == 4
    assert dpp.DEFAULT_RIDGE == 0.1 and dpp.DEFAULT_QUALITY_FLOOR == 0.1


def test_feature_kernel_avoids_drawing_duplicates_together():
    rng = np.random.default_rng(16)
    base = np.linalg.qr(rng.normal(size=(8, 4)))[0].T  # 4 orthonormal directions
    features = np.vstack([base[0], 3 * base[0], base[1], base[2], base[3]])  # items 0 and 1 coincide
    L = dpp.feature_kernel(features, np.full(5, 0.5))
    draws = 2000
    counts = empirical(lambda: dpp.sample_k_dpp_spectral(L, 2, rng), draws)
    together = counts[(0, 1)] / draws
    distinct = np.mean([counts[s] / draws for s in itertools.combinations(range(5), 2) if s != (0, 1)])
    assert together < 0.35 * distinct  # exact ratio 0.21 / 1.21 ~ 0.17; uniform would give 1


# --- the released code's subsets ------------------------------------------------------------------


def test_repo_subsets_cifar10_lt_known_positions():
    subsets = dpp.repo_subsets(CIFAR10_LT_IF100, 500)
    assert sorted(subsets) == [0, 1, 2, 3, 4]  # classes of 387 images or fewer are kept whole
    np.testing.assert_array_equal(subsets[4][:5], [632, 592, 599, 291, 72])
    np.testing.assert_array_equal(subsets[4], np.random.RandomState(42).choice(645, 500, replace=False))
    np.testing.assert_array_equal(subsets[3][:5], [969, 212, 416, 677, 550])
    np.testing.assert_array_equal(subsets[0][:5], [2611, 2536, 4419, 4123, 2341])
    for c, subset in subsets.items():
        assert subset.dtype == np.int64 and subset.shape == (500,)
        assert len(np.unique(subset)) == 500 and subset.min() >= 0 and subset.max() < CIFAR10_LT_IF100[c]


def test_repo_subsets_cifar100_lt_known_positions():
    subsets = dpp.repo_subsets(CIFAR100_LT_IF100, 50)
    assert CIFAR100_LT_IF100[49] == 51
    assert sorted(subsets) == [c for c, n in enumerate(CIFAR100_LT_IF100) if n > 50]
    np.testing.assert_array_equal(subsets[49][:5], [43, 40, 46, 12, 24])


def test_repo_subsets_depend_only_on_sizes_k_and_seed():
    first = dpp.repo_subsets(CIFAR10_LT_IF100, 500)
    again = dpp.repo_subsets(list(CIFAR10_LT_IF100), 500, seed=42)
    assert first.keys() == again.keys()
    for c, subset in first.items():
        np.testing.assert_array_equal(again[c], subset)
    assert not np.array_equal(dpp.repo_subsets(CIFAR10_LT_IF100, 500, seed=0)[4], first[4])
    assert dpp.repo_subsets([10, 5, 3], 10) == {}


try:  # dppy is a dev dependency: the oracle for repo_subsets.
    from dppy.finite_dpps import FiniteDPP
except ImportError:  # pragma: no cover - dev extra not installed
    FiniteDPP = None


@pytest.mark.skipif(FiniteDPP is None, reason="dppy (dev extra) not installed")
def test_repo_subsets_match_dppy_basis_exchange_initial_state():
    sizes, k = [260, 45, 130, 60, 61, 20], 60
    scores = np.random.default_rng(17)
    rng = np.random.RandomState(42)  # one stream for all classes, as in the released code
    expected = {}
    for c in range(len(sizes) - 1, -1, -1):  # reverse class order
        if sizes[c] <= k:
            continue
        sampler = FiniteDPP("likelihood", L=dpp.reference_kernel(scores.random(sizes[c])))
        sampler.sample_mcmc_k_dpp(size=k, random_state=rng)
        expected[c] = np.asarray(sampler.list_of_samples[0][0])
    got = dpp.repo_subsets(sizes, k)
    assert sorted(got) == sorted(expected) == [0, 2, 4]
    for c, subset in expected.items():
        np.testing.assert_array_equal(got[c], subset)
