"""LDS of TracIn averaged over independently trained models (an ensemble of seeds), and the LDS ceiling.

Runs on the cache of ``benchmarks/lds.py`` (same ``--workdir`` and settings: digits, 100 subset
models, 200 held-out queries; the full model of seed 0 and its ``default`` index). Trains full
models with training seeds 1..S-1 (the same TrainConfig otherwise), indexes each with the default
layout (``<workdir>/ens/seed{s}/``), scores the same held-out queries (raw and cosine, all
checkpoints, query seed 0) and reports the LDS of the ensemble of the first 1, 2, 4 models:

* ``plain mean``: the mean of the models' scores -- what one index over the runs' concatenated
  checkpoints (``proponent index --run A --run B ...``) ranks by (it sums them), up to the noise
  draws, which the index keys by checkpoint position;
* the mean of each model's scores divided by their mean absolute value per query (no model
  dominates by its scale).

**The ceiling.** The first ``--ceiling-subsets`` subsets are retrained with other training seeds
(subset j with seed 1 + j: ``retrain_subsets(vary_seed=True)``, cached too); the LDS of those
models' losses as the prediction of the seed-0 subset models' losses is what retraining itself
achieves as a predictor: an attribution that knew the expected effect of every subset exactly
would still be limited by the training noise of the models it is judged against.

    python benchmarks/lds_ensemble.py --workdir runs/lds [--seeds 4] [--ceiling-subsets 50]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from proponent.analysis.lds import (
    lds_per_query,
    open_lds_cache,
    paired_difference,
    spearman_rows,
    summarize,
)
from proponent.analysis.scoring_comparison import query_dots
from proponent.indexer.job import IndexOptions, build_index, checkpoints_from_run
from proponent.indexer.training import train
from proponent.query.index import open_index
from proponent.query.usecase import combine
from proponent.threads import set_threads


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True, help="the workdir of a benchmarks/lds.py run (default settings)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--subsets", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--ceiling-subsets", type=int, default=50)
    a = ap.parse_args()
    set_threads(1)
    wd = Path(a.workdir)
    cache = open_lds_cache(wd, queries=a.queries, subsets=a.subsets)
    data, qx, masks, losses = cache.data, cache.query_x, cache.masks, cache.losses
    mc, tc = cache.model_config, cache.train_config
    print(
        f"LDS of seed ensembles on digits (N={len(data)}), {len(qx)} held-out queries, {a.subsets} subset models "
        f"(seed {tc.seed}, cache of benchmarks/lds.py in {wd}); full models with seeds 0..{a.seeds - 1}, "
        "default layout, all checkpoints; mean LDS [95% CI] and the paired difference against one model's raw TracIn"
    )
    out: dict[str, list[float]] = {}
    scores: dict[str, list[np.ndarray]] = {"raw": [], "cosine": []}
    for s in range(a.seeds):
        run = wd / "full" / "run" if s == 0 else wd / "ens" / f"seed{s}" / "run"
        if not (run / "run.json").exists():
            print(f"training seed {s}", file=sys.stderr, flush=True)
            train(data, mc, run, dataclasses.replace(tc, seed=s), show_progress=False)
        specs, _ = checkpoints_from_run(run)
        path = wd / "index" / "default" if s == 0 else wd / "ens" / f"seed{s}" / "index"
        if not (path / "manifest.json").exists():
            build_index(data, specs, path, IndexOptions(m=16), show_progress=False)
        score_file = wd / "ens" / f"scores{s}_{a.queries}.npz"
        if score_file.exists():
            z = np.load(score_file)
            raw, cos = z["raw"], z["cosine"]
        else:
            idx = open_index(path, device="cpu")
            qs = [query_dots(idx, x, seed=0) for x in qx]
            raw = np.stack([combine(idx, qv, d, scoring="raw") for qv, d in qs])
            cos = np.stack([combine(idx, qv, d, scoring="cosine") for qv, d in qs])
            score_file.parent.mkdir(parents=True, exist_ok=True)
            np.savez(score_file, raw=raw, cosine=cos)
        scores["raw"].append(raw)
        scores["cosine"].append(cos)
        print(f"seed {s} ready", file=sys.stderr, flush=True)
    for scoring, mats in scores.items():
        for size in (1, 2, 4, 8):
            if size > len(mats):
                continue
            # raw scores of different models live on different scales: average each model's scores
            # divided by its mean |score| (per query) so no model dominates
            norm = [m / np.abs(m).mean(axis=1, keepdims=True) for m in mats[:size]]
            out[f"{scoring} ens={size}"] = lds_per_query(np.mean(norm, axis=0), masks, losses).tolist()
            out[f"{scoring} ens={size} plain mean"] = lds_per_query(
                np.mean(mats[:size], axis=0), masks, losses
            ).tolist()
    base = out["raw ens=1"]
    for k, v in out.items():
        s = summarize(v)
        d = paired_difference(v, base)
        print(
            f"{k:>28} {s['mean']:+.3f} [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]  - raw {d['mean']:+.3f} "
            f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]",
            flush=True,
        )
    # the ceiling: the same subsets retrained with other seeds predict the first set's losses
    mc_masks = masks[: a.ceiling_subsets]
    vary = open_lds_cache(wd, queries=a.queries, subsets=a.ceiling_subsets, vary_seed=True).losses
    ceil = spearman_rows(-vary.T, -losses[: a.ceiling_subsets].T)
    s = summarize(ceil)
    print(
        f"ceiling (subsets 0..{a.ceiling_subsets - 1} retrained with seeds 1+j predict the seed-0 losses): "
        f"{s['mean']:+.3f} [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]"
    )
    r1 = lds_per_query(scores["raw"][0], mc_masks, losses[: a.ceiling_subsets])
    print(f"raw ens=1 on the same {a.ceiling_subsets} subsets: {summarize(r1)['mean']:+.3f}")
    Path(wd / "ens" / "lds_ensemble.json").write_text(json.dumps({**out, "ceiling": ceil.tolist()}))


if __name__ == "__main__":
    main()
