"""The fused exact scan: equal to float64 brute force, near-ties included."""

from __future__ import annotations

import numpy as np
import pytest

from proponent.query.search import ArrayRows as Rows
from proponent.query.search import exact_scores, scan_topk


def _brute(qs: list[np.ndarray], fs: list[np.ndarray], k: int) -> np.ndarray:
    s = exact_scores(qs, fs).sum(axis=1)
    return np.lexsort((np.arange(len(s)), -s))[:k]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 5, 40])
def test_scan_equals_float64_brute_force_with_near_ties(seed: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    n, d, c = 3000, 257, 3
    fs = [rng.standard_normal((n, d)).astype(np.float32) for _ in range(c)]
    qs = [rng.standard_normal(d).astype(np.float32) for _ in range(c)]
    # plant near-duplicates of the best rows: scores that differ at float32 resolution
    best = _brute(qs, fs, 5)
    for f in fs:
        f[n - 5 :] = np.nextafter(f[best], np.float32(np.inf))
    norms = [float(np.sqrt((f.astype(np.float64) ** 2).sum(axis=1).max())) for f in fs]
    res = scan_topk(qs, [Rows(f) for f in fs], k, norms)
    want = _brute(qs, fs, k)
    s64 = exact_scores(qs, fs).sum(axis=1)
    # float64 sums over different row blocks may differ in the last bits (~1e-16 relative), which
    # may reorder exact duplicates; the answer must be the same up to that.
    tol = 1e-12 * np.abs(s64).max()
    np.testing.assert_allclose(res.scores, s64[want], rtol=0, atol=tol)
    assert np.all(s64[res.ids] >= s64[want[-1]] - tol)
    assert len(set(res.ids.tolist())) == k
    assert res.exact and res.strategy == "scan" and res.candidates >= k


def test_scan_handles_k_larger_than_n() -> None:
    rng = np.random.default_rng(0)
    f = rng.standard_normal((7, 5)).astype(np.float32)
    q = rng.standard_normal(5).astype(np.float32)
    res = scan_topk([q], [Rows(f)], 50, [float(np.linalg.norm(f, axis=1).max())])
    assert len(res.ids) == 7
    np.testing.assert_array_equal(res.ids, _brute([q], [f], 7))
