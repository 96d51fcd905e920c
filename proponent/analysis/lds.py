"""Linear datamodeling score (LDS): attribution scores judged against retraining.

TRAK (Park et al., ICML 2023) defines the yardstick: draw M random subsets ``S_j`` of the
training set (here each of ``fraction · N`` samples), retrain a model on each, and measure a
query's output ``f(z; θ_j)``. An attribution method predicts the effect of a whole subset by
summing its members' scores, ``g(z, S_j) = Σ_{i ∈ S_j} τ(z, i)``; its LDS for the query is the
Spearman rank correlation, over the subsets, between the prediction and the actual output. The
reported figure is the mean over queries.

For VAE-TracIn the output is the query's loss (paper eq. 6) under **fixed draws** -- the same
m draws ``ε`` for every retrained model, keyed by the query (domain :data:`NOISE_LDS`), so the
loss differences come from the training data, not from the Monte Carlo noise. A proponent
(positive score) lowers the query's loss, so the prediction is correlated with the **negative**
loss: higher predicted group influence should mean lower loss.

Seed scheme (documented so that caches are reusable and runs reproducible):

* subset ``j`` is the ``round(fraction · N)`` rows with the smallest keys of a Philox generator
  seeded by ``(NOISE_LDS, subset_seed, j)``: subset j does not depend on M;
* every subset model is trained with the full model's :class:`TrainConfig` (epochs, learning
  rate, batch size, optimiser, m), its ``seed`` included -- the same initialisation and the same
  minibatch-shuffle generator for every subset, so the models differ by their data only --
  unless ``vary_seed``, where subset j trains with ``seed + 1 + j``;
* the loss draws of query row r are ``draw_noise(NOISE_LDS, loss_seed, 0, [r], m, ...)``.

:func:`retrain_subsets` caches every trained model (``<workdir>/subsets/<key>/``, keyed by its data,
rows and configuration) and every loss vector (per query set and draws) on disk; re-running with
other attribution configurations reuses them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proponent.analysis.scoring_comparison import query_dots
from proponent.api.registry import SCORINGS
from proponent.format.curvature import eigenbases, kfac_eigenvalues, rotate
from proponent.format.fsio import atomic_write_bytes, atomic_write_json, read_json
from proponent.indexer.data import Dataset, load_dataset
from proponent.indexer.training import TrainConfig, train, training_objective
from proponent.model.architectures import ModelConfig
from proponent.model.checkpoints import load_checkpoint
from proponent.model.objectives import draw_noise
from proponent.query.usecase import combine

NOISE_LDS = 2
"""Noise domain of the LDS subsets and query-loss draws (index features use 0, queries 1)."""

__all__ = [
    "NOISE_LDS",
    "checkpoint_subsets",
    "fixed_query_noise",
    "lds_rows",
    "GramBlock",
    "KfacBlock",
    "kronecker_factors",
    "LdsCache",
    "open_lds_cache",
    "paired_difference",
    "lds_per_query",
    "predicted_group_influence",
    "query_losses",
    "retrain_subsets",
    "spearman_rows",
    "subset_masks",
    "summarize",
]


def subset_masks(n: int, n_subsets: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """``[n_subsets, n]`` boolean masks, each with ``round(fraction · n)`` rows (see the seed scheme)."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    size = max(1, min(n - 1, round(fraction * n)))
    masks = np.zeros((n_subsets, n), dtype=bool)
    for j in range(n_subsets):
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([NOISE_LDS, seed, j])))
        masks[j, np.argsort(rng.random(n), kind="stable")[:size]] = True
    return masks


