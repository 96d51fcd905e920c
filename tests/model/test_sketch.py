"""Second-stage sketches: reproducible, unbiased, equal to their explicit matrices, dtype and batch safe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from proponent.format.store import quantize_int8
from proponent.model.architectures import ModelConfig, build_model
from proponent.model.featurizers.kronecker import KroneckerFeaturizer
from proponent.model.objectives import ELBO
from proponent.model.projection import ProjectionSpec, Projector, discover_layers
from proponent.model.sketch import (
    SKETCH_KINDS,
    Sketch,
    TensorSketch,
    allocate_dims,
    hadamard_factors,
    hadamard_matrix,
    make_sketch,
    paley,
    storage_bytes,
    sylvester,
)
from proponent.research.sketches import (
    KronVariance,
    LayerTensorSketch,
    allocate_kron,
    allocate_kron_variance,
    calibrate_kron,
    dequantize_rows,
    kron_projector,
    kron_variance,
    quantize_rows,
)

CASES = [("srht", 1), ("sparse", 1), ("sparse", 3), ("gaussian", 1)]


def _sketch(kind: str, nnz: int, in_dim: int, out_dim: int, seed: int = 0) -> Sketch:
    return Sketch(in_dim, out_dim, kind, seed=seed, nnz=nnz)


# ---------------------------------------------------------------------------- Hadamard pieces


@pytest.mark.parametrize("order", [1, 2, 4, 8, 12, 16, 20, 32])
def test_hadamard_matrices_are_hadamard(order: int) -> None:
    h = hadamard_matrix(order)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(h @ h.T, order * torch.eye(order, dtype=torch.float64))


def test_hadamard_sizes() -> None:
    assert hadamard_factors(19_520) == [20, 32, 32]  # 20,480: 5% padding instead of 68% for 2^15
    for n in [1, 2, 3, 5, 11, 12, 13, 21, 100, 1000, 1536, 4097, 19_520, 71_808]:
        f = hadamard_factors(n)
        size = math.prod(f)
        assert size >= n
        assert all(a in (12, 20) or (a & (a - 1) == 0 and a <= 32) for a in f)
        smaller = [h * 2**p for h in (1, 12, 20) for p in range(20) if n <= h * 2**p < size]
        assert not smaller, (n, f, smaller)
    with pytest.raises(ValueError):
        paley(16)
    with pytest.raises(ValueError):
        sylvester(12)


# --------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(("kind", "nnz"), CASES)
@pytest.mark.parametrize(("in_dim", "out_dim"), [(1, 1), (7, 3), (64, 64), (100, 17), (300, 64)])
def test_apply_equals_explicit_matrix(kind: str, nnz: int, in_dim: int, out_dim: int) -> None:
    if nnz > out_dim:
        pytest.skip("nnz > out_dim")
    if kind == "srht" and out_dim > math.prod(hadamard_factors(in_dim)):
        pytest.skip("out_dim above the padded size")
    s = _sketch(kind, nnz, in_dim, out_dim, seed=5)
    x = torch.randn(9, in_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    m = s.matrix()
    assert m.shape == (in_dim, out_dim) and m.dtype == torch.float64
    torch.testing.assert_close(s.apply(x), x @ m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.apply(x[0]), x[0] @ m, rtol=1e-12, atol=1e-12)  # a single row
    if kind == "sparse":  # the deterministic gather path (used off the CPU) computes the same sums
        torch.testing.assert_close(s._apply_sparse(x, "gather"), x @ m, rtol=1e-12, atol=1e-12)


def test_sparse_structure() -> None:
    s = Sketch(1000, 64, "sparse", seed=2, nnz=2)
    m = s.matrix()
    per_row = (m != 0).sum(1)
    assert int(per_row.max()) <= 2 and float(per_row.float().mean()) > 1.9  # a rare same-bucket collision
    counts = torch.bincount(s._tensors["buckets"][0], minlength=64)
    assert int(counts.max() - counts.min()) <= 1  # balanced buckets
    assert set(m[m != 0].abs().unique().tolist()) <= {1 / math.sqrt(2), 2 / math.sqrt(2)}


def test_srht_matrix_has_orthogonal_scaled_columns() -> None:
    s = Sketch(300, 40, "srht", seed=1)  # padded to 320 = 20 x 16
    m = s.matrix()
    # columns are distinct rows of an orthogonal matrix (restricted to the first 300 inputs), scaled
    full = Sketch(320, 40, "srht", seed=1)
    mf = full.matrix()
    torch.testing.assert_close(mf.T @ mf, (320 / 40) * torch.eye(40, dtype=torch.float64))
    assert m.shape == (300, 40)


# ------------------------------------------------------------------------------ reproducibility


# sha256 of the defining tensors of Sketch(50, 8, kind, seed=7, nnz): pinned, so that a change of
# generator (ours or torch's) that would make stored features unreadable is caught here.
PINNED = {
    ("srht", 1): "2b947add6e55f682",
    ("sparse", 1): "c645bb71bb7d7b8a",
    ("sparse", 3): "657632cc178e95f5",
    ("gaussian", 1): "6a10f74e2ca36572",
}


@pytest.mark.parametrize(("kind", "nnz"), CASES)
def test_reproducible_bytes(kind: str, nnz: int) -> None:
    a, b = _sketch(kind, nnz, 50, 8, seed=7), _sketch(kind, nnz, 50, 8, seed=7)
    assert a.digest() == b.digest()
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    assert a.apply(x).numpy().tobytes() == b.apply(x).numpy().tobytes()
    assert _sketch(kind, nnz, 50, 8, seed=8).digest() != a.digest()
    assert _sketch(kind, nnz, 50, 9, seed=7).digest() != a.digest()
    c = Sketch.from_dict(a.to_dict())
    assert c.digest() == a.digest() and c.to_dict() == a.to_dict()
    assert a.digest()[:16] == PINNED[(kind, nnz)], a.digest()[:16]


def test_to_dict_and_make_sketch() -> None:
    s = Sketch(100, 10, "sparse", seed=3, nnz=2)
    d = s.to_dict()
    assert d == {"kind": "sparse", "in_dim": 100, "out_dim": 10, "seed": 3, "nnz": 2, "version": 1}
    made = make_sketch(d)
    assert made is not None and made.digest() == s.digest()
    assert make_sketch(None) is None and make_sketch({"kind": "none"}) is None
    with pytest.raises(ValueError, match="version"):
        Sketch.from_dict({**d, "version": 99})


# ---------------------------------------------------------------------------------- unbiasedness


@pytest.mark.parametrize(("kind", "nnz"), CASES)
def test_unbiased_over_seeds(kind: str, nnz: int) -> None:
    g = torch.Generator().manual_seed(0)
    n, d = 200, 16
    # aligned, non-negative, partly spiky vectors: the hard case for sketches
    x = torch.rand(n, generator=g, dtype=torch.float64)
    y = x + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
    x[3] = 5.0
    truth_xy, truth_xx = float(x @ y), float(x @ x)
    est_xy, est_xx = [], []
    for seed in range(400):
        s = _sketch(kind, nnz, n, d, seed=seed)
        sx, sy = s.apply(torch.stack([x, y]))
        est_xy.append(float(sx @ sy))
        est_xx.append(float(sx @ sx))
    for est, truth in ((np.array(est_xy), truth_xy), (np.array(est_xx), truth_xx)):
        se = est.std(ddof=1) / math.sqrt(len(est))
        assert abs(est.mean() - truth) < 4 * se, (kind, est.mean(), truth, se)
        assert est.std() > 0
        # and the spread is that of a JL sketch of dimension d (within a factor): relative sd ~ sqrt(2/d)
        assert est.std() / truth < 3 * math.sqrt(2 / d)


@pytest.mark.parametrize(("kind", "nnz"), CASES)
def test_expected_gram_is_identity(kind: str, nnz: int) -> None:
    n, d, seeds = 12, 6, 3000
    acc = torch.zeros(n, n, dtype=torch.float64)
    acc2 = torch.zeros(n, n, dtype=torch.float64)
    for seed in range(seeds):
        m = _sketch(kind, nnz, n, d, seed=seed).matrix()
        g = m @ m.T
        acc += g
        acc2 += g * g
    mean = acc / seeds
    se = ((acc2 / seeds - mean**2).clamp_min(0) / seeds).sqrt()
    dev = (mean - torch.eye(n, dtype=torch.float64)).abs()
    # SRHT and sparse diagonals are exactly 1 (zero variance) for every seed
    assert bool((dev <= 4.5 * se + 1e-12).all()), float((dev - 4.5 * se).max())


# ---------------------------------------------------------------------------- dtypes and batches


@pytest.mark.parametrize(("kind", "nnz"), CASES)
def test_float64_and_float32(kind: str, nnz: int) -> None:
    s = _sketch(kind, nnz, 500, 32, seed=1)
    x64 = torch.randn(6, 500, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y64 = s.apply(x64)
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64, x64 @ s.matrix(), rtol=1e-12, atol=1e-12)
    y32 = s.apply(x64.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=1e-5 * float(y64.abs().max()))
    y16 = s.apply(x64.half())  # computed in float32, returned in the input dtype
    assert y16.dtype == torch.float16


@pytest.mark.parametrize(("kind", "nnz"), CASES)
def test_batch_size_invariance(kind: str, nnz: int) -> None:
    s = _sketch(kind, nnz, 3000, 256, seed=4)
    x = torch.randn(37, 3000, generator=torch.Generator().manual_seed(3))
    full = s.apply(x)
    parts = torch.cat([s.apply(x[i : i + 5]) for i in range(0, 37, 5)])
    single = torch.stack([s.apply(x[i]) for i in range(37)])
    scale = float(full.abs().max())
    torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(single, full, rtol=1e-5, atol=1e-6 * scale)


def test_devices() -> None:
    s = Sketch(200, 16, "srht", seed=1)
    t = s.to("cpu")
    assert t is not s and t.digest() == s.digest()
    x = torch.randn(3, 200)
    torch.testing.assert_close(t.apply(x), s.apply(x))
    if torch.cuda.is_available():
        for kind, nnz in CASES:
            c = _sketch(kind, nnz, 200, 16, seed=1)
            gpu = c.to("cuda")
            assert gpu.digest() == c.digest()
            torch.testing.assert_close(gpu.apply(x.cuda()).cpu(), c.apply(x), rtol=1e-5, atol=1e-5)


def test_errors() -> None:
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="kind"):
        Sketch(10, 5, "fjlt")
    with pytest.raises(ValueError, match="dims"):
        Sketch(0, 5)
    with pytest.raises(ValueError, match="nnz"):
        Sketch(10, 5, "gaussian", nnz=2)
    with pytest.raises(ValueError, match="nnz"):
        Sketch(10, 2, "sparse", nnz=3)
    with pytest.raises(ValueError, match="padded"):
        Sketch(10, 17, "srht")
    with pytest.raises(ValueError, match="columns"):
        Sketch(11, 5).apply(x)
    assert set(SKETCH_KINDS) == {"srht", "sparse", "gaussian"}


# ---------------------------------------------------------------------------------- allocation


def test_allocate_dims() -> None:
    assert allocate_dims([3.0, 1.0], 100) == [75, 25]
    dims = allocate_dims([10.0, 1.0, 0.1], 100, max_dims=[30, 1000, 1000])
    assert dims[0] == 30 and sum(dims) == 100 and dims[1] > dims[2] >= 1
    assert allocate_dims([1.0, 1.0], 100, max_dims=[10, 20]) == [10, 20]  # everything exact
    assert sum(allocate_dims([0.5, 0.25, 0.25, 1e-9], 4097, min_dim=8)) == 4097
    assert allocate_dims([0.0, 0.0], 10) == [5, 5]
    assert allocate_dims([1.0, 4.0], 30, power=0.5) == [10, 20]
    with pytest.raises(ValueError):
        allocate_dims([1.0, 1.0], 1, min_dim=4)
    with pytest.raises(ValueError):
        allocate_dims([1.0, -1.0], 10)


def test_allocate_kron() -> None:
    lay = allocate_kron([0.01, 0.05, 1.0], in_dims=[785, 513, 257], out_dims=[512, 256, 784], total_dim=20_000)
    assert sum(a * b for a, b in lay) <= 20_000
    assert lay[2][0] >= lay[1][0] >= lay[0][0]  # more energy, larger k
    assert sum(a * b for a, b in lay) > 15_000  # the budget is used
    # a low-energy layer still grows once the high-energy one is capped: the whole budget is usable
    lay = allocate_kron([0.001, 1.0], in_dims=[400, 65], out_dims=[300, 64], total_dim=40_000)
    assert lay[1] == (65, 64) and 30_000 < sum(a * b for a, b in lay) <= 40_000
    small = allocate_kron([1.0, 1.0], in_dims=[5, 3], out_dims=[4, 2], total_dim=10_000)
    assert small == [(5, 4), (3, 2)]  # fits exactly: every side identity


def test_kron_projector_matches_uniform_projector() -> None:
    cfg = ModelConfig(kind="mlp", input_shape=(1, 8, 8), hidden=(40, 20), latent_dim=3)
    layers = discover_layers(build_model(cfg))
    ref = Projector(layers, ProjectionSpec(kind="kron", k=16, seed=3))
    mine = kron_projector(layers, [(16, 16)] * len(layers), seed=3)
    assert mine.dim == ref.dim
    for a, b in zip(ref.blocks, mine.blocks, strict=True):
        assert (a.k_in, a.k_out, a.offset) == (b.k_in, b.k_out, b.offset)
        for pa, pb in ((a.p_in, b.p_in), (a.p_out, b.p_out)):
            assert (pa is None) == (pb is None)
            if pa is not None and pb is not None:
                assert torch.equal(pa, pb)
    uneven = kron_projector(layers, [(8, 4), (41, 20), (21, 6), (4, 20), (21, 40), (41, 64)], seed=3)
    assert [(b.k_in, b.k_out) for b in uneven.blocks] == [(8, 4), (41, 20), (21, 6), (4, 20), (21, 40), (41, 64)]
    assert uneven.dim == sum(b.dim for b in uneven.blocks)
    assert uneven.blocks[1].p_in is None and uneven.blocks[1].p_out is None  # both sides exact


def test_kron_projector_features_match_uniform_projector() -> None:
    """The featurizer sizes its output by ``stage1_dim``: a per-layer projector must set it (it was 0,
    and ``index_throughput.py --quick`` crashed writing the first block into a zero-width slice)."""
    cfg = ModelConfig(kind="mlp", input_shape=(1, 8, 8), hidden=(40, 20), latent_dim=3)
    model = build_model(cfg)
    layers = discover_layers(model)
    ref = Projector(layers, ProjectionSpec(kind="kron", k=16, seed=3))
    mine = kron_projector(layers, [(16, 16)] * len(layers), seed=3)
    assert mine.stage1_dim == mine.dim == ref.stage1_dim
    g = torch.Generator().manual_seed(1)
    x, eps = torch.rand(5, 1, 8, 8, generator=g), torch.randn(5, 2, 3, generator=g)
    y = torch.zeros(5, dtype=torch.long)
    obj = ELBO(m=2)
    want = KroneckerFeaturizer(model, obj, ref).featurize(x, y, eps).features
    got = KroneckerFeaturizer(model, obj, mine).featurize(x, y, eps).features
    torch.testing.assert_close(got, want)


# -------------------------------------------------------------------------------- quantization


def test_quantize_rows() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 300)).astype(np.float32)
    x[2] = 0.0
    q, scale = quantize_rows(x, "int8")
    assert q.dtype == np.int8 and scale is not None and scale.dtype == np.float32 and scale.shape == (5,)
    assert int(np.abs(q).max()) == 127
    back = dequantize_rows(q, scale)
    assert np.all(np.abs(back - x) <= scale[:, None] / 2 + 1e-7)
    assert np.all(back[2] == 0) and np.all(q[2] == 0) and scale[2] == 0  # the store's zero row: scale 0
    codes, store_scale = quantize_int8(x)  # one int8 quantizer: the store's
    np.testing.assert_array_equal(q, codes)
    np.testing.assert_array_equal(scale, store_scale)
    h, none = quantize_rows(torch.from_numpy(x), "float16")
    assert h.dtype == np.float16 and none is None
    np.testing.assert_allclose(dequantize_rows(h, None), x, rtol=1e-3, atol=1e-3)
    f, _ = quantize_rows(x, "float32")
    assert np.array_equal(f, x)
    assert storage_bytes(2048, "float32") == 8192
    assert storage_bytes(4096, "float16") == 8192
    assert storage_bytes(8000, "int8") == 8004
    with pytest.raises(ValueError):
        quantize_rows(x, "int4")


@pytest.mark.parametrize("kind", ["srht", "gaussian"])
def test_nested(kind: str) -> None:
    big = Sketch(700, 96, kind, seed=2)
    assert big.nested and not Sketch(700, 96, "sparse").nested
    x = torch.randn(5, 700, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    full = big.apply(x)
    tol = 1e-12 if kind == "srht" else 1e-6  # the Gaussian matrix is float32, scaled per out_dim
    for d in (1, 17, 64, 96):
        small = Sketch(700, d, kind, seed=2)
        torch.testing.assert_close(small.apply(x), full[:, :d] * math.sqrt(96 / d), rtol=tol, atol=tol)


def test_kron_variance_matches_monte_carlo() -> None:
    g = torch.Generator().manual_seed(0)
    t, n_in, n_out = 3, 30, 20
    a = torch.rand(2, t, n_in, generator=g, dtype=torch.float64)  # aligned inputs (non-negative)
    d = torch.randn(2, t, n_out, generator=g, dtype=torch.float64)
    grads = [d[i].T @ a[i] for i in range(2)]
    kv = kron_variance(a, d)
    assert kv.energy == pytest.approx(float(sum((x**2).sum() for x in grads) / 2))
    for k_in, k_out in ((4, n_out), (n_in, 4)):  # one side projected: the formula is exact
        est = []
        for seed in range(3000):
            gs = torch.Generator().manual_seed(seed)
            q = torch.randn(n_in, k_in, generator=gs, dtype=torch.float64) / math.sqrt(k_in)
            p = torch.randn(n_out, k_out, generator=gs, dtype=torch.float64) / math.sqrt(k_out)
            f = [
                (p.T @ x if k_out < n_out else x) @ (q if k_in < n_in else torch.eye(n_in, dtype=torch.float64))
                for x in grads
            ]
            est.append(float((f[0] * f[1]).sum()))
        pred = kv.variance(k_in, k_out, n_in, n_out)
        assert float(np.var(est)) == pytest.approx(pred, rel=0.12)
    assert kv.variance(n_in, n_out, n_in, n_out) == 0.0  # both sides exact


def test_allocate_kron_variance() -> None:
    # layer 0: aligned inputs (a ~ c, input side cheap to keep small), layer 1: tiny energy
    terms = [KronVariance(a=1.0, b=50.0, c=60.0, energy=10.0), KronVariance(a=1e-4, b=1e-4, c=1e-4, energy=0.01)]
    lay = allocate_kron_variance(terms, in_dims=[257, 513], out_dims=[784, 256], total_dim=8000)
    assert sum(i * o for i, o in lay) <= 8000
    (ki, ko), (ki1, ko1) = lay
    assert ko > ki  # the costly side (b) gets the dimensions
    assert ki1 * ko1 < 100  # the low-energy layer stays small
    full = allocate_kron_variance(terms, in_dims=[5, 3], out_dims=[4, 2], total_dim=1000)
    assert full == [(5, 4), (3, 2)]
    with pytest.raises(ValueError):
        allocate_kron_variance(terms, [5, 3], [4, 2], total_dim=1)


def test_calibrate_kron() -> None:
    cfg = ModelConfig(kind="mlp", input_shape=(1, 8, 8), hidden=(20,), latent_dim=3)
    model = build_model(cfg)
    layers = discover_layers(model)
    from proponent.model.objectives import ELBO

    obj = ELBO(m=2)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(1))
    terms = calibrate_kron(model, obj, layers, x, torch.zeros(6, dtype=torch.long), eps)
    assert len(terms) == len(layers)
    exact = Projector(layers, ProjectionSpec(kind="none"))
    from proponent.model.featurizers.kronecker import KroneckerFeaturizer

    f = KroneckerFeaturizer(model, obj, exact).featurize(x, torch.zeros(6, dtype=torch.long), eps).features.double()
    for term, blk in zip(terms, exact.blocks, strict=True):
        assert term.energy == pytest.approx(
            float(f[:, blk.offset : blk.offset + blk.dim].pow(2).sum(1).mean()), rel=1e-6
        )
        assert term.a > 0 and term.b > 0 and term.c > 0


# ------------------------------------------------------------------------------ tensor sketches


def test_tensor_sketch_equals_explicit_matrix() -> None:
    ts = TensorSketch(7, 5, 16, seed=1, name="layer")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 7, dtype=torch.float64, generator=g)
    d = torch.randn(3, 4, 5, dtype=torch.float64, generator=g)
    grad = torch.bmm(d.transpose(1, 2), a)  # [B, out, in]
    m = ts.matrix()
    assert m.shape == (35, 16) and int((m != 0).sum()) == 35  # one signed bucket per entry
    want = grad.reshape(3, -1) @ m
    torch.testing.assert_close(ts.apply_factors(a, d), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ts.apply_matrix(grad), want, rtol=1e-12, atol=1e-12)
    # float32 and batch-size invariance
    y32 = ts.apply_factors(a.float(), d.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ts.apply_factors(a[1:2], d[1:2]), want[1:2], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        ts.apply_factors(a[..., :6], d)


def test_tensor_sketch_bias_and_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked kernel with the bias as a bucket (no concatenated ones column) and an ``out`` slice
    gives the explicit matrix's sketch of ``G`` with the bias column, whatever the chunking."""
    import proponent.model.sketch as sketch_mod

    ts = TensorSketch(9, 6, 40, seed=4, name="layer")
    g = torch.Generator().manual_seed(2)
    a = torch.randn(7, 3, 8, dtype=torch.float64, generator=g)  # 8 inputs + the bias column
    d = torch.randn(7, 3, 6, dtype=torch.float64, generator=g)
    ab = torch.cat([a, torch.ones(7, 3, 1, dtype=torch.float64)], dim=2)
    want = torch.bmm(d.transpose(1, 2), ab).reshape(7, -1) @ ts.matrix()
    whole = ts.apply_factors(a, d, bias=True)
    torch.testing.assert_close(whole, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ts.apply_factors(ab, d), want, rtol=1e-12, atol=1e-12)
    for elems in (1, 3 * 40 * 2, 3 * 40 * 3 + 1):  # one sample per chunk, two, three: a ragged last chunk
        monkeypatch.setattr(sketch_mod, "_TS_CHUNK_ELEMS", elems)
        feats = torch.full((7, 50), 7.0, dtype=torch.float64)
        got = ts.apply_factors(a, d, bias=True, out=feats[:, 5:45])
        assert got.data_ptr() == feats[:, 5:45].data_ptr()
        torch.testing.assert_close(feats[:, 5:45], want, rtol=1e-12, atol=1e-12)
        assert bool((feats[:, :5] == 7).all() and (feats[:, 45:] == 7).all())
        y32 = ts.apply_factors(a.float(), d.float(), bias=True)
        torch.testing.assert_close(y32.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="bias excluded"):
        ts.apply_factors(ab, d, bias=True)


