"""The index job's fidelity check: how well the stored features rank against exact gradients.

Every finished index measures its own sketch: at every checkpoint, ``queries`` rows of the index
are scored against a pool of ``pool`` other rows twice -- with the stored features (at stored
precision: the int8 codes times their scales, what a query scan reads) and with the exact
per-sample gradients of the same layers (the index's featurizer with the identity layout,
``--projection none``, which the tests hold equal to torch.func's; the index's own noise draws) --
and the two rankings are compared:

* ``recall@10`` of the exact top-10 proponents (largest scores) and opponents (smallest), the
  median over the queries;
* the relative score error ``||s_stored - s_exact|| / ||s_exact||`` over the pool, the median.

The bar is the one the default layout was chosen by (README "Indexing"): median recall@10
>= 0.95 for proponents and >= 0.90 for opponents; below it the answers' ``approximations`` and the
index info carry a warning. Rows are chosen by a generator seeded with the index's seed, so a
resumed, sharded or distributed job records the same figures. The check costs ``queries + pool``
exact per-sample gradients per checkpoint (a few seconds on digits; ``timings.json`` records its time,
outside the checksummed manifest).

Its memory is bounded (:func:`plan`): the queries' exact gradients are held in float32 and multiplied in
float64 one block of columns at a time, the pool's arrive ``chunk`` rows at a time; when ``queries`` rows
would not fit in the budget (:data:`MEMORY_ENV`, default 2 GiB) the chunk shrinks, then the number of
queries (down to :data:`MIN_QUERIES`); a model whose exact gradients do not fit even then is not checked,
and the job says so (a reason, never a silent pass).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from proponent.format import whiten as wfmt
from proponent.format.manifest import FidelityCheck, FidelityRecord, Manifest
from proponent.format.store import FeatureStore
from proponent.model.featurizers import make_featurizer
from proponent.model.objectives import NOISE_INDEX, Objective, draw_noise
from proponent.model.projection import ProjectionSpec, Projector, discover_layers, select_layers

QUERIES = 32
POOL = 128
TOP = 10
BAR_PROPONENTS = 0.95
BAR_OPPONENTS = 0.90
_CHUNK = 32  # rows per exact-gradient pass
WINDOW = 2048
MIN_QUERIES = 4
MEMORY_ENV = "PROPONENT_FIDELITY_MEMORY"
DEFAULT_MEMORY = 2 << 30
_BLOCK = 1 << 16  # columns per float64 product block
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def memory_budget(value: str | None = None) -> int:
    """Bytes the check may hold: ``value`` or the environment's :data:`MEMORY_ENV` (a number of bytes with an
    optional K/M/G/T suffix, binary), default 2 GiB."""
    raw = os.environ.get(MEMORY_ENV, "") if value is None else value
    text = raw.strip().upper().removesuffix("IB").removesuffix("B")
    if not text:
        return DEFAULT_MEMORY
    unit = text[-1] if text[-1] in _SUFFIX else ""
    try:
        n = float(text[: len(text) - len(unit)])
    except ValueError:
        n = -1.0
    if not n > 0:
        raise ValueError(f"{MEMORY_ENV}={raw!r}: give a positive size in bytes, e.g. 512M or 4G")
    return int(n * _SUFFIX[unit])


def exact_dim(model: nn.Module, selection: str) -> int:
    """Entries of one exact per-sample gradient of the selected layers."""
    return sum(lay.in_dim * lay.out_dim + lay.bias_dim for lay in select_layers(discover_layers(model), selection))


def _needed(dim: int, queries: int, chunk: int) -> int:
    """Bytes held at once: the queries' gradients (float32), one chunk's (float32 features and about two
    float32 copies inside the featurizer), the float64 blocks of the product."""
    return queries * dim * 4 + chunk * dim * 12 + (queries + chunk) * min(dim, _BLOCK) * 8


def plan(dim: int, queries: int, budget: int) -> tuple[int, int] | str:
    """``(queries, chunk)`` that fit in ``budget`` bytes for exact gradients of ``dim`` entries (the chunk
    shrinks first, then the queries, not below :data:`MIN_QUERIES`), or the reason the check is skipped."""
    q, chunk = queries, _CHUNK
    while _needed(dim, q, chunk) > budget and chunk > 1:
        chunk //= 2
    while _needed(dim, q, chunk) > budget and q > min(MIN_QUERIES, queries):
        q = max(min(MIN_QUERIES, queries), q // 2)
    if _needed(dim, q, chunk) > budget:
        need = _needed(dim, q, chunk) / 2**30
        return (
            f"skipped: exact gradients of {dim:,} entries need {need:.2f} GiB for {q} queries, above the "
            f"{budget / 2**30:.2f} GiB budget ({MEMORY_ENV})"
        )
    return q, chunk


def _dot64(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """``a @ b.T`` in float64 (``a [Q, D]``, ``b [P, D]`` float32), converted a block of columns at a time."""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for s in range(0, a.shape[1], _BLOCK):
        out += a[:, s : s + _BLOCK].double() @ b[:, s : s + _BLOCK].double().T
    return out.cpu().numpy()


def choose_rows(
    n: int, seed: int, queries: int | None = None, pool: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(query rows, pool rows)``: disjoint, sorted, drawn by a generator seeded with ``seed`` from a window
    of :data:`WINDOW` consecutive rows at a seeded offset (the reads stay a few storage chunks at any N);
    for a small index the queries take at most a quarter of the rows."""
    q = min(QUERIES if queries is None else queries, max(1, n // 4))
    p = min(POOL if pool is None else pool, n - q)
    rng = np.random.default_rng([seed, 0xF1DE])
    w = min(n, WINDOW)
    start = int(rng.integers(0, n - w + 1))
    rows = start + rng.permutation(w)[: q + p]
    return np.sort(rows[:q]), np.sort(rows[q:])


def recall_at(exact: np.ndarray, approx: np.ndarray, k: int, largest: bool) -> float:
    """Share of the exact top-k (largest or smallest) found in the approximate top-k."""
    k = min(k, len(exact))
    if k == 0:
        return 1.0
    sign = -1.0 if largest else 1.0
    want = set(np.argsort(sign * exact, kind="stable")[:k].tolist())
    got = set(np.argsort(sign * approx, kind="stable")[:k].tolist())
    return len(want & got) / k


def score_agreement(exact: np.ndarray, approx: np.ndarray, k: int = TOP) -> dict[str, float]:
    """Medians over the queries (rows) of recall@k both ways and of the relative score error."""
    pro = [recall_at(e, a, k, True) for e, a in zip(exact, approx, strict=True)]
    opp = [recall_at(e, a, k, False) for e, a in zip(exact, approx, strict=True)]
    err = [
        float(np.linalg.norm(a - e)) / max(float(np.linalg.norm(e)), 1e-300) for e, a in zip(exact, approx, strict=True)
    ]
    return {
        "recall_proponents": float(np.median(pro)),
        "recall_opponents": float(np.median(opp)),
        "relative_error": float(np.median(err)),
    }


def check_checkpoint(
    man: Manifest,
    store: FeatureStore,
    c: int,
    model: nn.Module,
    objective: Objective,
    device: torch.device,
    queries: np.ndarray,
    pool: np.ndarray,
    chunk: int = _CHUNK,
) -> FidelityCheck:
    """The check at checkpoint ``c`` (``model`` holds its weights, parameters requiring grad), computing
    ``chunk`` exact gradients at a time."""
    layers = select_layers(discover_layers(model), man.projection.selection)
    exact_proj = Projector(layers, ProjectionSpec(kind="none"), device)
    white = wfmt.load(store.where, man, c)
    if white is not None:  # a whitened index stores L G Rᵀ: the exact answer is the whitened gradients'
        exact_proj.set_whitening(white)
    feat = make_featurizer(man.featurizer, model, objective, exact_proj)
    ids = store.array("ids")
    labels = store.array("labels")
    noise_shape = objective.noise_shape(model)

    def grads(rows: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(store.inputs(rows)).to(device)
        y = torch.from_numpy(np.clip(labels[rows], 0, None)).to(device)
        eps = draw_noise(NOISE_INDEX, man.objective.seed, c, ids[rows], man.objective.m, noise_shape).to(device)
        return feat.featurize(x, y, eps).features

    gq = torch.cat([grads(queries[s : s + chunk]).float() for s in range(0, len(queries), chunk)])
    exact = np.concatenate([_dot64(gq, grads(pool[s : s + chunk]).float()) for s in range(0, len(pool), chunk)], axis=1)
    stored = store.feature_rows(c, queries) @ store.feature_rows(c, pool).T
    m = score_agreement(exact, stored)
    return FidelityCheck(
        checkpoint=c,
        passed=m["recall_proponents"] >= BAR_PROPONENTS and m["recall_opponents"] >= BAR_OPPONENTS,
        **m,
    )


def fidelity_record(checks: list[FidelityCheck], queries: int, pool: int) -> FidelityRecord:
    return FidelityRecord(
        queries=queries,
        pool=pool,
        top=TOP,
        bar_proponents=BAR_PROPONENTS,
        bar_opponents=BAR_OPPONENTS,
        checkpoints=checks,
    )
