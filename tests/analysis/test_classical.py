"""Closed-form influence of classical density estimators (Kong & Chaudhuri 2021, §3) vs leave-one-out."""

from __future__ import annotations

import numpy as np
import pytest

from proponent.analysis.classical import (
    KDEDensity,
    KNNDensity,
    WSGMMDensity,
    gmm_influence,
    gmm_self_influence,
    kde_influence,
    kde_self_influence,
    knn_influence,
    knn_nll,
    knn_self_influence,
    loo_influence,
    loo_self_influence,
    make_estimator,
    plot_classical,
    six_cluster_toy,
)

RTOL, ATOL = 1e-6, 1e-12


@pytest.fixture(scope="module")
def toy() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Six-cluster toy, test points: random ones, exact training points and a far-away point."""
    X, labels = six_cluster_toy((25, 20, 15, 12, 10, 8), seed=3)
    rng = np.random.default_rng(7)
    Z = np.concatenate([X[rng.choice(len(X), 6, replace=False)] + rng.normal(0, 0.3, (6, 2)), X[:3], [[30.0, -9.0]]])
    return X, labels, Z


# ----------------------------------------------------------------------------- k-NN, eq. (1)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_knn_influence_equals_leave_one_out(toy, k):
    X, _, Z = toy
    if k == 1:  # a test point equal to a training point has R_1 = 0 (infinite density): keep the others
        Z = np.delete(Z, [6, 7, 8], axis=0)
    np.testing.assert_allclose(knn_influence(X, Z, k), loo_influence(KNNDensity(k), X, Z), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("k", [2, 5, 8])
def test_knn_self_influence_equals_leave_one_out(toy, k):
    X, _, _ = toy
    est = KNNDensity(k)
    closed = knn_self_influence(X, k)
    np.testing.assert_allclose(closed, loo_self_influence(est, X), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(closed, np.diagonal(knn_influence(X, X, k)), rtol=RTOL, atol=ATOL)


def test_knn_influence_has_two_values_and_k_proponents(toy):
    """Eq. (1): for fixed z only log((N-1)/N) or that plus d log(R_{k+1}/R_k), the latter on the k nearest."""
    X, _, Z = toy
    k = 4
    inf = knn_influence(X, Z, k)
    base = np.log((len(X) - 1) / len(X))
    for m in range(Z.shape[0]):
        nearest = np.argsort(np.linalg.norm(X - Z[m], axis=1))[:k]
        assert np.allclose(np.delete(inf[:, m], nearest), base)
        assert np.all(inf[nearest, m] >= base)


def test_knn_ties_at_the_kth_radius():
    """Points tied at R_k: removing one leaves R_k unchanged (R_{k+1} = R_k), exactly as the refit says."""
    X = np.array([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [0.0, -1.0], [3.0, 0.0], [0.0, 5.0]])
    Z = np.array([[0.0, 0.0], [0.1, 0.2]])
    for k in (1, 2, 4, 5):
        np.testing.assert_allclose(knn_influence(X, Z, k), loo_influence(KNNDensity(k), X, Z), rtol=RTOL, atol=ATOL)


def test_knn_self_influence_peaks_on_cluster_of_exactly_k_points():
    """Paper §3 / blog: with k-NN, high self-influence samples form a cluster of exactly k points."""
    X, labels = six_cluster_toy(seed=0)  # the smallest cluster has 10 points
    self_inf = knn_self_influence(X, k=10)
    assert set(labels[np.argsort(self_inf)[-10:]]) == {5}


# ----------------------------------------------------------------------------- KDE, eq. (2)


@pytest.mark.parametrize("bandwidth", [0.05, 0.4, 3.0])
def test_kde_influence_equals_leave_one_out(toy, bandwidth):
    X, _, Z = toy
    closed = kde_influence(X, Z, bandwidth)
    np.testing.assert_allclose(closed, loo_influence(KDEDensity(bandwidth), X, Z), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("bandwidth", [0.05, 0.4, 3.0])
def test_kde_self_influence_equals_leave_one_out(toy, bandwidth):
    X, _, _ = toy
    closed = kde_self_influence(X, bandwidth)
    np.testing.assert_allclose(closed, loo_self_influence(KDEDensity(bandwidth), X), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(closed, np.diagonal(kde_influence(X, X, bandwidth)), rtol=RTOL, atol=ATOL)


def test_kde_proponents_are_nearest_neighbours(toy):
    """Paper §3: for fixed z the KDE influence decreases with ||z - x_i||."""
    X, _, Z = toy
    inf = kde_influence(X, Z[:1], 0.5)[:, 0]
    dist = np.linalg.norm(X - Z[0], axis=1)
    assert np.all(np.diff(inf[np.argsort(dist)]) <= 1e-15)


# ----------------------------------------------------------------------------- WS-GMM, eqs. (3)-(5)


def _separated_clusters(n_k: int, scale: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three uniform square clusters far apart, and test points inside clusters 0 and 1."""
    rng = np.random.default_rng(seed)
    centres = scale * np.array([[0.0, 0.0], [30.0, 0.0], [0.0, 30.0]])
    X = np.concatenate([c + scale * rng.uniform(-1.0, 1.0, (n_k, 2)) for c in centres])
    labels = np.repeat(np.arange(3), n_k)
    inner = scale * np.array([[0.2, 0.1], [-0.5, 0.4], [0.6, -0.6], [0.0, 0.0]])
    return X, labels, np.concatenate([inner, inner[:2] + centres[1]])


