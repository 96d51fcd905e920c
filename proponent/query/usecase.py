"""The one query path: a typed query in, a typed answer out.

``answer(index, params, x=..., sample_id=...)`` is called by the REST route, the CLI
(``proponent influence``), the Python API (``InfluenceIndex.influence``) and the report, so they
give the same answer to the same question. ``params`` is the API's :class:`InfluenceParams`;
the answer is the API's :class:`InfluenceResponse`.

A stored sample is answered like an upload of its exact stored input: its gradient is
recomputed with fresh query draws (independent of the index's draws, as paper eq. 10 wants,
and with per-hit standard errors). ``features="stored"`` uses the index's stored features of
that sample instead (no featurization; the query then shares the training side's draws). The
label of a stored sample is its stored label unless given; a classifier query without a label
is an error that says so.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from proponent.api.registry import PRECONDITIONS
from proponent.api.schemas import Hit, InfluenceParams, InfluenceResponse, QueryInfo, SearchStats, Timings
from proponent.format.curvature import KINDS as CURVATURE_KINDS
from proponent.format.precond import PreconditionError
from proponent.query.crossloss import make_query_objective
from proponent.query.scoring import multipliers
from proponent.query.searcher import SearchRequest, search_all

if TYPE_CHECKING:
    from proponent.query.index import InfluenceIndex
    from proponent.query.scan import TopK


class QueryError(ValueError):
    """A query that cannot be answered as asked (the message says why)."""


def _query_features(
    index: InfluenceIndex, params: InfluenceParams, x: np.ndarray | None, row: int | None, cks: list[int]
):
    """Per-checkpoint query vectors, exact squared norms, per-draw vectors (or None), and m; under a K-FAC /
    EK-FAC ``params.precondition`` already preconditioned (:mod:`proponent.query.curvature`)."""
    meta = index.meta
    label = params.label
    if label is None and row is not None:
        label = meta.label_of(row)
    if params.features == "stored":
        if row is None:
            raise QueryError("features='stored' needs a stored sample (sample_id), not an upload")
        if params.objective != "elbo" or (params.label is not None and params.label != meta.label_of(row)):
            raise QueryError("features='stored' answers with the training objective only (objective elbo, own label)")
        if params.precondition in CURVATURE_KINDS:  # the row's exact gradient with its own draws
            vec, sq, _ = _curvature_query(
                index, params, index.runtime.objective, index.input(row), label, cks, False, row
            )
            return vec, sq, None, 1, label
        vec = {c: index.store.feature_rows(c, np.array([row]))[0] for c in cks}
        sq = {c: float(index.features.sq_norm[c][row]) for c in cks}
        return vec, sq, None, 1, label
    if x is None:
        assert row is not None
        x = index.input(row)
    objective = make_query_objective(index, params.objective, beta=params.beta, label=label)
    if params.precondition in CURVATURE_KINDS:
        vec, sq, draws = _curvature_query(index, params, objective, x, label, cks, params.uncertainty, None)
        return vec, sq, draws, int(objective.m), label
    labels = None if label is None else np.array([label], np.int64)
    qf = index.runtime.featurize(
        x[None], objective=objective, seed=params.seed, labels=labels, checkpoints=cks, per_draw=params.uncertainty
    )
    vec = {c: qf.mean[c][0] for c in cks}
    sq = {c: float(qf.sq_norm[c][0]) for c in cks}
    draws = None if qf.per_draw is None else {c: qf.per_draw[c][0] for c in cks}
    m = int(objective.m)
    return vec, sq, draws, m, label


def _curvature_query(
    index: InfluenceIndex,
    params: InfluenceParams,
    objective: Any,
    x: np.ndarray,
    label: int | None,
    cks: list[int],
    per_draw: bool,
    row: int | None,
):
    """:func:`proponent.query.curvature.query_features`, its refusals as :class:`QueryError`.

    A sketched index refuses K-FAC / EK-FAC queries: the preconditioned query mapped through the sketch scores
    the rows with an error several times the scores themselves, and the measured LDS falls far below
    unpreconditioned TracIn's (``benchmarks/results/lds_served_digits_paired.txt``)."""
    from proponent.query.curvature import query_features  # lazy: torch-side code of K-FAC queries only

    if not index.manifest.projection.is_exact:
        raise QueryError(
            f"precondition={params.precondition}: this index is sketched (projection "
            f"{index.manifest.projection.kind}), and a query preconditioned per layer and mapped through a sketch "
            "is worse than none (K-FAC: measured LDS 0.14 against 0.36 unpreconditioned on digits); index with "
            f"--projection none for {params.precondition} answers, or use precondition=none|gram here (the "
            f"{params.precondition} leverage of self-influence jobs is exact on any index)"
        )

    try:
        return query_features(
            index,
            params.precondition,
            objective,
            x,
            label,
            seed=params.seed,
            checkpoints=cks,
            per_draw=per_draw,
            index_row=row,
        )
    except PreconditionError as e:
        raise QueryError(str(e)) from None


