"""Scoring variants, chosen at query time from what every index stores (no re-indexing).

With q_c the query's features at checkpoint c, f_c(i) training row i's, w_c the checkpoint
weights and n_c(·) the exact squared norms of the unprojected gradients:

* ``raw``:     Σ_c w_c <q_c, f_c(i)>                                  (paper eq. 10)
* ``cosine``:  Σ_c w_c <q_c, f_c(i)> / sqrt(n_c(q) · n_c(i))           (per-checkpoint unit-normalised
               gradients; the exact norms make it an unbiased estimate of the exact cosine sum)
* ``relatif``: Σ_c w_c <q_c, f_c(i)> / sqrt(Σ_c w_c n_c(i))            (RelatIF, Barshan et al. 2020:
               divided by the square root of the training sample's self-influence)

With ``precondition="gram"`` (:mod:`proponent.format.precond`) the query vectors are P_c q_c
before these formulas, n_c(q) is q_cᵀ P_c q_c and n_c(i) is the leverage ℓ_c(i) = f_c(i)ᵀ P_c f_c(i).

Raw scores grow with a training sample's gradient norm, so high-norm outliers crowd out real
proponents (Hammoudeh & Lowd 2022); the other two remove that. Self-influence stays raw
(cosine self-influence is constant).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from proponent.api.registry import PRECONDITIONS, SCORINGS

from .features import ServedFeatures
from .scan import ScoredQuery


def _inv_sqrt(v: np.ndarray) -> np.ndarray:
    out = np.zeros_like(v, dtype=np.float64)
    pos = v > 0
    out[pos] = 1.0 / np.sqrt(v[pos])
    return out


@dataclass
class Multipliers:
    """A scoring's factors for one query: score(i) = g(i) · Σ_c μ_c(i) · scales[c] · <q_c, f_c(i)>."""

    scales: dict[int, float]  # query side, per checkpoint: the weight (and 1/||g_c(q)|| for cosine)
    row_mult: dict[int, np.ndarray] | None = None  # μ_c [N] (cosine: 1/||g_c(i)||)
    global_mult: np.ndarray | None = None  # g [N] (relatif: 1/sqrt(self-influence))

    def combine(self, dots: dict[int, np.ndarray]) -> np.ndarray:
        """Scores ``[..., N]`` from the raw inner products ``dots[c] = <q_c, f_c(·)>`` (``[..., N]``)."""
        total: np.ndarray | None = None
        for c, scale in self.scales.items():
            part = scale * np.asarray(dots[c], np.float64)
            if self.row_mult is not None:
                part = part * self.row_mult[c]
            total = part if total is None else total + part
        assert total is not None
        return total if self.global_mult is None else total * self.global_mult


def _raw(
    served: ServedFeatures, weights: np.ndarray, checkpoints: list[int], sq_norms: dict[int, float], pre: str
) -> Multipliers:
    return Multipliers({c: float(weights[c]) for c in checkpoints})


def _cosine(
    served: ServedFeatures, weights: np.ndarray, checkpoints: list[int], sq_norms: dict[int, float], pre: str
) -> Multipliers:
    scales = {c: float(weights[c]) * float(_inv_sqrt(np.array([sq_norms[c]]))[0]) for c in checkpoints}
    return Multipliers(scales, row_mult={c: _inv_sqrt(served.row_sq_norm(c, pre)) for c in checkpoints})


def _relatif(
    served: ServedFeatures, weights: np.ndarray, checkpoints: list[int], sq_norms: dict[int, float], pre: str
) -> Multipliers:
    self_influence = sum(float(weights[c]) * served.row_sq_norm(c, pre) for c in checkpoints)
    return Multipliers(
        {c: float(weights[c]) for c in checkpoints}, global_mult=_inv_sqrt(np.asarray(self_influence, np.float64))
    )


Scorer = Callable[[ServedFeatures, np.ndarray, list[int], dict[int, float], str], Multipliers]
SCORERS: dict[str, Scorer] = {"raw": _raw, "cosine": _cosine, "relatif": _relatif}
"""The implementation of each scoring named in :data:`proponent.api.registry.SCORINGS` (the same names)."""


def multipliers(
    served: ServedFeatures,
    weights: np.ndarray,
    checkpoints: list[int],
    sq_norms: dict[int, float],
    scoring: str,
    precondition: str = "none",
) -> Multipliers:
    """The factors of ``scoring`` for a query with exact squared gradient norms ``sq_norms`` (cosine only;
    preconditioned: qᵀPq), rows' norms from the index (preconditioned: their leverage)."""
    return SCORERS[SCORINGS.check(scoring)](served, weights, checkpoints, sq_norms, PRECONDITIONS.check(precondition))


def scored_query(
    served: ServedFeatures,
    weights: np.ndarray,
    checkpoints: list[int],
    vectors: dict[int, np.ndarray],
    sq_norms: dict[int, float],
    scoring: str,
    precondition: str = "none",
) -> ScoredQuery:
    """The scan's form of one query (per-checkpoint vectors [D], the query's exact squared norms)."""
    mult = multipliers(served, weights, checkpoints, sq_norms, scoring, precondition)
    vec = {c: mult.scales[c] * np.asarray(vectors[c], np.float64) for c in checkpoints}
    return ScoredQuery(vec, row_mult=mult.row_mult, global_mult=mult.global_mult, scales=mult.scales)
