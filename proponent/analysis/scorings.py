"""Query-time scorings compared: raw TracIn, cosine, RelatIF (answer quality with outliers).

Raw VAE-TracIn scores (paper eq. 10) scale with gradient norms, so training samples with very
large gradients -- outliers -- crowd the top proponents of ordinary queries. Two normalised
scorings are measured against it, with per-checkpoint query features ``q_c``, training features
``f_c(i)``, checkpoint weights ``w_c`` and exact unprojected squared gradient norms ``n_c``
(``store.sq_norm(c)`` for training rows, the featurizer's ``FeatureBatch.sq_norm`` for queries):

``raw``
    ``Σ_c w_c <q_c, f_c(i)>`` (paper eq. 10);
``cosine``
    ``Σ_c w_c <q_c, f_c(i)> / sqrt(n_c(q) · n_c(i))`` (every checkpoint's gradients unit-normalised);
``relatif``
    ``[Σ_c w_c <q_c, f_c(i)>] / sqrt(Σ_c w_c n_c(i))`` (divided by the square root of the training
    sample's self-influence; Barshan et al. 2020's RelatIF with the TracIn self-influence).

:func:`scores_all` is the one place the scorings are defined (the query path's implementation
can replace it). :func:`compare_scorings` measures, per scoring, the share of injected outliers
among the top-k proponents / opponents of clean queries, same-class rates and self-top1, and
returns a plain dict (JSON-ready) for benchmarks and the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from proponent.model.featurizers import make_featurizer
from proponent.model.objectives import NOISE_QUERY, draw_noise

if TYPE_CHECKING:
    from proponent.query.index import Convention, InfluenceIndex

SCORINGS = ("raw", "cosine", "relatif")

__all__ = [
    "SCORINGS",
    "QueryFeatures",
    "checkpoint_dots",
    "combine_scores",
    "compare_scorings",
    "featurize_queries",
    "scores_all",
    "self_influence_ratio",
    "stored_queries",
    "top_rows",
]


@dataclass
class QueryFeatures:
    """Features of B queries at some checkpoints, with their exact squared gradient norms."""

    features: dict[int, np.ndarray]  # checkpoint -> [B, D] float32
    sq_norm: dict[int, np.ndarray]  # checkpoint -> [B] float64, exact ||g_c(q)||² (unprojected)

    def __len__(self) -> int:
        return len(next(iter(self.features.values())))

    def select(self, rows: Sequence[int] | np.ndarray) -> QueryFeatures:
        sel = np.asarray(rows)
        return QueryFeatures(
            {c: f[sel] for c, f in self.features.items()}, {c: s[sel] for c, s in self.sq_norm.items()}
        )


def featurize_queries(
    index: InfluenceIndex,
    x: np.ndarray,
    *,
    seed: int = 0,
    checkpoints: list[int] | None = None,
    batch_size: int = 256,
) -> QueryFeatures:
    """Query features of images ``x [B, *shape]`` and their exact squared norms.

    The same draws as :meth:`InfluenceIndex.featurize` on the whole of ``x`` (query row r at
    checkpoint c uses the key ``(NOISE_QUERY, seed, c, r)``), batched to bound memory.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.shape[1:] != tuple(index.shape):
        raise ValueError(f"query shape {x.shape[1:]} does not match the index's input shape {tuple(index.shape)}")
    xt = torch.from_numpy(x)
    yt = torch.zeros(len(x), dtype=torch.int64)
    obj = index.objective
    feats: dict[int, np.ndarray] = {}
    norms: dict[int, np.ndarray] = {}
    with index.featurize_lock:
        for c in index.resolve_checkpoints(checkpoints):
            model = index.model(c)
            featurizer = make_featurizer(index.manifest["featurizer"], model, obj, index._projectors[c])
            f_parts, n_parts = [], []
            for start in range(0, len(x), batch_size):
                stop = min(len(x), start + batch_size)
                eps = draw_noise(NOISE_QUERY, seed, c, np.arange(start, stop), obj.m, obj.noise_shape(model))
                fb = featurizer.featurize(xt[start:stop], yt[start:stop], eps)
                f_parts.append(fb.features.cpu().numpy())
                n_parts.append(fb.sq_norm.cpu().numpy().astype(np.float64))
            feats[c] = np.concatenate(f_parts) if f_parts else np.zeros((0, index.dim), np.float32)
            norms[c] = np.concatenate(n_parts) if n_parts else np.zeros(0, np.float64)
    return QueryFeatures(feats, norms)


