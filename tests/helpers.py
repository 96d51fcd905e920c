"""Reference computations the tests hold the product to: plain float64 numpy over the stored features.

Written from the definitions (README "Queries", proponent.query.scoring's docstring), not from the
production code paths, so that a wrong weighting, sign, scaling or candidate set shows up.
"""

from __future__ import annotations

import numpy as np


def weights(index, convention: str) -> np.ndarray:
    out = []
    for ck in index.manifest.checkpoints:
        out.append(ck.lr if convention == "lr" else ck.lr * ck.batch_size * ck.steps_since_prev / index.n)
    return np.array(out, np.float64)


def stored_matrix(index, c: int) -> np.ndarray:
    """Stored features of checkpoint ``c`` as float64 ``[N, D]`` (int8: codes times row scale)."""
    store = index.store
    rows = []
    for k in range(store.layout.n_chunks):
        lo, hi = store.layout.chunk_range(k)
        block = store.feature_chunk(c, k).astype(np.float64)
        if store.dtype == np.int8:
            block *= store.scale(c)[lo:hi, None].astype(np.float64)
        rows.append(block)
    return np.concatenate(rows)


def reference_scores(
    index,
    vectors: dict[int, np.ndarray],
    sq_norms: dict[int, float] | None = None,
    *,
    scoring: str = "raw",
    convention: str = "lr",
    checkpoints=None,
) -> np.ndarray:
    cks = sorted(set(checkpoints)) if checkpoints is not None else list(range(len(index.checkpoints)))
    w = weights(index, convention)
    total = np.zeros(index.n)
    self_inf = sum(w[c] * index.store.sq_norm(c) for c in cks)
    for c in cks:
        raw = stored_matrix(index, c) @ (w[c] * np.asarray(vectors[c], np.float64))
        if scoring == "cosine":
            assert sq_norms is not None
            denom = np.sqrt(sq_norms[c] * index.store.sq_norm(c))
            raw = np.where(denom > 0, raw / np.where(denom > 0, denom, 1), 0.0)
        total += raw
    if scoring == "relatif":
        total = np.where(self_inf > 0, total / np.sqrt(np.where(self_inf > 0, self_inf, 1)), 0.0)
    return total


def top(index, total: np.ndarray, k: int, direction: str) -> tuple[list[int], np.ndarray]:
    """Ids and scores of the top-k (ties: the smaller row first)."""
    sign = 1.0 if direction == "proponents" else -1.0
    order = np.lexsort((np.arange(len(total)), -sign * total))[:k]
    return [int(i) for i in index.meta.ids[order]], total[order]


def query_vectors(index, x: np.ndarray, *, seed: int = 0, checkpoints=None, objective=None, label=None):
    """The query's per-checkpoint features and exact squared norms, from the index's featurizer."""
    cks = index.meta.resolve_checkpoints(checkpoints)
    labels = None if label is None else np.array([label])
    qf = index.runtime.featurize(x[None], objective=objective, seed=seed, labels=labels, checkpoints=cks)
    return {c: qf.mean[c][0] for c in cks}, {c: float(qf.sq_norm[c][0]) for c in cks}


def answer_key(res) -> dict:
    """What two answers must share to be the same answer (everything but timings and strategy names)."""
    out = {
        "exact": res.exact,
        "partial": res.partial,
        "approximations": res.approximations,
        "unresolved": res.unresolved,
    }
    for d in ("proponents", "opponents"):
        hits = getattr(res, d)
        out[d] = None if hits is None else [h.model_dump() for h in hits]
    return out


def build_small_index(run, out, **kw):
    """An index of a trained run (``checkpoints_from_run``) with small chunks and m=3 on CPU; ``kw`` overrides
    :class:`~proponent.indexer.job.IndexOptions`. Returns its path."""
    from pathlib import Path

    from proponent.indexer.job import IndexOptions, build_index, checkpoints_from_run

    specs, run_json = checkpoints_from_run(run)
    opts = IndexOptions(**{"m": 3, "device": "cpu", "chunk_rows": 64, "unit_rows": 64, **kw})
    return Path(build_index(run_json["data"]["spec"], specs, out, opts, show_progress=False))
