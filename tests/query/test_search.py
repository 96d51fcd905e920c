"""The exact scan and its certificate: equal to float64 brute force over the stored features, near-ties
included, for every stored dtype, every features mode (memory, quantized, stream) and every scoring."""

from __future__ import annotations

import numpy as np
import pytest

from proponent.format.fsio import IndexDir
from proponent.format.store import FeatureStore
from proponent.query.features import ServedFeatures
from proponent.query.scan import brute_force, scan
from proponent.query.scoring import scored_query


def make_store(tmp_path, feats: list[np.ndarray], dtype: str, chunk_rows: int = 256) -> FeatureStore:
    """A real store holding ``feats`` (one [N, D] array per checkpoint) with random exact norms."""
    n, d = feats[0].shape
    where = IndexDir(tmp_path)
    store = FeatureStore.create(
        where,
        "store.zarr",
        dim=d,
        n_checkpoints=len(feats),
        dtype=dtype,
        latent_dim=0,
        inputs=np.zeros((n, 1), np.float32),
        ids=np.arange(n),
        labels=None,
        origin=np.zeros(n, np.int32),
        source_row=np.arange(n),
        injected=np.zeros(n, bool),
        chunk_rows=chunk_rows,
        unit_rows=chunk_rows * 2,
    )
    rng = np.random.default_rng(99)
    for c, f in enumerate(feats):
        for u in range(store.n_units):
            lo, hi = store.unit_range(u)
            sq = (f[lo:hi].astype(np.float64) ** 2).sum(axis=1) * rng.uniform(1, 3, hi - lo)  # "exact" > projected
            store.write_unit(c, u, f[lo:hi], sq, np.zeros(hi - lo, np.float32))
    return FeatureStore.open(where)


def planted(seed: int, n: int = 3000, d: int = 257, c: int = 3, scale: float = 1.0):
    """Features and a query with near-duplicates of the best rows (scores equal to float32 resolution)."""
    rng = np.random.default_rng(seed)
    fs = [rng.standard_normal((n, d)).astype(np.float32) * scale for _ in range(c)]
    qs = [rng.standard_normal(d).astype(np.float32) for _ in range(c)]
    s = sum(f.astype(np.float64) @ q.astype(np.float64) for f, q in zip(fs, qs))
    best = np.argsort(-s)[:5]
    worst = np.argsort(s)[:5]
    for f in fs:
        f[n - 5 :] = np.nextafter(f[best], np.float32(np.inf))
        f[n - 10 : n - 5] = np.nextafter(f[worst], np.float32(-np.inf))
    return fs, qs


def reference_top(served, sq, k, direction):
    s = brute_force(served, sq)
    sign = 1.0 if direction == "proponents" else -1.0
    return np.lexsort((np.arange(len(s)), -sign * s))[:k], s


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
@pytest.mark.parametrize("mode", ["memory", "quantized", "stream"])
@pytest.mark.parametrize("scoring", ["raw", "cosine", "relatif"])
def test_scan_equals_brute_force_with_planted_near_ties(tmp_path, dtype, mode, scoring):
    fs, qs = planted(seed=len(dtype) + len(mode) + len(scoring))
    store = make_store(tmp_path, fs, dtype)
    served = ServedFeatures(store, len(fs), mode=mode)
    assert served.mode == ("memory" if (mode == "quantized" and dtype == "int8") else mode)
    weights = np.array([0.7, 1.3, 0.4])
    vec = {c: qs[c] for c in range(len(qs))}
    sqn = {c: float((qs[c].astype(np.float64) ** 2).sum()) * 1.5 for c in range(len(qs))}
    sq = scored_query(served, weights, [0, 1, 2], vec, sqn, scoring)
    for k in (1, 5, 40):
        res = scan(served, sq, k, ("proponents", "opponents"))
        for d in ("proponents", "opponents"):
            want, s64 = reference_top(served, sq, k, d)
            got = res[d]
            # float64 sums in different orders may differ in the last bits and reorder exact duplicates
            tol = 1e-12 * np.abs(s64).max()
            np.testing.assert_allclose(got.scores, s64[want], rtol=0, atol=tol)
            sign = 1.0 if d == "proponents" else -1.0
            assert np.all(sign * s64[got.rows] >= sign * s64[want[-1]] - tol)
            assert len(set(got.rows.tolist())) == k and got.exact and got.candidates >= k
            np.testing.assert_allclose(got.contributions.sum(axis=1), got.scores, rtol=1e-12, atol=tol)