def stored_queries(
    index: InfluenceIndex, rows: Sequence[int] | np.ndarray, checkpoints: list[int] | None = None
) -> QueryFeatures:
    """Training rows as queries with their stored features and exact norms (the index's own draws)."""
    sel = np.asarray(rows, dtype=np.int64)
    cks = index.resolve_checkpoints(checkpoints)
    return QueryFeatures(
        {c: index.sources[c].rows(sel) for c in cks},
        {c: np.asarray(index.store.sq_norm(c), np.float64)[sel] for c in cks},
    )


def checkpoint_dots(
    index: InfluenceIndex,
    query_feats: dict[int, np.ndarray],
    checkpoints: list[int] | None = None,
    block_rows: int = 2048,
) -> dict[int, np.ndarray]:
    """Unweighted inner products ``<q_c, f_c(i)>`` per checkpoint, float64 ``[B, N]`` each.

    Computed in float64 over row blocks of the stored features (no full float64 copy).
    """
    cks = index.resolve_checkpoints(checkpoints)
    missing = [c for c in cks if c not in query_feats]
    if missing:
        raise ValueError(f"query features lack checkpoints {missing}")
    out = {}
    for c in cks:
        q = np.atleast_2d(np.asarray(query_feats[c], dtype=np.float64))  # [B, D]
        feats = index.sources[c].all()
        dots = np.empty((len(q), index.n), dtype=np.float64)
        for start in range(0, index.n, block_rows):
            stop = min(index.n, start + block_rows)
            dots[:, start:stop] = q @ feats[start:stop].astype(np.float64).T
        out[c] = dots
    return out


def combine_scores(
    index: InfluenceIndex,
    dots: dict[int, np.ndarray],
    query_sqnorms: dict[int, np.ndarray] | None,
    scoring: str = "raw",
    convention: Convention = "lr",
    checkpoints: list[int] | None = None,
) -> np.ndarray:
    """The scorings' definitions, from per-checkpoint inner products ``dots[c] [B, N]`` -> ``[B, N]``.

    raw: ``Σ_c w_c dots_c``; cosine: ``Σ_c w_c dots_c / sqrt(n_c(q) n_c(i))``; relatif:
    ``Σ_c w_c dots_c / sqrt(Σ_c w_c n_c(i))``, sums over ``checkpoints``. A zero norm contributes 0.
    """
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    cks = index.resolve_checkpoints(checkpoints)
    w = index.weights(convention)
    total: np.ndarray | None = None
    self_infl = np.zeros(index.n, dtype=np.float64)
    for c in cks:
        d = np.atleast_2d(dots[c])
        n_train = np.asarray(index.store.sq_norm(c), dtype=np.float64)
        if scoring == "cosine":
            if query_sqnorms is None or c not in query_sqnorms:
                raise ValueError("cosine scoring needs the queries' exact squared norms")
            n_query = np.atleast_1d(np.asarray(query_sqnorms[c], dtype=np.float64))
            denom = np.sqrt(n_query[:, None] * n_train[None, :])
            d = np.divide(d, denom, out=np.zeros_like(d), where=denom > 0)
        elif scoring == "relatif":
            self_infl += w[c] * n_train
        part = w[c] * d
        total = part if total is None else total + part
    assert total is not None
    if scoring == "relatif":
        root = np.broadcast_to(np.sqrt(self_infl)[None, :], total.shape)
        total = np.divide(total, root, out=np.zeros_like(total), where=root > 0)
    return total


