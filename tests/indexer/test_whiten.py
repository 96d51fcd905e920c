"""``proponent index --whiten kfac|adam``: stored features of L G Rᵀ per layer, held to a float64 brute force.

The brute force is written from the definitions with this suite's own tools (tests/query/test_curvature.py's
``_per_sample``: exact per-sample gradients by autograd one sample at a time and the layers' ``(a, δ)`` rows with
the index's draws): K-FAC's ``A = E[a aᵀ]``, ``S = E[δ δᵀ]`` over the forward rows, ``L = (S + λ_S)^{-1/2}``,
``R = (A + λ_A)^{-1/2}`` with ``λ = α · mean eigenvalue``, or Adam's ``v̂`` (read from the checkpoint file by the
test) factored by its row and column means. On exact gradients the stored features, norms, query scores and
self-influence equal it; on a sketched int8 index the scores estimate it; the Kronecker and the dense featurizers
agree; damaged files are refused by name; a whitened index refuses query-time K-FAC.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from proponent.cli import main as cli_main
from proponent.format.fsio import IndexDir
from proponent.format.integrity import verify_index
from proponent.format.manifest import read_manifest
from proponent.format.whiten import WhitenError, kfac_factors
from proponent.format.whiten import load as load_whitening
from proponent.indexer.data import load_dataset
from proponent.indexer.job import IndexJobError, calibrate_layer_dims
from proponent.indexer.training import TrainConfig, train
from proponent.model.architectures import ModelConfig
from proponent.model.objectives import NOISE_INDEX, NOISE_QUERY, draw_noise, objective_at
from proponent.model.projection import ProjectionSpec
from proponent.query.curvature import to_features
from proponent.query.index import open_index
from tests.helpers import build_small_index, weights
from tests.query.test_curvature import _adam_v, _per_sample

pytestmark = pytest.mark.timeout(900)
ALPHA = 0.1


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    data = load_dataset("digits,limit=120")
    cfg = ModelConfig(kind="mlp", input_shape=data.shape, hidden=(6,), latent_dim=2)
    out = tmp_path_factory.mktemp("whiten_run") / "run"
    return train(data, cfg, out, TrainConfig(epochs=3, batch_size=32, checkpoints=2, seed=5), show_progress=False)


def _exact(run: Path, out: Path, kind: str = "kfac", **kw) -> Path:
    exact = {"projection": ProjectionSpec(kind="none"), "dtype": "float32"}
    return build_small_index(run, out, whiten=kind, whiten_alpha=ALPHA, **{**exact, **kw})


@pytest.fixture(scope="module")
def kfac_exact(run, tmp_path_factory) -> Path:
    return _exact(run, tmp_path_factory.mktemp("white_kfac") / "idx")


def _inv_sqrt(m: np.ndarray, lam: float) -> np.ndarray:
    e, q = np.linalg.eigh(m)
    return q @ np.diag(1.0 / np.sqrt(np.clip(e, 0, None) + lam)) @ q.T


def _whitening(idx, c: int, kind: str):
    """Per layer ``(L, R)`` from the definitions, and the rows' exact (unwhitened) gradients ``[N, out, in]``."""
    rt, man = idx.runtime, idx.manifest
    shape = objective_at(rt.objective, c).noise_shape(rt.model(c))
    eps = draw_noise(NOISE_INDEX, man.objective.seed, c, idx.meta.ids, man.objective.m, shape).numpy()
    grads, acts = _per_sample(idx, c, idx.store.inputs(slice(0, idx.n)), eps, idx.meta.labels, rt.objective)
    mats = []
    for lay, (a, d) in zip(man.projection.layers, acts, strict=True):
        if kind == "kfac":
            A, S = a.T @ a / len(a), d.T @ d / len(d)
            lam_a, lam_s = ALPHA * np.trace(A) / len(A), ALPHA * np.trace(S) / len(S)
            mats.append((_inv_sqrt(S, lam_s), _inv_sqrt(A, lam_a)))
        else:
            v = _adam_v(idx, c, lay.name).reshape(lay.out_dim, lay.in_dim)
            r, col = v.mean(1), v.mean(0)
            q = v.mean() ** 0.25
            mats.append((np.diag(q / np.sqrt(r + ALPHA * r.mean())), np.diag(q / np.sqrt(col + ALPHA * col.mean()))))
    return mats, grads


