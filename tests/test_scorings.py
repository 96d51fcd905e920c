"""Query-time scorings (raw, cosine, RelatIF) and their comparison on an outlier set.

One small index: 300 digits upscaled to 28x28 plus 30 generated bold letters (``glyphs:size=28``,
9% injected), 10 epochs, 3 checkpoints, m = 4, kron k = 16 (about 25 s on 2 cores).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from proponent.analysis.scorings import (
    SCORINGS,
    combine_scores,
    compare_scorings,
    featurize_queries,
    scores_all,
    self_influence_ratio,
    stored_queries,
    top_rows,
    upscaled_digits_npz,
)
from proponent.build.data import load_dataset
from proponent.build.job import IndexOptions, build_index, checkpoints_from_run
from proponent.build.training import TrainConfig, train
from proponent.model.architectures import default_config_for
from proponent.model.projection import ProjectionSpec
from proponent.query.index import open_index


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
    idx, held_out = outlier_index
    q = featurize_queries(idx, held_out.x[:3], seed=5)
    # the same draws as the index's own featurize on the whole batch
    plain = idx.featurize(held_out.x[:3], seed=5)
    for c in plain:
        np.testing.assert_array_equal(q.features[c], plain[c])
    w = idx.weights("lr")
    cks = idx.resolve_checkpoints(None)
    dots = {c: idx.sources[c].all().astype(np.float64) @ q.features[c].astype(np.float64).T for c in cks}  # [N, B]
    n_train = {c: idx.store.sq_norm(c) for c in cks}
    raw = sum(w[c] * dots[c] for c in cks).T
    cosine = sum(w[c] * dots[c] / np.sqrt(n_train[c][:, None] * q.sq_norm[c][None, :]) for c in cks).T
    relatif = raw / np.sqrt(sum(w[c] * n_train[c] for c in cks))[None, :]
    np.testing.assert_allclose(scores_all(idx, q.features, q.sq_norm, "raw"), raw, rtol=1e-10)
    np.testing.assert_allclose(scores_all(idx, q.features, q.sq_norm, "cosine"), cosine, rtol=1e-10)
    np.testing.assert_allclose(scores_all(idx, q.features, q.sq_norm, "relatif"), relatif, rtol=1e-10)
    # raw is the index's own score (paper eq. 10); one query gives [N]
    one = {c: v[0] for c, v in q.features.items()}
    np.testing.assert_allclose(scores_all(idx, one, None, "raw"), idx.scores(one), rtol=1e-6)
    assert scores_all(idx, one, {c: v[0] for c, v in q.sq_norm.items()}, "cosine").shape == (idx.n,)
    # checkpoint subsets: cosine sums only their terms, relatif normalises by their self-influence
    last = [cks[-1]]
    np.testing.assert_allclose(
        scores_all(idx, q.features, q.sq_norm, "relatif", checkpoints=last),
        (w[last[0]] * dots[last[0]] / np.sqrt(w[last[0]] * n_train[last[0]])[:, None]).T,
        rtol=1e-10,
    )
    # the exact squared norms of the query are the featurizer's; stored queries reuse the store's
    sq = stored_queries(idx, [0, 7])
    np.testing.assert_array_equal(sq.sq_norm[0], idx.store.sq_norm(0)[[0, 7]])
    # a stored sample scored with cosine against itself: projected / exact norms, close to 1
    self_cos = combine_scores(idx, {c: (sq.features[c] @ idx.sources[c].all().T) for c in cks}, sq.sq_norm, "cosine")
    assert 0.5 * w.sum() < self_cos[0, 0] < 1.5 * w.sum()
    with pytest.raises(ValueError, match="scoring must be one of"):
        scores_all(idx, q.features, q.sq_norm, "dot")
    with pytest.raises(ValueError, match="needs the queries' exact squared norms"):
        scores_all(idx, q.features, None, "cosine")


def test_zero_norm_rows_score_zero(outlier_index):
    idx, held_out = outlier_index
    q = featurize_queries(idx, held_out.x[:1])
    zero = {c: np.zeros_like(v) for c, v in q.features.items()}
    for scoring in SCORINGS:
        s = scores_all(idx, zero, {c: np.zeros(1) for c in q.sq_norm}, scoring)
        assert np.all(s == 0) and np.all(np.isfinite(s))


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
