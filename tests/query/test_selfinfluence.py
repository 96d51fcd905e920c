"""Self-influence jobs: stored norms, recomputed norms and the unbiased paired estimator."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from proponent.cli import main as cli_main
from proponent.indexer.data import load_dataset
from proponent.indexer.job import IndexOptions, build_index, checkpoints_from_run, training_objective
from proponent.indexer.training import TrainConfig, train
from proponent.model.architectures import ModelConfig
from proponent.model.objectives import draw_noise
from proponent.model.projection import ProjectionSpec
from proponent.query.index import open_index
from proponent.query.selfinfluence import NOISE_SELF, NOISE_SELF_PAIR, SelfInfluenceJob, SelfInfluenceParams

DATA = "digits,limit=120"


@pytest.fixture(scope="module")
def index_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wd = tmp_path_factory.mktemp("selfinf")
    data = load_dataset(DATA)
    cfg = ModelConfig(kind="mlp", input_shape=data.shape, hidden=(16,), latent_dim=3)
    run = train(data, cfg, wd / "run", TrainConfig(epochs=2, checkpoints=2, seed=3), show_progress=False)
    specs, _ = checkpoints_from_run(run)
    opts = IndexOptions(m=3, projection=ProjectionSpec(kind="kron", k=4), chunk_rows=64)
    return build_index(data, specs, wd / "idx", opts, show_progress=False)


def _grad(model: torch.nn.Module, obj, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    loss = obj.loss(model, x[None], torch.zeros(1, dtype=torch.long), eps[None])[0]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]).double()


@pytest.mark.parametrize("estimator", ["norm", "unbiased"])
def test_recomputed_self_influence_matches_autograd(index_path: Path, tmp_path: Path, estimator: str) -> None:
    idx = open_index(index_path, device="cpu")
    p = SelfInfluenceParams(m=2, seed=9, estimator=estimator)
    scores = SelfInfluenceJob(idx, p, tmp_path / "state").run()
    assert scores is not None and scores.shape == (idx.n,)
    obj = training_objective(idx.manifest.model, 2)
    w = idx.weights("lr")
    x = torch.from_numpy(idx.store.inputs(slice(0, idx.n)))
    ids = idx.meta.ids
    for i in (0, 33, 77):
        want = 0.0
        for c in range(len(idx.checkpoints)):
            model = idx.runtime.model(c)
            shape = obj.noise_shape(model)
            g1 = _grad(model, obj, x[i], draw_noise(NOISE_SELF, 9, c, [int(ids[i])], 2, shape)[0])
            g2 = _grad(model, obj, x[i], draw_noise(NOISE_SELF_PAIR, 9, c, [int(ids[i])], 2, shape)[0])
            want += w[c] * float(g1 @ (g2 if estimator == "unbiased" else g1))
        assert scores[i] == pytest.approx(want, rel=1e-5)


def test_unbiased_estimate_is_below_the_norm_on_average(index_path: Path, tmp_path: Path) -> None:
    """E||ḡ||² = ||E g||² + tr(Var g)/m, while E<ḡ, ḡ'> = ||E g||²: the norm is biased upwards."""
    idx = open_index(index_path, device="cpu")
    norm = SelfInfluenceJob(idx, SelfInfluenceParams(m=1, seed=1), tmp_path / "a").run()
    unb = SelfInfluenceJob(idx, SelfInfluenceParams(m=1, seed=1, estimator="unbiased"), tmp_path / "b").run()
    assert norm is not None and unb is not None
    assert float(np.mean(unb)) < float(np.mean(norm))
    with pytest.raises(ValueError, match="estimator"):
        SelfInfluenceJob(idx, SelfInfluenceParams(estimator="other"), tmp_path / "c")


def test_cli_self_influence_csv(index_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "ranked.csv"
    assert cli_main(["self-influence", "--index", str(index_path), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    idx = open_index(index_path, device="cpu")
    si = idx.self_influence()
    assert len(rows) == idx.n and int(rows[0]["id"]) == int(idx.meta.ids[np.argmax(si)])
    scores = [float(r["self_influence"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    with pytest.raises(SystemExit) as e:  # argparse: one line on stderr, exit 2
        cli_main(["self-influence", "--index", str(index_path), "--out", str(out), "--estimator", "bogus"])
    assert e.value.code == 2