def fixed_query_noise(n_queries: int, m: int, noise_shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """The fixed loss draws ``[n_queries, m, *noise_shape]`` (query row r keyed by (NOISE_LDS, seed, 0, r))."""
    return draw_noise(NOISE_LDS, seed, 0, np.arange(n_queries), m, noise_shape)


@torch.no_grad()
def query_losses(model: torch.nn.Module, model_config: ModelConfig, x: np.ndarray, eps: torch.Tensor) -> np.ndarray:
    """Per-query training loss (paper eq. 6) of ``model`` under the given draws, float64 ``[Q]``."""
    objective = training_objective(model_config, int(eps.shape[1]))
    model.eval()
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
    y = torch.zeros(len(xt), dtype=torch.int64)
    return objective.loss(model, xt, y, eps).double().numpy()


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            a = np.ascontiguousarray(p)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def retrain_subsets(
    data: Dataset,
    model_config: ModelConfig,
    train_config: TrainConfig,
    masks: np.ndarray,
    workdir: str | Path,
    query_x: np.ndarray,
    query_eps: torch.Tensor,
    *,
    vary_seed: bool = False,
    progress: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Train one model per subset (cached) and return the queries' losses ``[M, Q]``.

    A subset model lives in ``<workdir>/subsets/<key>/``, ``key`` a digest of everything that
    determines it (training data fingerprint, the subset's rows, model and training
    configuration), so a cache is never reused for another setting and settings can be mixed in
    one workdir. The directory holds the run (final checkpoint only), ``subset.json`` (what the
    key covers, readable) and one ``losses-<key>.npy`` per query set and draws.
    """
    workdir = Path(workdir)
    if masks.shape[1] != len(data):
        raise ValueError(f"masks cover {masks.shape[1]} rows, the data has {len(data)}")
    loss_key = _digest(np.asarray(query_x, np.float32), query_eps.numpy())[:16]
    out = np.empty((len(masks), len(query_x)), dtype=np.float64)
    for j, mask in enumerate(masks):
        tc = dataclasses.replace(train_config, checkpoints=1, checkpoint_every_steps=None, checkpoint_every_epochs=None)
        if vary_seed:
            tc.seed = train_config.seed + 1 + j
        record = {
            "data_fingerprint": data.fingerprint,
            "rows": _digest(np.flatnonzero(mask).astype(np.int64)),
            "n_rows": int(mask.sum()),
            "model_config": model_config.to_dict(),
            "train_config": dataclasses.asdict(tc),
        }
        sub_dir = workdir / "subsets" / _digest(record)[:20]
        run_dir = sub_dir / "run"
        if not (sub_dir / "subset.json").exists():
            if progress:
                progress(f"training subset model {j + 1}/{len(masks)}")
            train(data.subset(mask), model_config, run_dir, tc, show_progress=False)
            atomic_write_json(sub_dir / "subset.json", {**record, "subset": j})
        loss_path = sub_dir / f"losses-{loss_key}.npy"
        if loss_path.exists():
            out[j] = np.load(loss_path)
            continue
        run = read_json(run_dir / "run.json")
        model, _, _ = load_checkpoint(run_dir / run["checkpoints"][-1]["path"], model_config)
        losses = query_losses(model, model_config, query_x, query_eps)
        buf = io.BytesIO()
        np.save(buf, losses)
        atomic_write_bytes(loss_path, buf.getvalue())
        out[j] = losses
    return out


@dataclasses.dataclass
class LdsCache:
    """What an LDS run (``benchmarks/lds.py --workdir``) measured once: the data, queries, subsets and losses."""

    data: Dataset
    query_x: np.ndarray  # [Q, *shape] the held-out queries
    masks: np.ndarray  # [M, N] the subsets
    losses: np.ndarray  # [M, Q] each subset model's loss of each query under the fixed draws
    model_config: ModelConfig
    train_config: TrainConfig
    run_dir: Path  # the full model's run


def open_lds_cache(
    workdir: str | Path,
    *,
    train_spec: str = "digits,limit=1597",
    queries_from: str = "digits,offset=1597",
    queries: int = 200,
    subsets: int = 100,
    fraction: float = 0.5,
    subset_seed: int = 0,
    loss_m: int = 32,
    vary_seed: bool = False,
    progress: Callable[[str], None] | None = None,
) -> LdsCache:
    """The cache of an LDS run in ``workdir`` with these settings (``benchmarks/lds.py``'s defaults); subset
    models that are missing are trained (and cached), so other analyses compare on the same subsets and losses."""
    workdir = Path(workdir)
    data = load_dataset(train_spec)
    run_dir = workdir / "full" / "run"
    if not (run_dir / "run.json").exists():
        raise FileNotFoundError(f"{run_dir}: no full model here; run benchmarks/lds.py --workdir {workdir} first")
    run = read_json(run_dir / "run.json")
    if run["data"]["fingerprint"] != data.fingerprint:
        raise ValueError(f"{run_dir}: trained on other data than {train_spec}")
    model_config = ModelConfig.from_dict(run["model_config"])
    train_config = TrainConfig(**run["train"])
    query_x = load_dataset(queries_from).x[:queries]
    eps = fixed_query_noise(len(query_x), loss_m, (model_config.latent_dim,), seed=0)
    masks = subset_masks(len(data), subsets, fraction, subset_seed)
    losses = retrain_subsets(
        data, model_config, train_config, masks, workdir, query_x, eps, vary_seed=vary_seed, progress=progress
    )
    return LdsCache(data, query_x, masks, losses, model_config, train_config, run_dir)


def add_cache_arguments(ap: Any, *, queries: int = 100, subsets: int = 40, index: str | None = None) -> None:
    """The arguments naming an LDS cache (``benchmarks/lds.py``'s settings) on an argparse parser: ``--workdir``,
    ``--train``, ``--queries-from``, ``--queries``, ``--subsets``, ``--loss-m``, ``--threads``, ``--json`` (and
    ``--index`` when given a default), shared by the benchmarks that run on the cache."""
    ap.add_argument("--workdir", required=True, help="the workdir of a benchmarks/lds.py run")
    if index is not None:
        ap.add_argument("--index", default=index, help="an index benchmarks/lds.py built there")
    ap.add_argument("--train", default="digits,limit=1597")
    ap.add_argument("--queries-from", default="digits,offset=1597")
    ap.add_argument("--queries", type=int, default=queries)
    ap.add_argument("--subsets", type=int, default=subsets)
    ap.add_argument("--loss-m", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write every per-query value here")


def stderr_log() -> Callable[[str], None]:
    """A progress logger for the benchmark scripts: ``[elapsed s] message`` on stderr."""
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    return log


def cache_from_arguments(a: Any, progress: Callable[[str], None] | None = None) -> LdsCache:
    """:func:`open_lds_cache` with the arguments of :func:`add_cache_arguments`."""
    return open_lds_cache(
        a.workdir,
        train_spec=a.train,
        queries_from=a.queries_from,
        queries=a.queries,
        subsets=a.subsets,
        loss_m=a.loss_m,
        progress=progress,
    )


class GramBlock:
    """TRAK's Gram preconditioner on one block, exactly: features ``phi [N, W]``, queries ``q [Q, W]``,
    P = (ΦᵀΦ + λI)⁻¹ (research code for the LDS and memorization benchmarks; not on the query path).

    The eigendecomposition is taken in the smaller of the two spaces: ΦᵀΦ = V σ Vᵀ (W x W) when
    W ≤ N, else K = ΦΦᵀ = U Λ Uᵀ (N x N) with the push-through identity Φ P q = (K + λ)⁻¹ Φ q.
    """

    def __init__(self, phi: np.ndarray, q: np.ndarray):
        self.width = phi.shape[1]
        self.dots = q @ phi.T  # [Q, N] raw inner products
        self.small = self.width <= phi.shape[0]
        if self.small:
            sig, v = np.linalg.eigh(phi.T @ phi)
            self.eig = np.clip(sig, 0, None)
            self.fv, self.qv = phi @ v, q @ v  # rows and queries in the eigenbasis
        else:
            lk, u = np.linalg.eigh(phi @ phi.T)
            self.eig, self.u = np.clip(lk, 0, None), u
            self.du = self.dots @ u
            self.qq = (q**2).sum(1)
        self.trace = float(self.eig.sum())

    def apply(self, lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(qᵀ P f_i [Q, N], f_iᵀ P f_i [N], qᵀ P q [Q])``."""
        inv = 1.0 / (self.eig + lam)
        if self.small:
            return (self.qv * inv) @ self.fv.T, (self.fv**2 * inv).sum(1), (self.qv**2 * inv).sum(1)
        s = (self.du * inv) @ self.u.T  # Φ P q = (K + λ)⁻¹ Φ q
        lev = ((self.u**2) * (self.eig * inv)).sum(1)  # f_iᵀ P f_i = [(K + λ)⁻¹ K]_ii
        qpq = (self.qq - (self.du**2 * inv).sum(1)) / lam  # Woodbury
        return s, lev, qpq


def kronecker_factors(a: np.ndarray, d: np.ndarray, bias: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """K-FAC's factors of one Linear layer, ``A = E[a aᵀ]`` and ``S = E[δ δᵀ]``, over the rows of ``a [T, in]``
    and ``δ [T, out]`` (every forward row of the layer: one per sample and, behind the sampling, per draw);
    with ``bias`` a constant-1 column is appended to ``a`` (the bias as the last input column of G)."""
    a = np.asarray(a, np.float64)
    d = np.asarray(d, np.float64)
    if bias:
        a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
    return a.T @ a / a.shape[0], d.T @ d / d.shape[0]


def conv_kronecker_rows(
    x: torch.Tensor, grad_out: torch.Tensor, conv: torch.nn.Conv2d
) -> tuple[np.ndarray, np.ndarray]:
    """The KFC rows of one Conv2d (Grosse & Martens 2016, as kronfluence forms them): ``a [B, T, C_in·kh·kw]``,
    the unfolded input patches at the T output positions, and ``δ [B, T, C_out]``, the loss gradient with respect
    to the output at those positions. A sample's gradient is ``G = Σ_t δ_t [a_t, 1]ᵀ`` (``[∂W.flatten(1) | ∂b]``),
    and :func:`kronecker_factors` over all ``B·T`` rows gives KFC's ``A`` and ``S`` (expectations over samples and
    positions; the constant factor T between KFC's and this form cancels under a damping relative to the mean
    eigenvalue)."""
    if isinstance(conv.padding, str):
        raise ValueError(f"padding={conv.padding!r}: give the padding as numbers")
    u = torch.nn.functional.unfold(
        x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride
    )
    b = x.shape[0]
    a = u.transpose(1, 2).reshape(b, -1, u.shape[1])
    d = grad_out.flatten(2).transpose(1, 2).reshape(b, -1, grad_out.shape[1])
    return a.detach().double().numpy(), d.detach().double().numpy()


class KfacBlock:
    """K-FAC / EK-FAC (kronfluence's definitions) on one Linear layer, exactly: per-sample gradients
    ``g [N, out, in]`` (bias column last), queries ``q [Q, out, in]``, factors ``A [in, in]``, ``S [out, out]``
    (research code for the LDS benchmark; the query path's form is :mod:`proponent.format.curvature`, whose
    eigenbases, rotation and K-FAC eigenvalues this uses).

    With A = Q_A diag(e_A) Q_Aᵀ and S = Q_S diag(e_S) Q_Sᵀ, a gradient's rotation is G̃ = Q_Sᵀ G Q_A and the
    preconditioned inner product is ``<G̃_q / (Λ + λ), G̃_i>`` with ``Λ = e_S e_Aᵀ`` (K-FAC: then
    P = (S ⊗ A + λI)⁻¹ on the row-major vec(G)) or, EK-FAC, ``Λ_jk = mean_i (G̃_i)_jk²`` (the eigenvalue
    correction fitted on the rows ``g``). The damping is ``λ = α · mean(Λ)`` (kronfluence's heuristic:
    α = 0.1)."""

    def __init__(self, a_cov: np.ndarray, s_cov: np.ndarray, g: np.ndarray, q: np.ndarray, ekfac: bool):
        ea, qa, es, qs = eigenbases(a_cov, s_cov)  # the product's definitions (proponent.format.curvature)
        self.width = g.shape[1] * g.shape[2]
        gr, qr = rotate(g, qa, qs), rotate(q, qa, qs)
        self.fv, self.qv = gr.reshape(len(gr), -1), qr.reshape(len(qr), -1)
        if ekfac:
            self.eig = (self.fv**2).mean(0)
        else:
            self.eig = kfac_eigenvalues(ea, es).reshape(-1)
        self.mean_eig = float(self.eig.mean())

    def apply(self, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(qᵀ P f_i [Q, N], f_iᵀ P f_i [N], qᵀ P q [Q])`` with λ = α · mean(Λ)."""
        inv = 1.0 / (self.eig + alpha * self.mean_eig)
        return (self.qv * inv) @ self.fv.T, (self.fv**2 * inv).sum(1), (self.qv**2 * inv).sum(1)


def predicted_group_influence(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``Σ_{i ∈ S_j} score(q, i)``: ``scores [Q, N]``, ``masks [M, N]`` -> ``[Q, M]``."""
    return np.asarray(scores, np.float64) @ np.asarray(masks, np.float64).T


def _ranks(a: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank)."""
    from scipy.stats import rankdata  # lazy: scipy only for rank correlations

    return np.asarray(rankdata(a, axis=-1), dtype=np.float64)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``a`` with the same row of ``b`` (``[Q, M]`` each) -> ``[Q]``.

    A row with constant values has no rank correlation; it gets NaN.
    """
    ra, rb = _ranks(np.atleast_2d(a)), _ranks(np.atleast_2d(b))
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(axis=1) / np.where(den > 0, den, 1.0), np.nan)


def lds_per_query(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """LDS of each query: Spearman over subsets of predicted group influence vs **negative** loss.

    ``scores [Q, N]`` (positive = proponent), ``masks [M, N]``, ``losses [M, Q]`` -> ``[Q]``.
    """
    pred = predicted_group_influence(scores, masks)
    return spearman_rows(pred, -np.asarray(losses, np.float64).T)


def summarize(values: Sequence[float] | np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict[str, float | int]:
    """Mean, std, standard error and a 95% percentile bootstrap CI of the mean (NaNs dropped)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        nan = float("nan")
        return {"mean": nan, "std": nan, "sem": nan, "ci_low": nan, "ci_high": nan, "n": 0}
    rng = np.random.default_rng(seed)
    boots = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
        "sem": float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0,
        "ci_low": float(np.percentile(boots, 2.5)),
        "ci_high": float(np.percentile(boots, 97.5)),
        "n": int(v.size),
    }


def paired_difference(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n_boot: int = 2000, seed: int = 0
) -> dict[str, float | int]:
    """:func:`summarize` of the per-query differences ``a - b`` (the same queries scored two ways).

    Pairing removes the between-query spread, so it resolves differences that overlapping
    per-method confidence intervals do not; queries where either side is NaN are dropped.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return summarize(d, n_boot=n_boot, seed=seed)


def paired_table(per_query: dict[str, list[float]], baseline: str) -> list[str]:
    """The benchmarks' table: each variant's mean LDS with its 95% CI and its paired difference against
    ``baseline`` (a key of ``per_query``), one line each after a header."""
    lines = [f"{'variant':>40} {'LDS mean [95% CI]':>26} {'minus ' + baseline + ' [95% CI], paired':>36}"]
    for name, v in per_query.items():
        s = summarize(v)
        dd = paired_difference(v, per_query[baseline])
        lines.append(
            f"{name:>40} {s['mean']:+.3f} [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]       "
            f"{dd['mean']:+.4f} [{dd['ci_low']:+.4f}, {dd['ci_high']:+.4f}]"
        )
    return lines


def checkpoint_subsets(n_checkpoints: int, names: Sequence[str]) -> dict[str, list[int]]:
    """Named checkpoint subsets: ``all``, ``last``, ``first+last``, or explicit ``0,2,4``-style lists."""
    out: dict[str, list[int]] = {}
    for name in names:
        if name == "all":
            out[name] = list(range(n_checkpoints))
        elif name == "last":
            out[name] = [n_checkpoints - 1]
        elif name == "first+last":
            out[name] = sorted({0, n_checkpoints - 1})
        else:
            try:
                out[name] = sorted({int(v) for v in name.replace("+", ",").split(",")})
            except ValueError:
                raise ValueError(f"checkpoint subset {name!r}: expected all, last, first+last or 0,2,4") from None
    return out


def lds_rows(
    index: Any,
    query_x: np.ndarray,
    masks: np.ndarray,
    losses: np.ndarray,
    *,
    scorings: Sequence[str] = SCORINGS,
    checkpoint_sets: Sequence[str] = ("all",),
    prefilters: Sequence[int] = (),
    convention: str = "lr",
    seed: int = 0,
    scorer: Callable[..., np.ndarray] | None = None,
    n_boot: int = 2000,
) -> list[dict[str, Any]]:
    """LDS of every (checkpoint subset or latent pre-filter) x scoring on one index.

    ``query_x [Q, *shape]`` are the held-out queries whose losses under the subset models are
    ``losses [M, Q]``. Queries are featurized once (all checkpoints, query seed ``seed``, as the API
    does) and their per-checkpoint inner products computed once; each scoring combines them with the
    query path's definitions (``scorer(index, x, scoring, convention, checkpoints) -> [N]`` replaces
    that, e.g. to test a deliberately wrong scorer). A pre-filter of size L scores only each query's
    L nearest training samples in latent space (all checkpoints); the others contribute 0. Returns
    one row per variant and scoring with the per-query LDS summary.
    """
    queries = [query_dots(index, x, seed=seed) for x in query_x] if scorer is None else []
    n_ck = len(index.checkpoints)
    variants: list[tuple[str, list[int], int | None]] = [
        (name, cks, None) for name, cks in checkpoint_subsets(n_ck, checkpoint_sets).items()
    ]
    variants += [(f"prefilter L={size}", list(range(n_ck)), int(size)) for size in prefilters]
    mu = index.runtime.latent_means(query_x) if prefilters else None
    latent = index.meta.latent_mu
    rows: list[dict[str, Any]] = []
    for name, cks, size in variants:
        for scoring in scorings:
            if scorer is None:  # the inner products are computed once; the scorings only combine them
                s = np.stack(
                    [
                        combine(index, qv, d, scoring=scoring, convention=convention, checkpoints=cks)
                        for qv, d in queries
                    ]
                )
            else:
                s = np.stack([scorer(index, x, scoring, convention, cks) for x in query_x])
            if size is not None:
                assert mu is not None and latent is not None
                kept = np.zeros_like(s)
                for b in range(len(s)):
                    d2 = ((latent - mu[b][None, :]) ** 2).sum(axis=1)
                    cand = np.argpartition(d2, size - 1)[:size] if size < len(d2) else np.arange(len(d2))
                    kept[b, cand] = s[b, cand]
                s = kept
            per_query = lds_per_query(s, masks, losses)
            rows.append(
                {
                    "variant": name,
                    "checkpoints": cks,
                    "prefilter": size,
                    "scoring": scoring,
                    **summarize(per_query, n_boot=n_boot, seed=seed),
                    "per_query": [float(v) for v in per_query],
                }
            )
    return rows


def injected_effect(
    index: Any,
    query_x: np.ndarray,
    masks: np.ndarray,
    losses: np.ndarray,
    *,
    scorings: Sequence[str] = SCORINGS,
    convention: str = "lr",
    seed: int = 0,
) -> dict[str, Any]:
    """Do the injected rows matter counterfactually, and how much do the scorings credit them?

    ``actual``: per-query Spearman between the number of injected rows in a subset and the
    negative loss (about 0 when removing outliers does not change the queries' losses). Per
    scoring: the LDS of the scores of the clean rows only and of the injected rows only, and the
    median (over queries) share of the variance of the predicted group influence that comes from
    the injected rows.
    """
    inj = np.asarray(index.meta.injected, dtype=bool)
    counts = masks[:, inj].sum(axis=1).astype(np.float64)
    actual = spearman_rows(np.tile(counts, (len(query_x), 1)), -np.asarray(losses, np.float64).T)
    queries = [query_dots(index, x, seed=seed) for x in query_x]
    out: dict[str, Any] = {"actual": summarize(actual, seed=seed), "scorings": {}}
    for scoring in scorings:
        s = np.stack([combine(index, qv, d, scoring=scoring, convention=convention) for qv, d in queries])
        clean, dirty = np.where(inj[None, :], 0.0, s), np.where(inj[None, :], s, 0.0)
        v_dirty = predicted_group_influence(dirty, masks).var(axis=1)
        v_clean = predicted_group_influence(clean, masks).var(axis=1)
        total = v_dirty + v_clean
        share = np.divide(v_dirty, total, out=np.zeros_like(total), where=total > 0)
        out["scorings"][scoring] = {
            "lds_clean_rows_only": summarize(lds_per_query(clean, masks, losses), seed=seed),
            "lds_injected_rows_only": summarize(lds_per_query(dirty, masks, losses), seed=seed),
            "predicted_variance_share_injected": float(np.median(share)),
        }
    return out
