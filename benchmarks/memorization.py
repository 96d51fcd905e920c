"""Self-influence checked against retraining: the leave-out memorization score (van den Burg & Williams 2021).

The memorization score of training sample i is how much more likely the model finds it when it
was trained on it than when it was not::

    M(i) = E_{models trained with i}[log p(x_i)] - E_{models trained without i}[log p(x_i)]

estimated K-fold as in the paper: the training set is split into K folds (R times, with
independent splits), one model is trained without each fold, and for i in fold k the "without"
side is the model that left fold k out, the "with" side the mean over the other K - 1 models of
the same split. ``log p(x_i)`` is approximated by minus the training loss (the negative ELBO,
paper eq. 6) under ``--loss-m`` fixed draws per sample (the same draws for every model, so the
difference comes from the training data, not from Monte Carlo noise).

A few rare samples are injected (``glyphs``: generated letters among the digits); the full
model is trained on everything and indexed (the default layout), and every self-influence
variant is compared with M over all samples: Spearman, and the overlap of the top-k sets.

Variants: ``raw`` TracIn self-influence Σ_c w_c ||g_c(i)||² (what ``proponent self-influence``
computes), the same at the last checkpoint only, the Gram-preconditioned self-influence (the
leverage Σ_c w_c f_c(i)ᵀ(Φ_cᵀΦ_c + λ_c I)⁻¹ f_c(i) over the stored features, λ_c = α · the mean
eigenvalue of Φ_cᵀΦ_c, swept), K-FAC and EK-FAC leverage (kronfluence's per-layer preconditioners as
the product serves them: ``proponent precondition --kind kfac|ekfac --alpha α`` then
``self_influence(precondition=…)``, the exact Σ_c w_c Σ_l g_l(i)ᵀ(Λ_l + λ_l)⁻¹ g_l(i), λ_l = α · mean Λ_l,
swept), the plain self-influence of whitened indexes (``--whiten kfac:0.1``: ``proponent index --whiten``, the
factored-damping K-FAC leverage over the default sketched layout's exact whitened norms), and the final model's
loss (a gradient-free baseline).

    python benchmarks/memorization.py --workdir /work/cache/mem [--folds 5 --repeats 2]

Training noise dominates such an estimate on a small model: two independent splits' estimates agree at a
Spearman of only 0.04 with minibatch training (``benchmarks/results/memorization_digits300.txt``). With
``--paired`` every model (the full one too) trains on full batches from the same initial weights with each
sample's draws keyed by its id (``TrainConfig(noise="keyed")``): a model without fold k then differs from
the full-data model only by the samples left out, as the leave-out definition intends.

    python benchmarks/memorization.py --workdir /work/cache/mem_paired --paired --epochs 600 --repeats 4
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from proponent.analysis.lds import GramBlock, query_losses
from proponent.format.fsio import read_json
from proponent.indexer.data import load_dataset
from proponent.indexer.job import IndexOptions, build_index, checkpoints_from_run
from proponent.indexer.training import TrainConfig, train
from proponent.model.architectures import ModelConfig, default_config_for
from proponent.model.checkpoints import load_checkpoint
from proponent.model.objectives import draw_noise
from proponent.query.index import open_index
from proponent.threads import set_threads

NOISE_MEM = 3  # noise domain of the fixed loss draws (index features use 0, queries 1, LDS 2)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def spearman_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 1000) -> tuple[float, float]:
    """95% bootstrap interval of Spearman(a, b) over the samples (resampled with replacement, fixed seed)."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    vals = [float(spearmanr(a[i], b[i]).statistic) for i in idx]
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def fold_masks(n: int, folds: int, repeats: int) -> list[np.ndarray]:
    """``repeats`` independent splits of 0..n-1 into ``folds`` folds: fold id per row, one array per split."""
    out = []
    for r in range(repeats):
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([NOISE_MEM, r])))
        out.append(rng.permutation(n) % folds)
    return out


def leverage(index: Any, alpha: float, convention: str = "lr") -> np.ndarray:
    """Σ_c w_c f_c(i)ᵀ(Φ_cᵀΦ_c + λ_c I)⁻¹ f_c(i), λ_c = alpha x the mean eigenvalue of Φ_cᵀΦ_c (float64)."""
    w = index.weights(convention)
    out = np.zeros(index.n)
    for c in range(len(index.meta.checkpoints)):
        phi = index.features.exact_rows(c, np.arange(index.n))
        block = GramBlock(phi, phi[:1])
        out += w[c] * block.apply(alpha * block.trace / block.width)[1]
    return out


