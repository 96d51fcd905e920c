"""LDS of preconditioned TracIn: TRAK's Gram preconditioner (whole, per layer, after a projection) x λ x scoring.

Runs on the cache of ``benchmarks/lds.py`` (same ``--workdir``, same settings): the subset models
and their query losses, and an index it built (``--index NAME``: ``<workdir>/index/NAME``). Nothing
is retrained when the cache is complete.

Per checkpoint c, with Φ_c ``[N, D]`` the stored features (float64), q_c a query's features
(featurized as the API does, query seed 0) and P_c = (Φ_cᵀΦ_c + λ_c I)⁻¹, the preconditioned
scorings are

* ``raw``:     Σ_c w_c q_cᵀ P_c f_c(i)
* ``cosine``:  Σ_c w_c q_cᵀ P_c f_c(i) / sqrt(q_cᵀ P_c q_c · f_c(i)ᵀ P_c f_c(i))
* ``relatif``: Σ_c w_c q_cᵀ P_c f_c(i) / sqrt(Σ_c w_c f_c(i)ᵀ P_c f_c(i))

computed exactly in the N-dimensional form (N < D here): with K_c = Φ_cΦ_cᵀ = U Λ Uᵀ, the scores
of all rows come from the push-through identity Φ P q = (K + λ)⁻¹ Φ q = U (Uᵀ Φ q)/(Λ + λ), the
leverage f_iᵀ P f_i = [Φ P Φᵀ]_ii = [(K + λ)⁻¹ K]_ii = Σ_j U_ij² Λ_j/(Λ_j + λ), and
qᵀ P q = (||q||² − Σ_j (Uᵀ Φ q)_j²/(Λ_j + λ))/λ (Woodbury). The damping is
λ_c = α · tr(Φ_cᵀΦ_c)/D, α times the mean eigenvalue of the D x D Gram (kronfluence's heuristic is
α = 0.1), swept over ``--alphas``.

Modes (``--mode``):

* ``gram``: one Gram per checkpoint over all D dimensions (TRAK); also "last checkpoint only";
* ``layer``: block-diagonal, one Gram per layer block of the layout (a per-layer curvature,
  as K-FAC's blocks are), and "per-layer scaled": each block divided by its mean eigenvalue
  (the α → ∞ limit of ``layer`` up to a constant);
* ``proj:K``: a Gaussian random projection of the features to K < N dimensions first (TRAK's
  regime, where ΦᵀΦ has full rank), then ``gram``.

Every row: the mean LDS over queries with its 95% bootstrap CI and the paired difference against
raw TracIn (the same queries). ``--json`` keeps every per-query value.

    python benchmarks/lds_precondition.py --workdir runs/lds --index default --mode gram --alphas 1e-4,1e-2,1,100,1000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from proponent.analysis.lds import (
    GramBlock,
    add_cache_arguments,
    cache_from_arguments,
    lds_per_query,
    paired_table,
    stderr_log,
)
from proponent.api.schemas import InfluenceParams
from proponent.query.index import open_index
from proponent.query.usecase import query_vectors
from proponent.threads import set_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cache_arguments(ap, queries=200, subsets=100, index="default")
    ap.add_argument("--mode", default="gram", help="gram | layer | proj:K")
    ap.add_argument("--alphas", default="1e-4,1e-2,1,10,100,300,1000,10000")
    a = ap.parse_args()
    set_threads(a.threads)
    log = stderr_log()

    wd = Path(a.workdir)
    proj = int(a.mode.split(":", 1)[1]) if a.mode.startswith("proj:") else 0
    if a.mode not in ("gram", "layer") and not proj:
        raise SystemExit(f"--mode must be gram, layer or proj:K, got {a.mode!r}")
    idx = open_index(wd / "index" / a.index, device="cpu")
    cache = cache_from_arguments(a, progress=log)
    qx, masks, losses = cache.query_x, cache.masks, cache.losses
    w = idx.meta.weights("lr")
    cks = list(range(len(idx.meta.checkpoints)))
    qcache = wd / "precondition" / f"queries-{a.index}-{len(qx)}.npz"
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
    raw, cos, rel_den = np.zeros((nq, n)), np.zeros((nq, n)), np.zeros(n)
    pre = {al: np.zeros((nq, n)) for al in alphas}
    pcos = {al: np.zeros((nq, n)) for al in alphas}
    plev = {al: np.zeros(n) for al in alphas}
    extra: dict[str, np.ndarray] = {}  # gram: last checkpoint only (per alpha); layer: per-layer scaled
    for c in cks:
        phi = idx.features.exact_rows(c, np.arange(n))  # [N, D]
        dim = phi.shape[1]
        q = qmat[c]
        d = q @ phi.T  # [Q, N] raw inner products
        sqf = idx.features.sq_norm[c].astype(np.float64)
        raw += w[c] * d
        cos += w[c] * d / np.sqrt(qsq[c][:, None] * sqf[None, :])
        rel_den += w[c] * sqf
        if proj:
            rp = np.random.default_rng(1000 + c).normal(size=(dim, proj)) / np.sqrt(proj)
            phi, q, dim = phi @ rp, q @ rp, proj
        if a.mode == "layer":
            blocks = [
                (lay.offset, lay.offset + lay.k_in * lay.k_out + lay.k_bias) for lay in idx.manifest.projection.layers
            ]
            if blocks[-1][1] != dim:
                raise SystemExit(f"layer blocks cover {blocks[-1][1]} of {dim} dimensions")
            parts = [GramBlock(phi[:, lo:hi], q[:, lo:hi]) for lo, hi in blocks]
        else:
            parts = [GramBlock(phi, q)]
        for al in alphas:
            s_c, lev_c, qpq_c = np.zeros((nq, n)), np.zeros(n), np.zeros(nq)
            for part in parts:
                s_b, lev_b, qpq_b = part.apply(al * part.trace / part.width)
                s_c += s_b
                lev_c += lev_b
                qpq_c += qpq_b
            pre[al] += w[c] * s_c
            pcos[al] += (
                w[c] * s_c / np.sqrt(np.clip(qpq_c, 1e-300, None)[:, None] * np.clip(lev_c, 1e-300, None)[None, :])
            )
            plev[al] += w[c] * lev_c
            if a.mode != "layer" and c == cks[-1]:
                extra[f"last checkpoint only, a={al:g}"] = s_c
        if a.mode == "layer":
            scaled = sum(part.dots / (part.trace / part.width) for part in parts)
            extra["per-layer scaled"] = extra.get("per-layer scaled", 0) + w[c] * scaled
        log(f"checkpoint {c}: D={dim}, {len(parts)} block(s)")
        del phi
    res: dict[str, list[float]] = {
        "TracIn raw": lds_per_query(raw, masks, losses).tolist(),
        "TracIn cosine": lds_per_query(cos, masks, losses).tolist(),
        "TracIn relatif": lds_per_query(raw / np.sqrt(rel_den)[None, :], masks, losses).tolist(),
    }
    for al in alphas:
        res[f"{a.mode} a={al:g} raw"] = lds_per_query(pre[al], masks, losses).tolist()
        res[f"{a.mode} a={al:g} cosine"] = lds_per_query(pcos[al], masks, losses).tolist()
        res[f"{a.mode} a={al:g} relatif"] = lds_per_query(pre[al] / np.sqrt(plev[al])[None, :], masks, losses).tolist()
    for name, s in extra.items():
        res[f"{a.mode} {name} raw"] = lds_per_query(s, masks, losses).tolist()
    print(
        f"LDS of preconditioned TracIn on {a.train} (N={n}), index {a.index} (D={idx.dim}), {nq} held-out queries, "
        f"{a.subsets} subset models (cache of benchmarks/lds.py in {wd}); mode {a.mode}; "
        "lambda_c = a x mean eigenvalue of the checkpoint's (block's) Gram"
    )
    print("\n".join(paired_table(res, "TracIn raw")), flush=True)
    log("done")
    if a.json:
        Path(a.json).write_text(json.dumps({"mode": a.mode, "index": a.index, "per_query": res}))


if __name__ == "__main__":
    main()