def _white(mats, grads) -> np.ndarray:
    """``[N, D]``: every layer's ``L G Rᵀ``, flattened row-major, in layer order."""
    return np.concatenate(
        [np.einsum("so,noi,ji->nsj", l, g, r).reshape(len(g), -1) for (l, r), g in zip(mats, grads)], 1
    )


@pytest.mark.parametrize("kind", ["kfac", "adam"])
def test_exact_whitened_index_equals_a_brute_force(run, kfac_exact, kind, tmp_path) -> None:
    path = kfac_exact if kind == "kfac" else _exact(run, tmp_path / "idx", kind="adam")
    idx = open_index(path, device="cpu")
    man = idx.manifest
    assert man.whiten is not None and man.whiten.kind == kind and man.whiten.alpha == ALPHA
    assert verify_index(IndexDir(path)) == []
    x = idx.input(idx.row_of(7)) * 0.5 + idx.input(idx.row_of(9)) * 0.5
    w = weights(idx, "lr")
    raw, lev = np.zeros(idx.n), np.zeros(idx.n)
    for c in range(len(idx.checkpoints)):
        mats, grads = _whitening(idx, c, kind)
        rows = _white(mats, grads)
        got = idx.store.feature_rows(c, np.arange(idx.n))
        np.testing.assert_allclose(got, rows, rtol=1e-4, atol=1e-5 * np.abs(rows).max())
        np.testing.assert_allclose(idx.store.sq_norm(c), (rows**2).sum(1), rtol=1e-6)
        shape = objective_at(idx.runtime.objective, c).noise_shape(idx.runtime.model(c))
        eps = draw_noise(NOISE_QUERY, 4, c, np.zeros(1, np.int64), man.objective.m, shape).numpy()
        gq, _ = _per_sample(idx, c, x[None], eps, np.zeros(1, np.int64), idx.runtime.objective)
        raw += w[c] * rows @ _white(mats, gq)[0]
        lev += w[c] * (rows**2).sum(1)
    np.testing.assert_allclose(idx.scores(x, seed=4, scoring="raw"), raw, rtol=1e-5, atol=1e-6 * np.abs(raw).max())
    np.testing.assert_allclose(idx.self_influence(), lev, rtol=1e-6)
    res = idx.influence(x, seed=4, scoring="raw", k=5)
    assert res.exact and [h.id for h in res.proponents] == [int(idx.meta.ids[i]) for i in np.argsort(-raw)[:5]]
    assert res.approximations[0].startswith("index whitened by")
    assert not any("unbiased estimate" in a for a in res.approximations)  # exact gradients: no sketch named
    assert man.fidelity is not None and all(ch.passed and ch.relative_error < 1e-5 for ch in man.fidelity.checkpoints)


def test_factored_damping_matches_the_dense_preconditioner(kfac_exact) -> None:
    """The stored inner product is vec(G_q)ᵀ P vec(G_i) with the dense P = (S + λ_S)⁻¹ ⊗ (A + λ_A)⁻¹."""
    idx = open_index(kfac_exact, device="cpu")
    mats, grads = _whitening(idx, 0, "kfac")
    (left, right), g = mats[0], grads[0]
    dense_p = np.kron(left.T @ left, right.T @ right)
    flat = g.reshape(len(g), -1)
    np.testing.assert_allclose(
        _white(mats[:1], grads[:1]) @ _white(mats[:1], grads[:1])[3], flat @ dense_p @ flat[3], rtol=1e-8
    )
    # and the stored factors are the module's own formula (one implementation, the same numbers)
    a_cov = np.cov(np.random.default_rng(0).normal(size=(5, 50)))
    s_cov = np.eye(3) * 2.0
    lft, rgt, lam_s, lam_a = kfac_factors(a_cov, s_cov, 0.5)
    np.testing.assert_allclose(rgt @ rgt @ (a_cov + lam_a * np.eye(5)), np.eye(5), atol=1e-10)
    assert lam_s == pytest.approx(1.0) and np.allclose(lft, np.eye(3) / np.sqrt(3.0))


