"""Query-time scorings compared: raw TracIn, cosine, RelatIF (answer quality with outliers).

Raw VAE-TracIn scores (paper eq. 10) scale with gradient norms, so training samples with very
large gradients -- outliers -- crowd the top proponents of ordinary queries. Two normalised
scorings are measured against it, with per-checkpoint query features ``q_c``, training features
``f_c(i)``, checkpoint weights ``w_c`` and exact unprojected squared gradient norms ``n_c``
(the stored exact norms for training rows, the featurizer's for queries), as the query path defines them
(:mod:`proponent.query.scoring`):

``raw``
    ``Σ_c w_c <q_c, f_c(i)>`` (paper eq. 10);
``cosine``
    ``Σ_c w_c <q_c, f_c(i)> / sqrt(n_c(q) · n_c(i))`` (every checkpoint's gradients unit-normalised);
``relatif``
    ``[Σ_c w_c <q_c, f_c(i)>] / sqrt(Σ_c w_c n_c(i))`` (divided by the square root of the training
    sample's self-influence; Barshan et al. 2020's RelatIF with the TracIn self-influence).

:func:`scores_all` scores every training row through the query path's own featurization and scoring.
:func:`compare_scorings` measures, per scoring, the share of injected outliers
among the top-k proponents / opponents of clean queries, same-class rates and self-top1, and
returns a plain dict (JSON-ready) for benchmarks and the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from proponent.api.registry import SCORINGS
from proponent.api.schemas import InfluenceParams
from proponent.query.usecase import QueryVectors, combine, query_vectors, raw_dots

if TYPE_CHECKING:
    from proponent.query.index import InfluenceIndex

__all__ = [
    "SCORINGS",
    "compare_scorings",
    "query_dots",
    "scores_all",
    "self_influence_ratio",
    "top_rows",
]


def query_dots(
    index: InfluenceIndex, x: np.ndarray, *, seed: int = 0, label: int | None = None
) -> tuple[QueryVectors, dict[int, np.ndarray]]:
    """One query's features (featurized as the API does) and its raw inner products with every row."""
    qv = query_vectors(index, InfluenceParams(seed=seed, label=label), x=np.asarray(x, np.float32))
    return qv, raw_dots(index, qv)


def scores_all(
    index: InfluenceIndex,
    x: np.ndarray,
    scoring: str = "raw",
    convention: str = "lr",
    checkpoints: list[int] | None = None,
    *,
    seed: int = 0,
) -> np.ndarray:
    """Scores of every training row under ``scoring`` for one input ``x``: ``[N]`` (the API's definition)."""
    qv, dots = query_dots(index, x, seed=seed)
    return combine(index, qv, dots, scoring=scoring, convention=convention, checkpoints=checkpoints)


def top_rows(scores: np.ndarray, k: int, direction: str = "proponents", exclude: int | None = None) -> np.ndarray:
    """Rows of the k largest (proponents) or most negative (opponents) scores; ties by row (stable)."""
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s if direction == "proponents" else s, kind="stable")
    if exclude is not None:
        order = order[order != exclude]
    return order[:k]


def self_influence_ratio(index: InfluenceIndex, convention: str = "lr") -> float | None:
    """Median self-influence of the injected rows over that of the clean rows (None without injected)."""
    inj = np.asarray(index.meta.injected, dtype=bool)
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
    convention: str = "lr",
    checkpoints: list[int] | None = None,
    seed: int = 0,
    self_rows: Sequence[int] | np.ndarray | None = None,
    n_self: int = 100,
) -> dict[str, Any]:
    """Answer quality of each scoring on clean queries, as a plain (JSON-ready) dict.

    Queries are either held-out ``images`` (with optional ``labels``) or training ``rows``
    (their exact stored inputs, featurized with fresh query draws as the API does; the query row
    itself is left out of its own top-k). Every query is featurized once and its inner products
    with the training set computed once; each scoring combines them (the query path's definitions).
    Per scoring:

    * ``injected_share_proponents`` / ``_opponents``: the fraction of injected rows among the
      top-k (averaged over queries); compare with ``injected_fraction`` of the training set;
    * ``queries_with_injected_top1``: the fraction of queries whose strongest proponent is injected;
    * ``same_class_proponents`` / ``_opponents``: the fraction of the top-k with the query's
      label (injected rows carry label -1 and never count); None without labels;
    * ``self_top1``: the fraction of ``self_rows`` (default: ``n_self`` clean training rows evenly
      spread) whose exact input, uploaded, finds itself as its strongest proponent; ``self_top1_injected``
      the same over up to ``n_self`` injected rows (None when there are none).

    ``scorings`` is a list of rows, one dict per scoring, in the order given.
    """
    if (images is None) == (rows is None):
        raise ValueError("give either images (held-out queries) or rows (training rows), not both")
    meta = index.meta
    injected = np.asarray(meta.injected, dtype=bool)
    train_labels = np.asarray(meta.labels, dtype=np.int64)
    cks = meta.resolve_checkpoints(checkpoints)
    if rows is not None:
        q_rows = np.asarray(rows, dtype=np.int64)
        q_images = index.store.inputs(q_rows)
        q_labels: np.ndarray | None = train_labels[q_rows]
        excludes: list[int | None] = [int(r) for r in q_rows]
    else:
        q_images = np.asarray(images, dtype=np.float32)
        q_labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        excludes = [None] * len(q_images)
    if q_labels is not None and not (q_labels >= 0).any():
        q_labels = None
    if self_rows is None:
        s_clean, s_dirty = _spread(np.flatnonzero(~injected), n_self), _spread(np.flatnonzero(injected), n_self)
    else:
        chosen = np.asarray(self_rows, dtype=np.int64)
        s_clean, s_dirty = chosen[~injected[chosen]], chosen[injected[chosen]]
    s_rows = np.concatenate([s_clean, s_dirty]).astype(np.int64)
    queries = [query_dots(index, x, seed=seed) for x in q_images]
    self_queries = [query_dots(index, x, seed=seed + 1) for x in index.store.inputs(s_rows)] if len(s_rows) else []

    results = []
    for scoring in scorings:
        inj_p, inj_o, same_p, same_o, top1 = [], [], [], [], []
        for b, (qv, dots) in enumerate(queries):
            scores = combine(index, qv, dots, scoring=scoring, convention=convention, checkpoints=cks)
            pro = top_rows(scores, k, "proponents", excludes[b])
            opp = top_rows(scores, k, "opponents", excludes[b])
            inj_p.append(float(injected[pro].mean()))
            inj_o.append(float(injected[opp].mean()))
            top1.append(float(injected[pro[0]]))
            if q_labels is not None and q_labels[b] >= 0:
                same_p.append(float((train_labels[pro] == q_labels[b]).mean()))
                same_o.append(float((train_labels[opp] == q_labels[b]).mean()))
        self_hits = np.array(
            [
                int(np.argmax(combine(index, qv, dots, scoring=scoring, convention=convention, checkpoints=cks)))
                == int(r)
                for (qv, dots), r in zip(self_queries, s_rows, strict=True)
            ],
            dtype=bool,
        )
        n_c = len(s_clean)
        results.append(
            {
                "scoring": scoring,
                "injected_share_proponents": _mean(inj_p),
                "injected_share_opponents": _mean(inj_o),
                "queries_with_injected_top1": _mean(top1),
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
    from PIL import Image  # lazy: Pillow and scikit-learn only to write this data set
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
