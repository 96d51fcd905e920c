"""Influence functions of classical density estimators (Kong & Chaudhuri, NeurIPS 2021, §3).

The loss is the negative log-likelihood, ``ℓ(z; A(X)) = -log p(z; A(X))``, and the influence of a
training point ``x_i`` over a test point ``z`` is the leave-one-out difference of Definition 1::

    IF_{X,A}(x_i, z) = ℓ(z; A(X_{-i})) - ℓ(z; A(X))

Positive values make ``x_i`` a *proponent* of ``z``, negative values an *opponent*.

Self-influence convention (paper §2, used by eqs. 1, 2 and 5): ``Self-IF(x_i) = IF(x_i, x_i)``,
i.e. the test point is the training point itself, evaluated under the model fitted on the full
``X`` (which *contains* ``x_i``) and under the model refitted on ``X_{-i}``. In particular, for the
k-NN estimator ``x_i`` is its own first nearest neighbour (distance 0) in ``X``, so
``R_k(x_i; X)`` counts ``x_i`` itself and the self-influence needs ``k >= 2``.

Three estimators are covered, each with a closed form, a self-influence and an exact refit:

* k-NN density estimator, eq. (1) -- exact: equals the leave-one-out refit to rounding.
* Gaussian KDE, eq. (2) -- exact: equals the leave-one-out refit to rounding.
* Well-separated spherical GMM (WS-GMM), eqs. (3)-(5) -- first order in ``1/N_k``; the gap to the
  refit is ``O(N_k^-2)``.

WS-GMM fitting convention (identical in the full fit and in every refit): clusters are *given*
(``labels``, Assumption 1); each cluster ``k`` gets the maximum-likelihood estimates of eq. (3) --
``μ_k`` = cluster mean, ``σ_k² = Σ ||x - μ_k||² / (N_k d)`` (biased ML variance), weight
``N_k / N`` -- and a point ``z`` is scored by the single component of the cluster nearest to it,
``k(z) = argmin_k min_{x ∈ X_k} ||z - x||`` (the nearest training point's label), exactly as the
paper defines ``p_WS-GMM``. In a refit ``x_i`` and its label are dropped and ``k(z)`` is recomputed.

Note on eqs. (4)-(5): expanding the refit to first order in ``1/N_0`` gives

    IF(x_i, z) = (d+2)/(2N_0) + (||z-μ_0||² ||x_i-μ_0||² / (d σ_0²) - ||z-x_i||²) / (2 N_0 σ_0²) - 1/N

for ``x_i`` in the cluster of ``z``. The paper prints ``||z-μ_0||²/σ_0²`` in place of
``||z-μ_0||² ||x_i-μ_0||² / (d σ_0²)``; the printed term is not scale invariant (it has units of
1/length²) and leaves an ``O(1/N_0)`` gap to the refit, whereas the expression above leaves the
``O(N_0^-2)`` gap the paper states (checked in ``tests/analysis/test_classical.py``). The corrected expansion
is the default; ``paper_literal=True`` reproduces the printed formula.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Protocol

import numpy as np
import numpy.typing as npt
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist
from scipy.special import gammaln, logsumexp

__all__ = [
    "DensityEstimator",
    "KDEDensity",
    "KNNDensity",
    "WSGMMDensity",
    "gmm_influence",
    "gmm_nll",
    "gmm_self_influence",
    "kde_influence",
    "kde_nll",
    "kde_self_influence",
    "knn_influence",
    "knn_nll",
    "knn_self_influence",
    "loo_influence",
    "loo_self_influence",
    "make_estimator",
    "plot_classical",
    "six_cluster_toy",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]
Method = Literal["knn", "kde", "gmm"]

#: Upper bound on the number of float64 entries of one intermediate block (64 MiB).
_BLOCK_ELEMENTS = 1 << 23


# --------------------------------------------------------------------------------------------
# Validation and small numerical helpers
# --------------------------------------------------------------------------------------------


def _as_points(name: str, A: npt.ArrayLike, dim: int | None = None) -> FloatArray:
    """Return ``A`` as a finite float64 ``[n, d]`` array, raising ``ValueError`` naming ``name``."""
    arr = np.asarray(A, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n_points, n_dims], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name} has {arr.shape[1]} dimensions but the training set X has {dim}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _train_and_test(X: npt.ArrayLike, Z: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Validate a training set (at least 2 points, so that ``X_{-i}`` is non-empty) and test set."""
    Xa = _as_points("X", X)
    if Xa.shape[0] < 2:
        raise ValueError(f"X must hold at least 2 training points, got {Xa.shape[0]}")
    return Xa, _as_points("Z", Z, dim=Xa.shape[1])