def test_sketched_int8_index_stores_the_sketch_of_the_whitened_gradients(run, kfac_exact, tmp_path) -> None:
    """The tensor sketch (int8) of the whitened gradients: every stored row is the index's own sketch of the brute
    force's L G Rᵀ (to int8 rounding), the exact norms are the whitened ones, the fidelity check is measured against
    the whitened exact gradients, and the answer names both approximations."""
    spec = ProjectionSpec(kind="tensor", dim=48)
    out = build_small_index(run, tmp_path / "idx", whiten="kfac", whiten_alpha=ALPHA, projection=spec)
    idx, ref = open_index(out, device="cpu"), open_index(kfac_exact, device="cpu")
    assert any(l.tensor for l in idx.manifest.projection.layers) and idx.manifest.storage.dtype == "int8"
    for c in range(len(idx.checkpoints)):
        mats, grads = _whitening(ref, c, "kfac")
        white = [np.einsum("so,noi,ji->nsj", l, g, r) for (l, r), g in zip(mats, grads)]
        want = to_features(idx, c, white)
        got = idx.store.feature_rows(c, np.arange(idx.n))
        step = np.abs(want).max(1, keepdims=True) / 127  # the int8 code's step per row
        assert np.all(np.abs(got - want) <= 0.51 * step + 1e-4 * np.abs(want).max(1, keepdims=True))
        np.testing.assert_allclose(idx.store.sq_norm(c), ref.store.sq_norm(c), rtol=1e-5)
    fid = idx.manifest.fidelity
    assert fid is not None and all(0 < ch.relative_error for ch in fid.checkpoints)
    # the per-layer dimensions follow the whitened gradients' energy: the calibration redone from the stored factors
    man, where = idx.manifest, IndexDir(out)
    models = [idx.runtime.model(0), idx.runtime.model(len(idx.checkpoints) - 1)]
    data = load_dataset(man.dataset.spec)

    def dims(white):
        return calibrate_layer_dims(
            models, idx.runtime.objective, data, spec, "all", torch.device("cpu"), 0, whitening=white
        )

    stored = [l.k_in for l in man.projection.layers]  # a tensor layer's sketch dimension
    assert stored == list(dims([load_whitening(where, man, c) for c in (0, len(models) - 1)]))
    assert stored != list(dims(None)), stored
    res = idx.influence(ref.input(ref.row_of(11)), seed=2, k=3)
    assert res.approximations[0].startswith("index whitened by K-FAC")
    assert any("tensor sketch" in a and "unbiased estimate" in a for a in res.approximations)


def test_dense_featurizer_agrees_with_the_kronecker_one(run, kfac_exact, tmp_path) -> None:
    out = _exact(run, tmp_path / "dense", featurizer="dense")
    a, b = open_index(kfac_exact, device="cpu"), open_index(out, device="cpu")
    for c in range(len(a.checkpoints)):
        fa, fb = a.store.feature_rows(c, np.arange(a.n)), b.store.feature_rows(c, np.arange(b.n))
        np.testing.assert_allclose(fb, fa, rtol=1e-4, atol=1e-5 * np.abs(fa).max())
        np.testing.assert_allclose(b.store.sq_norm(c), a.store.sq_norm(c), rtol=1e-5)


def test_the_cli_builds_it_and_the_server_reports_it(run, tmp_path) -> None:
    out = tmp_path / "cli"
    args = ["index", "--run", str(run), "--out", str(out), "--m", "3", "--whiten", "kfac", "--quiet"]
    assert cli_main([*args, "--whiten-alpha", "0.2", "--threads", "1"]) == 0
    man = read_manifest(IndexDir(out))
    assert man.whiten is not None and man.whiten.alpha == 0.2 and len(man.whiten.checkpoints) == 2
    assert all(ck.factors.path.startswith("whiten/") for ck in man.whiten.checkpoints)
    from proponent.service.routes.index import build_index_info

    info = build_index_info(open_index(out, device="cpu"), 100)
    assert info["whiten"]["kind"] == "kfac" and len(info["whiten"]["checkpoints"]) == 2
    assert "factors" not in info["whiten"]["checkpoints"][0]
    # the same settings again: complete, nothing redone; other whitening: refused, naming the difference
    assert cli_main([*args, "--whiten-alpha", "0.2", "--threads", "1"]) == 0
    assert cli_main([*args, "--whiten-alpha", "0.3", "--threads", "1"]) != 0