def _precondition(
    index: InfluenceIndex,
    precondition: str,
    cks: list[int],
    vec: dict[int, np.ndarray],
    sq: dict[int, float],
    draws: dict[int, np.ndarray] | None,
):
    """The query as ``precondition`` scores it: ``P_c q_c`` (and each draw's), ``q_cᵀ P_c q_c`` for the norms
    (K-FAC / EK-FAC: made so by :func:`_query_features` already)."""
    if PRECONDITIONS.check(precondition) == "none" or precondition in CURVATURE_KINDS:
        return vec, sq, draws
    try:
        pre = index.preconditioner()
    except PreconditionError as e:
        raise QueryError(str(e)) from None
    both = {c: pre[c].apply_quad(vec[c]) for c in cks}
    new_vec = {c: both[c][0] for c in cks}
    new_sq = {c: both[c][1] for c in cks}
    new_draws = None if draws is None else {c: pre[c].apply(draws[c]) for c in cks}
    return new_vec, new_sq, new_draws


def _prefilter_rows(
    index: InfluenceIndex, params: InfluenceParams, x: np.ndarray | None, row: int | None
) -> np.ndarray:
    meta = index.meta
    size = int(params.prefilter or 0)
    if meta.latent_mu is None:
        raise QueryError("this index stores no latent means (not a VAE): no latent pre-filter")
    if row is not None:
        mu = meta.latent_mu[row]
    else:
        assert x is not None
        mu = index.runtime.latent_means(x[None])[0]
    d = ((meta.latent_mu - np.asarray(mu, np.float32)[None, :]) ** 2).sum(axis=1)
    size = min(size, meta.n)
    return np.argpartition(d, size - 1)[:size] if size < meta.n else np.arange(meta.n)


@dataclass
class _Prepared:
    """A query featurized and turned into a search request, with what its answer reports."""

    request: SearchRequest
    sample_id: int | None
    m: int
    use_ann: bool
    cks: list[int]
    t0: float
    featurize_s: float
    decode_ms: float


def _featurize_batch(
    index: InfluenceIndex, params: InfluenceParams, items: list[tuple[np.ndarray | None, int | None]], chunk: int = 64
) -> list[tuple | None]:
    """The query features of a batch's uploads and stored samples, as :func:`_query_features` gives each alone,
    from one forward/backward per ``chunk`` queries of the same label (each query keeps its own noise: the
    key it has alone). Float32 featurization is not batch-shape invariant, so a feature may differ from the
    query's single one by float32 rounding. None where nothing is featurized (``features='stored'``)."""
    if params.features == "stored" or params.precondition in CURVATURE_KINDS:  # featurized one by one
        return [None] * len(items)
    meta = index.meta
    cks = meta.resolve_checkpoints(params.checkpoints)
    groups: dict[int | None, list[tuple[int, np.ndarray]]] = {}
    for i, (x, sid) in enumerate(items):
        row = meta.row_of(sid) if sid is not None else None
        if x is None:
            assert row is not None
            x = index.input(row)
        x = np.asarray(x, np.float32)
        if x.shape != index.shape:
            raise QueryError(f"query shape {list(x.shape)} does not match the index's input shape {list(index.shape)}")
        label = params.label if params.label is not None or row is None else meta.label_of(row)
        groups.setdefault(label, []).append((i, x))
    out: list[tuple | None] = [None] * len(items)
    for label, members in groups.items():
        objective = make_query_objective(index, params.objective, beta=params.beta, label=label)
        for lo in range(0, len(members), chunk):
            part = members[lo : lo + chunk]
            t0 = time.perf_counter()
            qf = index.runtime.featurize(
                np.stack([x for _, x in part]),
                objective=objective,
                seed=params.seed,
                labels=None if label is None else np.full(len(part), label, np.int64),
                checkpoints=cks,
                per_draw=params.uncertainty,
                draw_ids=np.zeros(len(part), np.int64),
            )
            share = (time.perf_counter() - t0) / len(part)
            for j, (i, _) in enumerate(part):
                vec = {c: qf.mean[c][j] for c in cks}
                sq = {c: float(qf.sq_norm[c][j]) for c in cks}
                draws = None if qf.per_draw is None else {c: qf.per_draw[c][j] for c in cks}
                out[i] = (vec, sq, draws, int(objective.m), share)
    return out


