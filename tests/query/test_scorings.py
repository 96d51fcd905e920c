"""Query-time scorings (raw, cosine, RelatIF) and their comparison on an outlier set.

One small index: 300 digits upscaled to 28x28 plus 30 generated bold letters (``glyphs:size=28``,
9% injected), 10 epochs, 3 checkpoints, m = 4, kron k = 16 (about 25 s on 2 cores).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from proponent.analysis.scoring_comparison import (
    SCORINGS,
    compare_scorings,
    scores_all,
    self_influence_ratio,
    top_rows,
    upscaled_digits_npz,
)
from proponent.indexer.data import load_dataset
from proponent.indexer.job import IndexOptions, build_index, checkpoints_from_run
from proponent.indexer.training import TrainConfig, train
from proponent.model.architectures import default_config_for
from proponent.model.projection import ProjectionSpec
from proponent.query.index import open_index
from tests.helpers import query_vectors, reference_scores


@pytest.fixture(scope="module")
def outlier_index(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("scorings")
    npz = upscaled_digits_npz(root / "digits28.npz")
    data = load_dataset(f"npz:{npz},limit=300+glyphs:n=30,size=28,injected")
    tc = TrainConfig(epochs=10, checkpoints=3)
    train(data, default_config_for(data.shape), root / "run", tc, show_progress=False)
    specs, _ = checkpoints_from_run(root / "run")
    opts = IndexOptions(m=4, projection=ProjectionSpec(kind="kron", k=16))
    idx = open_index(build_index(data, specs, root / "idx", opts, show_progress=False), device="cpu")
    held_out = load_dataset(f"npz:{npz},offset=1597,limit=40")
    return idx, held_out


def test_scorings_match_their_definitions(outlier_index):
    """scores_all (the query path's featurization and scoring) equals the definitions, and the API's answers."""
    idx, held_out = outlier_index
    x = held_out.x[0]
    vec, sqn = query_vectors(idx, x, seed=5)
    for scoring in SCORINGS:
        want = reference_scores(idx, vec, sqn, scoring=scoring)
        np.testing.assert_allclose(scores_all(idx, x, scoring, seed=5), want, rtol=1e-10)
        last = [len(idx.checkpoints) - 1]
        np.testing.assert_allclose(
            scores_all(idx, x, scoring, checkpoints=last, seed=5),
            reference_scores(idx, vec, sqn, scoring=scoring, checkpoints=last),
            rtol=1e-10,
        )
        ans = idx.influence(x, k=5, scoring=scoring, seed=5, uncertainty=False)
        assert ans.ids() == [int(i) for i in top_rows(want, 5)]
    with pytest.raises(ValueError, match="scoring must be one of"):
        scores_all(idx, x, "dot")


def test_top_rows_order_and_exclusion():
    s = np.array([0.5, -2.0, 3.0, 3.0, -1.0])
    assert top_rows(s, 2).tolist() == [2, 3]
    assert top_rows(s, 2, exclude=2).tolist() == [3, 0]
    assert top_rows(s, 2, "opponents").tolist() == [1, 4]


def test_raw_is_crowded_by_outliers_and_robust_scorings_are_not(outlier_index):
    idx, held_out = outlier_index
    assert self_influence_ratio(idx) > 2  # the generated letters have far larger gradients
    res = compare_scorings(idx, images=held_out.x, labels=held_out.labels, n_self=20)
    json.dumps(res)  # plain, renderable
    assert res["n_injected"] == 30 and res["n_queries"] == 40 and res["queries"] == "held-out images"
    by = {r["scoring"]: r for r in res["scorings"]}
    assert [r["scoring"] for r in res["scorings"]] == list(SCORINGS)
    frac = res["injected_fraction"]
    raw = by["raw"]
    assert raw["injected_share_proponents"] > 1.5 * frac  # the failure: outliers over-represented
    for name in ("cosine", "relatif"):
        robust = by[name]
        assert robust["injected_share_proponents"] < 0.5 * raw["injected_share_proponents"]
        assert robust["same_class_proponents"] > raw["same_class_proponents"]
        assert robust["self_top1"] >= raw["self_top1"]
    for r in res["scorings"]:
        for key in ("injected_share_proponents", "injected_share_opponents", "same_class_proponents", "self_top1"):
            assert 0.0 <= r[key] <= 1.0


def test_compare_scorings_on_training_rows_excludes_the_query(outlier_index):
    idx, _ = outlier_index
    res = compare_scorings(idx, rows=[0, 1, 2], scorings=["raw"], k=5, self_rows=[0, 1, 310], n_self=3)
    assert res["queries"] == "training rows" and res["n_self"] == 2 and res["n_self_injected"] == 1
    assert res["scorings"][0]["same_class_proponents"] is not None
    with pytest.raises(ValueError, match="either images"):
        compare_scorings(idx)