def _check_k(k: int, k_max: int, why: str) -> int:
    """``k`` must be an integer with ``1 <= k <= k_max``; ``why`` explains the bound in the message."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise ValueError(f"k must be an integer, got {k!r}")
    if not 1 <= k <= k_max:
        raise ValueError(f"k must satisfy 1 <= k <= {k_max} ({why}), got k={k}")
    return int(k)


def _check_k_influence(k: int, n_train: int) -> int:
    """Influence needs ``k < N``: ``R_{k+1}(z; X)`` and ``R_k(z; X_{-i})`` must exist."""
    return _check_k(k, n_train - 1, f"k < N = {n_train} training points, so that X without x_i has k points")


def _check_bandwidth(bandwidth: float) -> float:
    bw = float(bandwidth)
    if not np.isfinite(bw) or bw <= 0.0:
        raise ValueError(f"bandwidth must be a finite positive number, got {bandwidth!r}")
    return bw


def _log1m_inv(n: int) -> float:
    """``log((n-1)/n)``, the change of the ``1/N`` normalisation when one point is removed."""
    return float(np.log1p(-1.0 / n))


def _chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices covering ``range(n)`` in blocks of at most ``size``."""
    size = max(1, int(size))
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _block_rows(n_other: int) -> int:
    """Rows per block so that a ``[rows, n_other]`` float64 block stays under ``_BLOCK_ELEMENTS``."""
    return max(1, _BLOCK_ELEMENTS // max(1, n_other))


def _logsumexp_leave_one_out(a: FloatArray) -> FloatArray:
    """For every entry of ``a = [N, M]``: ``out[i, m] = log Σ_{j != i} exp(a[j, m])``, computed stably.

    For ``i`` not the column's arg-max, ``exp(a[i])`` is at most half of the column total, so
    ``L + log1p(-exp(a[i] - L))`` is well conditioned; the arg-max entry is recomputed directly
    from the other terms. Requires ``N >= 2`` finite entries per column.
    """
    total = logsumexp(a, axis=0)
    with np.errstate(divide="ignore"):
        out = total + np.log1p(-np.exp(a - total))
    top, cols = np.argmax(a, axis=0), np.arange(a.shape[1])
    rest = a.copy()
    rest[top, cols] = -np.inf
    out[top, cols] = logsumexp(rest, axis=0)
    return out


# --------------------------------------------------------------------------------------------
# k-NN density estimator, eq. (1)
# --------------------------------------------------------------------------------------------


def _log_unit_ball_volume(d: int) -> float:
    """``log V_d`` with ``V_d = π^{d/2} / Γ(d/2 + 1)``, the volume of the unit ball in R^d."""
    return 0.5 * d * np.log(np.pi) - float(gammaln(0.5 * d + 1.0))


def _log_radii(radii: FloatArray, k: int) -> FloatArray:
    """``log R``; a zero radius means ``z`` coincides with ``>= k`` training points (infinite density)."""
    if np.any(radii <= 0.0):
        raise ValueError(
            f"a query point coincides with at least k={k} training points (R_k = 0), so the k-NN density "
            "is infinite there; use a larger k or remove duplicate points"
        )
    return np.log(radii)


def _knn_radii(D: FloatArray, k: int) -> tuple[FloatArray, FloatArray]:
    """``(R_k(z; X), R_{k+1}(z; X))`` for each column of the distance matrix ``D = [N, M]``, ``k < N``."""
    part = np.partition(D, (k - 1, k), axis=0)
    return part[k - 1], part[k]


def _knn_if(n_train: int, d: int, log_rk: FloatArray, log_rk1: FloatArray, inside: npt.NDArray[np.bool_]) -> FloatArray:
    """Eq. (1): ``log((N-1)/N) + d log(R_{k+1}/R_k)`` if ``||x_i - z|| <= R_k`` else ``log((N-1)/N)``."""
    return _log1m_inv(n_train) + np.where(inside, d * (log_rk1 - log_rk), 0.0)


def knn_nll(X: npt.ArrayLike, Z: npt.ArrayLike, k: int) -> FloatArray:
    """Negative log-likelihood ``-log p_kNN(z; X)`` with ``p_kNN(z; X) = k / (N V_d R_k(z; X)^d)`` (§3).

    Returns ``[M]``. ``R_k(z; X)`` is the distance from ``z`` to its k-th nearest point of ``X``
    (a training point equal to ``z`` counts, at distance 0).
    """
    Xa, Za = _train_and_test(X, Z)
    n, d = Xa.shape
    k = _check_k(k, n, f"the k-NN density needs at least k points, X has N = {n}")
    out = np.empty(Za.shape[0])
    for sl in _chunks(Za.shape[0], _block_rows(n)):
        r_k = np.partition(cdist(Xa, Za[sl]), k - 1, axis=0)[k - 1]
        out[sl] = -np.log(k) + np.log(n) + _log_unit_ball_volume(d) + d * _log_radii(r_k, k)
    return out


def knn_influence(X: npt.ArrayLike, Z: npt.ArrayLike, k: int) -> FloatArray:
    """Influence ``IF_{X,kNN}(x_i, z_m)`` of every training point over every test point, eq. (1).

    Removing ``x_i`` changes the normalisation ``N -> N-1`` for every ``z``; if ``x_i`` is one of
    the ``k`` nearest neighbours of ``z`` (``||x_i - z|| <= R_k(z; X)``), the k-th neighbour radius
    of ``X_{-i}`` becomes ``R_{k+1}(z; X)``, otherwise it is unchanged. This is exact (ties
    included: a tie at ``R_k`` gives ``R_{k+1} = R_k``).

    Args:
        X: training set ``[N, d]``.
        Z: test points ``[M, d]``.
        k: number of neighbours, ``1 <= k < N``.

    Returns:
        ``[N, M]`` array of influences (nats).
    """
    Xa, Za = _train_and_test(X, Z)
    n, d = Xa.shape
    k = _check_k_influence(k, n)
    out = np.empty((n, Za.shape[0]))
    for sl in _chunks(Za.shape[0], _block_rows(n)):
        D = cdist(Xa, Za[sl])
        r_k, r_k1 = _knn_radii(D, k)
        out[:, sl] = _knn_if(n, d, _log_radii(r_k, k)[None], np.log(r_k1)[None], D <= r_k[None])
    return out


def knn_self_influence(X: npt.ArrayLike, k: int) -> FloatArray:
    """Self-influence ``IF_{X,kNN}(x_i, x_i)``, eq. (1) with ``z = x_i``: ``[N]``.

    ``x_i`` is its own first neighbour (distance 0 <= R_k), so every self-influence takes the
    second branch: ``log((N-1)/N) + d log(R_{k+1}(x_i; X) / R_k(x_i; X))``. Requires ``k >= 2``
    (with ``k = 1``, ``R_1(x_i; X) = 0`` and the density at ``x_i`` is infinite).
    """
    Xa = _as_points("X", X)
    n, d = Xa.shape
    k = _check_k_influence(k, n)
    if k < 2:
        raise ValueError("knn_self_influence needs k >= 2: with k=1, R_1(x_i; X) = 0 (x_i is its own neighbour)")
    dist, _ = cKDTree(Xa).query(Xa, k=k + 1)
    inside = np.ones(n, dtype=bool)
    return _knn_if(n, d, _log_radii(dist[:, k - 1], k), np.log(dist[:, k]), inside)


# --------------------------------------------------------------------------------------------
# Gaussian kernel density estimator, eq. (2)
# --------------------------------------------------------------------------------------------


def _kde_log_terms(X: FloatArray, Z: FloatArray, bandwidth: float) -> FloatArray:
    """``a[i, m] = log(K_σ(z_m - x_i) / N)``: the log of the i-th summand of ``p_KDE(z_m; X)``.

    ``K_σ`` is the density of ``N(0, σ² I)`` in ``d`` dimensions.
    """
    n, d = X.shape
    log_norm = -0.5 * d * np.log(2.0 * np.pi * bandwidth**2) - np.log(n)
    return log_norm - cdist(X, Z, "sqeuclidean") / (2.0 * bandwidth**2)


def kde_nll(X: npt.ArrayLike, Z: npt.ArrayLike, bandwidth: float) -> FloatArray:
    """``-log p_KDE(z; X)`` with ``p_KDE(z; X) = (1/N) Σ_i K_σ(z - x_i)``, Gaussian kernel (§3): ``[M]``."""
    Xa, Za = _train_and_test(X, Z)
    bw = _check_bandwidth(bandwidth)
    out = np.empty(Za.shape[0])
    for sl in _chunks(Za.shape[0], _block_rows(Xa.shape[0])):
        out[sl] = -logsumexp(_kde_log_terms(Xa, Za[sl], bw), axis=0)
    return out


def kde_influence(X: npt.ArrayLike, Z: npt.ArrayLike, bandwidth: float) -> FloatArray:
    """Influence ``IF_{X,KDE}(x_i, z_m)`` of every training point over every test point, eq. (2).

    ``IF = log((N-1)/N) + log(1 + (K_σ(z - x_i)/N) / (p_KDE(z; X) - K_σ(z - x_i)/N))``, evaluated
    in the log domain (``log1p(exp(·))`` of a log-ratio whose denominator is a leave-one-out
    log-sum-exp), so that it stays exact when one kernel dominates or all kernels underflow.

    Args:
        X: training set ``[N, d]``.
        Z: test points ``[M, d]``.
        bandwidth: kernel standard deviation ``σ > 0``.

    Returns:
        ``[N, M]`` array of influences (nats).
    """
    Xa, Za = _train_and_test(X, Z)
    bw = _check_bandwidth(bandwidth)
    out = np.empty((Xa.shape[0], Za.shape[0]))
    for sl in _chunks(Za.shape[0], _block_rows(Xa.shape[0])):
        a = _kde_log_terms(Xa, Za[sl], bw)
        out[:, sl] = _log1m_inv(Xa.shape[0]) + np.logaddexp(0.0, a - _logsumexp_leave_one_out(a))
    return out


def kde_self_influence(X: npt.ArrayLike, bandwidth: float) -> FloatArray:
    """Self-influence ``IF_{X,KDE}(x_i, x_i)``, eq. (2) with ``z = x_i``: ``[N]``.

    Large for points in sparse regions (small ``p_KDE(x_i; X)``), small in dense regions.
    """
    Xa = _as_points("X", X)
    out = np.empty(Xa.shape[0])
    for sl in _chunks(Xa.shape[0], _block_rows(Xa.shape[0])):
        out[sl] = np.diagonal(kde_influence(Xa, Xa[sl], bandwidth)[sl])
    return out


# --------------------------------------------------------------------------------------------
# Well-separated spherical GMM, eqs. (3)-(5)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _WSGMMFit:
    """Maximum-likelihood WS-GMM of eq. (3): one spherical Gaussian per given cluster."""

    clusters: IntArray  # [N] cluster index (0..K-1) of every training point
    counts: FloatArray  # [K] N_k
    means: FloatArray  # [K, d] μ_k
    variances: FloatArray  # [K] σ_k²

    @classmethod
    def fit(cls, X: FloatArray, clusters: IntArray, n_clusters: int) -> _WSGMMFit:
        counts = np.bincount(clusters, minlength=n_clusters).astype(np.float64)
        means = np.zeros((n_clusters, X.shape[1]))
        np.add.at(means, clusters, X)
        means /= counts[:, None]
        sq = np.sum((X - means[clusters]) ** 2, axis=1)
        variances = np.bincount(clusters, weights=sq, minlength=n_clusters) / (counts * X.shape[1])
        return cls(clusters=clusters, counts=counts, means=means, variances=variances)

    def assign(self, X: FloatArray, Z: FloatArray) -> IntArray:
        """``k(z) = argmin_k d(z, X_k)``: the cluster of the nearest training point."""
        nearest = np.empty(Z.shape[0], dtype=np.intp)
        for sl in _chunks(Z.shape[0], _block_rows(X.shape[0])):
            nearest[sl] = np.argmin(cdist(Z[sl], X, "sqeuclidean"), axis=1)
        return self.clusters[nearest]


def _encode_labels(labels: npt.ArrayLike, n_train: int, min_size: int) -> tuple[IntArray, int]:
    """Map arbitrary cluster labels to ``0..K-1``; each cluster needs ``N_k >= min_size`` points."""
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] != n_train:
        raise ValueError(
            f"labels must be a 1-D array with one cluster label per training point ({n_train}), got shape {lab.shape}"
        )
    uniq, clusters = np.unique(lab, return_inverse=True)
    counts = np.bincount(clusters, minlength=uniq.size)
    if np.any(counts < min_size):
        small = [str(u) for u, c in zip(uniq, counts, strict=True) if c < min_size]
        raise ValueError(f"every cluster needs at least {min_size} points here; too small: {', '.join(small)}")
    return clusters.astype(np.intp), int(uniq.size)


