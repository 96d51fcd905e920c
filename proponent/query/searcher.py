"""Where the rows are searched: one interface for the local scan and for shards.

A :class:`SearchRequest` carries everything a search needs that does not depend on which rows it
covers -- the query's per-checkpoint features (and each draw's), its exact squared norms, the
checkpoint weights, the scoring and k -- so that the same request can be answered by the
:class:`LocalSearcher` over an index's served features or fanned out to shards, each holding a
contiguous range of rows and its own per-row norms (:class:`ShardedSearcher`; on Ray Serve:
``proponent.service.sharded``). Rows in answers are always the index's global rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from proponent.query.features import ServedFeatures
from proponent.query.scan import ScoredQuery, TopK, _top, restricted, row_dots, scan_batch
from proponent.query.scoring import scored_query


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
    allow_partial: bool = False  # sharded: answer from the shards that respond instead of failing
    precondition: str = "none"  # gram: vectors are P_c q_c, sq_norms q_cᵀP_cq_c, rows' norms their leverage


class Searcher(Protocol):
    def search(self, request: SearchRequest) -> dict[str, TopK]: ...


def search_all(searcher: Searcher, requests: Sequence[SearchRequest]) -> list[dict[str, TopK]]:
    """Several requests: in one pass where the searcher batches (:meth:`LocalSearcher.search_batch`), else one by one
    (a sharded searcher: each shard scans each request)."""
    batch = getattr(searcher, "search_batch", None)
    if batch is not None:
        return list(batch(requests))
    return [searcher.search(r) for r in requests]


def per_draw_scores(served: ServedFeatures, sq: ScoredQuery, request: SearchRequest, rows: np.ndarray, sign: float):
    """``[m, len(rows)]``: each query draw's score of ``rows`` (the mean over draws is the score)."""
    assert request.draws is not None
    m = next(iter(request.draws.values())).shape[0]
    out = np.zeros((m, len(rows)))
    for c in sq.checkpoints:
        f = served.exact_rows(c, rows)
        assert sq.scales is not None
        vals = row_dots(f, request.draws[c].astype(np.float64) * sq.scales[c])  # batch-invariant, as the scores
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
        return self.search_batch([request])[0]

    def search_batch(self, requests: Sequence[SearchRequest]) -> list[dict[str, TopK]]:
        """Answers to several requests: the exact scans among them that share k, directions and checkpoints
        in one pass over the rows (:func:`~proponent.query.scan.scan_batch`: a GEMM, not one product per
        query); pre-filtered and ANN requests one by one. Each answer is the one its request gets alone."""
        served = self.served
        sqs = [
            scored_query(served, r.weights, r.checkpoints, r.vectors, r.sq_norms, r.scoring, r.precondition)
            for r in requests
        ]
        answers: list[dict[str, TopK] | None] = [None] * len(requests)
        groups: dict[tuple[int, tuple[str, ...], tuple[int, ...]], list[int]] = {}
        for i, (request, sq) in enumerate(zip(requests, sqs, strict=True)):
            k = min(request.k, served.n)
            if request.candidates is not None:
                local = np.asarray(request.candidates, np.int64) - self.offset
                local = local[(local >= 0) & (local < served.n)]
                answers[i] = restricted(served, sq, local, k, request.directions)
            elif request.use_ann:
                answers[i] = self._ann(sq, k, request.directions)
            else:
                groups.setdefault((k, tuple(request.directions), tuple(sq.checkpoints)), []).append(i)
        for (k, directions, _), members in groups.items():
            for i, found in zip(members, scan_batch(served, [sqs[i] for i in members], k, directions), strict=True):
                answers[i] = found
        out = []
        for request, sq, results in zip(requests, sqs, answers, strict=True):
            assert results is not None
            for d, res in results.items():
                if request.draws is not None:
                    res.per_draw = per_draw_scores(served, sq, request, res.rows, 1.0 if d == "proponents" else -1.0)
                res.rows = res.rows + self.offset
            out.append(results)
        return out

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