def _gmm_gaps(scale: float, paper_literal: bool) -> np.ndarray:
    """Max |closed form - refit| at N_k = 50, 200, 800 (all of cluster 0, 10 points of the others)."""
    gaps = []
    for n_k in (50, 200, 800):
        X, labels, Z = _separated_clusters(n_k, scale)
        rows = np.r_[0:n_k, n_k : n_k + 10, 2 * n_k : 2 * n_k + 10]
        closed = gmm_influence(X, Z, labels, paper_literal=paper_literal)[rows]
        exact = loo_influence(WSGMMDensity(labels), X, Z, rows)
        gaps.append(np.abs(closed - exact).max())
    return np.array(gaps)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_gmm_influence_gap_shrinks_like_inverse_square(scale):
    """Eq. (4) is exact up to O(N_k^-2): each 4x growth of N_k shrinks the gap (ideally 16x)."""
    gaps = _gmm_gaps(scale, paper_literal=False)
    assert gaps[0] < 0.02
    assert np.all(gaps[:-1] / gaps[1:] > 4.0)  # faster than any O(1/N_k) term
    assert gaps[0] / gaps[-1] > 64.0  # over 16x: log-slope steeper than -1.5
    n_k = np.array([50.0, 200.0, 800.0])
    assert (gaps * n_k**2).max() / (gaps * n_k**2).min() < 8.0  # N_k^2 * gap stays bounded


def test_gmm_paper_literal_formula_leaves_first_order_gap():
    """The printed eq. (4) coupling ||z-μ||²/σ⁴ is not scale invariant: its gap only shrinks like 1/N_k."""
    gaps = _gmm_gaps(3.0, paper_literal=True)
    assert gaps[0] / gaps[-1] < 32.0


def test_gmm_self_influence_gap_shrinks():
    gaps = []
    for n_k in (50, 200, 800):
        X, labels, _ = _separated_clusters(n_k)
        rows = np.r_[0:n_k:2, n_k : n_k + 10]
        exact = loo_self_influence(WSGMMDensity(labels), X, rows)
        gaps.append(np.abs(gmm_self_influence(X, labels)[rows] - exact).max())
    assert gaps[0] < 0.02 and gaps[0] / gaps[1] > 4.0 and gaps[1] / gaps[2] > 4.0


