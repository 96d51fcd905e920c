"""Top-k of a sum of per-checkpoint inner products, certified exact (DESIGN.md §4).

score(i) = Σ_c <q_c, f_c(i)> with q_c already weighted by w_c. Each checkpoint
has its own inner-product index. For a candidate depth k':

1. search every checkpoint index for its top k' rows of <q_c, ·>;
2. rescore the union of the candidates exactly from the stored features;
3. threshold certificate (Fagin's TA): a row outside the union scores at most
   τ = Σ_c s_c(k'), the sum of the k'-th scores, so if the k-th best exact score
   is ≥ τ (plus a float32 rounding margin) the answer is exact. Otherwise k' is
   doubled; a full scan is the last resort.

With an approximate index the per-checkpoint lists may miss rows, the
certificate does not hold and the answer is reported as approximate.
Opponents are the top-k of the negated query.

With flat (exact, linear-time) indexes every round of that algorithm reads every
stored feature once per checkpoint, so it cannot beat one fused pass over the
data. :func:`scan_topk` is that pass, and is exact too: one float32
matrix-vector product per checkpoint (the memory-bandwidth floor), then a float64
rescoring of every row whose float32 score is within the rounding bound of the
k-th best. ``InfluenceIndex`` uses it for flat indexes and the threshold
algorithm for sublinear (approximate) ones; both are tested against brute force.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)


class RowSource(Protocol):
    """Stored features of one checkpoint: ``rows(ids) -> [len(ids), D] float32`` and ``all()``."""

    def rows(self, ids: np.ndarray) -> np.ndarray: ...

    def all(self) -> np.ndarray: ...


class ArrayRows:
    """A :class:`RowSource` over an in-memory ``[N, D]`` float32 array (or a view of one)."""

    def __init__(self, x: np.ndarray):
        self._x = x

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return self._x[ids]

    def all(self) -> np.ndarray:
        return self._x


class Searcher(Protocol):
    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class TopK:
    ids: np.ndarray  # [k] int64 row indices
    scores: np.ndarray  # [k] float64
    contributions: np.ndarray  # [k, C] float64, per active checkpoint
    exact: bool
    rounds: int = 1
    candidates: int = 0
    depth: int = 0  # final k'
    full_scan: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    strategy: str = "threshold"  # "threshold" (per-checkpoint index searches) or "scan" (one fused pass)


def exact_scores(queries: list[np.ndarray], features: list[np.ndarray]) -> np.ndarray:
    """Per-checkpoint contributions ``[n, C]`` in float64 (the definition of "exact")."""
    return np.stack([f.astype(np.float64) @ q.astype(np.float64) for q, f in zip(queries, features)], axis=1)


def rounding_margin(queries: list[np.ndarray], max_row_norms: list[float]) -> float:
    """Bound on |float32 score − exact score| for any row (Higham: |error| ≤ γ_D Σ|q_j f_j|)."""
    d = queries[0].shape[0] if queries else 0
    gamma = (d + len(queries) + 2) * F32_EPS
    return sum(gamma * float(np.linalg.norm(q)) * m for q, m in zip(queries, max_row_norms))


def scan_topk(
    queries: list[np.ndarray],
    sources: list[RowSource],
    k: int,
    max_row_norms: list[float],
    partial_scores: Callable[[list[np.ndarray]], np.ndarray] | None = None,
) -> TopK:
    """Exact top-k by one fused pass: float32 scores, then float64 rescoring of the near-ties.

    ``partial_scores(queries) -> [N] float32`` may compute the fused pass elsewhere (a GPU).
    Exact: a true top-k row j has s32_j ≥ s64_j − e ≥ s64_(k) − e ≥ s32_(k) − 2e, so every
    such row is among the candidates that are rescored in float64.
    """
    t = time.perf_counter()
    if partial_scores is not None:
        s32 = partial_scores(queries)
    else:
        s32 = np.zeros(sources[0].all().shape[0], np.float32)
        for q, src in zip(queries, sources):
            s32 += src.all() @ q.astype(np.float32, copy=False)
    n = len(s32)
    k = min(k, n)
    t_scan = time.perf_counter() - t
    t = time.perf_counter()
    margin = rounding_margin(queries, max_row_norms)
    kth = float(np.partition(s32, n - k)[n - k]) if k else 0.0
    cand = np.flatnonzero(s32 >= kth - 2 * margin)
    contrib = exact_scores(queries, [s.rows(cand) for s in sources])
    total = contrib.sum(axis=1)
    top = _top(total, k)
    timings = {"search_s": t_scan, "rescore_s": time.perf_counter() - t}
    return TopK(cand[top], total[top], contrib[top], True, 1, len(cand), n, True, timings, strategy="scan")


def prefiltered_topk(queries: list[np.ndarray], sources: list[RowSource], candidates: np.ndarray, k: int) -> TopK:
    """Top-k among ``candidates`` only, scored exactly: approximate over the whole set."""
    t = time.perf_counter()
    cand = np.unique(candidates)
    contrib = exact_scores(queries, [s.rows(cand) for s in sources])
    total = contrib.sum(axis=1)
    top = _top(total, k)
    timings = {"search_s": 0.0, "rescore_s": time.perf_counter() - t}
    return TopK(cand[top], total[top], contrib[top], False, 1, len(cand), len(cand), False, timings, "prefilter")


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest, sorted descending; ties broken by smaller index."""
    k = min(k, len(scores))
    if k == 0:
        return np.empty(0, np.int64)
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return part[np.lexsort((part, -scores[part]))]


