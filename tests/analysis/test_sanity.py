"""The paper's sanity check (Kong & Chaudhuri 2021, §5.1, Table 1) with the default pipeline.

Train on all 1,797 digits (latent 16), index with the defaults (the default feature layout,
m = 16): a training sample should be its own strongest proponent. The paper reports 0.992
on MNIST.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from proponent.indexer.data import load_dataset
from proponent.indexer.job import IndexOptions, build_index, checkpoints_from_run
from proponent.indexer.training import TrainConfig, train
from proponent.model.architectures import default_config_for
from proponent.query.index import open_index


@pytest.fixture(scope="module")
def digits_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wd = tmp_path_factory.mktemp("sanity")
    data = load_dataset("digits")
    run = train(
        data, default_config_for(data.shape, latent_dim=16), wd / "run", TrainConfig(epochs=30), show_progress=False
    )
    specs, _ = checkpoints_from_run(run)
    return build_index(data, specs, wd / "idx", IndexOptions(m=16), show_progress=False)


def test_training_samples_are_their_own_strongest_proponents(digits_index: Path) -> None:
    idx = open_index(digits_index)
    man = idx.manifest
    defaults = IndexOptions()
    assert man.featurizer == "kron" and man.projection.k == defaults.projection.k
    assert man.storage.dtype == defaults.dtype and man.objective.m == 16 and man.model.latent_dim >= 16
    rows = range(128)
    # the paper's protocol: the training sample's own (stored) gradient is the query
    stored = np.mean([idx.influence(sample_id=r, k=1, features="stored", scoring="raw").ids()[0] == r for r in rows])
    assert stored >= 0.9, stored
    # the service's protocol: the stored input featurized with its own, independent draws
    fresh = np.mean(
        [idx.influence(sample_id=r, k=1, seed=7, scoring="raw", uncertainty=False).ids()[0] == r for r in rows]
    )
    assert fresh >= 0.8, fresh


def test_self_influence_ranking_matches_the_dense_reference(digits_index: Path) -> None:
    """Self-influence from the Kronecker path's exact norms ranks samples as the dense path does."""
    import torch

    from proponent.model.featurizers import make_featurizer
    from proponent.model.objectives import NOISE_INDEX, draw_noise

    idx = open_index(digits_index)
    rows = np.arange(200)
    data = load_dataset("digits")
    x, y = torch.from_numpy(data.x[rows]), torch.zeros(len(rows), dtype=torch.long)
    w = idx.weights("lr")
    dense = np.zeros(len(rows))
    obj = idx.runtime.objective
    for c in range(len(idx.checkpoints)):
        model = idx.runtime.model(c)
        feat = make_featurizer("dense", model, obj, idx.runtime.projector(c))
        eps = draw_noise(NOISE_INDEX, 0, c, rows, obj.m, obj.noise_shape(model))
        dense += w[c] * feat.featurize(x, y, eps).sq_norm.numpy()
    kron = idx.self_influence()[rows]
    np.testing.assert_allclose(kron, dense, rtol=1e-4)
    np.testing.assert_array_equal(np.argsort(-kron)[:20], np.argsort(-dense)[:20])