def scores_all(
    index: InfluenceIndex,
    query_feats: dict[int, np.ndarray],
    query_sqnorms: dict[int, np.ndarray] | None,
    scoring: str = "raw",
    convention: Convention = "lr",
    checkpoints: list[int] | None = None,
) -> np.ndarray:
    """Scores of every training row under ``scoring``: ``[N]`` for one query, ``[B, N]`` for B.

    ``query_feats[c]`` is ``[D]`` or ``[B, D]``; ``query_sqnorms[c]`` the matching exact squared
    norms (scalar or ``[B]``; only ``cosine`` needs them). Float64 throughout. This is the one
    function to replace with the query path's own scoring call.
    """
    cks = index.resolve_checkpoints(checkpoints)
    single = np.asarray(query_feats[cks[0]]).ndim == 1 if cks[0] in query_feats else False
    scores = combine_scores(index, checkpoint_dots(index, query_feats, cks), query_sqnorms, scoring, convention, cks)
    return scores[0] if single else scores


def top_rows(scores: np.ndarray, k: int, direction: str = "proponents", exclude: int | None = None) -> np.ndarray:
    """Rows of the k largest (proponents) or most negative (opponents) scores; ties by row (stable)."""
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s if direction == "proponents" else s, kind="stable")
    if exclude is not None:
        order = order[order != exclude]
    return order[:k]


def self_influence_ratio(index: InfluenceIndex, convention: Convention = "lr") -> float | None:
    """Median self-influence of the injected rows over that of the clean rows (None without injected)."""
    inj = np.asarray(index.injected, dtype=bool)
    if not inj.any() or inj.all():
        return None
    si = np.asarray(index.self_influence(convention), dtype=np.float64)
    return float(np.median(si[inj]) / np.median(si[~inj]))