def _fit_gmm(X: npt.ArrayLike, labels: npt.ArrayLike, min_size: int) -> tuple[FloatArray, _WSGMMFit]:
    """Eq. (3) on validated inputs. The fit needs ``N_k >= 2`` (positive variance); influence needs
    ``N_k >= 3`` so that the leave-one-out refit it approximates is defined."""
    Xa = _as_points("X", X)
    clusters, n_clusters = _encode_labels(labels, Xa.shape[0], min_size)
    fit = _WSGMMFit.fit(Xa, clusters, n_clusters)
    if np.any(fit.variances <= 0.0):
        raise ValueError("a cluster has zero variance (all its points are identical); the WS-GMM is degenerate")
    return Xa, fit


def gmm_nll(X: npt.ArrayLike, Z: npt.ArrayLike, labels: npt.ArrayLike) -> FloatArray:
    """``-log p_WS-GMM(z)`` with ``p_WS-GMM(z) = (N_k/N) N(z; μ_k, σ_k² I)``, ``k = k(z)``, eq. (3): ``[M]``."""
    Xa, fit = _fit_gmm(X, labels, min_size=2)
    Za = _as_points("Z", Z, dim=Xa.shape[1])
    n, d = Xa.shape
    c = fit.assign(Xa, Za)
    var = fit.variances[c]
    sq = np.sum((Za - fit.means[c]) ** 2, axis=1)
    return -np.log(fit.counts[c] / n) + 0.5 * d * np.log(2.0 * np.pi * var) + sq / (2.0 * var)