def kfac_leverage(path: Path, alphas: list[float], kind: str, convention: str = "lr") -> dict[float, np.ndarray]:
    """The product's K-FAC / EK-FAC self-influence per alpha: ``proponent precondition --kind KIND --alpha A`` on
    the index (replacing the one stored before), then ``self_influence(precondition=KIND)``, the exact leverage
    Σ_c w_c Σ_l g_l(i)ᵀ P_l g_l(i) that ``proponent self-influence --precondition KIND`` ranks by (exact on any
    index: it comes from each row's exact per-layer gradient, not from the stored sketch)."""
    from proponent.cli import main as cli_main  # lazy: only for the K-FAC rows

    out = {}
    for al in alphas:
        with contextlib.redirect_stdout(sys.stderr):  # the command's report goes to the log, not the table
            rc = cli_main(["precondition", "--index", str(path), "--kind", kind, "--alpha", repr(al)])
        if rc != 0:
            raise SystemExit(f"proponent precondition --kind {kind} --alpha {al} failed on {path}")
        out[al] = open_index(path, device="cpu").self_influence(convention, precondition=kind)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--data", default="digits,limit=1000+glyphs:n=20,injected")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--paired",
        action="store_true",
        help="full batches and keyed draws: models differ only by the samples left out (same initial weights)",
    )
    ap.add_argument("--loss-m", type=int, default=64)
    ap.add_argument("--alphas", default="1,100,1000", help="the Gram preconditioner's damping multiples")
    ap.add_argument(
        "--kfac-alphas",
        default="1e-3,1e-2,0.1,1",
        help="K-FAC / EK-FAC damping multiples (proponent precondition --kind kfac|ekfac; empty: skip)",
    )
    ap.add_argument(
        "--whiten",
        default="",
        help="whitened indexes to add, KIND:ALPHA comma-separated (proponent index --whiten KIND --whiten-alpha "
        "ALPHA; adam needs a full model saved with optimizer state): their plain self-influence is the factored "
        "leverage",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    set_threads(a.threads)
    wd = Path(a.workdir)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    data = load_dataset(a.data)
    n = len(data)
    cfg = default_config_for(data.shape)
    tc = TrainConfig(
        epochs=a.epochs,
        batch_size=n if a.paired else a.batch_size,
        lr=a.lr,
        noise="keyed" if a.paired else "stream",
    )
    wd.mkdir(parents=True, exist_ok=True)
    config = {"data": a.data, "train": dataclasses.asdict(tc)}
    if (wd / "config.json").exists() and read_json(wd / "config.json") != config:
        raise SystemExit(f"{wd} holds models trained with {read_json(wd / 'config.json')}: use another --workdir")
    (wd / "config.json").write_text(json.dumps(config))
    full = wd / "full" / "run"
    if not (full / "run.json").exists():
        log(f"training the full model on {n} samples")
        train(data, cfg, full, tc, show_progress=False)
    eps = draw_noise(NOISE_MEM, 0, 0, np.arange(n), a.loss_m, (cfg.latent_dim,))
    # log p(x_i) ≈ -loss of every model on every sample, [R, K, N]
    ll = np.zeros((a.repeats, a.folds, n))
    splits = fold_masks(n, a.folds, a.repeats)
    t0 = time.perf_counter()
    for r, fold in enumerate(splits):
        for k in range(a.folds):
            run = wd / f"split{r}" / f"fold{k}" / "run"
            if not (run / "run.json").exists():
                log(f"training split {r} fold {k} (without {int((fold == k).sum())} samples)")
                train(data.subset(fold != k), cfg, run, dataclasses.replace(tc, checkpoints=1), show_progress=False)
            meta = read_json(run / "run.json")
            model, _, _ = load_checkpoint(
                run / meta["checkpoints"][-1]["path"], ModelConfig.from_dict(meta["model_config"])
            )
            ll[r, k] = -query_losses(model, cfg, data.x, eps)
    t_retrain = time.perf_counter() - t0
    mem = np.zeros((a.repeats, n))
    for r, fold in enumerate(splits):
        for k in range(a.folds):
            rows = fold == k
            others = [j for j in range(a.folds) if j != k]
            mem[r, rows] = ll[r, others][:, rows].mean(axis=0) - ll[r, k, rows]
    m_score = mem.mean(axis=0)
    # the estimate's own repeatability: mean Spearman between independent splits' estimates, and what
    # that implies for their mean over R splits (Spearman-Brown): no variant can track M better than M
    # tracks itself
    pairs = [(i, j) for i in range(a.repeats) for j in range(i + 1, a.repeats)]
    split_agreement = float(np.mean([spearman(mem[i], mem[j]) for i, j in pairs])) if pairs else float("nan")
    reliability = a.repeats * split_agreement / (1 + (a.repeats - 1) * split_agreement)

    path = wd / "index"
    if not (path / "manifest.json").exists():
        log("indexing the full model (default layout)")
        specs, _ = checkpoints_from_run(full)
        build_index(data, specs, path, IndexOptions(), show_progress=False)
    idx = open_index(path, device="cpu")
    last = len(idx.meta.checkpoints) - 1
    variants: dict[str, np.ndarray] = {
        "raw TracIn self-influence": idx.self_influence(),
        "raw, last checkpoint": idx.self_influence(checkpoints=[last]),
    }
    for alpha in [float(v) for v in a.alphas.split(",") if v]:
        variants[f"Gram-preconditioned (leverage), alpha={alpha:g}"] = leverage(idx, alpha)
    for kind in ("kfac", "ekfac"):
        for al, v in kfac_leverage(path, [float(v) for v in a.kfac_alphas.split(",") if v], kind).items():
            variants[f"{kind.upper()} leverage, alpha={al:g}"] = v
    for entry in [e for e in a.whiten.split(",") if e]:
        kind, _, al = entry.partition(":")
        wpath = wd / f"index-whiten-{kind}-{al}"
        if not (wpath / "manifest.json").exists():
            log(f"indexing the full model whitened by {kind} (alpha {al})")
            specs, _ = checkpoints_from_run(full)
            opts = IndexOptions(whiten=kind, whiten_alpha=float(al))
            build_index(data, specs, wpath, opts, show_progress=False)
        variants[f"whitened index ({kind}, alpha={float(al):g})"] = open_index(wpath, device="cpu").self_influence()
    variants["final model's loss (no gradients)"] = idx.losses().astype(np.float64)
    inj = np.asarray(idx.meta.injected, bool)
    ks = sorted({int(inj.sum()), 50, 100})
    top_m = {k: set(np.argsort(-m_score, kind="stable")[:k].tolist()) for k in ks}
    print(
        f"memorization (van den Burg & Williams 2021) on {a.data} (N={n}, {int(inj.sum())} injected), "
        f"{a.folds}-fold x {a.repeats} splits ({a.folds * a.repeats} models, {t_retrain:.0f}s), "
        f"log p ~ -ELBO under {a.loss_m} fixed draws; TrainConfig epochs={tc.epochs} lr={tc.lr} batch={tc.batch_size} "
        f"noise={tc.noise}"
    )
    print(
        f"memorization score: median {np.median(m_score):+.3f}, injected median {np.median(m_score[inj]):+.3f}; "
        f"mean Spearman between two independent splits' estimates {split_agreement:+.3f} "
        f"(the estimate's own repeatability; for the mean of {a.repeats} splits, Spearman-Brown: {reliability:+.3f})"
    )
    header = f"{'self-influence variant':>48} {'Spearman [95% CI over samples]':>30} {'clean only':>11} " + " ".join(
        f"{'top-' + str(k) + ' overlap':>15}" for k in ks
    )
    print(header)
    results: dict[str, Any] = {
        "data": a.data,
        "n": n,
        "injected": int(inj.sum()),
        "folds": a.folds,
        "repeats": a.repeats,
        "split_agreement": split_agreement,
        "reliability_of_mean": reliability,
        "variants": {},
    }
    for name, v in variants.items():
        rho = spearman(v, m_score)
        lo, hi = spearman_ci(v, m_score)
        rho_clean = spearman(v[~inj], m_score[~inj])
        overlaps = {k: len(top_m[k] & set(np.argsort(-v, kind="stable")[:k].tolist())) / k for k in ks}
        results["variants"][name] = {
            "spearman": rho,
            "spearman_ci": [lo, hi],
            "spearman_clean": rho_clean,
            "top_overlap": overlaps,
        }
        print(
            f"{name:>48} {rho:>+9.3f} [{lo:+.3f}, {hi:+.3f}] {rho_clean:>+11.3f} "
            + " ".join(f"{overlaps[k]:>15.2f}" for k in ks)
        )
    log("done")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