def test_gmm_self_influence_is_diagonal_and_grows_with_distance_to_centre():
    X, labels = six_cluster_toy(seed=1)
    self_inf = gmm_self_influence(X, labels)
    np.testing.assert_allclose(self_inf, np.diagonal(gmm_influence(X, X, labels)), rtol=1e-12)
    for c in range(6):
        pts = X[labels == c]
        dist = np.linalg.norm(pts - pts.mean(axis=0), axis=1)
        assert np.all(np.diff(self_inf[labels == c][np.argsort(dist)]) >= -1e-15)


def test_gmm_other_clusters_get_minus_one_over_n_and_far_same_cluster_points_oppose():
    X, labels, Z = _separated_clusters(100)
    inf = gmm_influence(X, Z[:1], labels)[:, 0]
    np.testing.assert_allclose(inf[labels != 0], -1.0 / len(X))
    same = inf[labels == 0]
    assert same.max() > 0.0 > same.min()  # proponents and opponents within the test point's own cluster


# ----------------------------------------------------------------------------- figures and toy data


@pytest.mark.parametrize("method", ["knn", "kde", "gmm"])
def test_plot_classical_writes_two_pngs(tmp_path, method):
    paths = plot_classical(method, tmp_path / "figs", seed=0)
    assert len(paths) == 2
    for path in paths:
        data = path.read_bytes()
        assert path.parent == tmp_path / "figs" and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_six_cluster_toy_is_seeded():
    X0, l0 = six_cluster_toy(seed=0)
    X1, l1 = six_cluster_toy(seed=0)
    X2, _ = six_cluster_toy(seed=1)
    np.testing.assert_array_equal(X0, X1)
    np.testing.assert_array_equal(l0, l1)
    assert not np.allclose(X0, X2)
    assert X0.shape == (210, 2) and np.array_equal(np.bincount(l0), [60, 50, 40, 30, 20, 10])
    assert six_cluster_toy(7)[0].shape == (42, 2)


# ----------------------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda X, Z, lab: knn_influence(X, Z, 0), "k must satisfy"),
        (lambda X, Z, lab: knn_influence(X, Z, len(X)), "k must satisfy"),
        (lambda X, Z, lab: knn_influence(X, Z, 2.5), "k must be an integer"),
        (lambda X, Z, lab: knn_self_influence(X, 1), "k >= 2"),
        (lambda X, Z, lab: knn_nll(X, Z, len(X) + 1), "k must satisfy"),
        (lambda X, Z, lab: kde_influence(X, Z, 0.0), "bandwidth"),
        (lambda X, Z, lab: kde_self_influence(X, -1.0), "bandwidth"),
        (lambda X, Z, lab: kde_influence(X, Z, float("nan")), "bandwidth"),
        (lambda X, Z, lab: kde_influence(X, Z[:, :1], 1.0), "dimensions"),
        (lambda X, Z, lab: knn_influence(X[:, 0], Z, 2), "2-D"),
        (lambda X, Z, lab: knn_influence(X[:1], Z, 1), "at least 2"),
        (lambda X, Z, lab: kde_influence(np.where(X > 5, np.nan, X), Z, 1.0), "NaN"),
        (lambda X, Z, lab: gmm_influence(X, Z, lab[:-1]), "labels"),
        (lambda X, Z, lab: gmm_self_influence(X, np.r_[lab[:-2], 99, 99]), "at least 3"),
        (lambda X, Z, lab: make_estimator("gmm"), "labels"),
        (lambda X, Z, lab: make_estimator("svm"), "unknown method"),
        (lambda X, Z, lab: loo_influence(KNNDensity(2), X, Z, [len(X)]), "indices"),
        (lambda X, Z, lab: six_cluster_toy((5, 5)), "six"),
        (lambda X, Z, lab: six_cluster_toy(2), "six"),
    ],
)
def test_invalid_inputs_raise_value_error(toy, call, match):
    X, labels, Z = toy
    with pytest.raises(ValueError, match=match):
        call(X, Z, labels)


def test_duplicated_points_give_infinite_knn_density_error():
    X = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    with pytest.raises(ValueError, match="R_k = 0"):
        knn_self_influence(X, 2)
    with pytest.raises(ValueError, match="R_k = 0"):
        knn_influence(X, np.zeros((1, 2)), 2)
