"""The offline indexer: exact features, unbiased projections, reproducible bytes, the store and FAISS."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from proponent.format.fsio import IndexDir
from proponent.format.integrity import verify_index
from proponent.format.store import FeatureStore
from proponent.indexer.data import load_dataset
from proponent.indexer.job import IndexJobError, IndexOptions, build_index, checkpoints_from_run
from proponent.indexer.training import TrainConfig, train
from proponent.model.architectures import ModelConfig, build_model
from proponent.model.checkpoints import CheckpointSpec
from proponent.model.objectives import ELBO, NOISE_INDEX, NOISE_QUERY, draw_noise
from proponent.model.projection import ProjectionSpec, Projector, build_projector, discover_layers, select_layers
from proponent.query.index import open_index
from tests.helpers import query_vectors, reference_scores, stored_matrix
from tests.indexer.conftest import DATA
from tests.indexer.conftest import build as _build


def _autograd_grad(
    model: torch.nn.Module, objective: ELBO, x: torch.Tensor, eps: torch.Tensor
) -> dict[str, torch.Tensor]:
    loss = objective.loss(model, x[None], torch.zeros(1, dtype=torch.long), eps[None])[0]
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters()])
    return {n: g[None] for n, g in zip(names, grads)}


def test_unprojected_features_equal_autograd_and_scores_match_definition(tiny_run: Path, tmp_path: Path) -> None:
    out = _build(tiny_run, tmp_path / "idx", projection=ProjectionSpec(kind="none"), dtype="float32")
    idx = open_index(out, device="cpu")
    obj = idx.runtime.objective
    assert isinstance(obj, ELBO) and obj.m == 3
    assert idx.meta.approximations([0, 1]) == []  # exact gradients, all layers and checkpoints, exact scan
    x_train = torch.from_numpy(load_dataset(DATA).x)
    query = x_train[7] * 0.5 + x_train[9] * 0.5
    q_vec, q_sq = query_vectors(idx, query.numpy(), seed=11)
    exact_g: dict[int, dict[int, torch.Tensor]] = {}
    for c in range(len(idx.checkpoints)):
        model = idx.runtime.model(c)
        proj = idx.runtime.projector(c)
        shape = obj.noise_shape(model)
        stored = stored_matrix(idx, c)
        for i in (0, 5, 42):
            eps = draw_noise(NOISE_INDEX, 0, c, [i], obj.m, shape)[0]
            g = proj.project_gradients(_autograd_grad(model, obj, x_train[i], eps))[0].double()
            rel = (torch.from_numpy(stored[i]).double() - g).norm() / g.norm()
            assert rel < 1e-5
            assert idx.store.sq_norm(c)[i] == pytest.approx(float(g.pow(2).sum()), rel=1e-5)
            exact_g.setdefault(c, {})[i] = g
        eps_q = draw_noise(NOISE_QUERY, 11, c, [0], obj.m, shape)[0]
        gq = proj.project_gradients(_autograd_grad(model, obj, query, eps_q))[0].double()
        assert (torch.from_numpy(q_vec[c]).double() - gq).norm() / gq.norm() < 1e-5
        assert q_sq[c] == pytest.approx(float(gq.pow(2).sum()), rel=1e-5)
        exact_g[c][-1] = gq
    for conv in ("lr", "visits"):
        w = idx.weights(conv)
        scores = idx.scores(query.numpy(), convention=conv, seed=11, scoring="raw")  # the product's own brute force
        np.testing.assert_allclose(scores, reference_scores(idx, q_vec, q_sq, convention=conv), rtol=1e-12)
        for i in (0, 5, 42):
            expected = sum(w[c] * float(exact_g[c][i] @ exact_g[c][-1]) for c in exact_g)
            assert scores[i] == pytest.approx(expected, rel=1e-5)
    # the stored training inputs are exactly the data the index featurized
    np.testing.assert_array_equal(idx.store.inputs(slice(None)), x_train.numpy())
    # the visits convention is lr * batch * steps / N, recorded per checkpoint
    ck = idx.checkpoints[1]
    assert idx.weights("visits")[1] == pytest.approx(ck.lr * ck.batch_size * ck.steps_since_prev / idx.n)


def test_projection_is_unbiased_over_seeds() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(kind="mlp", input_shape=(1, 8, 8), hidden=(20,), latent_dim=3)
    model = build_model(cfg)
    obj = ELBO(m=2)
    x = torch.rand(2, 1, 8, 8)
    eps = draw_noise(NOISE_INDEX, 0, 0, [0, 1], 2, (3,))
    g1 = _autograd_grad(model, obj, x[0], eps[0])
    g2 = _autograd_grad(model, obj, x[1], eps[1])
    layers = select_layers(discover_layers(model), "all")
    exact = Projector(layers, ProjectionSpec(kind="none"))
    e1, e2 = exact.project_gradients(g1)[0].double(), exact.project_gradients(g2)[0].double()
    truth = float(e1 @ e2)
    est = []
    for seed in range(300):
        p = Projector(layers, ProjectionSpec(kind="kron", k=4, seed=seed))
        est.append(float(p.project_gradients(g1)[0].double() @ p.project_gradients(g2)[0].double()))
    est_arr = np.array(est)
    se = est_arr.std(ddof=1) / np.sqrt(len(est_arr))
    assert abs(est_arr.mean() - truth) < 4 * se  # unbiased
    assert est_arr.std() > 0  # and really random
    # squared norms are unbiased too
    sq = [
        float(
            Projector(layers, ProjectionSpec(kind="kron", k=4, seed=s)).project_gradients(g1)[0].double().pow(2).sum()
        )
        for s in range(300)
    ]
    assert abs(np.mean(sq) - float(e1 @ e1)) < 4 * np.std(sq, ddof=1) / np.sqrt(300)


def _hash_store(path: Path) -> str:
    """sha256 over every file of the store (chunks and metadata)."""
    h = hashlib.sha256()
    for p in sorted((path / "store.zarr").rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _features(path: Path, c: int) -> np.ndarray:
    store = FeatureStore.open(IndexDir(path))
    return np.concatenate([b for _, b in store.iter_feature_chunks(c)])


def test_features_bit_identical_across_runs_and_shards_and_batch_invariant(tiny_run: Path, tmp_path: Path) -> None:
    proj = ProjectionSpec(kind="kron", k=4, seed=3)
    a = _build(tiny_run, tmp_path / "a", projection=proj, batch_size=64, chunk_rows=64, unit_rows=64)
    b = _build(tiny_run, tmp_path / "b", projection=proj, batch_size=64, chunk_rows=64, unit_rows=64)
    c = _build(tiny_run, tmp_path / "c", projection=proj, batch_size=7, chunk_rows=64, unit_rows=64)
    _build(tiny_run, tmp_path / "d", projection=proj, batch_size=64, chunk_rows=64, unit_rows=64, shard=(0, 2))
    man = (tmp_path / "d" / "manifest.json").read_text()
    assert '"complete": false' in man
    _build(tiny_run, tmp_path / "d", projection=proj, batch_size=64, chunk_rows=64, unit_rows=64, shard=(1, 2))
    d = _build(tiny_run, tmp_path / "d", projection=proj, batch_size=64, chunk_rows=64, unit_rows=64)
    ha = _hash_store(a)
    assert ha == _hash_store(b) == _hash_store(d)
    # Noise is keyed by sample id, not batch position, so another batch size gives the same
    # features up to float32 BLAS rounding (vendor GEMMs are not batch-shape invariant).
    sa, sc = FeatureStore.open(IndexDir(a)), FeatureStore.open(IndexDir(c))
    for ck in range(sa.n_checkpoints):
        fa, fc = _features(a, ck), _features(c, ck)
        np.testing.assert_allclose(fc, fa, rtol=1e-4, atol=1e-5 * np.abs(fa).max())
        np.testing.assert_allclose(sc.sq_norm(ck), sa.sq_norm(ck), rtol=1e-5)
    e = _build(
        tiny_run, tmp_path / "e", projection=ProjectionSpec(kind="kron", k=4, seed=4), chunk_rows=64, unit_rows=64
    )
    assert _hash_store(e) != ha  # a different projection seed changes the bytes


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_store_layout_and_manifest(tiny_run: Path, tmp_path: Path, dtype: str) -> None:
    out = _build(tiny_run, tmp_path / "idx", projection=ProjectionSpec(kind="kron", k=4), dtype=dtype)
    assert verify_index(out) == [] and verify_index(out, deep=True) == []
    assert not (out / "faiss").exists()  # features are stored once: the exact scan reads the store
    idx = open_index(out, device="cpu")
    man = idx.manifest
    assert man.complete and man.storage.dtype == dtype and man.n == 150 and man.version == 2
    assert len(man.checksum) == 64 and all(len(c.sha256) == 64 for c in man.checkpoints)
    assert {f.path for f in man.storage.metadata} == set(idx.store.metadata_files())
    arr = idx.store.group["ckpt_000/features"]
    assert str(arr.dtype) == dtype and arr.shape == (150, idx.dim)
    codecs = arr.metadata.to_dict()["codecs"]
    assert [c["name"] for c in codecs] == ["bytes", "crc32c"]
    f = stored_matrix(idx, 0)
    np.testing.assert_allclose(idx.store.feat_norm(0), np.linalg.norm(f, axis=1), rtol=1e-6)
    assert np.all(idx.store.feat_norm(0) >= np.linalg.norm(f, axis=1))  # rounded up: a bound
    # proponents are the largest scores, opponents the smallest, from the Python API
    res = idx.influence(sample_id=3, k=5, direction="both")
    s = idx.scores(sample_id=3)
    assert res.ids("proponents") == [int(i) for i in np.argsort(-s, kind="stable")[:5]]
    assert res.ids("opponents") == [int(i) for i in np.argsort(s, kind="stable")[:5]]
    assert res.exact
    si = idx.self_influence()
    assert si.shape == (150,) and np.all(si > 0)
    assert idx.meta.labels.min() >= 0 and idx.store.array("latent_mu").shape == (150, 4)
    approx = idx.meta.approximations([1])
    assert any("random projection" in a for a in approx) and any(dtype in a for a in approx)
    assert any("checkpoint subset: [1]" in a for a in approx)


def test_ann_index_is_approximate_and_flagged(tiny_run: Path, tmp_path: Path) -> None:
    out = _build(tiny_run, tmp_path / "idx", projection=ProjectionSpec(kind="kron", k=4), index_kind="ivf:4:4")
    idx = open_index(out, device="cpu")
    assert idx.manifest.ann.kind == "ivf:4:4" and len(idx.manifest.ann.files) == 2
    res = idx.influence(sample_id=3, k=5)
    assert res.exact is False and res.search["proponents"].strategy == "ann/ivf:4:4"
    assert any("approximate nearest-neighbour index" in a for a in res.approximations)
    exact = idx.influence(sample_id=3, k=5, search="scan")  # all lists probed here: the same answer, exact
    assert exact.exact and exact.ids() == res.ids()
    (out / "faiss" / "ckpt_001.index").unlink()
    assert any("ckpt_001.index missing" in p for p in verify_index(out))


def test_index_refuses_mismatched_settings_and_reports_corruption(tiny_run: Path, tmp_path: Path) -> None:
    out = _build(tiny_run, tmp_path / "idx", projection=ProjectionSpec(kind="kron", k=4))
    with pytest.raises(IndexJobError, match="projection"):
        _build(tiny_run, out, projection=ProjectionSpec(kind="kron", k=5))
    ck = out / open_index(out).manifest.checkpoints[0].path
    ck.write_bytes(ck.read_bytes() + b"x")
    problems = verify_index(out)
    assert any("checkpoint 0" in p and "sha256" in p for p in problems)


def test_external_checkpoints_and_layer_selection(tiny_run: Path, tmp_path: Path) -> None:
    specs, run = checkpoints_from_run(tiny_run)
    cfg = ModelConfig.from_dict(run["model_config"])
    raw = torch.load(specs[0].path, weights_only=True)
    bare = tmp_path / "bare.pt"
    torch.save(raw["state_dict"], bare)
    opts = IndexOptions(m=2, featurizer="dense", layers="decoder", projection=ProjectionSpec(kind="none"), device="cpu")
    out = build_index(
        DATA,
        [CheckpointSpec(path=str(bare), lr=0.5, batch_size=32, steps_since_prev=10)],
        tmp_path / "ext",
        opts,
        model_config=cfg,
        show_progress=False,
    )
    idx = open_index(out)
    model = build_model(cfg)
    n_dec = sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder"))
    assert idx.dim == n_dec
    assert idx.weights("lr")[0] == 0.5
    with pytest.raises(ValueError, match="matches no parameterised layer"):
        build_projector(model, "nonexistent", ProjectionSpec())


def test_package_level_api_mirrors_the_cli() -> None:
    import proponent

    assert proponent.build_index is build_index and proponent.open_index is open_index
    assert proponent.train is train and proponent.load_dataset is load_dataset
    with pytest.raises(AttributeError):
        proponent.no_such_name  # noqa: B018


def test_ensemble_of_runs_concatenates_checkpoints(tiny_run: Path, tmp_path: Path) -> None:
    from proponent.indexer.job import checkpoints_from_runs

    data = load_dataset(DATA)
    cfg = ModelConfig.from_dict(checkpoints_from_run(tiny_run)[1]["model_config"])
    other = train(
        data, cfg, tmp_path / "run2", TrainConfig(epochs=3, batch_size=32, checkpoints=2, seed=2), show_progress=False
    )
    specs, run_json = checkpoints_from_runs([tiny_run, other])
    assert [s.path for s in specs] == [
        s.path for s in checkpoints_from_run(tiny_run)[0] + checkpoints_from_run(other)[0]
    ]
    opts = IndexOptions(m=3, featurizer="dense", device="cpu", projection=ProjectionSpec(kind="none"), dtype="float32")
    ens = open_index(build_index(DATA, specs, tmp_path / "ens", opts, show_progress=False), device="cpu")
    one = open_index(_build(tiny_run, tmp_path / "one", projection=ProjectionSpec(kind="none"), dtype="float32"))
    assert len(ens.checkpoints) == 4 and [c.sha256 for c in ens.checkpoints[:2]] == [c.sha256 for c in one.checkpoints]
    x = data.x[3] * 0.5 + data.x[8] * 0.5
    # the first run's checkpoints keep their positions (and noise draws): its part of the sum is its own index's score
    np.testing.assert_allclose(ens.scores(x, seed=5, checkpoints=[0, 1]), one.scores(x, seed=5), rtol=1e-10)
    # all checkpoints: the sum of the runs' parts
    both = ens.scores(x, seed=5)
    np.testing.assert_allclose(
        both, ens.scores(x, seed=5, checkpoints=[0, 1]) + ens.scores(x, seed=5, checkpoints=[2, 3]), rtol=1e-9
    )
    # runs of another model, or on other data, are refused with the reason
    small = ModelConfig(kind="mlp", input_shape=data.shape, hidden=(12,), latent_dim=4)
    third = train(
        data, small, tmp_path / "run3", TrainConfig(epochs=1, batch_size=32, checkpoints=1), show_progress=False
    )
    with pytest.raises(ValueError, match="model configuration differs"):
        checkpoints_from_runs([tiny_run, third])
    fourth = train(
        load_dataset("digits,limit=140"),
        cfg,
        tmp_path / "run4",
        TrainConfig(epochs=1, checkpoints=1),
        show_progress=False,
    )
    with pytest.raises(ValueError, match="other data"):
        checkpoints_from_runs([tiny_run, fourth])