def _ws_gmm_same_cluster_if(
    n_k: FloatArray,
    var_k: FloatArray,
    d: int,
    sq_z_mu: FloatArray,
    sq_z_x: FloatArray,
    sq_x_mu: FloatArray,
    paper_literal: bool,
) -> FloatArray:
    """Eq. (4) without its ``-1/N`` term, for ``x_i`` in the cluster of ``z`` (broadcasting).

    ``(d+2)/(2N_k) + (c - ||z - x_i||²) / (2 N_k σ_k²)`` with ``c = ||z-μ_k||² ||x_i-μ_k||² / (d σ_k²)``
    (first-order expansion of the refit) or, with ``paper_literal``, ``c = ||z-μ_k||² / σ_k²`` as
    printed in the paper (see the module docstring).
    """
    coupling = sq_z_mu / var_k if paper_literal else sq_z_mu * sq_x_mu / (d * var_k)
    return (d + 2.0) / (2.0 * n_k) + (coupling - sq_z_x) / (2.0 * n_k * var_k)


def gmm_influence(
    X: npt.ArrayLike, Z: npt.ArrayLike, labels: npt.ArrayLike, *, paper_literal: bool = False
) -> FloatArray:
    """Influence ``IF_{X,WS-GMM}(x_i, z_m)`` of every training point over every test point, eq. (4).

    For ``x_i`` outside the cluster of ``z``: ``-1/N``. For ``x_i`` in the cluster ``k`` of ``z``:
    ``(d+2)/(2N_k) + (||z-μ_k||² ||x_i-μ_k||² / (d σ_k²) - ||z-x_i||²) / (2 N_k σ_k²) - 1/N``.
    Both are first order; the gap to the leave-one-out refit is ``O(N_k^-2)``.

    Args:
        X: training set ``[N, d]``.
        Z: test points ``[M, d]``; each is scored under the cluster of its nearest training point.
        labels: ``[N]`` cluster label of each training point (Assumption 1); every ``N_k >= 3``.
        paper_literal: use the formula exactly as printed in the paper (an ``O(1/N_k)`` gap).

    Returns:
        ``[N, M]`` array of influences (nats).
    """
    Xa, fit = _fit_gmm(X, labels, min_size=3)
    Za = _as_points("Z", Z, dim=Xa.shape[1])
    n, d = Xa.shape
    cz = fit.assign(Xa, Za)  # [M]
    sq_x_mu = np.sum((Xa - fit.means[fit.clusters]) ** 2, axis=1)  # [N]
    out = np.empty((n, Za.shape[0]))
    for sl in _chunks(Za.shape[0], _block_rows(n)):
        c = cz[sl]
        same = fit.clusters[:, None] == c[None, :]
        sq_z_mu = np.sum((Za[sl] - fit.means[c]) ** 2, axis=1)
        term = _ws_gmm_same_cluster_if(
            fit.counts[c][None],
            fit.variances[c][None],
            d,
            sq_z_mu[None],
            cdist(Xa, Za[sl], "sqeuclidean"),
            sq_x_mu[:, None],
            paper_literal,
        )
        out[:, sl] = np.where(same, term, 0.0) - 1.0 / n
    return out