# ---------------------------------------------------------------------------------- shards
class ShardUnavailable(RuntimeError):
    """A shard did not answer (down, restarting, timed out) and the request did not allow a partial answer."""

    def __init__(self, message: str, retry_after_s: int = 5):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def shard_ranges(n: int, chunk_rows: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous, chunk-aligned row ranges covering ``0..n`` (as equal as whole chunks allow)."""
    n_chunks = math.ceil(n / chunk_rows) if n else 0
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if shards > max(n_chunks, 1):
        raise ValueError(f"{shards} shards for an index of {n_chunks} chunks of {chunk_rows} rows: at most {n_chunks}")
    # boundary i near i·n/shards rows, in whole chunks, each shard at least one chunk
    bounds = [0]
    for i in range(1, shards):
        want = math.floor(i * n / shards / chunk_rows + 0.5)
        bounds.append(min(max(want, bounds[-1] + 1), n_chunks - (shards - i)))
    bounds.append(n_chunks)
    return [(bounds[i] * chunk_rows, min(n, bounds[i + 1] * chunk_rows)) for i in range(shards)]


def merge_topk(parts: Sequence[dict[str, TopK]], k: int, directions: tuple[str, ...]) -> dict[str, TopK]:
    """The exact top-k of an index from the exact top-k of each of its shards.

    **Why the union of the shards' top-k holds the global top-k.** Order rows by score
    (descending; for opponents by minus the score) with ties broken by the smaller row: a strict
    total order, and every row's score is the same number whichever shard computes it (scores are
    batch-invariant: :func:`proponent.query.scan.row_dots`). Let r be one of the global top-k and
    s the shard holding it. Every row of s ranked above r is a row of the index ranked above r, and
    fewer than k rows of the index rank above r (r is in the global top-k); so fewer than k rows of
    s rank above r and r is in s's top-k (or s has fewer than k rows and returns them all). Hence
    the global top-k is a subset of the union of the shards' top-k, and the top-k of that union in
    the same order is exactly the global top-k -- same rows, same scores, same order.

    Each shard's answer must cover ``min(k, rows of the shard)`` rows: :class:`LocalSearcher` does.
    Strategies and counts are combined (candidates add up; exact only if every shard's is).
    """
    out: dict[str, TopK] = {}
    for d in directions:
        sign = 1.0 if d == "proponents" else -1.0
        got = [p[d] for p in parts if d in p]
        if not got:
            continue
        rows = np.concatenate([g.rows for g in got]).astype(np.int64)
        scores = np.concatenate([g.scores for g in got])
        contrib = np.concatenate([g.contributions for g in got])
        top = _top(sign * scores, rows, k)
        per_draw = None
        if all(g.per_draw is not None for g in got):
            per_draw = np.concatenate([g.per_draw for g in got if g.per_draw is not None], axis=1)[:, top]
        timings: dict[str, float] = {}
        for g in got:
            for key, v in g.timings.items():
                timings[key] = max(timings.get(key, 0.0), v)  # shards run side by side: the slowest one's
        strategies = sorted({g.strategy for g in got})
        out[d] = TopK(
            rows=rows[top],
            scores=scores[top],
            contributions=contrib[top],
            exact=all(g.exact for g in got),
            candidates=sum(g.candidates for g in got),
            strategy=f"sharded[{len(got)}]/" + "+".join(strategies),
            timings=timings,
            per_draw=per_draw,
            missing=[r for g in got for r in g.missing],
        )
    return out


class Shard(Protocol):
    """One shard as the router sees it: its rows, a search, and a description (raises when down)."""

    rows: tuple[int, int]

    def search(self, request: SearchRequest, timeout_s: float) -> dict[str, TopK]: ...

    def describe(self, timeout_s: float) -> dict[str, Any]: ...


@dataclass
class LocalShard:
    """A shard in this process: a :class:`LocalSearcher` over a row range (tests, benchmarks)."""

    searcher: LocalSearcher
    rows: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.rows = (self.searcher.offset, self.searcher.offset + self.searcher.served.n)

    def search(self, request: SearchRequest, timeout_s: float) -> dict[str, TopK]:
        return self.searcher.search(request)

    def describe(self, timeout_s: float) -> dict[str, Any]:
        return self.searcher.served.describe()


class ShardedSearcher:
    """Sends the same :class:`SearchRequest` to every shard and merges their exact top-k (:func:`merge_topk`).

    A shard that fails or does not answer within ``timeout_s`` makes the search raise
    :class:`ShardUnavailable` (the server answers 503 with Retry-After) -- never a silently partial
    answer -- unless the request allows a partial one: then the answer merges the shards that
    answered and lists the row ranges of the others in ``missing`` (flagged ``partial``).
    """

    def __init__(self, shards: Sequence[Shard], timeout_s: float = 30.0, retry_after_s: int = 5):
        self.shards = list(shards)
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.shards)), thread_name_prefix="shard")

    def _fan_out(self, fn: Any) -> list[tuple[Any, BaseException | None]]:
        futures = [self._pool.submit(fn, s) for s in self.shards]
        out: list[tuple[Any, BaseException | None]] = []
        for f in futures:
            try:
                out.append((f.result(), None))
            except Exception as e:
                out.append((None, e))
        return out

    def search(self, request: SearchRequest) -> dict[str, TopK]:
        answers = self._fan_out(lambda s: s.search(request, self.timeout_s))
        down = [(i, e) for i, (_, e) in enumerate(answers) if e is not None]
        if down and (not request.allow_partial or len(down) == len(self.shards)):
            what = "; ".join(
                f"shard {i} (rows {self.shards[i].rows[0]}..{self.shards[i].rows[1] - 1}): {_one_line(e)}"
                for i, e in down
            )
            hint = "" if request.allow_partial else " (allow_partial=true answers from the shards that respond)"
            raise ShardUnavailable(
                f"{len(down)} of {len(self.shards)} shards did not answer: {what}; retry later{hint}",
                self.retry_after_s,
            )
        merged = merge_topk([a for a, e in answers if e is None], request.k, request.directions)
        for res in merged.values():
            res.missing = sorted(res.missing + [self.shards[i].rows for i, _ in down])
        return merged

    def describe_shards(self, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        """One entry per shard: its rows and, when it answers, its serving mode and sizes; ``healthy``."""
        answers = self._fan_out(lambda s: s.describe(timeout_s))
        out = []
        for i, (s, (info, e)) in enumerate(zip(self.shards, answers, strict=True)):
            entry: dict[str, Any] = {"shard": i, "rows": list(s.rows), "n": s.rows[1] - s.rows[0]}
            if e is None:
                entry.update({k: v for k, v in dict(info).items() if k != "rows"})
                entry["healthy"] = True
            else:
                entry.update({"healthy": False, "error": _one_line(e)})
            out.append(entry)
        return out


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__
