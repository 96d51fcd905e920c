"""How much does the random projection cost in answer quality? (measured against the exact answer)

Builds, on one trained digits run, an index with exact gradients (projection none) and
indexes with Kronecker projections of several sizes k, then for a set of query samples
compares each projected index's answers with the exact index's:

* recall@10 of proponents and of opponents (fraction of the exact top-10 found);
* Spearman correlation of the scores over the whole training set;
* the paper's sanity check: fraction of training samples that are their own strongest
  proponent (query = the sample's stored gradient);
* feature dimension and store size;
* and, on the exact index, what answering from a subset of checkpoints, or from a latent-space
  pre-filter of L candidates, costs.

    python benchmarks/projection_fidelity.py [--ks 8,16,32,64] [--queries 64] [--epochs 100]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from proponent.build.data import load_dataset
from proponent.build.job import IndexOptions, build_index, checkpoints_from_run, set_threads
from proponent.build.training import TrainConfig, train
from proponent.model.architectures import default_config_for
from proponent.model.projection import ProjectionSpec
from proponent.query.index import open_index


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default="8,16,32,64")
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--featurizer", default="kron")
    ap.add_argument("--likelihood", default="gaussian", choices=["gaussian", "bernoulli"])
    ap.add_argument("--latent-dim", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    set_threads()
    wd = Path(a.workdir or tempfile.mkdtemp(prefix="fidelity_"))
    data = load_dataset("digits")
    run = wd / "run"
    if not (run / "run.json").exists():
        train(
            data,
            default_config_for(data.shape, latent_dim=a.latent_dim, likelihood=a.likelihood),
            run,
            TrainConfig(epochs=a.epochs, device="cuda" if a.device == "cuda" else "cpu"),
            show_progress=False,
        )
    specs, _ = checkpoints_from_run(run)

    def build(name: str, proj: ProjectionSpec) -> tuple[Path, float]:
        t = time.perf_counter()
        out = build_index(
            data,
            specs,
            wd / name,
            IndexOptions(m=a.m, projection=proj, featurizer=a.featurizer, device=a.device),
            show_progress=False,
        )
        return out, time.perf_counter() - t

    exact_path, t_exact = build("none", ProjectionSpec(kind="none"))
    exact = open_index(exact_path)
    rows = np.arange(a.queries)
    ex_scores = [exact.scores(exact.stored_features(int(r))) for r in rows]

    def sanity(idx) -> str:  # type: ignore[no-untyped-def]
        stored = np.mean([idx.top(idx.stored_features(int(r)), k=1).rows[0] == r for r in range(128)])
        q = idx.featurize(idx.store.images(slice(0, 128)), seed=1)
        fresh = np.mean([idx.top({c: v[r] for c, v in q.items()}, k=1).rows[0] == r for r in range(128)])
        return f"{stored:.3f}/{fresh:.3f}"

    print(
        f"digits, {a.likelihood} likelihood, latent {a.latent_dim}, {a.epochs} epochs; N={exact.n}, "
        f"C={len(exact.checkpoints)}, m={a.m}, featurizer={a.featurizer}, {a.queries} queries"
    )
    print(
        f"{'projection':>12} {'D':>7} {'store MB':>9} {'index s':>8} {'recall@10 pro':>14} {'recall@10 opp':>14} "
        f"{'spearman':>9} {'self-top1 stored/fresh':>23}"
    )
    print(
        f"{'none':>12} {exact.dim:>7} {dir_size(exact_path) / 1e6:>9.1f} {t_exact:>8.1f} {1.0:>14.3f} {1.0:>14.3f} "
        f"{1.0:>9.3f} {sanity(exact):>23}"
    )
    for k in [int(v) for v in a.ks.split(",")]:
        path, t_idx = build(f"k{k}", ProjectionSpec(kind="kron", k=k))
        idx = open_index(path)
        rp, ro, sp = [], [], []
        for r, es in zip(rows, ex_scores):
            s = idx.scores(idx.stored_features(int(r)))
            rp.append(len(set(np.argsort(-s)[:10]) & set(np.argsort(-es)[:10])) / 10)
            ro.append(len(set(np.argsort(s)[:10]) & set(np.argsort(es)[:10])) / 10)
            sp.append(spearman(s, es))
        print(
            f"{'kron k=' + str(k):>12} {idx.dim:>7} {dir_size(path) / 1e6:>9.1f} {t_idx:>8.1f} "
            f"{np.median(rp):>14.3f} {np.median(ro):>14.3f} {np.median(sp):>9.3f} {sanity(idx):>23}"
        )
    # The paper's other scaling suggestion: a subset of checkpoints, measured on exact gradients.
    n_ck = len(exact.checkpoints)
    subsets = [[n_ck - 1], [0, n_ck - 1], list(range(0, n_ck, 2))]
    print(f"\ncheckpoint subsets (exact gradients) against all {n_ck} checkpoints")
    print(f"{'checkpoints':>16} {'recall@10 pro':>14} {'recall@10 opp':>14} {'spearman':>9}")
    for sub in subsets:
        sp_p, sp_o, sp_r = [], [], []
        for r, es in zip(rows, ex_scores):
            s = exact.scores(exact.stored_features(int(r), checkpoints=sub), checkpoints=sub)
            sp_p.append(len(set(np.argsort(-s)[:10]) & set(np.argsort(-es)[:10])) / 10)
            sp_o.append(len(set(np.argsort(s)[:10]) & set(np.argsort(es)[:10])) / 10)
            sp_r.append(spearman(s, es))
        print(
            f"{','.join(map(str, sub)):>16} {np.median(sp_p):>14.3f} {np.median(sp_o):>14.3f} {np.median(sp_r):>9.3f}"
        )
    # The paper's first scaling suggestion: score only the nearest samples in latent space.
    print("\nlatent pre-filter (exact gradients): score only the L nearest training samples in latent space")
    print(f"{'L':>16} {'recall@10 pro':>14} {'recall@10 opp':>14}")
    mu = exact.store.array("latent_mu")
    for size in (50, 200, 800):
        pf_p, pf_o = [], []
        for r, es in zip(rows, ex_scores):
            q = exact.stored_features(int(r))
            cand = exact.latent_neighbours(mu[int(r)], size)
            pro = exact.top(q, k=10, candidates=cand).rows
            opp = exact.top(q, k=10, direction="opponents", candidates=cand).rows
            pf_p.append(len(set(pro.tolist()) & set(np.argsort(-es)[:10].tolist())) / 10)
            pf_o.append(len(set(opp.tolist()) & set(np.argsort(es)[:10].tolist())) / 10)
        print(f"{size:>16} {np.median(pf_p):>14.3f} {np.median(pf_o):>14.3f}")
    print(
        "(recall and spearman: medians over queries; self-top1: fraction of the first 128 training samples that are"
        " their own strongest proponent, querying with the stored gradient / with fresh query draws)"
    )


if __name__ == "__main__":
    main()