def _prepare(
    index: InfluenceIndex,
    params: InfluenceParams,
    x: np.ndarray | None,
    sample_id: int | None,
    decode_ms: float,
    features: tuple | None = None,
) -> _Prepared:
    """The query's search request; ``features`` (from :func:`_featurize_batch`) instead of featurizing it."""
    t0 = time.perf_counter()
    if (x is None) == (sample_id is None):
        raise QueryError("give exactly one of an input x or a sample_id")
    meta = index.meta
    row = meta.row_of(sample_id) if sample_id is not None else None
    cks = meta.resolve_checkpoints(params.checkpoints)
    if x is not None:
        x = np.asarray(x, np.float32)
        if x.shape != index.shape:
            raise QueryError(f"query shape {list(x.shape)} does not match the index's input shape {list(index.shape)}")
    shared_s = 0.0
    if features is not None:
        vec, sqn, draws, m, shared_s = features
    else:
        vec, sqn, draws, m, _ = _query_features(index, params, x, row, cks)
    vec, sqn, draws = _precondition(index, params.precondition, cks, vec, sqn, draws)
    directions: tuple[str, ...] = ("proponents", "opponents") if params.direction == "both" else (params.direction,)
    use_ann = not params.prefilter and (params.search == "ann" or (params.search == "auto" and index.has_ann))
    if params.search == "ann" and not index.has_ann:
        if index.manifest.ann.kind != "none":
            raise QueryError("search='ann': this server answers with the exact scan only (sharded serving)")
        raise QueryError("search='ann' needs an index built with an ANN kind (--index-kind ivf:..., hnsw:...)")
    request = SearchRequest(
        vectors=vec,
        sq_norms=sqn,
        weights=meta.weights(params.convention),
        checkpoints=cks,
        scoring=params.scoring,
        k=min(params.k, meta.n),
        directions=directions,
        draws=draws if (draws is not None and m > 1) else None,
        candidates=_prefilter_rows(index, params, x, row) if params.prefilter else None,
        use_ann=use_ann,
        allow_partial=params.allow_partial,
        precondition=params.precondition,
    )
    return _Prepared(request, sample_id, m, use_ann, cks, t0, time.perf_counter() - t0 + shared_s, decode_ms)


def answer(
    index: InfluenceIndex,
    params: InfluenceParams,
    *,
    x: np.ndarray | None = None,
    sample_id: int | None = None,
    decode_ms: float = 0.0,
) -> InfluenceResponse:
    """Proponents and/or opponents of an input ``x [*shape]`` or a stored sample (see the module docstring)."""
    prep = _prepare(index, params, x, sample_id, decode_ms)
    t1 = time.perf_counter()
    results = index.searcher.search(prep.request)
    return _respond(index, params, prep, results, time.perf_counter() - t1)