def test_tensor_sketch_reproducible_and_unbiased() -> None:
    a1 = TensorSketch(30, 20, 64, seed=3, name="x")
    assert a1.digest() == TensorSketch(30, 20, 64, seed=3, name="x").digest()
    assert a1.digest() != TensorSketch(30, 20, 64, seed=3, name="y").digest()  # layers get independent hashes
    assert a1.digest()[:16] == "e664f628a2df1eb3", a1.digest()[:16]
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 1, 30, generator=g, dtype=torch.float64)  # aligned inputs
    d = torch.randn(2, 1, 20, generator=g, dtype=torch.float64)
    grads = torch.bmm(d.transpose(1, 2), a).reshape(2, -1)
    truth = float(grads[0] @ grads[1])
    est = []
    for seed in range(600):
        f = TensorSketch(30, 20, 64, seed=seed).apply_factors(a, d)
        est.append(float(f[0] @ f[1]))
    arr = np.array(est)
    assert abs(arr.mean() - truth) < 4 * arr.std(ddof=1) / math.sqrt(len(arr))
    # error of a Gaussian sketch of vec(G) of the same dimension (within a factor), not of a Kronecker block
    gauss_sd = math.sqrt((float(grads[0] @ grads[0]) * float(grads[1] @ grads[1]) + truth**2) / 64)
    assert arr.std() < 1.5 * gauss_sd