def test_damaged_or_missing_factors_are_refused_by_name(kfac_exact, tmp_path) -> None:
    path = tmp_path / "idx"
    shutil.copytree(kfac_exact, path)
    f = path / "whiten" / "ckpt_001.npz"
    data = bytearray(f.read_bytes())
    data[-20] ^= 0xFF
    f.write_bytes(bytes(data))
    problems = verify_index(IndexDir(path))
    assert any("ckpt_001.npz" in p and "damaged" in p for p in problems), problems
    with pytest.raises(Exception, match="ckpt_001.npz"):
        idx = open_index(path, device="cpu")
        idx.scores(idx.input(0), seed=0)
    f.unlink()
    assert any("ckpt_001.npz" in p and "missing" in p for p in verify_index(IndexDir(path)))


def test_query_time_curvature_is_refused_on_a_whitened_index(kfac_exact, tmp_path) -> None:
    path = tmp_path / "idx"
    shutil.copytree(kfac_exact, path)
    before = (path / "manifest.json").read_bytes()
    assert cli_main(["precondition", "--index", str(path), "--kind", "kfac"]) != 0
    assert (path / "manifest.json").read_bytes() == before
    # TRAK's Gram preconditioner is over the stored features: allowed
    assert cli_main(["precondition", "--index", str(path), "--kind", "gram"]) == 0


def test_unsupported_whitening_is_refused_before_anything_is_written(run, tmp_path) -> None:
    with pytest.raises(IndexJobError, match="unknown whitening"):
        build_small_index(run, tmp_path / "a", whiten="ekfac")
    assert not (tmp_path / "a").exists()
    with pytest.raises(IndexJobError, match="alpha must be > 0"):
        build_small_index(run, tmp_path / "b", whiten="kfac", whiten_alpha=0.0)
    assert not (tmp_path / "b" / "manifest.json").exists()
    with pytest.raises(WhitenError, match="zero"):
        kfac_factors(np.zeros((2, 2)), np.eye(2), 0.1)


def test_adam_needs_optimizer_state(run, tmp_path) -> None:
    """Checkpoints saved without the optimizer's state: --whiten adam is refused, naming the checkpoint."""
    bare = tmp_path / "run"
    shutil.copytree(run, bare)
    meta = json.loads((bare / "run.json").read_text())
    for entry in meta["checkpoints"]:
        ck = bare / entry["path"]
        raw = torch.load(ck, weights_only=True)
        raw.pop("optimizer", None)
        torch.save(raw, ck)
        entry["sha256"] = hashlib.sha256(ck.read_bytes()).hexdigest()
    (bare / "run.json").write_text(json.dumps(meta))
    with pytest.raises(IndexJobError, match="no optimizer state"):
        build_small_index(bare, tmp_path / "idx", whiten="adam")


def test_shards_and_a_second_run_write_the_same_bytes(run, tmp_path) -> None:
    """Sharded runs whiten with the files the first one stored (never recomputed): the same store and manifest as
    an unsharded run, the same bytes as a second unsharded run."""
    kw = {"whiten": "kfac", "whiten_alpha": ALPHA, "projection": ProjectionSpec(kind="kron", k=4), "batch_size": 64}

    def tree(root: Path) -> dict[str, bytes]:
        skip = {"timings.json"}
        return {
            str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in skip
        }

    a = build_small_index(run, tmp_path / "a", **kw)
    b = build_small_index(run, tmp_path / "b", **kw)
    build_small_index(run, tmp_path / "d", shard=(0, 2), **kw)
    assert '"complete": false' in (tmp_path / "d" / "manifest.json").read_text()
    build_small_index(run, tmp_path / "d", shard=(1, 2), **kw)
    d = build_small_index(run, tmp_path / "d", **kw)
    ta = tree(a)
    assert any(k.startswith("whiten/") for k in ta)
    assert ta == tree(b) == tree(d)


def test_the_report_names_the_whitening(kfac_exact, tmp_path) -> None:
    from proponent.analysis.report import write_report

    out = write_report(kfac_exact, tmp_path / "r.html", queries=[3], seed=0)
    text = out.read_text()
    assert '<span id="whiten">Index whitened by K-FAC (factored damping) (α=0.1)' in text