def gmm_self_influence(X: npt.ArrayLike, labels: npt.ArrayLike, *, paper_literal: bool = False) -> FloatArray:
    """Self-influence ``IF_{X,WS-GMM}(x_i, x_i)``, eq. (5): ``[N]``.

    ``(d+2)/(2N_k) + ||x_i-μ_k||⁴ / (2 d N_k σ_k⁴) - 1/N`` (eq. (4) with ``z = x_i``; the paper's
    printed eq. (5) has ``||x_i-μ_k||² / (2 N_k σ_k⁴)``, reproduced by ``paper_literal=True``).
    Far from the cluster centre, in small or tight clusters: large self-influence.
    """
    Xa, fit = _fit_gmm(X, labels, min_size=3)
    c = fit.clusters
    sq_x_mu = np.sum((Xa - fit.means[c]) ** 2, axis=1)
    term = _ws_gmm_same_cluster_if(
        fit.counts[c], fit.variances[c], Xa.shape[1], sq_x_mu, np.zeros_like(sq_x_mu), sq_x_mu, paper_literal
    )
    return term - 1.0 / Xa.shape[0]


# --------------------------------------------------------------------------------------------
# Estimator objects and the leave-one-out ground truth (Definition 1)
# --------------------------------------------------------------------------------------------


