"""Cross-loss influence: every query objective against brute-force autograd.

score(x_i, z) = Σ_c w_c <∇θ l_train(x_i; θ_c), ∇θ l_query(z; θ_c)>, computed one sample at a
time with torch.autograd.grad and the index's own noise keys, must equal what
``index.scores(z, objective=...)`` (the query path's brute force) returns on an unprojected index.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from proponent.indexer.data import load_dataset
from proponent.indexer.job import IndexOptions, build_index, checkpoints_from_run
from proponent.indexer.training import TrainConfig, train
from proponent.model.architectures import ModelConfig
from proponent.model.checkpoints import load_checkpoint
from proponent.model.objectives import NOISE_INDEX, NOISE_QUERY, draw_noise, objective_at
from proponent.model.projection import ProjectionSpec
from proponent.query.crossloss import ObjectiveError, fit_probe, index_probe, make_query_objective
from proponent.query.index import open_index

SEED = 3  # index noise seed
QUERY_SEED = 11
M = 2
SPEC = "digits,limit=200"


def _build(tmp: object, spec: str) -> object:
    data = load_dataset(spec)
    cfg = ModelConfig(kind="mlp", input_shape=data.shape, latent_dim=4, hidden=(16,))
    run = train(
        data, cfg, tmp / "run", TrainConfig(epochs=3, batch_size=32, checkpoints=2, seed=0), show_progress=False
    )
    specs, _ = checkpoints_from_run(run)
    opts = IndexOptions(
        m=M, seed=SEED, projection=ProjectionSpec(kind="none"), dtype="float32", featurizer="dense", device="cpu"
    )
    return build_index(data, specs, tmp / "idx", opts, show_progress=False)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crossloss")
    return open_index(_build(tmp, SPEC), device="cpu", use_gpu_faiss=False)


def _flat_grad(model: torch.nn.Module, objective, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters()]
    loss = objective.loss(model, x, y, eps)[0]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = [(torch.zeros_like(p) if g is None else g).reshape(-1).double() for p, g in zip(params, grads, strict=True)]
    return torch.cat(flat)


def _brute_force(index, query_obj, z: np.ndarray, z_label: int, rows: list[int]) -> np.ndarray:
    w = index.weights("lr")
    train_obj = index.runtime.objective
    cfg = ModelConfig.from_dict(index.manifest.model.config)
    train_x = load_dataset(SPEC).x  # the training images, from the data source itself
    out = np.zeros(len(rows))
    for c, ck in enumerate(index.checkpoints):
        model, _, _ = load_checkpoint(index.path / ck.path, cfg)
        for p in model.parameters():
            p.requires_grad_(True)
        shape = train_obj.noise_shape(model)
        q_obj = objective_at(query_obj, c)
        eps_q = draw_noise(NOISE_QUERY, QUERY_SEED, c, [0], q_obj.m, q_obj.noise_shape(model))
        gq = _flat_grad(model, q_obj, torch.from_numpy(z[None]), torch.tensor([z_label]), eps_q)
        for j, r in enumerate(rows):
            sid = int(index.meta.ids[r])
            eps = draw_noise(NOISE_INDEX, SEED, c, [sid], M, shape)
            x = torch.from_numpy(train_x[r : r + 1])
            y = torch.tensor([max(int(index.meta.labels[r]), 0)])
            gx = _flat_grad(model, train_obj, x, y, eps)
            out[j] += w[c] * float(gx @ gq)
    return out


@pytest.mark.parametrize("name", ["elbo", "reconstruction", "kl", "elbo_beta", "probe"])
def test_query_objective_matches_autograd(index, name):
    query_row = 7
    z = index.input(query_row)
    label = int(index.meta.labels[query_row])
    beta = 4.0 if name == "elbo_beta" else None
    obj = make_query_objective(index, name, beta=beta, label=label)
    kw = {"objective": name, "beta": beta, "label": label, "seed": QUERY_SEED, "scoring": "raw"}
    scores = index.scores(z, **kw)
    # the API's answer comes from the same scores
    top = index.influence(z, k=5, uncertainty=False, **kw)
    assert top.ids() == [int(i) for i in np.lexsort((np.arange(index.n), -scores))[:5]]
    rows = [0, 5, query_row, 42, 199]
    expected = _brute_force(index, obj, z, label, rows)
    scale = np.abs(scores).max()
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(scores[rows], expected, rtol=1e-4, atol=1e-5 * scale)


def test_query_objectives_differ(index):
    z = index.input(3)
    label = int(index.meta.labels[3])
    got = {}
    for name in ("elbo", "reconstruction", "kl", "probe"):
        got[name] = index.scores(z, objective=name, label=label, seed=QUERY_SEED, scoring="raw")
    # ELBO = reconstruction + β·KL (β = 1), with the same query draws
    np.testing.assert_allclose(
        got["elbo"], got["reconstruction"] + got["kl"], rtol=1e-4, atol=1e-6 * np.abs(got["elbo"]).max()
    )
    assert np.corrcoef(got["probe"], got["elbo"])[0, 1] < 0.99


def test_probe_is_fitted_per_checkpoint_and_cached(index):
    p0, p1 = index_probe(index, 0), index_probe(index, 1)
    assert p0.weight.shape == (10, 4) and p1.weight.shape == (10, 4)
    assert not np.allclose(p0.weight, p1.weight)  # each checkpoint's own latent space
    assert index_probe(index, 1) is p1  # cached
    with torch.no_grad():
        mu = index.runtime.model(1).encode(torch.from_numpy(index.store.inputs(np.arange(index.n))))[0].numpy()
    pred = p1.classes[np.argmax(mu @ p1.weight.T + p1.bias, axis=1)]
    assert (pred == index.meta.labels).mean() == pytest.approx(p1.accuracy)
    assert p1.accuracy > 0.2  # above chance (0.1): the probe learned something from a 3-epoch model


def test_probe_errors(index, tmp_path):
    with pytest.raises(ObjectiveError, match="label"):
        make_query_objective(index, "probe")
    with pytest.raises(ObjectiveError, match="not a class"):
        make_query_objective(index, "probe", label=42)
    with pytest.raises(ObjectiveError, match="unknown objective"):
        make_query_objective(index, "nope")
    with pytest.raises(ObjectiveError, match="beta"):
        make_query_objective(index, "elbo_beta")
    obj = make_query_objective(index, "probe", label=1)
    with pytest.raises(ObjectiveError, match="objective_for"):
        obj.loss(
            index.runtime.model(0), torch.zeros(1, *index.shape), torch.zeros(1, dtype=torch.long), torch.zeros(1, M, 4)
        )


def test_probe_needs_labels(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "x.npz", x=rng.integers(0, 256, size=(40, 8, 8), dtype=np.uint8))
    data = load_dataset(f"npz:{tmp_path / 'x.npz'}")
    cfg = ModelConfig(kind="mlp", input_shape=data.shape, latent_dim=2, hidden=(8,))
    run = train(data, cfg, tmp_path / "run", TrainConfig(epochs=1, batch_size=20, checkpoints=1), show_progress=False)
    specs, _ = checkpoints_from_run(run)
    opts = IndexOptions(m=1, projection=ProjectionSpec(kind="none"), featurizer="dense", device="cpu")
    idx = open_index(
        build_index(data, specs, tmp_path / "idx", opts, show_progress=False), device="cpu", use_gpu_faiss=False
    )
    with pytest.raises(ObjectiveError, match="labelled index"):
        make_query_objective(idx, "probe", label=0)


def test_fit_probe_two_classes():
    rng = np.random.default_rng(0)
    mu = np.concatenate([rng.normal(-2, 1, (50, 3)), rng.normal(2, 1, (50, 3))])
    labels = np.repeat([4, 9], 50)
    p = fit_probe(mu, labels)
    assert p.weight.shape == (2, 3) and p.classes.tolist() == [4, 9]
    pred = p.classes[np.argmax(mu @ p.weight.T + p.bias, axis=1)]
    assert (pred == labels).mean() > 0.9
