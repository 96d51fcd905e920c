"""LDS of optimizer-aware TracIn: the query's gradient preconditioned by Adam's second moments (TrackStar's idea).

Runs on the cache of ``benchmarks/lds.py`` (same ``--workdir``, same settings) and its index of exact
gradients (``--index exact``, ``projection=none``). Each checkpoint c's Adam state gives the bias-corrected
second moments ``v̂_c`` of every parameter (:func:`proponent.model.checkpoints.adam_second_moments`), laid
out as the index's rows are (per layer ``G [out, in]``, bias column last). Variants, with ``D_c`` diagonal:

* ``adam step``:   Σ_c w_c q_cᵀ D_c g_c(i), ``D_c = 1 / (sqrt(v̂_c) + ε_c)``: TracIn over the step Adam
  actually takes for a sample's gradient (the linearised update), ``ε_c = α · mean sqrt(v̂_c)``;
* ``adam sq``:     ``D_c = 1 / (v̂_c + λ_c)``, ``λ_c = α · mean v̂_c``: both sides divided by sqrt(v̂) as
  TrackStar does (its unit normalisation is the ``cosine`` scoring here);

each with ``raw`` and ``cosine`` (divided by ``sqrt(qᵀDq · gᵀDg)``) scorings, the paired difference against
raw TracIn on the same queries. The training rows are the float64 per-sample gradients rebuilt from the
featurizer's hooks with the index's draws (``benchmarks/lds_kfac.py``'s ``layer_factors``).

The cache's full model must carry its optimizer state (proponent's training saves it in every
checkpoint since this benchmark). For a cache trained before, ``--retrain-state`` trains the full model
again with the cache's own settings into ``<workdir>/full-adam`` and uses that run's optimizer states after
checking that its weights equal the cached checkpoints' (the largest difference is printed).

    python benchmarks/lds_adam.py --workdir runs/lds --index exact --retrain-state --alphas 1e-3,1e-2,0.1,1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from proponent.analysis.lds import add_cache_arguments, cache_from_arguments, lds_per_query, paired_table, stderr_log
from proponent.api.schemas import InfluenceParams
from proponent.format.fsio import read_json
from proponent.indexer.training import train
from proponent.model.checkpoints import adam_second_moments, load_checkpoint, read_checkpoint
from proponent.query.index import open_index
from proponent.query.usecase import query_vectors
from proponent.threads import set_threads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lds_kfac import layer_factors  # noqa: E402  (a sibling benchmark: the per-sample gradient capture)


def moments_per_checkpoint(cache, wd: Path, retrain: bool, log) -> tuple[list[dict[str, torch.Tensor]], float]:
    """Adam's v̂ per named parameter for every checkpoint of the cache's full model, and the largest weight
    difference between the run they come from and the cached one (0 when the cache's own checkpoints carry them)."""
    run = read_json(cache.run_dir / "run.json")
    cached = [cache.run_dir / c["path"] for c in run["checkpoints"]]
    source, worst = cached, 0.0
    if adam_second_moments(read_checkpoint(cached[0]), load_checkpoint(cached[0])[0], str(cached[0])) is None:
        if not retrain:
            raise SystemExit(f"{cache.run_dir}: the checkpoints carry no optimizer state; pass --retrain-state")
        again = wd / "full-adam" / "run"
        if not (again / "run.json").exists():
            log("retraining the full model with the cache's settings to recover its optimizer states")
            train(cache.data, cache.model_config, again, cache.train_config, show_progress=False)
        source = [again / c["path"] for c in read_json(again / "run.json")["checkpoints"]]
        for a, b in zip(cached, source):
            sa, sb = load_checkpoint(a)[0].state_dict(), load_checkpoint(b)[0].state_dict()
            worst = max(worst, max(float((sa[k] - sb[k]).abs().max()) for k in sa))
    out = []
    for path in source:
        model = load_checkpoint(path)[0]
        v = adam_second_moments(read_checkpoint(path), model, str(path))
        assert v is not None
        out.append(v)
    return out, worst


def open_with_moments(a, log):
    """``(workdir, exact index, LDS cache, v̂ per checkpoint, weight difference)`` for the arguments of
    :func:`proponent.analysis.lds.add_cache_arguments` and ``--retrain-state``; refuses a sketched index."""
    wd = Path(a.workdir)
    idx = open_index(wd / "index" / a.index, device="cpu")
    if idx.manifest.projection.kind != "none":
        raise SystemExit(f"index {a.index} is sketched; this benchmark needs exact gradients (projection=none)")
    cache = cache_from_arguments(a)
    moments, worst = moments_per_checkpoint(cache, wd, a.retrain_state, log)
    return wd, idx, cache, moments, worst


def diag_rows(idx, v: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """v̂ laid out as each layer's row block ``G [out, in]`` (bias column last)."""
    out = []
    for lay in idx.manifest.projection.layers:
        if lay.bias_dim:
            raise SystemExit(f"layer {lay.name}: a separate bias block (ConvTranspose2d) is not laid out here")
        w = v[lay.params[0]].reshape(lay.out_dim, -1)
        if len(lay.params) > 1:
            w = torch.cat([w, v[lay.params[1]].reshape(lay.out_dim, 1)], dim=1)
        if tuple(w.shape) != (lay.out_dim, lay.in_dim):
            raise SystemExit(f"layer {lay.name}: moments {list(w.shape)} vs rows {[lay.out_dim, lay.in_dim]}")
        out.append(w.numpy())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cache_arguments(ap, index="exact")
    ap.add_argument("--alphas", default="1e-3,1e-2,0.1,1,10")
    ap.add_argument("--retrain-state", action="store_true", help="recover the optimizer states by retraining")
    a = ap.parse_args()
    set_threads(a.threads)
    log = stderr_log()

    wd, idx, cache, moments, worst = open_with_moments(a, log)
    if worst > 1e-4:
        raise SystemExit(f"the retrained full model differs from the cached one by {worst:g}: not the same run")
    qx, masks, losses = cache.query_x, cache.masks, cache.losses
    w = idx.meta.weights("lr")
    n, nq = idx.n, len(qx)
    log(f"featurizing {nq} queries")
    qvs = [query_vectors(idx, InfluenceParams(seed=0), x=x) for x in qx]
    alphas = [float(s) for s in a.alphas.split(",") if s]
    raw, cos = np.zeros((nq, n)), np.zeros((nq, n))
    forms = ("adam step", "adam sq")
    pre = {(f, al): np.zeros((nq, n)) for f in forms for al in alphas}
    pcos = {(f, al): np.zeros((nq, n)) for f in forms for al in alphas}
    for c in range(len(idx.meta.checkpoints)):
        _, _, grads, _ = layer_factors(idx, c)
        g = np.concatenate([x.reshape(n, -1) for x in grads], axis=1)
        q = np.stack([np.asarray(v.vectors[c], np.float64) for v in qvs])
        vhat = np.concatenate([x.reshape(-1) for x in diag_rows(idx, moments[c])])
        d = q @ g.T
        raw += w[c] * d
        cos += w[c] * d / np.sqrt(np.outer((q**2).sum(1), (g**2).sum(1)))
        for form in forms:
            base = np.sqrt(vhat) if form == "adam step" else vhat
            for al in alphas:
                dg = 1.0 / (base + al * base.mean())
                s = (q * dg) @ g.T
                pre[form, al] += w[c] * s
                pcos[form, al] += w[c] * s / np.sqrt(np.outer((q**2 * dg).sum(1), (g**2 * dg).sum(1)))
        log(f"checkpoint {c}: D={g.shape[1]}, v̂ from {len(moments[c])} parameters")
    res: dict[str, list[float]] = {
        "TracIn raw (float64 gradients)": lds_per_query(raw, masks, losses).tolist(),
        "TracIn cosine": lds_per_query(cos, masks, losses).tolist(),
    }
    for (form, al), s in pre.items():
        res[f"{form} a={al:g} raw"] = lds_per_query(s, masks, losses).tolist()
        res[f"{form} a={al:g} cosine"] = lds_per_query(pcos[form, al], masks, losses).tolist()
    print(
        f"LDS of Adam-preconditioned TracIn on {a.train} (N={n}), index {a.index} (D={idx.dim}, exact gradients), "
        f"{nq} held-out queries, {a.subsets} subset models (cache of benchmarks/lds.py in {wd}); "
        f"v̂ = Adam's bias-corrected second moments of each checkpoint"
        + (f" (from a retrained run: weights within {worst:.1e} of the cached ones)" if a.retrain_state else "")
        + "; 'adam step': 1/(sqrt(v̂) + a mean sqrt(v̂)), 'adam sq': 1/(v̂ + a mean v̂)"
    )
    print("\n".join(paired_table(res, "TracIn raw (float64 gradients)")), flush=True)
    log("done")
    if a.json:
        Path(a.json).write_text(json.dumps({"per_query": res, "weight_difference": worst}))


if __name__ == "__main__":
    main()
