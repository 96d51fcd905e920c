"""Where the rows are searched: one interface for the local scan and for shards.

A :class:`SearchRequest` carries everything a search needs that does not depend on which rows it
covers -- the query's per-checkpoint features (and each draw's), its exact squared norms, the
checkpoint weights, the scoring and k -- so that the same request can be answered by the
:class:`LocalSearcher` over an index's served features or fanned out to shards, each holding a
contiguous range of rows and its own per-row norms (``proponent.service.sharded``). Rows in
answers are always the index's global rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from proponent.query.features import ServedFeatures
from proponent.query.scoring import scored_query
from proponent.query.search import ScoredQuery, TopK, restricted, scan


@dataclass
class SearchRequest:
    vectors: dict[int, np.ndarray]  # checkpoint -> [D] float32 query features (unweighted)
    sq_norms: dict[int, float]  # checkpoint -> exact squared norm of the query's gradient
    weights: np.ndarray  # [C] checkpoint weights (the request's convention)
    checkpoints: list[int]
    scoring: str
    k: int
    directions: tuple[str, ...]
    draws: dict[int, np.ndarray] | None = None  # checkpoint -> [m, D] each draw's features (uncertainty)
    candidates: np.ndarray | None = None  # global rows (a pre-filter): score only these, approximately
    use_ann: bool = False


class Searcher(Protocol):
    def search(self, request: SearchRequest) -> dict[str, TopK]: ...


def per_draw_scores(served: ServedFeatures, sq: ScoredQuery, request: SearchRequest, rows: np.ndarray, sign: float):
    """``[m, len(rows)]``: each query draw's score of ``rows`` (the mean over draws is the score)."""
    assert request.draws is not None
    m = next(iter(request.draws.values())).shape[0]
    out = np.zeros((m, len(rows)))
    for c in sq.checkpoints:
        f = served.exact_rows(c, rows)
        assert sq.scales is not None
        vals = (request.draws[c].astype(np.float64) * sq.scales[c]) @ f.T
        if sq.row_mult is not None:
            vals = vals * sq.row_mult[c][rows][None, :]
        out += vals
    if sq.global_mult is not None:
        out *= sq.global_mult[rows][None, :]
    return sign * out


class LocalSearcher:
    """Searches the rows of ``served`` (rows ``offset .. offset + served.n`` of the index)."""

    def __init__(
        self, served: ServedFeatures, ann_indexes: list[Any] | None = None, ann_kind: str = "none", offset: int = 0
    ):
        self.served = served
        self.ann_indexes = ann_indexes or []
        self.ann_kind = ann_kind
        self.offset = offset

    def search(self, request: SearchRequest) -> dict[str, TopK]:
        served = self.served
        sq = scored_query(
            served, request.weights, request.checkpoints, request.vectors, request.sq_norms, request.scoring
        )
        k = min(request.k, served.n)
        if request.candidates is not None:
            local = np.asarray(request.candidates, np.int64) - self.offset
            local = local[(local >= 0) & (local < served.n)]
            results = restricted(served, sq, local, k, request.directions)
        elif request.use_ann:
            results = self._ann(sq, k, request.directions)
        else:
            results = scan(served, sq, k, request.directions)
        for d, res in results.items():
            if request.draws is not None:
                res.per_draw = per_draw_scores(served, sq, request, res.rows, 1.0 if d == "proponents" else -1.0)
            res.rows = res.rows + self.offset
        return results

    def _ann(self, sq: ScoredQuery, k: int, directions: tuple[str, ...]) -> dict[str, TopK]:
        """Candidates from the per-checkpoint FAISS indexes (raw inner products), rescored exactly: approximate."""
        t0 = time.perf_counter()
        depth = min(self.served.n, max(4 * k, 64))
        out = {}
        for d in directions:
            sign = 1.0 if d == "proponents" else -1.0
            cand = []
            for c in sq.checkpoints:
                q = np.ascontiguousarray(sign * sq.vectors[c][None, :], dtype=np.float32)
                _, ids = self.ann_indexes[c].search(q, depth)
                cand.append(ids[0][ids[0] >= 0])
            rows = np.unique(np.concatenate(cand)) if cand else np.empty(0, np.int64)
            part = restricted(self.served, sq, rows, k, (d,))[d]
            part.strategy = f"ann/{self.ann_kind}"
            part.timings = {"scan_s": time.perf_counter() - t0, "rescore_s": 0.0}
            out[d] = part
        return out