class DensityEstimator(Protocol):
    """A density estimator ``A`` with its loss, closed-form influence and self-influence."""

    @property
    def name(self) -> str:
        """Display name used in figure titles."""
        ...

    def loss(self, X: FloatArray, Z: FloatArray, drop: int | None = None) -> FloatArray:
        """``ℓ(z; A(X))`` for every row of ``Z``, or ``ℓ(z; A(X_{-drop}))`` if ``drop`` is given."""
        ...

    def influence(self, X: FloatArray, Z: FloatArray) -> FloatArray:
        """Closed-form ``IF(x_i, z_m)``: ``[N, M]``."""
        ...

    def self_influence(self, X: FloatArray) -> FloatArray:
        """Closed-form ``IF(x_i, x_i)``: ``[N]``."""
        ...


def _without(A: FloatArray, drop: int | None) -> FloatArray:
    return A if drop is None else np.delete(A, drop, axis=0)


@dataclass(frozen=True)
class KNNDensity:
    """k-NN density estimator with ``k`` neighbours (eq. 1)."""

    k: int
    name: ClassVar[str] = "k-NN"

    def loss(self, X: FloatArray, Z: FloatArray, drop: int | None = None) -> FloatArray:
        return knn_nll(_without(X, drop), Z, self.k)

    def influence(self, X: FloatArray, Z: FloatArray) -> FloatArray:
        return knn_influence(X, Z, self.k)

    def self_influence(self, X: FloatArray) -> FloatArray:
        return knn_self_influence(X, self.k)


@dataclass(frozen=True)
class KDEDensity:
    """Gaussian KDE with bandwidth ``σ`` (eq. 2)."""

    bandwidth: float
    name: ClassVar[str] = "KDE"

    def loss(self, X: FloatArray, Z: FloatArray, drop: int | None = None) -> FloatArray:
        return kde_nll(_without(X, drop), Z, self.bandwidth)

    def influence(self, X: FloatArray, Z: FloatArray) -> FloatArray:
        return kde_influence(X, Z, self.bandwidth)

    def self_influence(self, X: FloatArray) -> FloatArray:
        return kde_self_influence(X, self.bandwidth)


@dataclass(frozen=True)
class WSGMMDensity:
    """Well-separated spherical GMM over the given clusters ``labels`` (eqs. 3-5).

    ``labels`` is aligned with the training set; a refit without ``x_i`` drops its label too.
    """

    labels: npt.NDArray[np.generic]
    paper_literal: bool = False
    name: ClassVar[str] = "WS-GMM"

    def loss(self, X: FloatArray, Z: FloatArray, drop: int | None = None) -> FloatArray:
        return gmm_nll(_without(X, drop), Z, _without(np.asarray(self.labels), drop))

    def influence(self, X: FloatArray, Z: FloatArray) -> FloatArray:
        return gmm_influence(X, Z, self.labels, paper_literal=self.paper_literal)

    def self_influence(self, X: FloatArray) -> FloatArray:
        return gmm_self_influence(X, self.labels, paper_literal=self.paper_literal)


