"""Exact top-k of a sum of per-checkpoint inner products, with a certificate.

A query's score of training row i is

    s(i) = g(i) · Σ_c μ_c(i) · <q_c, f_c(i)>

with q_c the query's per-checkpoint vector (already multiplied by the checkpoint weight, the
scoring's query-side scale and the direction's sign), f_c(i) the stored feature row, and
per-row multipliers μ_c (cosine: 1/||g_c(i)||) and g (RelatIF: 1/sqrt(self-influence)), both
≥ 0 and 1 for raw scores. "Exact" means: the top-k of s computed in float64 from the stored
feature values, ties broken by the smaller row.

:func:`scan` makes one pass over the features (resident or streamed) and computes, for every
row, an approximate score ŝ(i) and a rigorous bound E(i) ≥ |ŝ(i) − s(i)|:

* int8 rows (codes x per-row scale): the query is split into two int8 vectors plus a residual,
  q = s₁z₁ + s₂z₂ + r; the integer products <z, codes> are exact (int32), so the only error is
  |<r, f̃>| ≤ ||r||·||f̃|| (relative size about 1/127²), plus ||q||·||f − f̃|| when the int8
  rows are a quantization of float features (mode ``quantized``);
* float rows: one float32 matrix-vector product, whose error is at most
  γ_D·||q||·||f|| + ||q − fl32(q)||·||f|| (Higham's bound for a dot product of length D).

Let L be the k-th largest lower bound ŝ − E. Every row of the exact top-k has s ≥ s₍ₖ₎ ≥ L, so
ŝ + E ≥ L: rescoring exactly the rows with ŝ + E ≥ L (a handful beyond k) gives the exact
answer. Proponents and opponents come from the same pass (opponents: −ŝ, same E). When the
features are streamed, rows are rescored while their chunk is in memory against the running
bound (which only rises), so the store is read once.

Exact scores are **batch-invariant**: a row's float64 score is computed by :func:`row_dots`, the
same operations in the same order whatever other rows are rescored with it. So a row has one
exact score -- in the scan, in brute force, and in any shard of a sharded server -- and merging
shards' exact top-k gives the unsharded answer bit for bit (:func:`proponent.query.searcher.merge_topk`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .features import Block, ServedFeatures
from .kernels import int8_products_tensor

F32_EPS = float(np.finfo(np.float32).eps)
_SLACK = 1e-12  # relative allowance for the float64 arithmetic of ŝ and E themselves
DIRECTIONS = ("proponents", "opponents")
# From this many queries the resident scan's selection (k-th lower bounds, rows that reach them) runs as parallel
# torch ops over [Q, N]; below, numpy: torch's OpenMP threads then spin-wait for milliseconds after each parallel
# op and slowed the native kernel's threads of the next query by 35 % on 2 cores (21 -> 29 ms per query at 60,000 rows).
PARALLEL_QUERIES = 4


@dataclass
class ScoredQuery:
    """A query as the scan takes it: per-checkpoint vectors and per-row multipliers."""

    vectors: dict[int, np.ndarray]  # checkpoint -> float64 [D] (weight x query scale, sign +)
    row_mult: dict[int, np.ndarray] | None = None  # checkpoint -> [N] μ_c (cosine), None = 1
    global_mult: np.ndarray | None = None  # [N] g (RelatIF), None = 1
    scales: dict[int, float] | None = None  # the query-side factor folded into each vector (for per-draw scores)

    @property
    def checkpoints(self) -> list[int]:
        return sorted(self.vectors)


@dataclass
class TopK:
    rows: np.ndarray  # [k] int64
    scores: np.ndarray  # [k] float64
    contributions: np.ndarray  # [k, C] float64, per searched checkpoint (sum = score)
    exact: bool
    candidates: int = 0  # rows rescored exactly
    strategy: str = "scan"
    timings: dict[str, float] = field(default_factory=dict)
    per_draw: np.ndarray | None = None  # [m, k] each query draw's score of the hits (their mean is the score)
    missing: list[tuple[int, int]] = field(default_factory=list)  # row ranges not searched (shards that were down)


def _top(scores: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest scores, descending; ties broken by the smaller row."""
    k = min(k, len(scores))
    if k <= 0:
        return np.empty(0, np.int64)
    return np.lexsort((rows, -scores))[:k]


