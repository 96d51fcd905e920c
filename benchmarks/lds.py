"""Linear datamodeling score (LDS) of the scorings and index configurations, on the digits VAE.

Trains the VAE on the training split, builds one index per configuration, retrains M VAEs on
random halves of the training split with the same TrainConfig (cached under --workdir), measures
each held-out query's loss under fixed draws with every retrained model, and reports, per index
configuration x query variant (checkpoint subset, latent pre-filter) x scoring, the Spearman
correlation over subsets between predicted group influence Σ_{i∈S_j} score(q, i) and the
negative loss, averaged over queries (see proponent/analysis/lds.py for the definitions and the
seed scheme).

    python benchmarks/lds.py --workdir runs/lds [--subsets 50] [--queries 100]
    python benchmarks/lds.py --workdir runs/lds --index "k32 projection=kron k=32"   # one more layout
    python benchmarks/lds.py --workdir runs/lds_paired --paired --epochs 800   # paired retraining (below)

``--paired`` trains every model (the full one and the subsets) on full batches from the same initial weights
with each sample's draws keyed by its id: a subset model then differs from the full model only by the samples
it leaves out, the counterfactual the LDS asks about, without the batch-order and draw noise of minibatch
training (which the cross-seed ceiling of ``benchmarks/lds_grid.py`` measures).

An index configuration is one string: a name, then ``key=value`` tokens. ``layers``, ``m``,
``featurizer`` and ``dtype`` go to IndexOptions; ``projection`` is ProjectionSpec's kind and
every other key is passed to ProjectionSpec as is (``k``, ``seed``, and whatever fields the
projection grows). Re-runs reuse the trained models, the retrained subset models, their losses
and every index already built.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from proponent.analysis.lds import (
    fixed_query_noise,
    injected_effect,
    lds_per_query,
    lds_rows,
    paired_difference,
    retrain_subsets,
    subset_masks,
    summarize,
)
from proponent.analysis.scoring_comparison import SCORINGS
from proponent.indexer.data import load_dataset
from proponent.indexer.job import IndexOptions, build_index, checkpoints_from_run
from proponent.indexer.training import TrainConfig, train
from proponent.model.architectures import ModelConfig, default_config_for
from proponent.model.projection import ProjectionSpec
from proponent.query.index import open_index
from proponent.threads import set_threads

# The index layouts measured by default; add a new projection layout with one more line.
DEFAULT_INDEXES = [
    "default",  # the default layout (per-layer tensor sketches, D = 7,996, int8)
    "kron64 projection=kron k=64",  # the first version's layout
    "exact projection=none",  # exact gradients, no projection
    "last2 projection=kron k=64 layers=last:2",  # the last two layers only (decoder.2, decoder.4)
]
_INDEX_OPTION_KEYS = {"layers": str, "m": int, "featurizer": str, "dtype": str}


def parse_index_config(text: str, default_m: int) -> tuple[str, IndexOptions]:
    """``"NAME key=value ..."`` -> (name, IndexOptions)."""
    name, *tokens = text.split()
    proj: dict[str, Any] = {}
    opts: dict[str, Any] = {"m": default_m}
    fields = {f.name: f for f in dataclasses.fields(ProjectionSpec)}
    for token in tokens:
        key, eq, value = token.partition("=")
        if not eq:
            raise SystemExit(f"index config {text!r}: expected key=value, got {token!r}")
        if key in _INDEX_OPTION_KEYS:
            opts[key] = _INDEX_OPTION_KEYS[key](value)
        elif key == "projection":
            proj["kind"] = value
        elif key in fields:
            default = getattr(ProjectionSpec(), key)
            proj[key] = type(default)(value) if isinstance(default, int | float) else value
        else:
            raise SystemExit(f"index config {text!r}: unknown key {key!r}")
    return name, IndexOptions(projection=ProjectionSpec(**proj), **opts)


def baseline_rows(
    idx: Any, data: Any, query_x: np.ndarray, query_labels: np.ndarray | None, masks: np.ndarray, losses: np.ndarray
) -> list[dict[str, Any]]:
    """LDS of attributions that use no gradients: random, same class, latent nearest neighbours."""
    q = len(query_x)
    cands: list[tuple[str, np.ndarray]] = [("random scores", np.random.default_rng(0).normal(size=(q, idx.n)))]
    if data.labels is not None and query_labels is not None:
        same = (data.labels[None, :] == query_labels[:q, None]) & (data.labels[None, :] >= 0)
        cands.append(("same class (1 / 0)", same.astype(np.float64)))
    if idx.meta.latent_mu is not None:
        d2 = ((idx.runtime.latent_means(query_x)[:, None, :] - idx.meta.latent_mu[None]) ** 2).sum(-1)
        for size in (50, 200):
            nn = np.zeros_like(d2)
            np.put_along_axis(nn, np.argsort(d2, axis=1)[:, :size], 1.0, axis=1)
            cands.append((f"{size} nearest in latent space (1 / 0)", nn))
        cands.append(("minus latent distance", -np.sqrt(d2)))
    cands.append(("self-influence (same for every query)", np.tile(idx.self_influence(), (q, 1))))
    out = []
    for name, s in cands:
        per_query = lds_per_query(s, masks, losses)
        out.append({"name": name, **summarize(per_query), "per_query": per_query.tolist()})
    return out


def fmt(row: dict[str, Any]) -> str:
    return f"{row['mean']:+.3f} ± {row['std']:.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--train", default="digits,limit=1597", help="training split (data spec)")
    ap.add_argument("--queries-from", default="digits,offset=1597", help="held-out queries (data spec)")
    ap.add_argument("--queries", type=int, default=100, help="number of held-out queries (the first ones)")
    ap.add_argument("--subsets", type=int, default=50)
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--subset-seed", type=int, default=0)
    ap.add_argument("--vary-seed", action="store_true", help="train subset j with seed+1+j (default: same seed)")
    ap.add_argument("--loss-m", type=int, default=32, help="fixed draws per query for the measured loss")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--paired",
        action="store_true",
        help="full batches and draws keyed by sample id (TrainConfig noise=keyed): the subset models differ from "
        "the full model only by the samples left out (same initial weights, no batch-order noise)",
    )
    ap.add_argument("--latent-dim", type=int, default=16)
    ap.add_argument("--model", default=None, choices=["mlp", "conv"], help="VAE kind (default: mlp)")
    ap.add_argument("--hidden", default=None, help="MLP widths, comma-separated (default: the data's default)")
    ap.add_argument("--channels", default=None, help="conv VAE channels per stride-2 stage, comma-separated")
    ap.add_argument("--m", type=int, default=16, help="draws per sample in the indexes")
    ap.add_argument(
        "--index", action="append", help="index configuration (repeatable); default: " + "; ".join(DEFAULT_INDEXES)
    )
    ap.add_argument("--checkpoint-sets", default="all,last,first+last")
    ap.add_argument("--prefilters", default="200", help="latent pre-filter sizes L (comma-separated; '' for none)")
    ap.add_argument("--scorings", default=",".join(SCORINGS))
    ap.add_argument("--convention", default="lr", choices=["lr", "visits"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-baselines", dest="baselines", action="store_false", help="skip the gradient-free baselines")
    ap.add_argument("--json", default=None, help="write all numbers (per-query LDS included) here")
    a = ap.parse_args()
    set_threads(a.threads)
    wd = Path(a.workdir)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    data = load_dataset(a.train)
    run = wd / "full" / "run"
    if not (run / "run.json").exists():
        log(f"training the full model on {a.train} ({len(data)} samples)")
        widths = {k: [int(v) for v in getattr(a, k).split(",")] for k in ("hidden", "channels") if getattr(a, k)}
        cfg = default_config_for(data.shape, kind=a.model, latent_dim=a.latent_dim, **widths)
        tc = TrainConfig(
            epochs=a.epochs,
            batch_size=len(data) if a.paired else a.batch_size,
            noise="keyed" if a.paired else "stream",
        )
        train(data, cfg, run, tc, show_progress=False)
    specs, run_meta = checkpoints_from_run(run)
    if run_meta["data"]["fingerprint"] != data.fingerprint:
        raise SystemExit(f"{run}: trained on other data than {a.train}; use another --workdir")
    model_config = ModelConfig.from_dict(run_meta["model_config"])
    train_config = TrainConfig(**run_meta["train"])
    t_full = run_meta["seconds"]

    held_out = load_dataset(a.queries_from)
    query_x = held_out.x[: a.queries]
    eps = fixed_query_noise(len(query_x), a.loss_m, (model_config.latent_dim,), seed=0)
    masks = subset_masks(len(data), a.subsets, a.fraction, a.subset_seed)
    t0 = time.perf_counter()
    losses = retrain_subsets(
        data, model_config, train_config, masks, wd, query_x, eps, vary_seed=a.vary_seed, progress=log
    )
    t_retrain = time.perf_counter() - t0
    log(f"subset models ready ({t_retrain:.0f}s); loss spread over subsets: median std {np.median(losses.std(0)):.3f}")

    configs = [parse_index_config(t, a.m) for t in (a.index or DEFAULT_INDEXES)]
    prefilters = [int(v) for v in a.prefilters.split(",") if v.strip()]
    results: dict[str, Any] = {
        "train": a.train,
        "queries_from": a.queries_from,
        "n_train": len(data),
        "n_queries": len(query_x),
        "subsets": a.subsets,
        "fraction": a.fraction,
        "vary_seed": a.vary_seed,
        "loss_m": a.loss_m,
        "train_config": dataclasses.asdict(train_config),
        "convention": a.convention,
        "seconds": {"full_training": t_full, "subsets": t_retrain},
        "indexes": {},
    }
    for name, opts in configs:
        t0 = time.perf_counter()
        path = build_index(data, specs, wd / "index" / name, opts, show_progress=False)
        t_index = time.perf_counter() - t0
        idx = open_index(path, device="cpu")
        t0 = time.perf_counter()
        rows = lds_rows(
            idx,
            query_x,
            masks,
            losses,
            scorings=a.scorings.split(","),
            checkpoint_sets=a.checkpoint_sets.split(","),
            prefilters=prefilters,
            convention=a.convention,
        )
        log(f"index {name}: D={idx.dim}, built/opened in {t_index:.0f}s, LDS in {time.perf_counter() - t0:.0f}s")
        results["indexes"][name] = {
            "options": {"projection": opts.projection.to_dict(), "layers": opts.layers, "m": opts.m},
            "dim": idx.dim,
            "rows": rows,
        }
        if data.injected.any():
            results["indexes"][name]["injected_effect"] = injected_effect(
                idx, query_x, masks, losses, scorings=a.scorings.split(","), convention=a.convention
            )
        if a.baselines and "baselines" not in results:
            results["baselines"] = baseline_rows(idx, data, query_x, held_out.labels, masks, losses)
        del idx

    print(
        f"LDS on {a.train} (N={len(data)}), {len(query_x)} held-out queries from {a.queries_from}, "
        f"{a.subsets} subset models on {a.fraction:.0%} subsets, loss under {a.loss_m} fixed draws, "
        f"TrainConfig epochs={train_config.epochs} lr={train_config.lr} batch={train_config.batch_size} "
        f"noise={train_config.noise} "
        f"seed={'varied' if a.vary_seed else train_config.seed}; weights {a.convention}"
    )

    print("mean ± std over queries [95% bootstrap CI of the mean]")
    scorings = a.scorings.split(",")
    header = f"{'index':>8} {'D':>6} {'variant':>15} " + " ".join(f"{s:>32}" for s in scorings)
    print(header)
    for name, entry in results["indexes"].items():
        by_variant: dict[str, dict[str, Any]] = {}
        for r in entry["rows"]:
            by_variant.setdefault(r["variant"], {})[r["scoring"]] = r
        for variant, cells in by_variant.items():
            print(f"{name:>8} {entry['dim']:>6} {variant:>15} " + " ".join(f"{fmt(cells[s]):>32}" for s in scorings))
    pairs = [(hi, lo) for i, lo in enumerate(scorings) for hi in scorings[i + 1 :]]
    if pairs:
        print("\npaired per-query differences (the same queries scored two ways): mean [95% bootstrap CI]")
        print(f"{'index':>8} {'variant':>15} " + " ".join(f"{hi + ' - ' + lo:>26}" for hi, lo in pairs))
        for name, entry in results["indexes"].items():
            by_variant = {}
            for r in entry["rows"]:
                by_variant.setdefault(r["variant"], {})[r["scoring"]] = r
            for variant, cells in by_variant.items():
                diffs = []
                for hi, lo in pairs:
                    d = paired_difference(cells[hi]["per_query"], cells[lo]["per_query"])
                    cells[hi]["minus_" + lo] = d
                    diffs.append(f"{d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]")
                print(f"{name:>8} {variant:>15} " + " ".join(f"{t:>26}" for t in diffs))
    effects = {name: e["injected_effect"] for name, e in results["indexes"].items() if "injected_effect" in e}
    if effects:
        first = next(iter(effects.values()))["actual"]
        print(
            f"\ninjected rows: Spearman(number of injected rows in the subset, -loss) = {fmt(first)}"
            " (0: removing them does not change the clean queries' losses)"
        )
        print(
            f"{'index':>8} {'scoring':>8} {'LDS, clean rows only':>32} {'LDS, injected rows only':>32} "
            f"{'predicted variance from injected':>33}"
        )
        for name, eff in effects.items():
            for scoring, e in eff["scorings"].items():
                print(
                    f"{name:>8} {scoring:>8} {fmt(e['lds_clean_rows_only']):>32} "
                    f"{fmt(e['lds_injected_rows_only']):>32} {e['predicted_variance_share_injected']:>33.2f}"
                )
    if results.get("baselines"):
        print("\nbaselines (no gradients; what LDS a trivial attribution gets on the same subsets and losses)")
        for r in results["baselines"]:
            print(f"{r['name']:>40} {fmt(r):>32}")
    log("done")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