def answer_batch(
    index: InfluenceIndex,
    params: InfluenceParams,
    *,
    xs: np.ndarray | list[np.ndarray] | None = None,
    sample_ids: list[int] | None = None,
    decode_ms: float = 0.0,
) -> list[InfluenceResponse]:
    """:func:`answer` for many queries with the same parameters -- inputs ``xs [B, *shape]`` or stored
    ``sample_ids`` -- featurized together (one forward/backward per 64 queries of a label, each with the
    noise it has alone: :func:`_featurize_batch`), the exact scans done in one pass over the rows (a GEMM
    per block: :func:`~proponent.query.scan.scan_batch`). Each answer equals the query's single answer up to
    the float32 rounding of a batched featurization (the same hits but at ties that close; scores within
    about 1e-6 relative); its ``search_ms`` is the batch's shared search time, ``featurize_ms`` its share."""
    if (xs is None) == (sample_ids is None):
        raise QueryError("give exactly one of inputs xs or sample_ids")
    items: list[tuple[np.ndarray | None, int | None]] = (
        [(np.asarray(x), None) for x in xs] if xs is not None else [(None, int(i)) for i in sample_ids or []]
    )
    if not items:
        raise QueryError("a batch needs at least one query")
    feats = _featurize_batch(index, params, items)
    preps = [
        _prepare(index, params, x, sid, decode_ms / len(items), f) for (x, sid), f in zip(items, feats, strict=True)
    ]
    t1 = time.perf_counter()
    results = search_all(index.searcher, [p.request for p in preps])
    search_s = time.perf_counter() - t1
    return [_respond(index, params, p, r, search_s) for p, r in zip(preps, results, strict=True)]


def _respond(
    index: InfluenceIndex, params: InfluenceParams, prep: _Prepared, results: dict[str, TopK], search_s: float
) -> InfluenceResponse:
    t_resp = time.perf_counter()
    meta = index.meta
    m, cks, use_ann = prep.m, prep.cks, prep.use_ann
    out: dict[str, Any] = {}
    unresolved: dict[str, list[list[int]]] = {}
    search: dict[str, SearchStats] = {}
    for d, res in results.items():
        sign = 1.0 if d == "proponents" else -1.0
        per_draw = res.per_draw
        hits = []
        pairs = []
        for i, (r, s, contrib) in enumerate(zip(res.rows, res.scores, res.contributions, strict=True)):
            stderr = sep = None
            if per_draw is not None:
                stderr = float(per_draw[:, i].std(ddof=1) / np.sqrt(m))
                if i + 1 < len(res.rows):
                    diff = per_draw[:, i] - per_draw[:, i + 1]
                    se = float(diff.std(ddof=1) / np.sqrt(m))
                    sep = bool(sign * (s - res.scores[i + 1]) >= 2 * se)
                    if not sep:
                        pairs.append([i + 1, i + 2])
            hits.append(
                Hit(
                    rank=i + 1,
                    score=float(s),
                    contributions=[float(v) for v in contrib],
                    stderr=stderr,
                    separated_from_next=sep,
                    **meta.hit_meta(int(r)),
                )
            )
        out[d] = hits
        unresolved[d] = pairs
        search[d] = SearchStats(strategy=res.strategy, candidates=res.candidates, exact=res.exact)
    respond_s = time.perf_counter() - t_resp
    missing = sorted({tuple(m) for r in results.values() for m in r.missing})
    exact = all(r.exact for r in results.values()) and not missing
    approximations = meta.approximations(
        cks, prefilter=params.prefilter, ann_used=use_ann, precondition=params.precondition
    )
    if missing:
        ranges = ", ".join(f"{lo}..{hi - 1}" for lo, hi in missing)
        approximations.append(f"partial answer: the shards holding rows {ranges} did not answer")
    return InfluenceResponse(
        query=QueryInfo(
            seed=params.seed,
            objective=params.objective,
            convention=params.convention,
            scoring=params.scoring,
            precondition=params.precondition,
            checkpoints=cks,
            shape=list(index.shape),
            sample_id=prep.sample_id,
            features=params.features,
            m=m,
        ),
        proponents=out.get("proponents"),
        opponents=out.get("opponents"),
        exact=exact,
        approximations=approximations,
        search=search,
        timings=Timings(
            decode_ms=prep.decode_ms,
            featurize_ms=prep.featurize_s * 1e3,
            search_ms=search_s * 1e3,
            total_ms=(prep.featurize_s + search_s + respond_s) * 1e3 + prep.decode_ms,
        ),
        unresolved=unresolved,
        partial=bool(missing),
    )


@dataclass
class QueryVectors:
    """A query's features at every searched checkpoint, as the answer uses them."""

    vectors: dict[int, np.ndarray]  # c -> [D] float32 (preconditioned: P_c q_c, float64)
    sq_norms: dict[int, float]  # c -> exact squared norm of the query gradient (preconditioned: q_cᵀP_cq_c)
    checkpoints: list[int]
    precondition: str = "none"


