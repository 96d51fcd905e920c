"""Influential latent factors of a VAE: mutual information between the input and each latent.

"Discovering Influential Factors in Variational Autoencoder" (arXiv 1809.01804) argues that the
mutual information ``I(x; z_j)`` between the input and latent dimension ``j`` tells which factors
the model uses: influential factors carry information about ``x``, collapsed (non-influential)
ones have a posterior equal to the aggregate posterior and ``I(x; z_j) = 0``.

With a Gaussian encoder ``q(z_j | x) = N(μ_j(x), exp(logvar_j(x)))`` and the empirical data
distribution, the aggregate posterior is the mixture ``q(z_j) = (1/N) Σ_n q(z_j | x_n)`` and::

    I(x; z_j) = E_x KL(q(z_j | x) || q(z_j)) = E_x E_{z ~ q(z_j | x)} [log q(z | x) - log q(z)]

:func:`latent_mutual_information` estimates this by Monte Carlo: ``n_samples`` reparameterised
draws per data point, the mixture density evaluated exactly over the whole data set with a
log-sum-exp that streams over blocks (memory stays bounded for N = 60,000 and beyond).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["FactorSplit", "classify_factors", "latent_mutual_information"]

FloatArray = npt.NDArray[np.float64]

_LOG_2PI = float(np.log(2.0 * np.pi))

#: Cap on the float64 entries of one ``[data, queries, dims]`` block (8 MiB).
_BLOCK_ELEMENTS = 1 << 20

#: Default absolute threshold (nats) below which a latent dimension counts as collapsed.
DEFAULT_MI_THRESHOLD = 0.01


def _gaussian_log_density(z: FloatArray, mu: FloatArray, logvar: FloatArray) -> FloatArray:
    """Elementwise ``log N(z; mu, exp(logvar))`` (broadcasting)."""
    return -0.5 * (_LOG_2PI + logvar + (z - mu) ** 2 * np.exp(-logvar))


def _blocks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _log_aggregate_posterior(z: FloatArray, mu: FloatArray, logvar: FloatArray, data_block: int) -> FloatArray:
    """``log q(z_j) = log (1/N) Σ_n N(z_j; mu_nj, exp(logvar_nj))`` per query row and dimension.

    ``z`` is ``[B, d]``; the sum over the ``N`` data points streams over blocks of ``data_block``
    rows with a running (max, scaled sum) log-sum-exp, so only a ``[data_block, B, d]`` block is
    ever held.
    """
    log_norm = -0.5 * (_LOG_2PI + logvar)  # [N, d]
    half_precision = 0.5 * np.exp(-logvar)  # [N, d]
    run_max = np.full(z.shape, -np.inf)
    run_sum = np.zeros(z.shape)
    for sl in _blocks(mu.shape[0], data_block):
        block = z[None, :, :] - mu[sl, None, :]
        np.square(block, out=block)
        block *= -half_precision[sl, None, :]
        block += log_norm[sl, None, :]
        new_max = np.maximum(run_max, block.max(axis=0))
        run_sum *= np.exp(run_max - new_max)
        block -= new_max[None]
        np.exp(block, out=block)
        run_sum += block.sum(axis=0)
        run_max = new_max
    return run_max + np.log(run_sum) - np.log(mu.shape[0])


def _validate_posteriors(mu: npt.ArrayLike, logvar: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    mu_a = np.asarray(mu, dtype=np.float64)
    lv_a = np.asarray(logvar, dtype=np.float64)
    if mu_a.ndim != 2 or mu_a.shape[0] == 0 or mu_a.shape[1] == 0:
        raise ValueError(f"mu must be a non-empty 2-D array [n_samples, latent_dim], got shape {mu_a.shape}")
    if lv_a.shape != mu_a.shape:
        raise ValueError(f"logvar must have the same shape as mu {mu_a.shape}, got {lv_a.shape}")
    if not (np.all(np.isfinite(mu_a)) and np.all(np.isfinite(lv_a))):
        raise ValueError("mu and logvar must be finite (no NaN or infinite values)")
    return mu_a, lv_a


def latent_mutual_information(
    mu: npt.ArrayLike,
    logvar: npt.ArrayLike,
    *,
    n_samples: int = 1,
    seed: int = 0,
    batch: int | None = None,
) -> FloatArray:
    """Monte Carlo estimate of ``I(x; z_j)`` for every latent dimension ``j`` (nats).

    For each data point ``x_n`` and each of ``n_samples`` draws ``z = mu_n + exp(logvar_n / 2) ε``,
    ``ε ~ N(0, I)``, the estimate averages ``log q(z_j | x_n) - log q(z_j)`` where
    ``q(z_j) = (1/N) Σ_m q(z_j | x_m)`` is evaluated over the *whole* data set. All noise is
    drawn up front from ``numpy.random.default_rng(seed)``, so the result does not depend on
    ``batch``. The estimate is consistent as ``N`` grows; it is not clipped, so a collapsed
    dimension may come out as a tiny negative number (exactly 0 when every posterior is equal).
    Cost: ``N² · n_samples · d`` density evaluations.

    Args:
        mu: encoder means ``[N, d]``.
        logvar: encoder log-variances ``[N, d]``.
        n_samples: draws per data point (>= 1).
        seed: seed of the draws.
        batch: query rows per block (default: chosen so a block holds about 4M floats). The
            data axis is streamed in blocks of the same element budget.

    Returns:
        ``[d]`` array, one mutual information per latent dimension.
    """
    mu_a, lv_a = _validate_posteriors(mu, logvar)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int | np.integer) or batch < 1):
        raise ValueError(f"batch must be a positive integer or None, got {batch!r}")
    n, d = mu_a.shape
    query_block = int(batch) if batch is not None else max(1, int(np.sqrt(_BLOCK_ELEMENTS / d)))
    data_block = max(1, _BLOCK_ELEMENTS // (query_block * d))

    # Queries: row n * n_samples + s is draw s for data point n.
    eps = np.random.default_rng(seed).standard_normal((n, n_samples, d))
    q_mu = np.repeat(mu_a, n_samples, axis=0)
    q_lv = np.repeat(lv_a, n_samples, axis=0)
    z = q_mu + np.exp(0.5 * q_lv) * eps.reshape(n * n_samples, d)

    total = np.zeros(d)
    for sl in _blocks(z.shape[0], query_block):
        log_cond = _gaussian_log_density(z[sl], q_mu[sl], q_lv[sl])
        total += np.sum(log_cond - _log_aggregate_posterior(z[sl], mu_a, lv_a, data_block), axis=0)
    return total / z.shape[0]


@dataclass(frozen=True)
class FactorSplit:
    """Latent dimensions split by their mutual information with the input.

    Attributes:
        influential: indices with ``I(x; z_j) >= threshold``, sorted by decreasing information.
        collapsed: the other indices (posterior close to the aggregate posterior), ascending.
        threshold: the effective threshold in nats.
    """

    influential: npt.NDArray[np.intp]
    collapsed: npt.NDArray[np.intp]
    threshold: float


def classify_factors(
    mi: npt.ArrayLike, threshold: float = DEFAULT_MI_THRESHOLD, *, relative: float = 0.0
) -> FactorSplit:
    """Split latent dimensions into influential and collapsed ones.

    A dimension is influential when its mutual information reaches
    ``max(threshold, relative * max_j I(x; z_j))``. Default: the absolute 0.01 nats
    (``DEFAULT_MI_THRESHOLD``), far below what a used factor carries and above the Monte Carlo
    noise of a collapsed one; ``relative`` (e.g. 0.05) additionally drops factors that carry
    only a small fraction of the most informative one.

    Args:
        mi: ``[d]`` mutual information per dimension (nats), e.g. from
            :func:`latent_mutual_information`.
        threshold: absolute threshold in nats (>= 0).
        relative: fraction of the largest value in ``[0, 1]``.
    """
    values = np.asarray(mi, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"mi must be a non-empty 1-D array, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("mi must be finite")
    if not np.isfinite(threshold) or threshold < 0.0:
        raise ValueError(f"threshold must be a finite non-negative number of nats, got {threshold!r}")
    if not 0.0 <= relative <= 1.0:
        raise ValueError(f"relative must lie in [0, 1], got {relative!r}")
    cut = max(float(threshold), float(relative) * float(values.max()))
    keep = values >= cut
    influential = np.flatnonzero(keep)
    return FactorSplit(
        influential=influential[np.argsort(-values[influential], kind="stable")],
        collapsed=np.flatnonzero(~keep),
        threshold=cut,
    )


DEFAULT_MAX_ROWS = 5000
"""Rows of an index the factor analysis uses (the estimate costs N²): a fixed random subsample beyond."""


def index_factors(
    index: Any, *, max_rows: int = DEFAULT_MAX_ROWS, seed: int = 0, threshold: float = DEFAULT_MI_THRESHOLD
) -> dict[str, Any]:
    """The factor analysis of an index's stored posteriors -- the one used by the API, the CLI and the report.

    Rows: all of them up to ``max_rows``, else a subsample drawn with ``seed`` (sorted rows).
    Returns ``{"mi", "influential", "collapsed", "threshold", "rows_used"}`` (plain Python values).
    """
    meta = index.meta
    if meta.latent_mu is None or meta.latent_logvar is None:
        raise ValueError("this index stores no latent posteriors (not a VAE index)")
    if max_rows < 2:
        raise ValueError(f"max_rows must be >= 2, got {max_rows}")
    mu = np.asarray(meta.latent_mu, np.float64)
    lv = np.asarray(meta.latent_logvar, np.float64)
    if len(mu) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(len(mu), size=max_rows, replace=False))
        mu, lv = mu[rows], lv[rows]
    mi = latent_mutual_information(mu, lv, seed=seed)
    split = classify_factors(mi, threshold=threshold)
    return {
        "mi": [float(v) for v in mi],
        "influential": [int(v) for v in split.influential],
        "collapsed": [int(v) for v in split.collapsed],
        "threshold": float(split.threshold),
        "rows_used": int(len(mu)),
    }