def test_layer_tensor_sketch() -> None:
    cfg = ModelConfig(kind="mlp", input_shape=(1, 4, 4), hidden=(6,), latent_dim=2)
    layers = discover_layers(build_model(cfg))
    dims = allocate_dims([1.0] * len(layers), 60, max_dims=[li.in_dim * li.out_dim for li in layers])
    lts = LayerTensorSketch(layers, dims, seed=0)
    assert lts.dim == 60 and lts.offsets[1] == dims[0]
    exact_sizes = [li.in_dim * li.out_dim for li in layers]
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(3, sum(exact_sizes), dtype=torch.float64, generator=g)
    y = lts.project_exact(grads)
    assert y.shape == (3, 60)
    pos = 0
    for i, (info, n) in enumerate(zip(layers, exact_sizes, strict=True)):
        blk = grads[:, pos : pos + n].reshape(3, info.out_dim, info.in_dim)
        sk = lts.sketches[i]
        want = blk.reshape(3, -1) if sk is None else blk.reshape(3, -1) @ sk.matrix()
        torch.testing.assert_close(y[:, lts.offsets[i] : lts.offsets[i] + dims[i]], want, rtol=1e-12, atol=1e-12)
        pos += n
    full = LayerTensorSketch(layers, exact_sizes)  # every layer exact: identity blocks
    assert all(s is None for s in full.sketches)
    torch.testing.assert_close(full.project_exact(grads), grads)
    a = torch.randn(3, 2, layers[0].in_dim, dtype=torch.float64, generator=g)
    d = torch.randn(3, 2, layers[0].out_dim, dtype=torch.float64, generator=g)
    torch.testing.assert_close(full.block(0, a, d), torch.bmm(d.transpose(1, 2), a).reshape(3, -1))
    with pytest.raises(ValueError):
        LayerTensorSketch(layers, [0] * len(layers))