def query_vectors(
    index: InfluenceIndex, params: InfluenceParams, *, x: np.ndarray | None = None, sample_id: int | None = None
) -> QueryVectors:
    """The query's features, featurized exactly as :func:`answer` does (without per-draw features)."""
    if (x is None) == (sample_id is None):
        raise QueryError("give exactly one of an input x or a sample_id")
    row = index.meta.row_of(sample_id) if sample_id is not None else None
    cks = index.meta.resolve_checkpoints(params.checkpoints)
    xx = None if x is None else np.asarray(x, np.float32)
    vec, sqn, _, _, _ = _query_features(index, params.model_copy(update={"uncertainty": False}), xx, row, cks)
    vec, sqn, _ = _precondition(index, params.precondition, cks, vec, sqn, None)
    return QueryVectors(vec, sqn, cks, params.precondition)


def raw_dots(index: InfluenceIndex, qv: QueryVectors, block: int = 4096) -> dict[int, np.ndarray]:
    """Exact float64 inner products ``<q_c, f_c(i)>`` of every training row, per checkpoint (``[N]`` each)."""
    served = index.features
    out = {c: np.empty(served.n) for c in qv.checkpoints}
    for lo in range(0, served.n, block):
        rows = np.arange(lo, min(served.n, lo + block))
        for c in qv.checkpoints:
            out[c][rows] = served.exact_rows(c, rows) @ np.asarray(qv.vectors[c], np.float64)
    return out


def combine(
    index: InfluenceIndex,
    qv: QueryVectors,
    dots: dict[int, np.ndarray],
    *,
    scoring: str,
    convention: str = "lr",
    checkpoints: list[int] | None = None,
) -> np.ndarray:
    """Every row's score ``[N]`` under ``scoring`` from :func:`raw_dots` (any subset of the query's checkpoints)."""
    cks = qv.checkpoints if checkpoints is None else index.meta.resolve_checkpoints(checkpoints)
    mult = multipliers(index.features, index.meta.weights(convention), cks, qv.sq_norms, scoring, qv.precondition)
    return mult.combine(dots)


def all_scores(
    index: InfluenceIndex, params: InfluenceParams, *, x: np.ndarray | None = None, sample_id: int | None = None
) -> np.ndarray:
    """Every training row's exact score ``[N]`` for one query, featurized and scored as :func:`answer` does."""
    qv = query_vectors(index, params, x=x, sample_id=sample_id)
    return combine(index, qv, raw_dots(index, qv), scoring=params.scoring, convention=params.convention)


SCORE_DTYPE = np.dtype([("id", "<i8"), ("score", "<f8")])
_NOT_FOR_SCORES = {
    "k": "a score vector has every row",
    "direction": "a score vector has every row",
    "prefilter": "a score vector is exact over every row",
    "allow_partial": "a score vector is exact over every row",
}


def score_vector(
    index: InfluenceIndex, params: InfluenceParams, *, x: np.ndarray | None = None, sample_id: int | None = None
) -> np.ndarray:
    """Every training sample's score for one query, as ``[N]`` records ``(id int64, score float64)`` in row
    order: the query featurized as :func:`answer` does, every row scored exactly over the stored features
    (the answer's scan ranks by the same scores). ``GET/POST /v1/scores``, ``proponent scores`` and
    ``InfluenceClient.scores`` return this."""
    for name, why in _NOT_FOR_SCORES.items():
        if name in params.model_fields_set:
            raise QueryError(f"{name}: not a parameter of a score vector ({why})")
    if params.search == "ann":
        raise QueryError("search: a score vector is exact over every row (no ANN index)")
    if x is not None:
        x = np.asarray(x, np.float32)
        if x.shape != index.shape:
            raise QueryError(f"query shape {list(x.shape)} does not match the index's input shape {list(index.shape)}")
    scores = all_scores(index, params, x=x, sample_id=sample_id)
    out = np.empty(len(scores), SCORE_DTYPE)
    out["id"] = index.meta.ids
    out["score"] = scores
    return out


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a ``.npy`` file (no pickles)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()
