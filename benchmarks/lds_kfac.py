"""LDS of K-FAC / EK-FAC preconditioned TracIn (kronfluence's per-layer preconditioners) x λ x scoring.

Runs on the cache of ``benchmarks/lds.py`` (same ``--workdir``, same settings) and on an index it built
with exact gradients (``--index exact``: ``projection=none``, every row the per-sample gradient, laid out
per Linear layer as the row-major ``G [out, in+1]``, bias column last). Nothing is retrained.

Per checkpoint c and Linear layer l, over the training set with the index's objective and draws
(``NOISE_INDEX``, m draws per sample), the factors ``A = E[a aᵀ]`` (a with a constant-1 bias column)
and ``S = E[δ δᵀ]`` are averaged over every forward row of the layer (the featurizer's hooks); then
:class:`proponent.analysis.lds.KfacBlock` scores every query against every training row:
``Σ_l <G̃_l(q) / (Λ_l + λ_l), G̃_l(i)>`` with ``G̃ = Q_Sᵀ G Q_A``, ``Λ = e_S e_Aᵀ`` (K-FAC) or
``Λ_jk = mean_i (G̃_i)_jk²`` (EK-FAC's eigenvalue correction over the per-sample gradients) and
``λ_l = α · mean(Λ_l)`` (kronfluence's heuristic α = 0.1), summed over layers and combined over
checkpoints with the lr weights as TracIn is:

* ``raw``:     Σ_c w_c qᵀ P_c f(i)
* ``cosine``:  Σ_c w_c qᵀ P_c f(i) / sqrt(qᵀ P_c q · f(i)ᵀ P_c f(i))
* ``relatif``: Σ_c w_c qᵀ P_c f(i) / sqrt(Σ_c w_c f(i)ᵀ P_c f(i))

The stored rows of the ``exact`` index are int8 codes (per-row scale): the training rows of the
preconditioned scores are by default the float64 per-sample gradients rebuilt from the captured ``(a, δ)``
with the index's draws (checked against the stored rows to within their int8 step); ``--grads stored``
uses the int8 rows instead. The query is featurized as the API does (float32, query seed 0).

Every row: the mean LDS over queries with its 95% bootstrap CI and the paired difference against raw
TracIn (the same queries, exact gradients of this index).

    python benchmarks/lds_kfac.py --workdir runs/lds --index exact --mode ekfac --alphas 1e-3,1e-2,0.1,1,10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from proponent.analysis.lds import KfacBlock, lds_per_query, open_lds_cache, paired_table
from proponent.api.schemas import InfluenceParams
from proponent.model.curvature import FactorSums, LayerGradients, double_model
from proponent.model.objectives import NOISE_INDEX, draw_noise, objective_at
from proponent.query.index import open_index
from proponent.query.usecase import query_vectors
from proponent.threads import set_threads


def layer_factors(
    idx, c: int, batch: int = 256, log=None
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], float]:
    """``(A_l, S_l)`` per featurized layer at checkpoint c, the float64 per-sample gradients ``G_l [N, out, in]``
    rebuilt from the captured ``(a, δ)`` (the mean over the index's m draws, as the stored rows), and the
    largest difference between them and the stored rows in units of each row's int8 step (the store's
    quantisation: at most 0.5 when the layout and the draws are the index's). The capture and the factors are
    the product's (:mod:`proponent.model.curvature`, as ``proponent precondition --kind kfac|ekfac`` makes them)."""
    rt = idx.runtime
    model64 = double_model(rt.model(c))
    cap = LayerGradients(model64, objective_at(rt.objective, c), [b.info for b in rt.projector(c).blocks])
    noise_shape = cap.feat.objective.noise_shape(model64)
    sums = FactorSums.empty(cap.shapes)
    grads = [np.zeros((idx.n, o, i)) for o, i in cap.shapes]
    worst = 0.0
    man_layers = idx.manifest.projection.layers
    for lo in range(0, idx.n, batch):
        hi = min(idx.n, lo + batch)
        x = torch.from_numpy(idx.store.inputs(slice(lo, hi)))
        y = torch.from_numpy(np.clip(idx.meta.labels[lo:hi], 0, None))
        eps = draw_noise(
            NOISE_INDEX, rt.manifest.objective.seed, c, idx.meta.ids[lo:hi], rt.manifest.objective.m, noise_shape
        )
        got = cap.capture(x, y, eps)
        sums.add(got)
        b = hi - lo
        rows = np.arange(lo, hi)
        stored = idx.features.exact_rows(c, rows)
        scale = idx.features.scale[c]
        step = np.asarray(scale[rows], np.float64) if scale is not None else np.abs(stored).max(1) / 127
        for i, g in enumerate(cap.gradients(got, b, cap.shapes)):
            grads[i][lo:hi] = g
            ml = man_layers[i]
            blk = stored[:, ml.offset : ml.offset + ml.k_in * ml.k_out]
            worst = max(worst, float((np.abs(blk - g.reshape(b, -1)).max(1) / step).max()))
        if log:
            log(f"  checkpoint {c}: factors over rows {hi}/{idx.n}")
    factors = sums.factors()
    return [a for a, _ in factors], [s for _, s in factors], grads, worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="the workdir of a benchmarks/lds.py run")
    ap.add_argument("--index", default="exact", help="an index with projection=none that benchmarks/lds.py built there")
    ap.add_argument("--scratch", default=None, help="where to cache the query vectors (default <workdir>/precondition)")
    ap.add_argument("--train", default="digits,limit=1597")
    ap.add_argument("--queries-from", default="digits,offset=1597")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--subsets", type=int, default=100)
    ap.add_argument("--loss-m", type=int, default=32)
    ap.add_argument("--mode", default="ekfac", help="kfac | ekfac")
    ap.add_argument("--alphas", default="1e-3,1e-2,0.1,1,10")
    ap.add_argument(
        "--grads",
        default="float64",
        help="training rows for the preconditioned scores (and EK-FAC's correction): float64 (rebuilt from the "
        "captured factors with the index's draws) | stored (the index's int8 rows)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    set_threads(a.threads)
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    if a.mode not in ("kfac", "ekfac"):
        raise SystemExit(f"--mode must be kfac or ekfac, got {a.mode!r}")
    wd = Path(a.workdir)
    idx = open_index(wd / "index" / a.index, device="cpu")
    if idx.manifest.projection.kind != "none":
        raise SystemExit(f"index {a.index} is sketched ({idx.manifest.projection.kind}); K-FAC needs exact gradients")
    cache = open_lds_cache(
        wd,
        train_spec=a.train,
        queries_from=a.queries_from,
        queries=a.queries,
        subsets=a.subsets,
        loss_m=a.loss_m,
        progress=log,
    )
    qx, masks, losses = cache.query_x, cache.masks, cache.losses
    w = idx.meta.weights("lr")
    cks = list(range(len(idx.meta.checkpoints)))
    qcache = Path(a.scratch or wd / "precondition") / f"queries-{a.index}-{len(qx)}.npz"
    if qcache.exists():
        z = np.load(qcache)
        qmat = {c: z[f"v{c}"] for c in cks}
        qsq = {c: z[f"s{c}"] for c in cks}
    else:
        log(f"featurizing {len(qx)} queries")
        qvs = [query_vectors(idx, InfluenceParams(seed=0), x=x) for x in qx]
        qmat = {c: np.stack([np.asarray(v.vectors[c], np.float64) for v in qvs]) for c in cks}
        qsq = {c: np.array([v.sq_norms[c] for v in qvs]) for c in cks}
        qcache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(qcache, **{f"v{c}": v for c, v in qmat.items()}, **{f"s{c}": v for c, v in qsq.items()})
    alphas = [float(v) for v in a.alphas.split(",")]
    n, nq = idx.n, len(qx)
    raw, cos, rel_den, raw64 = np.zeros((nq, n)), np.zeros((nq, n)), np.zeros(n), np.zeros((nq, n))
    pre = {al: np.zeros((nq, n)) for al in alphas}
    pcos = {al: np.zeros((nq, n)) for al in alphas}
    plev = {al: np.zeros(n) for al in alphas}
    last: dict[float, np.ndarray] = {}
    layout_err = 0.0
    for c in cks:
        acov, scov, grads, err = layer_factors(idx, c)
        layout_err = max(layout_err, err)
        phi = idx.features.exact_rows(c, np.arange(n))  # [N, D]
        q = qmat[c]
        d = q @ phi.T
        sqf = idx.features.sq_norm[c].astype(np.float64)
        raw += w[c] * d
        cos += w[c] * d / np.sqrt(qsq[c][:, None] * sqf[None, :])
        rel_den += w[c] * sqf
        parts = []
        f64 = np.concatenate([g.reshape(n, -1) for g in grads], axis=1)
        raw64 += w[c] * (q @ f64.T)
        del f64
        for ml, ac, sc, g in zip(idx.manifest.projection.layers, acov, scov, grads):
            lo, hi = ml.offset, ml.offset + ml.k_in * ml.k_out
            rows_l = g if a.grads == "float64" else phi[:, lo:hi].reshape(n, ml.k_out, ml.k_in)
            parts.append(KfacBlock(ac, sc, rows_l, q[:, lo:hi].reshape(nq, ml.k_out, ml.k_in), a.mode == "ekfac"))
        if parts and idx.manifest.projection.layers[-1].offset + parts[-1].width != phi.shape[1]:
            raise SystemExit("the Linear layers do not cover the feature vector")
        for al in alphas:
            s_c, lev_c, qpq_c = np.zeros((nq, n)), np.zeros(n), np.zeros(nq)
            for part in parts:
                s_b, lev_b, qpq_b = part.apply(al)
                s_c += s_b
                lev_c += lev_b
                qpq_c += qpq_b
            pre[al] += w[c] * s_c
            pcos[al] += (
                w[c] * s_c / np.sqrt(np.clip(qpq_c, 1e-300, None)[:, None] * np.clip(lev_c, 1e-300, None)[None, :])
            )
            plev[al] += w[c] * lev_c
            if c == cks[-1]:
                last[al] = s_c
        log(f"checkpoint {c}: {len(parts)} layers, rebuilt gradients within {err:.2f} int8 steps of the stored rows")
        del phi, parts, grads
    res: dict[str, list[float]] = {
        "TracIn raw": lds_per_query(raw, masks, losses).tolist(),
        "TracIn cosine": lds_per_query(cos, masks, losses).tolist(),
        "TracIn relatif": lds_per_query(raw / np.sqrt(rel_den)[None, :], masks, losses).tolist(),
        "TracIn raw, float64 gradients": lds_per_query(raw64, masks, losses).tolist(),
    }
    for al in alphas:
        res[f"{a.mode} a={al:g} raw"] = lds_per_query(pre[al], masks, losses).tolist()
        res[f"{a.mode} a={al:g} cosine"] = lds_per_query(pcos[al], masks, losses).tolist()
        res[f"{a.mode} a={al:g} relatif"] = lds_per_query(pre[al] / np.sqrt(plev[al])[None, :], masks, losses).tolist()
    for al, s in last.items():
        res[f"{a.mode} last checkpoint only, a={al:g} raw"] = lds_per_query(s, masks, losses).tolist()
    print(
        f"LDS of {a.mode.upper()}-preconditioned TracIn on {a.train} (N={n}), index {a.index} (D={idx.dim}, exact "
        f"gradients), {nq} held-out queries, {a.subsets} subset models (cache of benchmarks/lds.py in {wd}); "
        f"per Linear layer, lambda_l = a x mean(Lambda_l) (kronfluence); factors over the training set with the "
        f"index's draws (m={idx.manifest.objective.m}); preconditioned scores over {a.grads} training gradients "
        f"(float64 ones rebuilt from the captured a, delta: within {layout_err:.2f} int8 steps of the stored rows); "
        "TracIn rows over the stored int8 rows unless named float64"
    )
    print("\n".join(paired_table(res, "TracIn raw")), flush=True)
    log("done")
    if a.json:
        Path(a.json).write_text(json.dumps({"mode": a.mode, "index": a.index, "per_query": res}))


if __name__ == "__main__":
    main()
