"""The scan's int8 kernels: the native one (every instruction set this CPU runs) and torch's, against exact
int64 products and against each other, and the scan's answers (rows, scores, candidates) the same whichever runs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from proponent.query import kernels
from proponent.query.features import ServedFeatures
from proponent.query.scan import scan
from proponent.query.scoring import scored_query
from tests.query.test_search import make_store, planted, reference_top

native = pytest.mark.skipif(kernels._native is None, reason="native kernel not built")


def _reference(codes: np.ndarray, z: np.ndarray) -> np.ndarray:
    return codes[:, : z.shape[1]].astype(np.int64) @ z.T.astype(np.int64)


def test_native_kernel_is_built_where_a_compiler_is():
    """make setup and CI build it (gcc); a machine without a compiler sets PROPONENT_ALLOW_NO_NATIVE=1."""
    if os.environ.get("PROPONENT_ALLOW_NO_NATIVE") == "1":
        pytest.skip("PROPONENT_ALLOW_NO_NATIVE=1")
    assert kernels.native_kernel() in ("avx512vnni", "avx2", "scalar")
    assert kernels.available() == ["native", "torch"]


@native
@pytest.mark.parametrize(
    "n,d,m,width",
    [
        (1, 1, 1, 1),
        (7, 63, 2, 64),
        (17, 64, 3, 64),
        (300, 257, 5, 264),
        (1000, 8000, 2, 8000),
        (9, 130, 1, 200),
        (0, 16, 2, 16),
        # a batch's vectors (m >= 8): the register-blocked GEMM, odd tiles of rows and vectors, column blocks
        (1, 1, 8, 1),
        (7, 63, 9, 64),
        (17, 64, 70, 64),
        (31, 4097, 16, 4100),
        (5, 8200, 140, 8200),
        (100, 257, 8, 264),
        (4, 32_768, 10, 32_768),
        (0, 16, 12, 16),
    ],
)
def test_every_native_instruction_set_is_exact(n, d, m, width):
    rng = np.random.default_rng(n + d + m)
    codes = rng.integers(-128, 128, (n, width), dtype=np.int8)
    z = rng.integers(-128, 128, (m, d), dtype=np.int8)
    want = _reference(codes, z)
    assert kernels._native is not None
    for isa in kernels._native.kernels():
        out = np.full((n, m), 7, np.int64)
        kernels._native.products(codes.ctypes.data, n, d, width, z.ctypes.data, m, out.ctypes.data, isa)
        np.testing.assert_array_equal(out, want, err_msg=isa)
    t = torch.from_numpy(codes)
    np.testing.assert_array_equal(kernels.int8_products(t, z, "native"), want)
    np.testing.assert_array_equal(kernels.int8_products(t, z, "torch"), want)


@native
@pytest.mark.parametrize("m", [2, 12])
def test_native_threads_split_rows_and_columns_longer_than_int32_sums(m):
    """Extreme codes over 140,000 columns overflow an int32 sum: both kernels split the columns (the few-vector
    kernel and the batch's GEMM)."""
    n, d = 2 * kernels._MIN_ROWS_PER_THREAD + 5, 140_000
    codes = np.full((n, d), 127, np.int8)
    codes[1::2] = -128
    z = np.stack([np.full(d, -128, np.int8), np.full(d, 127, np.int8)] * (m // 2))
    want = _reference(codes, z)
    assert np.abs(want).max() > 2**31
    t = torch.from_numpy(codes)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        np.testing.assert_array_equal(kernels.int8_products(t, z, "native"), want)
    finally:
        torch.set_num_threads(old)
    np.testing.assert_array_equal(kernels.int8_products(t[:40], z, "torch"), want[:40])


@pytest.mark.parametrize("n,d,m", [(1, 1, 1), (17, 64, 3), (300, 257, 70), (5, 8200, 140), (40, 140_000, 2)])
def test_torch_products_in_both_orientations(n, d, m):
    """torch._int_mm as the CPU runs it (``z @ codes.T``, rows last) and as CUDA's cuBLASLt gets it (``codes @ zt``,
    padded, returned transposed) give the same exact ``[m, n]`` products, int32 sums split past 65,536 columns."""
    rng = np.random.default_rng(n + m)
    codes = rng.integers(-128, 128, (n, d), dtype=np.int8)
    if d == 140_000:  # extreme codes whose sums overflow int32
        codes[:] = 127
        codes[1::2] = -128
    z = rng.integers(-128, 128, (m, d), dtype=np.int8)
    z[0] = -128
    want = _reference(codes, z).T
    t = torch.from_numpy(codes)
    for rows_last in (True, False):
        got = kernels._torch_products(t, z, rows_last=rows_last)
        assert tuple(got.shape) == (m, n)
        np.testing.assert_array_equal(got.to(torch.int64).numpy(), want, err_msg=f"rows_last={rows_last}")
    np.testing.assert_array_equal(kernels.int8_products_tensor(t, z, "torch").to(torch.int64).numpy(), want)


@native
def test_gemm_peak_is_measured_on_every_kernel():
    assert kernels._native is not None
    for isa in kernels._native.kernels():
        seconds, macs = kernels._native.peak(isa, 3)
        assert seconds > 0 and macs == 3 * 12 * 8 * 1024
    with pytest.raises(ValueError, match="kernel avx9 is not available"):
        kernels._native.peak("avx9", 1)


def test_kernel_choice_and_bad_input(monkeypatch):
    codes = torch.zeros((4, 8), dtype=torch.int8)
    monkeypatch.setenv("PROPONENT_INT8_KERNEL", "auto")
    assert kernels.choose(codes, vectors=kernels.BATCH_VECTORS) == "torch"  # a batch's GEMM: oneDNN's
    if kernels._native is not None:
        assert kernels.choose(codes, vectors=2) == "native"
        assert kernels.choose(codes, "native", vectors=kernels.BATCH_VECTORS) == "native"
    monkeypatch.setenv("PROPONENT_INT8_KERNEL", "torch")
    assert kernels.choose(codes) == "torch"
    monkeypatch.setenv("PROPONENT_INT8_KERNEL", "fast")
    with pytest.raises(ValueError, match="PROPONENT_INT8_KERNEL must be one of auto, native, torch, got 'fast'"):
        kernels.choose(codes)
    with pytest.raises(ValueError, match="narrower than the 9 query columns"):
        kernels.int8_products(codes, np.zeros((2, 9), np.int8), "torch")
    with pytest.raises(TypeError, match="int8 codes and vectors"):
        kernels.int8_products(codes.float(), np.zeros((2, 8), np.int8))


@pytest.mark.parametrize("mode", ["memory", "stream"])
@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_scan_answers_are_the_same_with_either_kernel(tmp_path, monkeypatch, mode, dtype):
    fs, qs = planted(seed=11, n=2000, d=203)
    store = make_store(tmp_path, fs, dtype)
    served = ServedFeatures(store, 3, mode="quantized" if (dtype == "float16" and mode == "memory") else mode)
    assert served.kernel_kind() == ("int8" if (dtype == "int8" or mode == "memory") else "float")
    sqn = {c: float((q.astype(np.float64) ** 2).sum()) * 1.5 for c, q in enumerate(qs)}
    sq = scored_query(served, np.array([0.7, 1.3, 0.4]), [0, 1, 2], dict(enumerate(qs)), sqn, "cosine")
    got = {}
    for name in kernels.available():
        monkeypatch.setenv("PROPONENT_INT8_KERNEL", name)
        got[name] = scan(served, sq, 10, ("proponents", "opponents"))
    for d in ("proponents", "opponents"):
        want, s64 = reference_top(served, sq, 10, d)
        for res in got.values():
            assert res[d].rows.tolist() == want.tolist() and res[d].exact
            np.testing.assert_allclose(res[d].scores, s64[want], rtol=0, atol=1e-12 * np.abs(s64).max())
        first = next(iter(got.values()))[d]
        for res in got.values():  # bit for bit: the integer products are exact in both kernels
            np.testing.assert_array_equal(res[d].scores, first.scores)
            assert res[d].candidates == first.candidates