def test_layer_sketch_kronecker_blocks_match_projector() -> None:
    cfg = ModelConfig(kind="mlp", input_shape=(1, 4, 4), hidden=(6,), latent_dim=2)
    model = build_model(cfg)
    layers = discover_layers(model)
    specs = [(4, 3), 5, (layers[2].in_dim, 2), 7]
    lts = LayerTensorSketch(layers, specs, seed=2)
    ref = kron_projector(layers, [(4, 3), (1, 1), (layers[2].in_dim, 2), (1, 1)], seed=2)
    exact_sizes = [li.in_dim * li.out_dim for li in layers]
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(3, sum(exact_sizes), generator=g)
    y = lts.project_exact(grads)
    assert lts.dims == [12, 5, layers[2].in_dim * 2, 7] and y.shape == (3, lts.dim)
    exact = Projector(layers, ProjectionSpec(kind="none"))
    mats = {p: grads[:, b.offset : b.offset + b.dim] for b in exact.blocks for p in b.info.params[:1]}
    for i in (0, 2):  # Kronecker blocks: the Projector's matrices and layout
        blk = ref.blocks[i]
        g_i = mats[blk.info.params[0]].reshape(3, blk.info.out_dim, blk.info.in_dim)
        torch.testing.assert_close(y[:, lts.offsets[i] : lts.offsets[i] + lts.dims[i]], ref.project_matrix(blk, g_i))
    # from factors, the same blocks
    a = torch.randn(3, 2, layers[0].in_dim, generator=g)
    d = torch.randn(3, 2, layers[0].out_dim, generator=g)
    want = lts.project_exact(
        torch.cat([torch.bmm(d.transpose(1, 2), a).reshape(3, -1), torch.zeros(3, sum(exact_sizes[1:]))], 1)
    )[:, : lts.dims[0]]
    torch.testing.assert_close(lts.block(0, a, d), want, rtol=1e-5, atol=1e-5)
    assert lts.to_dict()["dims"] == [[4, 3], 5, [layers[2].in_dim, 2], 7]