def make_estimator(
    method: Method,
    *,
    k: int = 10,
    bandwidth: float = 0.5,
    labels: npt.ArrayLike | None = None,
) -> DensityEstimator:
    """Build the estimator named ``method`` (``"knn"``, ``"kde"`` or ``"gmm"``; ``gmm`` needs ``labels``)."""
    if method == "knn":
        return KNNDensity(k)
    if method == "kde":
        return KDEDensity(bandwidth)
    if method == "gmm":
        if labels is None:
            raise ValueError("method 'gmm' needs the cluster labels of the training points")
        return WSGMMDensity(np.asarray(labels))
    raise ValueError(f"unknown method {method!r}; expected one of 'knn', 'kde', 'gmm'")


def _drop_indices(indices: Sequence[int] | None, n: int) -> IntArray:
    idx = np.arange(n) if indices is None else np.asarray(indices, dtype=np.intp).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"indices must lie in [0, {n}), got range [{idx.min()}, {idx.max()}]")
    return idx


def loo_influence(
    estimator: DensityEstimator, X: npt.ArrayLike, Z: npt.ArrayLike, indices: Sequence[int] | None = None
) -> FloatArray:
    """Ground truth of Definition 1 by refitting: ``ℓ(z; A(X_{-i})) - ℓ(z; A(X))``.

    One refit per removed point, each evaluated on all of ``Z`` at once.

    Args:
        estimator: the density estimator ``A`` (see :func:`make_estimator`).
        X: training set ``[N, d]``.
        Z: test points ``[M, d]``.
        indices: training points to remove (default: all ``N``); row ``r`` of the result
            belongs to ``indices[r]``.

    Returns:
        ``[len(indices), M]`` array of exact influences.
    """
    Xa, Za = _train_and_test(X, Z)
    base = estimator.loss(Xa, Za)
    idx = _drop_indices(indices, Xa.shape[0])
    return np.stack([estimator.loss(Xa, Za, drop=int(i)) - base for i in idx]).reshape(idx.size, Za.shape[0])


def loo_self_influence(
    estimator: DensityEstimator, X: npt.ArrayLike, indices: Sequence[int] | None = None
) -> FloatArray:
    """Ground-truth self-influence ``ℓ(x_i; A(X_{-i})) - ℓ(x_i; A(X))`` by refitting.

    Returns ``[len(indices)]`` (default: all ``N`` training points), entry ``r`` for ``indices[r]``.
    """
    Xa = _as_points("X", X)
    idx = _drop_indices(indices, Xa.shape[0])
    base = estimator.loss(Xa, Xa[idx])
    return np.array([estimator.loss(Xa, Xa[i : i + 1], drop=int(i))[0] for i in idx]).reshape(idx.size) - base


# --------------------------------------------------------------------------------------------
# The six-cluster toy and its figures (paper Figs. 5-7, blog post)
# --------------------------------------------------------------------------------------------

#: Default cluster sizes: unequal, the smallest equal to the default k of the k-NN figures so
#: that its points show the "cluster of exactly k points" self-influence pattern of eq. (1).
DEFAULT_CLUSTER_SIZES: tuple[int, ...] = (60, 50, 40, 30, 20, 10)
_TOY_CENTERS = np.array([[0.0, 0.0], [6.0, 0.0], [12.0, 0.0], [0.0, 6.0], [6.0, 6.0], [12.0, 6.0]])
_TOY_STDS = np.array([0.8, 0.5, 0.7, 0.4, 0.6, 0.3])


