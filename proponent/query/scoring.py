"""Scoring variants, chosen at query time from what every index stores (no re-indexing).

With q_c the query's features at checkpoint c, f_c(i) training row i's, w_c the checkpoint
weights and n_c(·) the exact squared norms of the unprojected gradients:

* ``raw``:     Σ_c w_c <q_c, f_c(i)>                                  (paper eq. 10)
* ``cosine``:  Σ_c w_c <q_c, f_c(i)> / sqrt(n_c(q) · n_c(i))           (per-checkpoint unit-normalised
               gradients; the exact norms make it an unbiased estimate of the exact cosine sum)
* ``relatif``: Σ_c w_c <q_c, f_c(i)> / sqrt(Σ_c w_c n_c(i))            (RelatIF, Barshan et al. 2020:
               divided by the square root of the training sample's self-influence)

Raw scores grow with a training sample's gradient norm, so high-norm outliers crowd out real
proponents (Hammoudeh & Lowd 2022); the other two remove that. Self-influence stays raw
(cosine self-influence is constant).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from .features import ServedFeatures
from .search import ScoredQuery

Scoring = Literal["raw", "cosine", "relatif"]
SCORINGS: tuple[str, ...] = ("raw", "cosine", "relatif")


def _inv_sqrt(v: np.ndarray) -> np.ndarray:
    out = np.zeros_like(v, dtype=np.float64)
    pos = v > 0
    out[pos] = 1.0 / np.sqrt(v[pos])
    return out


def scored_query(
    served: ServedFeatures,
    weights: np.ndarray,
    checkpoints: list[int],
    vectors: dict[int, np.ndarray],
    sq_norms: dict[int, float],
    scoring: str,
) -> ScoredQuery:
    """The scan's form of one query (per-checkpoint vectors [D], the query's exact squared norms)."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    vec = {c: float(weights[c]) * np.asarray(vectors[c], np.float64) for c in checkpoints}
    if scoring == "raw":
        return ScoredQuery(vec)
    if scoring == "cosine":
        for c in checkpoints:
            vec[c] = vec[c] * float(_inv_sqrt(np.array([sq_norms[c]]))[0])
        return ScoredQuery(vec, row_mult={c: _inv_sqrt(served.sq_norm[c]) for c in checkpoints})
    self_influence = sum(float(weights[c]) * served.sq_norm[c] for c in checkpoints)
    return ScoredQuery(vec, global_mult=_inv_sqrt(np.asarray(self_influence, np.float64)))


def query_scale(weights: np.ndarray, c: int, sq_norm: float, scoring: str) -> float:
    """The factor that multiplies query vectors at checkpoint ``c`` (for per-draw vectors too)."""
    w = float(weights[c])
    if scoring == "cosine":
        return w * float(_inv_sqrt(np.array([sq_norm]))[0])
    return w
