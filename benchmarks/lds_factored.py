"""LDS of preconditioners that keep each draw's gradient rank-one: candidates for whitening at index time.

A sketched index cannot be preconditioned at query time by K-FAC, EK-FAC or Adam's diagonal: the sketch's
error is relative to ``||P q|| · ||g_i||``, far larger than ``qᵀ P g_i`` once P whitens (measured in
``benchmarks/results/precondition_kfac_digits.txt``). A preconditioner of the form ``P = LᵀL ⊗ RᵀR`` per
layer can instead be applied to both sides before the sketch: every draw's rank-one gradient ``δ aᵀ``
becomes ``(L δ)(R a)ᵀ``, still rank-one, so the tensor sketch and the int8 store apply unchanged and the
scan estimates ``<L G_q Rᵀ, L G_i Rᵀ> = qᵀ P g_i`` with the sketch's usual error. This measures, on exact
gradients, what such forms keep of the query-time preconditioners' LDS:

* ``kfac factored``: ``P = (S + λ_S)⁻¹ ⊗ (A + λ_A)⁻¹``, ``λ_S = α · mean e_S``, ``λ_A = α · mean e_A``
  (damping each Kronecker factor, as K-FAC for optimisation does, instead of their product);
* ``adam factored``: Adam's ``v̂`` per layer factored as Adafactor does, ``v̂ ≈ r cᵀ / mean(v̂)`` (row and
  column means), ``P = mean(v̂) / ((r + α · mean r)(c + α · mean c)ᵀ)``;

beside raw TracIn, and (from the same run) kronfluence's K-FAC and Adam's unfactored ``1/(v̂ + λ)`` at the
same α for comparison; raw and cosine scorings, paired differences against raw TracIn.

``--sketch-index NAME`` (an index of the same run with a sketched layout, e.g. ``default``) also maps both
sides of the factored forms and raw TracIn through that index's own projection of each checkpoint
(:func:`proponent.query.curvature.to_features`: the per-layer tensor sketch, float32, not quantised): what an
index whitened before its sketch would answer (rows ``S L G_i Rᵀ``, query ``S L G_q Rᵀ``).

    python benchmarks/lds_factored.py --workdir runs/lds --retrain-state --alphas 1e-3,1e-2,0.1,1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from proponent.analysis.lds import add_cache_arguments, lds_per_query, paired_table, stderr_log
from proponent.api.schemas import InfluenceParams
from proponent.format.whiten import inv_sqrt_psd
from proponent.query.index import open_index
from proponent.query.usecase import query_vectors
from proponent.threads import set_threads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lds_adam import diag_rows, open_with_moments  # noqa: E402  (sibling benchmark)
from lds_kfac import layer_factors  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cache_arguments(ap, index="exact")
    ap.add_argument("--alphas", default="1e-3,1e-2,0.1,1")
    ap.add_argument("--sketch-index", default=None, help="also through this sketched index's projection")
    ap.add_argument("--retrain-state", action="store_true", help="recover the optimizer states by retraining")
    a = ap.parse_args()
    set_threads(a.threads)
    log = stderr_log()

    wd, idx, cache, moments, _ = open_with_moments(a, log)
    masks, losses = cache.masks, cache.losses
    w = idx.meta.weights("lr")
    n, nq = idx.n, len(cache.query_x)
    qvs = [query_vectors(idx, InfluenceParams(seed=0), x=x) for x in cache.query_x]
    alphas = [float(s) for s in a.alphas.split(",") if s]
    forms = ("kfac factored", "kfac", "adam factored", "adam sq")
    sk = open_index(wd / "index" / a.sketch_index, device="cpu") if a.sketch_index else None
    sketched = ("kfac factored", "adam factored")
    sk_raw = np.zeros((nq, n))
    sk_pre = {(f, al): np.zeros((nq, n)) for f in sketched for al in alphas}
    sk_cos = {(f, al): np.zeros((nq, n)) for f in sketched for al in alphas}

    def through(c: int, mats: list[np.ndarray]) -> np.ndarray:
        from proponent.query.curvature import to_features  # lazy: only with --sketch-index

        assert sk is not None
        return to_features(sk, c, mats)

    raw = np.zeros((nq, n))
    pre = {(f, al): np.zeros((nq, n)) for f in forms for al in alphas}
    pcos = {(f, al): np.zeros((nq, n)) for f in forms for al in alphas}
    for c in range(len(idx.meta.checkpoints)):
        acov, scov, grads, _ = layer_factors(idx, c)
        q = np.stack([np.asarray(v.vectors[c], np.float64) for v in qvs])
        vh = diag_rows(idx, moments[c])
        layers = idx.manifest.projection.layers
        raw += w[c] * q @ np.concatenate([g.reshape(n, -1) for g in grads], axis=1).T
        qmats = [
            q[:, lay.offset : lay.offset + lay.out_dim * lay.in_dim].reshape(nq, lay.out_dim, lay.in_dim)
            for lay in idx.manifest.projection.layers
        ]
        if sk is not None:
            sk_raw += w[c] * through(c, qmats) @ through(c, list(grads)).T
        for al in alphas:
            acc = {f: (np.zeros((nq, n)), np.zeros(nq), np.zeros(n)) for f in forms}
            whitened: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {f: ([], []) for f in sketched}
            for lay, ac, sc, g, v in zip(layers, acov, scov, grads, vh, strict=True):
                qg = q[:, lay.offset : lay.offset + lay.out_dim * lay.in_dim].reshape(nq, lay.out_dim, lay.in_dim)
                ea, es = np.linalg.eigvalsh(ac), np.linalg.eigvalsh(sc)
                ls = inv_sqrt_psd(sc, al * float(np.clip(es, 0, None).mean()))
                ra = inv_sqrt_psd(ac, al * float(np.clip(ea, 0, None).mean()))
                # kfac factored: both sides transformed (L G R), the plain inner product after
                tq = np.einsum("so,noi,ij->nsj", ls, qg, ra, optimize=True).reshape(nq, -1)
                tg = np.einsum("so,noi,ij->nsj", ls, g, ra, optimize=True).reshape(n, -1)
                forms_mats: dict[str, tuple[np.ndarray, np.ndarray]] = {"kfac factored": (tq, tg)}
                if sk is not None:
                    whitened["kfac factored"][0].append(tq.reshape(qg.shape))
                    whitened["kfac factored"][1].append(tg.reshape(g.shape))
                # kronfluence's K-FAC at the same alpha: P = (S ⊗ A + λ)⁻¹, λ = α · mean(e_S e_Aᵀ)
                eva, qa = np.linalg.eigh(ac)
                evs, qs = np.linalg.eigh(sc)
                lam = np.outer(np.clip(evs, 0, None), np.clip(eva, 0, None))
                inv = 1.0 / np.sqrt(lam + al * lam.mean())
                rq = np.einsum("so,nsi,ij->noj", qs, qg, qa, optimize=True) * inv
                rg = np.einsum("so,nsi,ij->noj", qs, g, qa, optimize=True) * inv
                forms_mats["kfac"] = (rq.reshape(nq, -1), rg.reshape(n, -1))
                # Adafactor-factored Adam and the unfactored diagonal
                r, cc, mv = v.mean(1), v.mean(0), float(v.mean())
                fac = np.sqrt(mv / np.outer(r + al * r.mean(), cc + al * cc.mean()))
                forms_mats["adam factored"] = ((qg * fac).reshape(nq, -1), (g * fac).reshape(n, -1))
                if sk is not None:
                    whitened["adam factored"][0].append(qg * fac)
                    whitened["adam factored"][1].append(g * fac)
                dg = 1.0 / np.sqrt(v + al * v.mean())
                forms_mats["adam sq"] = ((qg * dg).reshape(nq, -1), (g * dg).reshape(n, -1))
                for f, (tq_, tg_) in forms_mats.items():
                    s, qq, gg = acc[f]
                    s += tq_ @ tg_.T
                    qq += (tq_**2).sum(1)
                    gg += (tg_**2).sum(1)
            for f in forms:
                s, qq, gg = acc[f]
                pre[f, al] += w[c] * s
                pcos[f, al] += w[c] * s / np.sqrt(np.outer(qq, gg))
            for f in sketched if sk is not None else ():
                fq, fg = through(c, whitened[f][0]), through(c, whitened[f][1])
                s = fq @ fg.T
                sk_pre[f, al] += w[c] * s
                sk_cos[f, al] += w[c] * s / np.sqrt(np.outer((fq**2).sum(1), (fg**2).sum(1)))
        log(f"checkpoint {c}")
    res: dict[str, list[float]] = {"TracIn raw (float64 gradients)": lds_per_query(raw, masks, losses).tolist()}
    for (f, al), s in pre.items():
        res[f"{f} a={al:g} raw"] = lds_per_query(s, masks, losses).tolist()
        res[f"{f} a={al:g} cosine"] = lds_per_query(pcos[f, al], masks, losses).tolist()
    if sk is not None:
        res[f"raw TracIn through {a.sketch_index}'s sketch"] = lds_per_query(sk_raw, masks, losses).tolist()
        for (f, al), s in sk_pre.items():
            res[f"{f} a={al:g} raw, sketched"] = lds_per_query(s, masks, losses).tolist()
            res[f"{f} a={al:g} cosine, sketched"] = lds_per_query(sk_cos[f, al], masks, losses).tolist()
    print(
        f"LDS of rank-one-preserving preconditioners on {a.train} (N={n}), index {a.index} (exact gradients), {nq} "
        f"held-out queries, {a.subsets} subset models (cache of benchmarks/lds.py in {wd}); 'kfac factored': "
        "(S + a mean e_S)^-1 (x) (A + a mean e_A)^-1; 'adam factored': Adafactor's r c^T / mean of Adam's v, "
        "each factor damped by a x its mean; 'kfac', 'adam sq': the unfactored forms at the same a"
    )
    print("\n".join(paired_table(res, "TracIn raw (float64 gradients)")), flush=True)
    log("done")
    if a.json:
        Path(a.json).write_text(json.dumps({"per_query": res}))


if __name__ == "__main__":
    main()