def certified_topk(
    queries: list[np.ndarray],
    searchers: list[Searcher],
    sources: list[RowSource],
    n: int,
    k: int,
    *,
    exact_indexes: bool = True,
    max_row_norms: list[float] | None = None,
    initial_depth: int | None = None,
) -> TopK:
    """Top-k rows of Σ_c <queries[c], f_c(row)>, certified exact when the indexes are."""
    if k < 1:
        raise ValueError("k must be >= 1")
    k = min(k, n)
    c_count = len(queries)
    timings = {"search_s": 0.0, "rescore_s": 0.0}
    # A row's float32 inner product may differ from the float64 one by at most about D·u·|q|·|f|.
    margin = rounding_margin(queries, max_row_norms) if max_row_norms is not None else 0.0
    depth = max(initial_depth or 2 * k, k)
    rounds = 0
    while True:
        rounds += 1
        if depth >= n:
            t = time.perf_counter()
            contrib = exact_scores(queries, [s.all() for s in sources])
            total = contrib.sum(axis=1)
            top = _top(total, k)
            timings["rescore_s"] += time.perf_counter() - t
            return TopK(top, total[top], contrib[top], True, rounds, n, n, True, timings)
        t = time.perf_counter()
        cand: list[np.ndarray] = []
        tau = 0.0
        short = False
        for q, s in zip(queries, searchers):
            scores, ids = s.search(q, depth)
            valid = ids >= 0
            ids, scores = ids[valid], scores[valid]
            if len(ids) < depth:
                short = True  # index holds fewer rows than asked: the union is complete for it
            cand.append(ids)
            tau += float(scores[-1]) if len(scores) else 0.0
        union = np.unique(np.concatenate(cand)) if cand else np.empty(0, np.int64)
        timings["search_s"] += time.perf_counter() - t
        t = time.perf_counter()
        contrib = exact_scores(queries, [s.rows(union) for s in sources]) if len(union) else np.zeros((0, c_count))
        total = contrib.sum(axis=1)
        top = _top(total, k)
        timings["rescore_s"] += time.perf_counter() - t
        if not exact_indexes:
            return TopK(union[top], total[top], contrib[top], False, rounds, len(union), depth, False, timings)
        certified = len(top) == k and float(total[top[-1]]) >= tau + margin
        if certified or (short and len(union) >= n):
            return TopK(union[top], total[top], contrib[top], True, rounds, len(union), depth, False, timings)
        depth *= 2