def test_certificate_is_tight_and_quantized_rescoring_reads_the_store(tmp_path):
    fs, qs = planted(seed=3)
    store = make_store(tmp_path, fs, "float16")
    weights = np.ones(3)
    vec = {c: qs[c] for c in range(3)}
    for mode in ("memory", "quantized", "stream"):
        served = ServedFeatures(store, 3, mode=mode)
        sq = scored_query(served, weights, [0, 1, 2], vec, {}, "raw")
        res = scan(served, sq, 10)["proponents"]
        # memory/stream: float32 rounding only; quantized: int8 error bound: still only a few rows rescored
        assert res.candidates <= (60 if mode == "quantized" else 20), (mode, res.candidates)
    served = ServedFeatures(store, 3, mode="quantized")
    assert served.resident_bytes == 3 * 3000 * 264  # int8 in memory, 257 columns padded to a multiple of 8
    assert served.residual[0] is not None and served.residual[0].max() > 0


def test_budget_chooses_the_mode(tmp_path):
    fs, _ = planted(seed=1, n=500, d=64)
    store = make_store(tmp_path, fs, "float32", chunk_rows=128)
    full = 3 * 500 * 64 * 4
    assert ServedFeatures(store, 3, budget_bytes=full).mode == "memory"
    assert ServedFeatures(store, 3, budget_bytes=full - 1).mode == "quantized"
    assert ServedFeatures(store, 3, budget_bytes=full // 4 - 1).mode == "stream"
    assert ServedFeatures(store, 3, budget_bytes=full // 4 - 1).resident_bytes == 0


def test_long_rows_split_the_integer_products(tmp_path):
    """Rows longer than int32 can sum exactly (D·127² ≥ 2³¹) are split into exact pieces."""
    rng = np.random.default_rng(0)
    n, d = 40, 140_000
    fs = [rng.standard_normal((n, d)).astype(np.float32)]
    store = make_store(tmp_path, fs, "int8", chunk_rows=64)
    served = ServedFeatures(store, 1, mode="memory")
    q = rng.standard_normal(d).astype(np.float32)
    sq = scored_query(served, np.ones(1), [0], {0: q}, {}, "raw")
    res = scan(served, sq, 5)["proponents"]
    want, s64 = reference_top(served, sq, 5, "proponents")
    assert res.rows.tolist() == want.tolist()
    np.testing.assert_allclose(res.scores, s64[want], rtol=1e-12)


def test_k_larger_than_n_and_damaged_chunk(tmp_path):
    fs, qs = planted(seed=2, n=300, d=16, c=1)
    store = make_store(tmp_path, fs, "int8", chunk_rows=64)
    served = ServedFeatures(store, 1, mode="stream")
    sq = scored_query(served, np.ones(1), [0], {0: qs[0]}, {}, "raw")
    assert len(scan(served, sq, 5000)["proponents"].rows) == 300
    key = tmp_path / "store.zarr" / "ckpt_000" / "features" / "c" / "2" / "0"
    data = bytearray(key.read_bytes())
    data[10] ^= 0x40
    key.write_bytes(bytes(data))
    from proponent.format.store import StoreError

    with pytest.raises(StoreError, match=r"ckpt_000/features/c/2/0: damaged \(checksum mismatch\)"):
        scan(served, sq, 5)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("mode", ["memory", "quantized", "stream"])
def test_batch_scan_breaks_exact_ties_like_brute_force_on_both_selection_paths(tmp_path, dtype, mode):
    """Rows that are exact copies of the best and worst rows score exactly the same: each query of a batch
    smaller than PARALLEL_QUERIES (numpy selection) and of one larger (torch's, in parallel) gets brute force's
    top-k with ties to the smaller row, k falling inside the groups of tied rows."""
    from proponent.query.scan import PARALLEL_QUERIES, scan_batch

    fs, qs = planted(seed=21, n=1200, d=97)
    s = sum(f.astype(np.float64) @ q.astype(np.float64) for f, q in zip(fs, qs, strict=True))
    best, worst = np.argsort(-s)[:3], np.argsort(s)[:3]
    for f in fs:  # three copies of each of the best and worst rows, before and after them
        for j, r in enumerate(best):
            f[[40 + j, 600 + j, 1100 + j]] = f[r]
        for j, r in enumerate(worst):
            f[[50 + j, 700 + j, 1110 + j]] = f[r]
    store = make_store(tmp_path, fs, dtype)
    served = ServedFeatures(store, 3, mode=mode)
    weights = np.array([0.7, 1.3, 0.4])
    rng = np.random.default_rng(3)
    vecs = [{c: qs[c] for c in range(3)}] + [
        {c: (qs[c] + 0.05 * rng.standard_normal(97)).astype(np.float32) for c in range(3)} for _ in range(6)
    ]
    sqs = [scored_query(served, weights, [0, 1, 2], v, {}, "raw") for v in vecs]
    both = ("proponents", "opponents")
    for size in (PARALLEL_QUERIES - 1, PARALLEL_QUERIES + 3):
        for k in (2, 6, 13):
            for sq, got in zip(sqs[:size], scan_batch(served, sqs[:size], k, both), strict=True):
                for d in both:
                    want, s64 = reference_top(served, sq, k, d)
                    assert got[d].rows.tolist() == want.tolist(), (size, k, d)
                    np.testing.assert_array_equal(got[d].scores, s64[want])


@pytest.mark.parametrize("kernel", ["native", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("mode", ["memory", "quantized", "stream"])
def test_batch_scan_gives_each_query_its_own_answer(tmp_path, monkeypatch, dtype, mode, kernel):
    """One pass for several queries (a GEMM per block: 10 int8 vectors, the native kernel's register-blocked
    GEMM) answers each exactly as a scan of it alone, with either int8 kernel."""
    from proponent.query import kernels
    from proponent.query.scan import scan_batch

    if kernel not in kernels.available():
        pytest.skip("native kernel not built")
    monkeypatch.setenv("PROPONENT_INT8_KERNEL", kernel)

    fs, _ = planted(seed=5, n=1500, d=97)
    store = make_store(tmp_path, fs, dtype)
    served = ServedFeatures(store, 3, mode=mode)
    rng = np.random.default_rng(7)
    weights = np.array([0.7, 1.3, 0.4])
    sqs = []
    for i, scoring in enumerate(["raw", "cosine", "relatif", "raw", "cosine"]):
        vec = {c: rng.standard_normal(97).astype(np.float32) * (i + 1) for c in range(3)}
        sqn = {c: float((vec[c].astype(np.float64) ** 2).sum()) * 1.5 for c in range(3)}
        sqs.append(scored_query(served, weights, [0, 1, 2], vec, sqn, scoring))
    both = ("proponents", "opponents")
    batch = scan_batch(served, sqs, 7, both)
    assert len(batch) == len(sqs)
    for sq, got in zip(sqs, batch, strict=True):
        alone = scan(served, sq, 7, both)
        for d in both:
            want, s64 = reference_top(served, sq, 7, d)
            assert got[d].rows.tolist() == alone[d].rows.tolist() == want.tolist()
            np.testing.assert_array_equal(got[d].scores, alone[d].scores)
            np.testing.assert_array_equal(got[d].contributions, alone[d].contributions)
            assert got[d].exact and got[d].strategy.endswith("/batch[5]")
    with pytest.raises(ValueError, match="same checkpoints for every query"):
        scan_batch(served, [sqs[0], scored_query(served, weights, [0, 1], {0: fs[0][0], 1: fs[1][0]}, {}, "raw")], 3)
