"""Determinantal point processes for IP-DPP's stage-2 undersampling (pure numpy, float64).

IP-DPP ("Long-Tailed Recognition via Information-Preservable Two-Stage Learning", Lin & Yuan,
arXiv:2510.08836) retrains the classifier in stage 2 on a class-balanced set: every class with
N > k training images keeps only k of them, drawn from a k-DPP (a DPP conditioned on |S| = k)
whose L-ensemble kernel is built from each image's score p_i, the stage-1 model's softmax
probability of the image's true label.

What lives here:

* :func:`reference_kernel` / :func:`reference_submatrix`: the method's kernel from the scores alone.
  It is within 2/N of the identity, so an exact k-DPP on it is practically uniform undersampling.
* :func:`sample_k_dpp_rejection`: an exact k-DPP sampler specialised to that kernel (uniform
  proposals accepted with probability det L_S), O(k^3) per proposal and no N x N matrix.
* :func:`sample_k_dpp_spectral`: the exact k-DPP sampler for any symmetric PSD kernel
  (Kulesza & Taskar 2012, Alg. 8 + Alg. 1), with elementary symmetric polynomials in log space.
* :func:`feature_kernel`: a quality x diversity L-ensemble on penultimate features
  (Kulesza & Taskar 2012, Sec. 3.1), an alternative that does prefer informative, diverse images.
* :func:`k_dpp_inclusion_probabilities`: exact marginals P(i in S), e.g. to report how far a kernel
  is from uniform undersampling (where every P(i in S) is k / N).
* :func:`repo_subsets`: a bit-exact reproduction of the subsets the authors' released code draws.

Every sampler takes a ``numpy.random.Generator`` so that draws are reproducible from a seed, and
returns sorted int64 positions within the class (0 .. N-1).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

__all__ = [
    "DEFAULT_QUALITY_FLOOR",
    "DEFAULT_RIDGE",
    "feature_kernel",
    "k_dpp_inclusion_probabilities",
    "log_elementary_symmetric_polynomials",
    "reference_kernel",
    "reference_submatrix",
    "repo_subsets",
    "sample_k_dpp_rejection",
    "sample_k_dpp_spectral",
]

DEFAULT_RIDGE = 0.1
"""Ridge added to the cosine-similarity Gram matrix in :func:`feature_kernel`: see its docstring."""

DEFAULT_QUALITY_FLOOR = 0.1
"""Quality floor in :func:`feature_kernel`: see its docstring."""

#: dppy's basis-exchange chain runs ``nb_iter = 10`` states by default, i.e. 9 moves after the start.
_DPPY_MCMC_MOVES = 9


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------


def _scores(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """``p`` as a float64 vector of probabilities; softmax scores outside [0, 1] mean a caller bug."""
    scores = np.asarray(p, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"scores p must be a non-empty 1-D array, got shape {scores.shape}")
    if not np.all(np.isfinite(scores)) or scores.min() < 0.0 or scores.max() > 1.0:
        raise ValueError("scores p must be probabilities in [0, 1] (softmax of the true label)")
    return scores


def _subset_size(k: int, n: int) -> int:
    """Validate the subset size k against the ground-set size n."""
    if isinstance(k, bool) or int(k) != k:
        raise ValueError(f"k must be an integer, got {k!r}")
    k = int(k)
    if not 0 <= k <= n:
        raise ValueError(f"k must lie in [0, N] = [0, {n}], got k={k}")
    return k


def _kernel(L: np.ndarray) -> np.ndarray:
    """``L`` as a symmetric float64 square matrix (symmetrised to absorb round-off)."""
    kernel = np.asarray(L, dtype=np.float64)
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"kernel L must be a square matrix, got shape {kernel.shape}")
    if not np.all(np.isfinite(kernel)):
        raise ValueError("kernel L has non-finite entries")
    scale = max(1.0, float(np.abs(kernel).max(initial=0.0)))
    if not np.allclose(kernel, kernel.T, rtol=0.0, atol=1e-10 * scale):
        raise ValueError("kernel L must be symmetric")
    return (kernel + kernel.T) / 2.0


# --------------------------------------------------------------------------------------------------
# the method's kernel
# --------------------------------------------------------------------------------------------------


def reference_kernel(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """IP-DPP's L-ensemble kernel S (N x N) for one class of N images with scores ``p``.

    With P = sum(p): S_ij = p_i p_j / N^2 for i != j and S_ii = 1 - p_i (P - p_i) / N^2, so every
    row sums to 1 (the all-ones vector is an eigenvector with eigenvalue 1), and S = D + u u^T with
    u = p / N and D = diag(1 - p_i P / N^2). By Gershgorin each eigenvalue lies within
    p_i (P - p_i) / N^2 < 1/N of S_ii <= 1, hence in [1 - 2/N, 1]: S is positive definite and
    within 2/N of the identity. An exact k-DPP on S therefore has P(S) = det S_S / e_k nearly
    constant over subsets: drawing from it is practically uniform undersampling, whatever p is.
    """
    scores = _scores(p)
    n = scores.size
    u = scores / n
    kernel = np.outer(u, u)
    np.fill_diagonal(kernel, 1.0 - scores * (scores.sum() - scores) / n**2)
    return kernel


def reference_submatrix(p: Sequence[float] | np.ndarray, subset: Sequence[int] | np.ndarray) -> np.ndarray:
    """The k x k principal submatrix S_{subset} of :func:`reference_kernel`, in O(k^2) memory.

    The rejection sampler evaluates det S_S for many proposals at N up to ~5000, so it must never
    form the N x N matrix: S_S = diag(S_ii, i in S) + (p_S p_S^T - diag(p_S^2)) / N^2.
    """
    scores = _scores(p)
    n = scores.size
    index = np.asarray(subset, dtype=np.int64).reshape(-1)
    if index.size and (index.min() < 0 or index.max() >= n):
        raise ValueError(f"subset positions must lie in [0, {n}), got min {index.min()} max {index.max()}")
    p_s = scores[index]
    sub = np.outer(p_s, p_s) / n**2
    np.fill_diagonal(sub, 1.0 - p_s * (scores.sum() - p_s) / n**2)
    return sub


def sample_k_dpp_rejection(
    p: Sequence[float] | np.ndarray,
    k: int,
    rng: np.random.Generator,
    max_proposals: int = 1000,
) -> np.ndarray:
    """Exact k-DPP sample from :func:`reference_kernel` (p) by rejection; sorted int64 positions.

    Propose S uniformly among the k-subsets and accept it with probability det S_S. This is valid
    because det S_S <= prod_{i in S} S_ii <= 1 (Hadamard's inequality), so an accepted S has
    P(S) proportional to det S_S, which is exactly the k-DPP. Since every eigenvalue of S is at least
    1 - 2/N, Cauchy interlacing gives det S_S >= (1 - 2/N)^k >= e^{-2} roughly, so the expected
    number of proposals is at most ~7.4 (close to 1 when k << N); each costs one k x k slogdet and
    no N x N matrix is formed. If ``max_proposals`` proposals are all rejected (vanishingly unlikely
    for the default) it warns and falls back to :func:`sample_k_dpp_spectral` on the full kernel.
    """
    scores = _scores(p)
    n = scores.size
    k = _subset_size(k, n)
    if k in (0, n):
        return np.arange(n, dtype=np.int64)[:k]
    for _ in range(int(max_proposals)):
        subset = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
        sign, logdet = np.linalg.slogdet(reference_submatrix(scores, subset))
        if sign > 0 and np.log(rng.random()) < logdet:
            return subset
    warnings.warn(
        f"k-DPP rejection sampler: {max_proposals} proposals rejected (N={n}, k={k}); "
        "falling back to the spectral sampler on the full N x N kernel",
        RuntimeWarning,
        stacklevel=2,
    )
    return sample_k_dpp_spectral(reference_kernel(scores), k, rng)


# --------------------------------------------------------------------------------------------------
# exact k-DPP for any kernel (Kulesza & Taskar 2012)
# --------------------------------------------------------------------------------------------------


def log_elementary_symmetric_polynomials(eigenvalues: Sequence[float] | np.ndarray, k: int) -> np.ndarray:
    """Table logE of shape (k+1, N+1) with logE[l, n] = log e_l(lambda_1, ..., lambda_n).

    Kulesza & Taskar 2012, Alg. 7, in log space: e_k grows like C(N, k) (about e^1600 at N=5000,
    k=500), which overflows float64, so the recursion
    e_l(n) = e_l(n-1) + lambda_n e_{l-1}(n-1) is run as a logaddexp. Zero eigenvalues give -inf
    terms, which logaddexp handles exactly (e_l(n) = 0 for l > n stays -inf).
    """
    lam = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    if lam.size and lam.min() < 0.0:
        raise ValueError("elementary symmetric polynomials need non-negative eigenvalues")
    n = lam.size
    k = _subset_size(k, n)
    with np.errstate(divide="ignore"):
        log_lam = np.log(lam)
    log_e = np.full((k + 1, n + 1), -np.inf)
    log_e[0, :] = 0.0
    for m in range(1, n + 1):
        log_e[1:, m] = np.logaddexp(log_e[1:, m - 1], log_lam[m - 1] + log_e[:-1, m - 1])
    return log_e


def _eigen(L: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Eigenvalues (clipped at 0), eigenvectors and numerical rank of a symmetric PSD kernel."""
    kernel = _kernel(L)
    lam, vectors = np.linalg.eigh(kernel)
    top = float(lam.max(initial=0.0))
    if lam.size and lam.min() < -1e-8 * max(1.0, top):
        raise ValueError(f"kernel L is not positive semi-definite (smallest eigenvalue {lam.min():.3g})")
    # Same tolerance as numpy.linalg.matrix_rank: below it an eigenvalue is round-off, not signal.
    tol = lam.size * np.finfo(np.float64).eps * max(top, 0.0)
    lam = np.where(lam > tol, lam, 0.0)
    return lam, vectors, int(np.count_nonzero(lam))


def sample_k_dpp_spectral(L: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Exact k-DPP sample for any symmetric PSD kernel ``L`` (N x N); sorted int64 positions.

    Kulesza & Taskar 2012, Alg. 8 then Alg. 1. (a) Eigendecompose L (tiny negative eigenvalues are
    round-off and are clipped to 0). (b) Elementary symmetric polynomials in log space
    (:func:`log_elementary_symmetric_polynomials`). (c) Walking n = N .. 1, keep eigenvector n with
    probability lambda_n e_{l-1}(n-1) / e_l(n), where l is how many remain to be kept: this picks
    the k-subset J of eigenvectors with probability prod_{n in J} lambda_n / e_k. (d) Draw the
    projection DPP spanned by the kept eigenvectors V (N x k) by the chain rule: pick item i with
    probability proportional to the squared row norm of V, then restrict V to the subspace
    orthogonal to e_i. Instead of re-orthonormalising V each step (O(N k^2) per step), the squared
    row norms of the projected V are updated incrementally, Gram-Schmidt style (they are the
    diagonal of the Schur complement of K = V V^T), for O(N k^2) in total.

    Raises ValueError when k exceeds the rank of L: a k-DPP needs k linearly independent items.
    """
    kernel = np.asarray(L)
    n = kernel.shape[0] if kernel.ndim == 2 else -1
    lam, vectors, rank = _eigen(kernel)
    k = _subset_size(k, n)
    if k > rank:
        raise ValueError(
            f"k-DPP needs k <= rank(L): N={n}, k={k}, rank={rank} (nonzero eigenvalues); "
            "add a ridge to the kernel or draw fewer items"
        )
    if k == 0:
        return np.zeros(0, dtype=np.int64)

    # (b) + (c): choose k eigenvectors.
    log_e = log_elementary_symmetric_polynomials(lam, k)
    with np.errstate(divide="ignore"):
        log_lam = np.log(lam)
    kept: list[int] = []
    remaining = k
    for m in range(n, 0, -1):
        if remaining == 0:
            break
        log_keep = log_lam[m - 1] + log_e[remaining - 1, m - 1] - log_e[remaining, m]
        if rng.random() < np.exp(log_keep):
            kept.append(m - 1)
            remaining -= 1
    v = vectors[:, kept]

    # (d): chain rule for the projection DPP K = V V^T. residual[i] = K_ii - K_iS K_SS^-1 K_Si is
    # the squared norm of row i of V after projecting out the items drawn so far; basis[:, t]
    # holds the t-th Gram-Schmidt direction evaluated at every item.
    residual = np.einsum("ij,ij->i", v, v)
    basis = np.zeros((n, k))
    chosen = np.zeros(k, dtype=np.int64)
    for t in range(k):
        weights = np.clip(residual, 0.0, None)
        weights[chosen[:t]] = 0.0
        i = int(rng.choice(n, p=weights / weights.sum()))
        chosen[t] = i
        column = (v @ v[i] - basis[:, :t] @ basis[i, :t]) / np.sqrt(residual[i])
        basis[:, t] = column
        residual = residual - column**2
    return np.sort(chosen)


# --------------------------------------------------------------------------------------------------
# an alternative, informative kernel
# --------------------------------------------------------------------------------------------------


def feature_kernel(
    features: np.ndarray,
    p: Sequence[float] | np.ndarray,
    ridge: float = DEFAULT_RIDGE,
    quality_floor: float = DEFAULT_QUALITY_FLOOR,
) -> np.ndarray:
    """Quality x diversity L-ensemble (N x N) on penultimate features (Kulesza & Taskar 2012, Sec. 3.1).

    L = diag(q) (F F^T + ridge I) diag(q), with F the L2-normalised rows of ``features`` (N, d),
    so F F^T holds cosine similarities (near-duplicates are rarely drawn together), and quality
    q_i = (1 - p_i) + quality_floor: images the model finds hard carry more information for the
    classifier, while the floor keeps perfectly classified images (p_i = 1) drawable.

    Defaults: ``ridge = 0.1`` makes L full rank (F F^T has rank <= d, e.g. 64 for ResNet-32, below
    k = 500) so that any k <= N is drawable, while keeping the diversity term dominant (a pair of
    identical features still has det ~ 0.21 q^4 against 1.21 q^4 for an orthogonal pair).
    ``quality_floor = 0.1`` bounds the quality ratio of the hardest to the easiest image at 11
    (121 on the diagonal of L), a strong but not exclusive preference. The diagonal is
    L_ii = q_i^2 (1 + ridge) for non-zero feature rows.
    """
    feats = np.asarray(features, dtype=np.float64)
    scores = _scores(p)
    if feats.ndim != 2 or feats.shape[0] != scores.size:
        raise ValueError(f"features must be (N, d) with N = len(p) = {scores.size}, got shape {feats.shape}")
    if not np.all(np.isfinite(feats)):
        raise ValueError("features have non-finite entries")
    if ridge < 0.0 or quality_floor < 0.0:
        raise ValueError(f"ridge and quality_floor must be >= 0, got {ridge} and {quality_floor}")
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    unit = feats / np.where(norms > 0.0, norms, 1.0)
    quality = (1.0 - scores) + quality_floor
    gram = unit @ unit.T
    gram[np.diag_indices_from(gram)] += ridge
    return quality[:, None] * gram * quality[None, :]


# --------------------------------------------------------------------------------------------------
# marginals
# --------------------------------------------------------------------------------------------------


def k_dpp_inclusion_probabilities(L: np.ndarray, k: int) -> np.ndarray:
    """Exact marginals P(i in S) (N,) of the k-DPP with kernel ``L``; they sum to k.

    Kulesza & Taskar 2012, Sec. 5.2.2: P(i in S) = sum_n w_n V_in^2 with
    w_n = lambda_n e_{k-1}(lambda without n) / e_k(lambda). e_{k-1} of all eigenvalues but one is
    assembled from prefix and suffix ESP tables in log space (O(N k), no overflow, no subtraction).
    Uniform undersampling has P(i in S) = k / N for every i: the spread of these marginals measures
    how far a kernel is from it.
    """
    kernel = np.asarray(L)
    n = kernel.shape[0] if kernel.ndim == 2 else -1
    lam, vectors, rank = _eigen(kernel)
    k = _subset_size(k, n)
    if k > rank:
        raise ValueError(f"k-DPP needs k <= rank(L): N={n}, k={k}, rank={rank} (nonzero eigenvalues)")
    if k == 0:
        return np.zeros(n)
    prefix = log_elementary_symmetric_polynomials(lam, k)  # prefix[j, m] = log e_j(lam_0 .. lam_{m-1})
    suffix = log_elementary_symmetric_polynomials(lam[::-1], k)[:, ::-1]  # suffix[j, m] = log e_j(lam_m ..)
    # log e_{k-1}(lam without m) = logsumexp_j prefix[j, m] + suffix[k-1-j, m+1], j = 0 .. k-1.
    terms = prefix[:k, :n] + suffix[:k][::-1, 1:]
    top = terms.max(axis=0)
    finite_top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        log_without = finite_top + np.log(np.exp(terms - finite_top).sum(axis=0))
        log_lam = np.log(lam)
    weights = np.exp(log_lam + log_without - prefix[k, n])
    return (vectors**2) @ weights


# --------------------------------------------------------------------------------------------------
# the released code's subsets
# --------------------------------------------------------------------------------------------------


def repo_subsets(class_sizes: Sequence[int], k: int, seed: int = 42) -> dict[int, np.ndarray]:
    """Bit-exact reproduction of the subsets IP-DPP's released code draws: {class: positions}.

    The released code calls dppy 0.3.3's basis-exchange MCMC,
    ``FiniteDPP('likelihood', L=S).sample_mcmc_k_dpp(size=k, random_state=RandomState(seed))``, one
    class after another in reverse class order, on one RandomState that is re-created for every
    resampling, and keeps the chain's first state, ``list_of_samples[0][0]``. That state is the
    chain's uniform initialisation, so the DPP step is a no-op: every resampling returns the same
    uniform subsets, whatever the model's scores. dppy re-draws the start only if det S_S <= 1e-9,
    which cannot happen on the reference kernel (det S_S >= (1 - 2(N-1)/N^2)^k, above ~e^-2).

    Replayed here from the random stream alone: for c = C-1 .. 0 with N_c > k, (1) the start
    ``rng.choice(N_c, k, replace=False)``, kept in dppy's (unsorted) order; (2) the 9 remaining chain
    moves, which only advance the stream: ``rng.rand()``, and when it is < 0.5 an exchange proposal
    ``rng.choice(k)``, ``rng.choice(N_c - k)`` and its acceptance draw ``rng.rand()``. Classes with
    N_c <= k are kept whole by the method and are absent from the result.
    """
    if isinstance(k, bool) or int(k) != k or int(k) < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    sizes = [int(size) for size in class_sizes]
    if any(size < 0 for size in sizes):
        raise ValueError(f"class sizes must be >= 0, got {sizes}")
    rng = np.random.RandomState(seed)
    subsets: dict[int, np.ndarray] = {}
    for c in range(len(sizes) - 1, -1, -1):
        n = sizes[c]
        if n <= k:
            continue
        start = rng.choice(n, k, replace=False).astype(np.int64)
        for _ in range(_DPPY_MCMC_MOVES):
            if rng.rand() < 0.5:
                rng.choice(k)
                rng.choice(n - k)
                rng.rand()
        subsets[c] = start
    return dict(sorted(subsets.items()))