def test_allocate_hybrid_and_smooth_sizes() -> None:
    from proponent.model.sketch import smooth_floor
    from proponent.research.sketches import allocate_hybrid

    assert [smooth_floor(n) for n in (1, 7, 1068, 1351, 3686)] == [1, 6, 1024, 1350, 3645]
    cfg = ModelConfig(kind="mlp", input_shape=(1, 28, 28), hidden=(512, 256), latent_dim=16)
    layers = discover_layers(build_model(cfg))
    energy = [0.15, 0.16, 0.45, 0.03, 0.08, 0.13]
    terms = [KronVariance(a=0.05, b=0.3, c=1.0, energy=e) for e in energy]
    rows = [1, 1, 1, 16, 16, 16]
    specs = allocate_hybrid(layers, energy, terms, rows, 8192)
    assert all(isinstance(s, int) for s in specs[:3]) and all(isinstance(s, tuple) for s in specs[3:])
    lts = LayerTensorSketch(layers, specs)
    assert 8000 < lts.dim <= 8192
    assert all(smooth_floor(int(s)) == s for s in specs[:3])  # type: ignore[call-overload]


def test_allocate_tensor_smooth() -> None:
    from proponent.model.sketch import allocate_tensor, smooth_floor

    energy = [0.149, 0.165, 0.45, 0.026, 0.079, 0.13]
    exact = [785 * 512, 513 * 256, 257 * 32, 17 * 256, 257 * 512, 513 * 784]
    for total in (2048, 4096, 7996, 8192):
        dims = allocate_tensor(energy, total, exact)
        assert all(smooth_floor(d) == d for d in dims)
        assert total * 0.98 <= sum(dims) <= total
    assert allocate_tensor(energy, 7996, exact, smooth=False) == allocate_dims(energy, 7996, max_dims=exact)
    assert allocate_tensor([1.0, 1.0], 100, [3, 1000])[0] == 3  # an exact (capped) layer is kept whole
