"""Mutual information between the input and each latent factor (arXiv 1809.01804)."""

from __future__ import annotations

import numpy as np
import pytest

from proponent.analysis import factors
from proponent.analysis.factors import classify_factors, latent_mutual_information

# Linear-Gaussian encoder: x ~ N(0, s²), q(z_j | x) = N(a_j x, σ_j²), so q(z_j) = N(0, a_j² s² + σ_j²)
# and I(x; z_j) = ½ log(1 + a_j² s² / σ_j²). Dimension 1 is collapsed (a_j = 0: posterior = prior).
SLOPES = np.array([1.0, 0.0, 2.0])
STDS = np.array([0.5, 1.0, 0.5])
DATA_STD = 1.0
TRUE_MI = 0.5 * np.log1p(SLOPES**2 * DATA_STD**2 / STDS**2)


def _linear_gaussian_posteriors(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(1000 + seed).normal(0.0, DATA_STD, n)
    mu = x[:, None] * SLOPES
    return mu, np.broadcast_to(2.0 * np.log(STDS), mu.shape).copy()


def _max_error(n: int) -> float:
    """Max error over dimensions, averaged over two data sets / noise seeds."""
    errors = [
        np.abs(latent_mutual_information(*_linear_gaussian_posteriors(n, seed), seed=seed) - TRUE_MI).max()
        for seed in (0, 1)
    ]
    return float(np.mean(errors))


def test_mutual_information_converges_to_closed_form():
    err_small, err_large = _max_error(200), _max_error(5000)
    assert err_large < 0.03  # about 3% of the 0.80 and 1.42 nats of the informative dimensions
    assert err_large < 0.5 * err_small


def test_collapsed_dimension_has_zero_information():
    mi = latent_mutual_information(*_linear_gaussian_posteriors(500, 0), n_samples=3, seed=5)
    assert abs(mi[1]) < 1e-9
    assert mi[0] > 0.5 and mi[2] > 1.0


def test_nearly_collapsed_dimension_is_small_and_classified_collapsed():
    rng = np.random.default_rng(0)
    x = rng.normal(size=2000)
    mu = np.stack([x, 1e-3 * x], axis=1)
    mi = latent_mutual_information(mu, np.zeros_like(mu))
    assert abs(mi[1]) < 1e-3  # true value ½ log(1 + 1e-6) ≈ 5e-7
    split = classify_factors(mi)
    assert split.influential.tolist() == [0] and split.collapsed.tolist() == [1]


def test_deterministic_for_a_seed_and_independent_of_batching(monkeypatch):
    mu, logvar = _linear_gaussian_posteriors(300, 2)
    ref = latent_mutual_information(mu, logvar, n_samples=2, seed=11)
    np.testing.assert_array_equal(ref, latent_mutual_information(mu, logvar, n_samples=2, seed=11))
    np.testing.assert_allclose(ref, latent_mutual_information(mu, logvar, n_samples=2, seed=11, batch=7), rtol=1e-12)
    monkeypatch.setattr(factors, "_BLOCK_ELEMENTS", 64)  # forces streaming over many data blocks
    np.testing.assert_allclose(ref, latent_mutual_information(mu, logvar, n_samples=2, seed=11), rtol=1e-12)
    assert not np.allclose(ref, latent_mutual_information(mu, logvar, n_samples=2, seed=12), rtol=1e-6)


def test_classify_factors_thresholds():
    mi = np.array([0.5, 0.004, 2.0, 0.05, -1e-4])
    split = classify_factors(mi)
    assert split.influential.tolist() == [2, 0, 3]  # by decreasing information
    assert split.collapsed.tolist() == [1, 4]
    assert split.threshold == pytest.approx(0.01)
    relative = classify_factors(mi, relative=0.1)  # cut = max(0.01, 0.1 * 2.0) = 0.2
    assert relative.influential.tolist() == [2, 0] and relative.threshold == pytest.approx(0.2)
    assert classify_factors(mi, threshold=0.0).influential.tolist() == [2, 0, 3, 1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mu": np.zeros(5), "logvar": np.zeros(5)}, "2-D"),
        ({"mu": np.zeros((5, 2)), "logvar": np.zeros((5, 3))}, "same shape"),
        ({"mu": np.full((5, 2), np.nan), "logvar": np.zeros((5, 2))}, "finite"),
        ({"mu": np.zeros((5, 2)), "logvar": np.zeros((5, 2)), "n_samples": 0}, "n_samples"),
        ({"mu": np.zeros((5, 2)), "logvar": np.zeros((5, 2)), "batch": 0}, "batch"),
    ],
)
def test_mutual_information_validates_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        latent_mutual_information(**kwargs)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((np.zeros((2, 2)),), {}, "1-D"),
        ((np.array([np.inf]),), {}, "finite"),
        ((np.ones(3),), {"threshold": -1.0}, "threshold"),
        ((np.ones(3),), {"relative": 1.5}, "relative"),
    ],
)
def test_classify_factors_validates_inputs(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        classify_factors(*args, **kwargs)