def row_dots(a: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``a @ q`` (``q [D]`` -> ``[rows]``; ``q [m, D]`` -> ``[m, rows]``) in float64, batch-invariant.

    Each row's products are summed by numpy's pairwise reduction along that row alone, so the result
    for a row does not depend on the other rows of ``a`` (a BLAS product may group rows into kernels
    whose rounding differs). Worked in blocks so that the temporaries stay small.
    """
    a = np.asarray(a, np.float64)
    q = np.asarray(q, np.float64)
    d = a.shape[1] if a.ndim == 2 else len(q)
    if q.ndim == 1:
        out = np.empty(len(a))
        step = max(1, (1 << 22) // max(d, 1))
        for i in range(0, len(a), step):
            out[i : i + step] = (a[i : i + step] * q).sum(axis=1)
        return out
    out = np.empty((q.shape[0], len(a)))
    step = max(1, (1 << 22) // max(d * q.shape[0], 1))
    for i in range(0, len(a), step):
        out[:, i : i + step] = (a[None, i : i + step, :] * q[:, None, :]).sum(axis=2)
    return out


def exact_contributions(served: ServedFeatures, sq: ScoredQuery, rows: np.ndarray, block: Block | None = None):
    """Per-checkpoint exact terms ``[len(rows), C]`` (float64) of the score of ``rows`` (batch-invariant)."""
    cks = sq.checkpoints
    out = np.zeros((len(rows), len(cks)))
    for j, c in enumerate(cks):
        vals = row_dots(served.exact_rows(c, rows, block), sq.vectors[c])
        if sq.row_mult is not None:
            vals = vals * sq.row_mult[c][rows]
        out[:, j] = vals
    if sq.global_mult is not None:
        out *= sq.global_mult[rows][:, None]
    return out


class _Int8Query:
    """q ≈ s₁z₁ + s₂z₂ (int8 vectors) with the residuals' norms, for exact integer products."""

    def __init__(self, q: np.ndarray):
        s1 = float(np.abs(q).max()) / 127.0 if q.size else 0.0
        z1 = np.rint(q / s1) if s1 > 0 else np.zeros_like(q)
        r1 = q - s1 * z1
        s2 = float(np.abs(r1).max()) / 127.0 if q.size else 0.0
        z2 = np.rint(r1 / s2) if s2 > 0 else np.zeros_like(q)
        resid = r1 - s2 * z2
        self.s = (s1, s2)
        self.z = np.stack([z1, z2]).astype(np.int8)  # [2, D]
        self.resid_norm = float(np.linalg.norm(resid)) * (1 + 1e-9)
        self.norm = float(np.linalg.norm(q)) * (1 + 1e-9)

    def products(self, codes: torch.Tensor) -> np.ndarray:
        """Σ_j q̃_j·codes_ij for int8 ``codes [n, ≥D]`` (exact integer sums, combined in float64)."""
        return _Int8Batch([self]).products(codes)[0]


class _Int8Batch:
    """The int8 forms of a batch of queries at one checkpoint: all their codes in one product (a GEMM)."""

    def __init__(self, queries: list[_Int8Query]):
        self.z = np.concatenate([q.z[:1] for q in queries] + [q.z[1:] for q in queries])  # [2Q, D]: z₁s, then z₂s
        self.s = np.array([q.s for q in queries])  # [Q, 2]
        self.resid_norm = np.array([q.resid_norm for q in queries])
        self.norm = np.array([q.norm for q in queries])

    def terms(self, codes: torch.Tensor) -> torch.Tensor:
        """``[Q, n]`` float64 (CPU): each query's Σ_j q̃_j·codes_ij, from exact integer sums."""
        a = int8_products_tensor(codes, self.z).cpu()  # [2Q, n]
        q = len(self.s)
        s = torch.from_numpy(self.s)
        out = torch.empty((q, a.shape[1]), dtype=torch.float64).copy_(a[:q]).mul_(s[:, :1])
        return out.add_(torch.empty_like(out).copy_(a[q:]).mul_(s[:, 1:]))  # s₁<z₁, c> + s₂<z₂, c>, row by row

    def products(self, codes: torch.Tensor) -> np.ndarray:
        """``[Q, n]``: each query's Σ_j q̃_j·codes_ij (exact integer sums, combined in float64)."""
        return self.terms(codes).numpy()


class _FloatBatch:
    """A batch of queries as float32 (one matrix product per block) and each one's rounding bound."""

    def __init__(self, qs: list[np.ndarray], device: torch.device):
        q32 = np.stack([q.astype(np.float32) for q in qs])
        d = q32.shape[1]
        self.t = torch.from_numpy(q32).to(device)
        gamma = (d + 2) * F32_EPS / (1 - (d + 2) * F32_EPS)
        self.err_per_norm = np.array(
            [
                gamma * float(np.linalg.norm(q32[i].astype(np.float64))) * (1 + 1e-9)
                + float(np.linalg.norm(q - q32[i].astype(np.float64))) * (1 + 1e-9)
                for i, q in enumerate(qs)
            ]
        )

    def terms(self, rows: torch.Tensor) -> torch.Tensor:
        """``[Q, n]`` float64 (CPU): the float32 products."""
        with torch.no_grad():
            if self.t.shape[0] == 1:
                return (rows @ self.t[0]).cpu().to(torch.float64)[None]
            return (self.t @ rows.T).cpu().to(torch.float64)  # [Q, n] as it is used: no transposed copy

    def products(self, rows: torch.Tensor) -> np.ndarray:
        return self.terms(rows).numpy()


def _block_terms(
    served: ServedFeatures, qb: _Int8Batch | _FloatBatch, c: int, rows: torch.Tensor, at: slice | np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate terms ``[Q, len(at)]`` of checkpoint ``c`` for the held rows ``rows`` (index rows ``at``)
    and their bounds: |exact term − approximate term| ≤ bound, before the per-row multipliers."""
    t = qb.terms(rows)
    if isinstance(qb, _Int8Batch):
        scale = served.row_scale(c)
        assert scale is not None
        t.mul_(torch.from_numpy(scale[at].astype(np.float64)))
        e = torch.from_numpy(qb.resid_norm)[:, None] * torch.from_numpy(served.resident_norm[c][at])
        resid = served.residual[c]
        if resid is not None:
            e.add_(torch.from_numpy(qb.norm)[:, None] * torch.from_numpy(resid[at]))
    else:
        e = torch.from_numpy(qb.err_per_norm)[:, None] * torch.from_numpy(served.feat_norm[c][at])
    return t, e


def _multipliers(sqs: list[ScoredQuery], c: int | None, at: slice | np.ndarray) -> torch.Tensor | None:
    """``[Q, len(at)]`` per-row multipliers of checkpoint ``c`` (μ_c; ``c=None``: the global g), None when all 1."""
    got = [sq.global_mult if c is None else (sq.row_mult[c] if sq.row_mult is not None else None) for sq in sqs]
    if all(m is None for m in got):
        return None
    n = len(range(*at.indices(len(next(m for m in got if m is not None))))) if isinstance(at, slice) else len(at)
    return torch.stack([torch.ones(n, dtype=torch.float64) if m is None else torch.from_numpy(m[at]) for m in got])


def _accumulate(
    served: ServedFeatures,
    sqs: list[ScoredQuery],
    batches: dict[int, _Int8Batch | _FloatBatch],
    data: dict[int, torch.Tensor],
    at: slice | np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ŝ and E ``[Q, rows]`` (float64) of the held rows ``data`` (index rows ``at``): the approximate scores
    summed over checkpoints with their multipliers, and rigorous bounds on their distance to the exact ones."""
    s_hat = err = None
    for c, qb in batches.items():
        t, e = _block_terms(served, qb, c, data[c], at)
        mu = _multipliers(sqs, c, at)
        if mu is not None:
            t.mul_(mu)
            e.mul_(mu)
        s_hat = t if s_hat is None else s_hat.add_(t)
        err = e if err is None else err.add_(e)
    assert s_hat is not None and err is not None
    g = _multipliers(sqs, None, at)
    if g is not None:
        s_hat.mul_(g)
        err.mul_(g)
    err.mul_(1 + _SLACK).add_(s_hat.abs(), alpha=_SLACK)  # the float64 arithmetic of ŝ and E themselves
    return s_hat, err


def _select(low: torch.Tensor, high: torch.Tensor, k: int, directions: tuple[str, ...]) -> dict[str, Selection]:
    """Per direction, each query's k-th largest lower bound (``[Q]``) and the rows whose upper bound reaches it
    (``[Q, N]`` bool), from ``low = ŝ − E`` and ``high = ŝ + E`` (``[Q, N]``). Proponents: lower ŝ − E, upper
    ŝ + E; opponents: lower −(ŝ + E), upper −(ŝ − E) (negation is exact: the same values as −ŝ − E and −ŝ + E).
    torch.topk only selects: the value np.partition gives."""
    k = min(k, low.shape[1])
    parallel = low.shape[0] >= PARALLEL_QUERIES
    out: dict[str, Selection] = {}
    for d in directions:
        if d == "proponents":
            kth = torch.topk(low, k, dim=1, sorted=False).values.amin(dim=1)
            reach = torch.ge(high, kth[:, None]).numpy() if parallel else high.numpy() >= kth.numpy()[:, None]
        else:
            kth = -torch.topk(high, k, dim=1, largest=False, sorted=False).values.amax(dim=1)
            reach = torch.le(low, -kth[:, None]).numpy() if parallel else low.numpy() <= -kth.numpy()[:, None]
        out[d] = Selection(kth.numpy(), reach)
    return out


@dataclass
class Selection:
    kth: np.ndarray  # [Q] each query's k-th best lower bound
    reach: np.ndarray  # [Q, N] the rows whose upper bound reaches it


def scan(
    served: ServedFeatures, sq: ScoredQuery, k: int, directions: tuple[str, ...] = ("proponents",)
) -> dict[str, TopK]:
    """Exact top-k rows per direction, from one pass over the features (see the module docstring)."""
    return scan_batch(served, [sq], k, directions)[0]


def scan_batch(
    served: ServedFeatures, sqs: list[ScoredQuery], k: int, directions: tuple[str, ...] = ("proponents",)
) -> list[dict[str, TopK]]:
    """:func:`scan` of several queries in one pass over the features: every block is multiplied by all the
    queries at once (one int8 GEMM per block and checkpoint instead of one product per query), and each
    query keeps its own bounds and certificate, so each answer is the one :func:`scan` gives alone."""
    for d in directions:
        if d not in DIRECTIONS:
            raise ValueError(f"direction must be proponents or opponents, got {d!r}")
    if not sqs:
        return []
    cks = sqs[0].checkpoints
    if any(sq.checkpoints != cks for sq in sqs):
        raise ValueError("a batch scan needs the same checkpoints for every query")
    k = max(1, min(int(k), served.n))
    if served.mode == "stream":
        return _scan_streamed(served, sqs, k, directions)
    return _scan_resident(served, sqs, k, directions)


def _answer(rows: np.ndarray, terms: np.ndarray, sign: float, k: int, strategy: str, timings: dict[str, float]) -> TopK:
    """The top-k of the rescored ``rows`` (``terms``: their signed exact per-checkpoint terms)."""
    total = terms.sum(axis=1)
    top = _top(total, rows, k)
    return TopK(
        rows=rows[top],
        scores=sign * total[top],
        contributions=sign * terms[top],
        exact=True,
        candidates=int(len(rows)),
        strategy=strategy,
        timings=timings,
    )


def _batches(served: ServedFeatures, sqs: list[ScoredQuery], kind: str) -> dict[int, _Int8Batch | _FloatBatch]:
    cks = sqs[0].checkpoints
    if kind == "int8":
        return {c: _Int8Batch([_Int8Query(sq.vectors[c]) for sq in sqs]) for c in cks}
    return {c: _FloatBatch([sq.vectors[c] for sq in sqs], served.device) for c in cks}


def _scan_resident(
    served: ServedFeatures, sqs: list[ScoredQuery], k: int, directions: tuple[str, ...]
) -> list[dict[str, TopK]]:
    """The scan of resident features (CPU or GPU): every query's bounds ŝ ± E held as ``[Q, N]`` float64,
    worked block by block with in-place torch ops (multi-threaded for a batch), then the rows that reach
    each query's k-th best lower bound rescored exactly."""
    t0 = time.perf_counter()
    cks = sqs[0].checkpoints
    nq, n = len(sqs), served.n
    kind = served.kernel_kind()
    batches = _batches(served, sqs, kind)
    low = torch.empty((nq, n), dtype=torch.float64)
    high = torch.empty((nq, n), dtype=torch.float64)
    for block in served.blocks(cks):
        at = slice(block.lo, block.hi)
        s_hat, err = _accumulate(served, sqs, batches, block.data, at)
        torch.sub(s_hat, err, out=low[:, at])
        torch.add(s_hat, err, out=high[:, at])
    t_scan = time.perf_counter() - t0
    t1 = time.perf_counter()
    selected = _select(low, high, k, directions)
    strategy = f"scan/{served.mode}/{kind}" + (f"/batch[{nq}]" if nq > 1 else "")
    reach = [{d: np.flatnonzero(selected[d].reach[i]) for d in directions} for i in range(nq)]
    answers = []
    for i, sq in enumerate(sqs):
        rows = np.unique(np.concatenate(list(reach[i].values())))  # both directions' rows rescored in one call
        terms = exact_contributions(served, sq, rows)
        out = {}
        for d in directions:
            sign = 1.0 if d == "proponents" else -1.0
            mine = terms[np.searchsorted(rows, reach[i][d])]
            timings = {"scan_s": t_scan, "rescore_s": time.perf_counter() - t1}
            out[d] = _answer(reach[i][d], sign * mine, sign, k, strategy, timings)
        answers.append(out)
    return answers


def _scan_streamed(
    served: ServedFeatures, sqs: list[ScoredQuery], k: int, directions: tuple[str, ...]
) -> list[dict[str, TopK]]:
    """The scan of streamed blocks: rows are rescored while their block is in memory, against each query's
    running k-th best lower bound (which only rises), so the store is read once."""
    t0 = time.perf_counter()
    cks = sqs[0].checkpoints
    nq, n = len(sqs), served.n
    kind = served.kernel_kind()
    batches = _batches(served, sqs, kind)
    approx = np.empty((nq, n))
    bound = np.empty((nq, n))
    # per query and direction: the running k-th best lower bound, and the rows rescored so far with their exact terms
    running = [{d: -np.inf for d in directions} for _ in sqs]
    pool_rows: list[dict[str, list[np.ndarray]]] = [{d: [] for d in directions} for _ in sqs]
    pool_terms: list[dict[str, list[np.ndarray]]] = [{d: [] for d in directions} for _ in sqs]
    best_lower = [{d: np.empty(0) for d in directions} for _ in sqs]
    t_rescore = 0.0
    for block in served.blocks(cks):
        lo, hi = block.lo, block.hi
        s_t, e_t = _accumulate(served, sqs, batches, block.data, slice(lo, hi))
        s_hat, err = s_t.numpy(), e_t.numpy()
        approx[:, lo:hi] = s_hat
        bound[:, lo:hi] = err
        t1 = time.perf_counter()
        for i, sq in enumerate(sqs):
            for d in directions:
                sign = 1.0 if d == "proponents" else -1.0
                lower = sign * s_hat[i] - err[i]
                best_lower[i][d] = _keep_largest(np.concatenate([best_lower[i][d], lower]), k)
                if len(best_lower[i][d]) >= k:
                    running[i][d] = float(best_lower[i][d].min())
                keep = np.flatnonzero(sign * s_hat[i] + err[i] >= running[i][d]) + lo
                if len(keep):
                    pool_rows[i][d].append(keep)
                    pool_terms[i][d].append(sign * exact_contributions(served, sq, keep, block))
        t_rescore += time.perf_counter() - t1
    t_scan = time.perf_counter() - t0 - t_rescore
    strategy = f"scan/{served.mode}/{kind}" + (f"/batch[{nq}]" if nq > 1 else "")
    t1 = time.perf_counter()
    low, high = torch.from_numpy(approx - bound), torch.from_numpy(approx + bound)
    thresholds = {d: sel.kth for d, sel in _select(low, high, k, directions).items()}
    answers = []
    for i in range(nq):
        out = {}
        for d in directions:
            sign = 1.0 if d == "proponents" else -1.0
            rows = np.concatenate(pool_rows[i][d]) if pool_rows[i][d] else np.empty(0, np.int64)
            terms = np.concatenate(pool_terms[i][d]) if pool_terms[i][d] else np.zeros((0, len(cks)))
            mask = sign * approx[i][rows] + bound[i][rows] >= float(thresholds[d][i])
            rows, terms = rows[mask], terms[mask]
            timings = {"scan_s": t_scan, "rescore_s": t_rescore + time.perf_counter() - t1}
            out[d] = _answer(rows, terms, sign, k, strategy, timings)
        answers.append(out)
    return answers


def _keep_largest(v: np.ndarray, k: int) -> np.ndarray:
    if len(v) <= k:
        return v
    return np.partition(v, len(v) - k)[len(v) - k :]


def restricted(served: ServedFeatures, sq: ScoredQuery, rows: np.ndarray, k: int, directions: tuple[str, ...]):
    """Top-k among ``rows`` only (a pre-filter's candidates), scored exactly: approximate overall."""
    t0 = time.perf_counter()
    rows = np.unique(np.asarray(rows, np.int64))
    terms = exact_contributions(served, sq, rows)
    out = {}
    for d in directions:
        sign = 1.0 if d == "proponents" else -1.0
        total = sign * terms.sum(axis=1)
        top = _top(total, rows, k)
        out[d] = TopK(
            rows[top],
            sign * total[top],
            terms[top],
            exact=False,
            candidates=len(rows),
            strategy="prefilter",
            timings={"scan_s": 0.0, "rescore_s": time.perf_counter() - t0},
        )
    return out


def brute_force(served: ServedFeatures, sq: ScoredQuery, block: int = 4096) -> np.ndarray:
    """Every row's exact score ``[N]`` (float64): the definition the scan is tested against."""
    out = np.empty(served.n)
    for lo in range(0, served.n, block):
        rows = np.arange(lo, min(served.n, lo + block))
        out[rows] = exact_contributions(served, sq, rows).sum(axis=1)
    return out
