"""What ``precondition=kfac|ekfac`` costs and how close a sketched index gets to the exact preconditioned scores.

    python benchmarks/precondition_kfac.py --index DIR [--exact-index DIR2] [--queries 20] [--alpha 0.01] [--reuse]
        [--skip-p50] [--symmetric]

``DIR`` (e.g. the default ``proponent index`` of ``proponent train --data digits``) is preconditioned in place with
``--kind gram``, ``kfac`` and ``ekfac``, and ``DIR2`` (``--exact-index``: the same run indexed with
``--projection none``) with ``kfac`` and ``ekfac`` (timed; bytes against the store's); then the same stored
samples are queried (fresh query draws, k=10, cosine) with what each index answers (the sketched one: none, gram,
kfac, ekfac; the exact one: none, kfac, ekfac): p50 of the answer's total, featurize and search times. Last, the
sketched index's K-FAC / EK-FAC scores (the preconditioned query mapped through its projection) against the exact
index's: the relative error ``||s - s_exact|| / ||s_exact||`` of every row's raw score and recall@10 of the exact
proponents / opponents, medians over the queries (none: the sketch's own error, for scale). ``--symmetric`` adds
the form not built, for the same comparison: every row's ``S P^{1/2} g_i`` (its exact gradient with the index's
draws, preconditioned by half, through the index's sketch; float64, held in memory) scanned with ``S P^{1/2} q``.
Results go to
``benchmarks/results/precondition_kfac_*.txt`` by the caller's redirection.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from proponent.format import curvature, precond
from proponent.format.curvature import rotate
from proponent.format.fsio import index_dir
from proponent.format.integrity import open_store
from proponent.format.manifest import read_manifest
from proponent.indexer.curvature import compute
from proponent.indexer.fidelity import recall_at
from proponent.model.curvature import LayerGradients
from proponent.model.objectives import NOISE_INDEX, NOISE_QUERY, draw_noise, objective_at
from proponent.query.curvature import to_features
from proponent.query.index import open_index


def _make(path: str, kind: str, alpha: float | None) -> None:
    where = index_dir(path)
    man = read_manifest(where)
    store = open_store(where, man)
    feats = sum(where.file_sizes("store.zarr").values())
    t0 = time.perf_counter()
    if kind == "gram":
        man = precond.compute(where, man, store)
        rec = man.precondition
        assert rec is not None
        size = sum(where.size(f.path) for ck in rec.checkpoints for f in (ck.vectors, ck.values, ck.leverage))
        extra = f"alpha={rec.alpha:g}"
    else:
        man = compute(where, man, store, kind, alpha=curvature.DEFAULT_ALPHA if alpha is None else alpha)
        crec = man.curvature[kind]
        size = sum(where.size(f.path) for ck in crec.checkpoints for f in (ck.factors, ck.leverage))
        worst = max(ck.norm_error for ck in crec.checkpoints)
        extra = f"alpha={crec.alpha:g}, exact norms within {worst:.1e} of the stored ones"
    print(
        f"  {path}: --kind {kind}: {time.perf_counter() - t0:.1f} s, {size} bytes ({size / feats:.3f}x the store's "
        f"{feats} bytes); {extra}",
        flush=True,
    )


def mapped_scores(idx, sid: int, kind: str) -> np.ndarray:
    """Raw scores of the form a sketched index refuses to serve: the stored-sample query's preconditioned exact
    gradient (fresh query draws, seed 0, as ``scores(sample_id=…)`` takes them) mapped through the index's own
    projection, against every stored row."""
    from proponent.query.curvature import query_features

    cks = list(range(len(idx.checkpoints)))
    w = idx.weights("lr")
    x = idx.input(idx.row_of(sid))
    vec, _, _ = query_features(idx, kind, idx.runtime.objective, x, None, seed=0, checkpoints=cks, per_draw=False)
    return sum(w[c] * (idx.features.exact_rows(c, np.arange(idx.n)).astype(np.float64) @ vec[c]) for c in cks)


def _p50(idx, pres: list[str], ids: list[int]) -> None:
    for pre in pres:
        tot, feat, srch = [], [], []
        for sid in ids:
            r = idx.influence(sample_id=sid, k=10, scoring="cosine", precondition=pre)
            tot.append(r.timings.total_ms)
            feat.append(r.timings.featurize_ms)
            srch.append(r.timings.search_ms)
        print(f"{pre:>12} {np.median(tot):13.2f} {np.median(feat):17.2f} {np.median(srch):14.2f}", flush=True)


def _half(lay, g: np.ndarray) -> np.ndarray:
    """``P^{1/2} G`` of one layer: rotate, divide by sqrt(Λ + λ), rotate back."""
    h = rotate(g, lay.qa, lay.qs) / np.sqrt(lay.eig + lay.lam)
    return np.einsum("so,...oj,ij->...si", lay.qs, h, lay.qa, optimize=True)


def symmetric_form(idx, ex, kind: str, ids: list[int], batch: int = 64) -> None:
    """The form not built: rows ``S P^{1/2} g_i`` (the index's sketch of every row's preconditioned-by-half exact
    gradient) scanned with ``S P^{1/2} q``, against the exact index's scores, as the table above."""
    rt, man = idx.runtime, idx.manifest
    w = idx.meta.weights("lr")
    cks = list(range(len(man.checkpoints)))
    pre = idx.curvature(kind)
    rows, caps = {}, {}
    for c in cks:
        model64 = idx.model64(c)
        cap = LayerGradients(model64, objective_at(rt.objective, c), [b.info for b in rt.projector(c).blocks])
        caps[c] = cap
        shape = cap.feat.objective.noise_shape(model64)
        out = np.empty((idx.n, idx.dim))
        for lo in range(0, idx.n, batch):
            hi = min(idx.n, lo + batch)
            x = torch.from_numpy(idx.store.inputs(slice(lo, hi)))
            y = torch.from_numpy(np.clip(idx.meta.labels[lo:hi], 0, None))
            eps = draw_noise(NOISE_INDEX, man.objective.seed, c, idx.meta.ids[lo:hi], man.objective.m, shape)
            half = [_half(lay, g) for lay, g in zip(pre[c].layers, cap.grads(x, y, eps), strict=True)]
            out[lo:hi] = to_features(idx, c, half)
        rows[c] = out
    errs, rp, ro = [], [], []
    for sid in ids:
        row = idx.row_of(sid)
        xt = torch.from_numpy(idx.input(row)[None])
        yt = rt.labels_for(1, None)
        s = np.zeros(idx.n)
        for c in cks:
            cap = caps[c]
            eps = draw_noise(
                NOISE_QUERY,
                0,
                c,
                np.zeros(1, np.int64),
                man.objective.m,
                cap.feat.objective.noise_shape(idx.model64(c)),
            )
            half = [_half(lay, g) for lay, g in zip(pre[c].layers, cap.grads(xt, yt, eps), strict=True)]
            s += w[c] * (rows[c] @ to_features(idx, c, half)[0])
        e = ex.scores(sample_id=sid, scoring="raw", precondition=kind)
        errs.append(float(np.linalg.norm(s - e) / np.linalg.norm(e)))
        rp.append(recall_at(e, s, 10, True))
        ro.append(recall_at(e, s, 10, False))
    print(f"{kind + ' S P^1/2':>12} {np.median(errs):11.3f} {np.median(rp):14.2f} {np.median(ro):14.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True, help="a sketched index (the default layout)")
    ap.add_argument("--exact-index", default=None, help="the same run indexed with --projection none")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--alpha", type=float, default=None)
    ap.add_argument("--reuse", action="store_true", help="keep preconditioners already stored (no build, no cost)")
    ap.add_argument(
        "--symmetric",
        action="store_true",
        help="also measure the form not built: stored rows S P^(1/2) g_i scanned with S P^(1/2) q (float64 here)",
    )
    ap.add_argument("--skip-p50", action="store_true", help="no latency table")
    a = ap.parse_args()
    paths = [a.index] + ([a.exact_index] if a.exact_index else [])
    for path in paths:
        man = open_index(path, device="cpu").manifest
        print(
            f"index {path}: N={man.n}, D={man.dim} (projection {man.projection.kind}), C={len(man.checkpoints)}, "
            f"{man.storage.dtype}, m={man.objective.m}"
        )
    print("proponent precondition (in place):")
    for path in paths:
        man = open_index(path, device="cpu").manifest
        kinds = ("kfac", "ekfac") if man.projection.is_exact else ("gram", "kfac", "ekfac")
        for kind in kinds:
            stored = man.precondition is not None if kind == "gram" else kind in man.curvature
            if not (a.reuse and stored):
                _make(path, kind, a.alpha)
    for path in [] if a.skip_p50 else paths:
        idx = open_index(path, device="cpu")
        exact = idx.manifest.projection.is_exact
        # a sketched index refuses kfac / ekfac queries (the mapped form is measured below, not served)
        pres = ["none", "kfac", "ekfac"] if exact else ["none", "gram"]
        for kind in pres[1:]:
            t0 = time.perf_counter()
            idx.leverage(0, kind)
            print(f"{path}: the first {kind} query reads and checks it: {time.perf_counter() - t0:.2f} s")
        ids = [int(i) for i in idx.meta.ids[:: max(1, idx.n // a.queries)][: a.queries]]
        print(
            f"{'precondition':>12} {'p50 total ms':>13} {'p50 featurize ms':>17} {'p50 search ms':>14}  ({path}: "
            f"{len(ids)} stored samples, fresh query draws, k=10, cosine)"
        )
        _p50(idx, pres, ids)
    if not a.exact_index:
        return
    idx, ex = open_index(a.index, device="cpu"), open_index(a.exact_index, device="cpu")
    ids = [int(i) for i in idx.meta.ids[:: max(1, idx.n // a.queries)][: a.queries]]
    print("sketched vs exact index (same run, models and draws; raw scores of every row; medians over the queries):")
    print(f"{'precondition':>12} {'rel. error':>11} {'recall@10 pro':>14} {'recall@10 opp':>14}")
    for pre in ("none", "kfac", "ekfac"):
        errs, rp, ro = [], [], []
        for sid in ids:
            s = idx.scores(sample_id=sid, scoring="raw") if pre == "none" else mapped_scores(idx, sid, pre)
            e = ex.scores(sample_id=sid, scoring="raw", precondition=pre)
            errs.append(float(np.linalg.norm(s - e) / np.linalg.norm(e)))
            rp.append(recall_at(e, s, 10, True))
            ro.append(recall_at(e, s, 10, False))
        print(f"{pre:>12} {np.median(errs):11.3f} {np.median(rp):14.2f} {np.median(ro):14.2f}", flush=True)
    if a.symmetric:
        for kind in ("kfac", "ekfac"):
            symmetric_form(idx, ex, kind, ids)


if __name__ == "__main__":
    main()