def _spread(rows: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` of ``rows``, evenly spaced (all of them when there are fewer)."""
    if len(rows) <= n:
        return rows.astype(np.int64)
    return rows[np.linspace(0, len(rows) - 1, n).round().astype(np.int64)]


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def compare_scorings(
    index: InfluenceIndex,
    *,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    rows: Sequence[int] | np.ndarray | None = None,
    scorings: Sequence[str] = SCORINGS,
    k: int = 10,
    convention: Convention = "lr",
    checkpoints: list[int] | None = None,
    seed: int = 0,
    self_rows: Sequence[int] | np.ndarray | None = None,
    n_self: int = 100,
) -> dict[str, Any]:
    """Answer quality of each scoring on clean queries, as a plain (JSON-ready) dict.

    Queries are either held-out ``images`` (with optional ``labels``) or training ``rows``
    (featurized from their stored images with fresh query draws, as an upload would be; the
    query row itself is left out of its own top-k). Per scoring:

    * ``injected_share_proponents`` / ``_opponents``: the fraction of injected rows among the
      top-k (averaged over queries); compare with ``injected_fraction`` of the training set;
    * ``queries_with_injected_top1``: the fraction of queries whose strongest proponent is injected;
    * ``same_class_proponents`` / ``_opponents``: the fraction of the top-k with the query's
      label (injected rows carry label -1 and never count); None without labels;
    * ``self_top1``: the fraction of ``self_rows`` (default: ``n_self`` clean training rows evenly
      spread) whose uploaded image finds itself as its strongest proponent; ``self_top1_injected``
      the same over up to ``n_self`` injected rows (None when there are none).

    ``scorings`` is a list of rows, one dict per scoring, in the order given.
    """
    if (images is None) == (rows is None):
        raise ValueError("give either images (held-out queries) or rows (training rows), not both")
    injected = np.asarray(index.injected, dtype=bool)
    train_labels = np.asarray(index.labels, dtype=np.int64)
    cks = index.resolve_checkpoints(checkpoints)
    if rows is not None:
        q_rows = np.asarray(rows, dtype=np.int64)
        q_images = index.store.images(q_rows)
        q_labels: np.ndarray | None = train_labels[q_rows]
        excludes: list[int | None] = [int(r) for r in q_rows]
    else:
        q_images = np.asarray(images, dtype=np.float32)
        q_labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        excludes = [None] * len(q_images)
    if q_labels is not None and not (q_labels >= 0).any():
        q_labels = None
    queries = featurize_queries(index, q_images, seed=seed, checkpoints=cks)

    if self_rows is None:
        s_clean, s_dirty = _spread(np.flatnonzero(~injected), n_self), _spread(np.flatnonzero(injected), n_self)
    else:
        chosen = np.asarray(self_rows, dtype=np.int64)
        s_clean, s_dirty = chosen[~injected[chosen]], chosen[injected[chosen]]
    s_rows = np.concatenate([s_clean, s_dirty]).astype(np.int64)
    self_queries = (
        featurize_queries(index, index.store.images(s_rows), seed=seed + 1, checkpoints=cks) if len(s_rows) else None
    )

    dots = checkpoint_dots(index, queries.features, cks)
    self_dots = checkpoint_dots(index, self_queries.features, cks) if self_queries is not None else None
    results = []
    for scoring in scorings:
        scores = combine_scores(index, dots, queries.sq_norm, scoring, convention, cks)
        inj_p, inj_o, same_p, same_o = [], [], [], []
        for b in range(len(q_images)):
            pro = top_rows(scores[b], k, "proponents", excludes[b])
            opp = top_rows(scores[b], k, "opponents", excludes[b])
            inj_p.append(float(injected[pro].mean()))
            inj_o.append(float(injected[opp].mean()))
            if q_labels is not None and q_labels[b] >= 0:
                same_p.append(float((train_labels[pro] == q_labels[b]).mean()))
                same_o.append(float((train_labels[opp] == q_labels[b]).mean()))
        self_hits = np.zeros(0, dtype=bool)
        if self_queries is not None and self_dots is not None:
            s_scores = combine_scores(index, self_dots, self_queries.sq_norm, scoring, convention, cks)
            self_hits = np.argmax(s_scores, axis=1) == s_rows
        n_c = len(s_clean)
        results.append(
            {
                "scoring": scoring,
                "injected_share_proponents": _mean(inj_p),
                "injected_share_opponents": _mean(inj_o),
                "queries_with_injected_top1": _mean(
                    [float(injected[top_rows(scores[b], 1, "proponents", excludes[b])[0]]) for b in range(len(scores))]
                ),
                "same_class_proponents": _mean(same_p),
                "same_class_opponents": _mean(same_o),
                "self_top1": float(self_hits[:n_c].mean()) if n_c else None,
                "self_top1_injected": float(self_hits[n_c:].mean()) if len(s_dirty) else None,
            }
        )
    return {
        "k": int(k),
        "convention": convention,
        "checkpoints": [int(c) for c in cks],
        "n_train": int(index.n),
        "n_injected": int(injected.sum()),
        "injected_fraction": float(injected.mean()),
        "self_influence_ratio": self_influence_ratio(index, convention),
        "n_queries": int(len(q_images)),
        "queries": "training rows" if rows is not None else "held-out images",
        "n_self": int(len(s_clean)),
        "n_self_injected": int(len(s_dirty)),
        "scorings": results,
    }


def upscaled_digits_npz(path: str | Path, size: int = 28) -> Path:
    """Write scikit-learn's digits upscaled to ``size`` x ``size`` (bilinear) as an ``npz:`` source.

    The clean counterpart of ``glyphs:size=28`` (the generated outliers reproduce the raw-score
    failure at MNIST's size, not at 8x8); ``x`` uint8, ``y`` the digit labels. Idempotent.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    path = Path(path)
    if path.exists():
        return path
    bunch = load_digits()
    planes = [
        np.asarray(Image.fromarray((im / 16).astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR))
        for im in bunch.images
    ]
    x = np.clip(np.stack(planes), 0.0, 1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez(tmp, x=np.round(x * 255).astype(np.uint8), y=np.asarray(bunch.target, dtype=np.int64))
    tmp.replace(path)
    return path