def six_cluster_toy(
    n_per_cluster: int | Sequence[int] = DEFAULT_CLUSTER_SIZES, seed: int = 0
) -> tuple[FloatArray, IntArray]:
    """Six 2-D isotropic Gaussian clusters, the toy data of the paper's §3.1 / Fig. 5.

    The paper does not list its generating parameters; here the centres lie on a 3 x 2 grid with
    spacing 6, the standard deviations are 0.3-0.8 (so the clusters are well separated, as the
    WS-GMM assumes) and the sizes differ (default ``(60, 50, 40, 30, 20, 10)``).

    Args:
        n_per_cluster: one size for all clusters or six sizes (each >= 3).
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        ``(X, labels)``: points ``[N, 2]`` and cluster labels ``[N]`` in ``0..5``.
    """
    sizes = np.asarray(n_per_cluster, dtype=np.int64)
    if sizes.ndim == 0:
        sizes = np.full(6, sizes)
    if sizes.shape != (6,) or np.any(sizes < 3):
        raise ValueError(f"n_per_cluster must be one integer or six integers, each >= 3; got {n_per_cluster!r}")
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(6), sizes)
    X = _TOY_CENTERS[labels] + rng.standard_normal((labels.size, 2)) * _TOY_STDS[labels, None]
    return X, labels.astype(np.intp)


_EQUATION = {"knn": "eq. 1", "kde": "eq. 2", "gmm": "eqs. 4-5"}


def _scatter_figure(
    X: FloatArray,
    values: FloatArray,
    title: str,
    colorbar_label: str,
    path: Path,
    test_point: FloatArray | None = None,
) -> Path:
    """One scatter plot of ``X`` coloured by ``values`` (red high, blue low), saved as PNG."""
    from matplotlib.colors import Normalize, TwoSlopeNorm  # lazy: matplotlib only for figures
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.8), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    lo, hi = float(values.min()), float(values.max())
    if test_point is not None and lo < 0.0 < hi:
        norm: Normalize = TwoSlopeNorm(vmin=lo, vcenter=0.0, vmax=hi)  # proponents red, opponents blue
    else:
        norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-12)
    sc = ax.scatter(X[:, 0], X[:, 1], c=values, cmap="coolwarm", norm=norm, s=18, edgecolors="k", linewidths=0.2)
    if test_point is not None:
        ax.scatter(
            [test_point[0]],
            [test_point[1]],
            marker="X",
            s=220,
            c="limegreen",
            edgecolors="k",
            linewidths=1.0,
            label="test point z",
            zorder=3,
        )
        ax.legend(loc="upper right", fontsize=9)
    fig.colorbar(sc, ax=ax, label=colorbar_label)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.set_aspect("equal", adjustable="datalim")
    fig.savefig(path)
    return path


def plot_classical(
    method: Method,
    out_dir: str | Path,
    seed: int = 0,
    *,
    n_per_cluster: int | Sequence[int] = DEFAULT_CLUSTER_SIZES,
    k: int = 10,
    bandwidth: float = 0.5,
    test_point: Sequence[float] | None = None,
) -> list[Path]:
    """Write the blog post's two figures for ``method`` on the six-cluster toy (Agg backend).

    1. ``{method}_self_influence.png``: every training point coloured by its self-influence.
    2. ``{method}_influence_over_test.png``: every training point coloured by its influence over
       one test point ``z`` (green cross; red = proponents, blue = opponents). By default ``z`` is
       the centre of cluster 0 shifted by half its standard deviation along both axes.

    Args:
        method: ``"knn"``, ``"kde"`` or ``"gmm"``.
        out_dir: output directory (created if missing).
        seed: seed of :func:`six_cluster_toy`.
        n_per_cluster, k, bandwidth: toy sizes and estimator parameters.
        test_point: the test point ``z`` (2 coordinates).

    Returns:
        The two PNG paths.
    """
    X, labels = six_cluster_toy(n_per_cluster, seed=seed)
    estimator = make_estimator(method, k=k, bandwidth=bandwidth, labels=labels)
    z = (_TOY_CENTERS[0] + 0.5 * _TOY_STDS[0]) if test_point is None else np.asarray(test_point, dtype=np.float64)
    z = _as_points("test_point", z.reshape(1, -1), dim=2)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    param = {"knn": f"k={k}", "kde": f"σ={bandwidth:g}", "gmm": "6 clusters"}[method]
    label = f"{estimator.name} ({param}, {_EQUATION[method]})"
    return [
        _scatter_figure(
            X,
            estimator.self_influence(X),
            f"{label}: self-influence",
            "Self-IF$(x_i)$ = IF$(x_i, x_i)$  [nats]",
            out / f"{method}_self_influence.png",
        ),
        _scatter_figure(
            X,
            estimator.influence(X, z)[:, 0],
            f"{label}: influence over z",
            "IF$(x_i, z)$  [nats]  (red: proponent, blue: opponent)",
            out / f"{method}_influence_over_test.png",
            test_point=z[0],
        ),
    ]
