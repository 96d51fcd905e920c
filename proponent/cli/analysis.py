"""Analysis commands of the ``proponent`` CLI: classical, factors, report, influence.

Registered by :func:`register`, which ``proponent.cli.build_parser`` calls.
Bad input raises ``ValueError`` with one line, which ``cli.main``
prints as ``proponent: error: ...``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np


def _ids_arg(text: str) -> list[int]:
    try:
        return _ids(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ids(text: str) -> list[int]:
    """``1,2,3`` or ``@FILE`` (ids separated by commas, spaces or newlines; ``#`` comments)."""
    src = text
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            src = path.read_text()
        except OSError as e:
            raise ValueError(f"cannot read id file {path}: {e.strerror or e}") from None
        src = "\n".join(line.split("#", 1)[0] for line in src.splitlines())
    toks = [t for t in src.replace(",", " ").split() if t]
    try:
        return [int(t) for t in toks]
    except ValueError:
        bad = next(t for t in toks if not t.lstrip("-").isdigit())
        raise ValueError(
            f"expected integer sample ids, got {bad!r} in {text if len(text) < 60 else text[:57] + '...'}"
        ) from None


# ------------------------------------------------------------------------------------ classical


def _cmd_classical(a: argparse.Namespace) -> int:
    from proponent.analysis.classical import plot_classical

    paths = plot_classical(a.method, a.out, seed=a.seed)
    for p in paths:
        print(p)
    return 0


# ------------------------------------------------------------------------------------ factors


def _cmd_factors(a: argparse.Namespace) -> int:
    from proponent.analysis.factors import classify_factors, latent_mutual_information
    from proponent.query.index import open_index

    idx = open_index(a.index, device="cpu", use_gpu_faiss=False)
    if not idx.store.latent_dim:
        raise ValueError(f"{a.index}: the index stores no latent posteriors (not a VAE index)")
    mu = np.asarray(idx.store.array("latent_mu"), np.float64)
    logvar = np.asarray(idx.store.array("latent_logvar"), np.float64)
    rows = np.sort(np.random.default_rng(a.seed).permutation(len(mu))[: a.max_rows])
    mi = latent_mutual_information(mu[rows], logvar[rows], seed=a.seed)
    split = classify_factors(mi, threshold=a.threshold)
    if a.json:
        print(
            json.dumps(
                {
                    "mi": [float(v) for v in mi],
                    "influential": split.influential.tolist(),
                    "collapsed": split.collapsed.tolist(),
                    "threshold": split.threshold,
                    "rows": int(rows.size),
                }
            )
        )
        return 0
    inf = set(split.influential.tolist())
    print(f"mutual information I(x; z_j) on {rows.size} samples (nats; threshold {split.threshold:.3g}):")
    for j, v in enumerate(mi):
        print(f"  z{j:<3d} {v:8.4f}  {'influential' if j in inf else 'collapsed'}")
    print(f"influential: {split.influential.tolist()}")
    print(f"collapsed:   {split.collapsed.tolist()}")
    return 0


# ------------------------------------------------------------------------------------ report


def _cmd_report(a: argparse.Namespace) -> int:
    from proponent.analysis.report import write_report

    path = write_report(a.index, a.out, queries=a.queries, outliers=a.outliers, convention=a.convention, seed=a.seed)
    numbers = json.loads(path.with_suffix(".json").read_text())
    extra = ""
    if numbers.get("detection"):
        extra = f"; outlier detection AUC {numbers['detection']['auc']:.3f}"
    print(f"wrote {path} (R² self-influence vs loss {numbers['self_influence_vs_loss']['r2']:.3f}{extra})")
    return 0


# ------------------------------------------------------------------------------------ influence


def _cmd_influence(a: argparse.Namespace) -> int:
    from proponent.query.crossloss import make_query_objective
    from proponent.query.index import open_index

    if (a.sample_id is None) == (a.image is None):
        raise ValueError("give exactly one of --sample-id N or --image FILE")
    if a.k < 1:
        raise ValueError(f"--k must be >= 1, got {a.k}")
    idx = open_index(a.index, device=a.device, use_gpu_faiss=False)
    label = a.label
    if a.sample_id is not None:
        row = idx.row_of(a.sample_id)
        x = idx.image(row)
        if label is None and a.objective == "probe" and int(idx.labels[row]) >= 0:
            label = int(idx.labels[row])
        query: dict[str, int | str] = {"sample_id": int(a.sample_id)}
    else:
        from proponent.build.data import load_image_bytes

        path = Path(a.image)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read image {path}: {e.strerror or e}") from None
        x = load_image_bytes(raw, idx.shape, allow_resize=a.resize)
        query = {"image": str(path)}
    obj = make_query_objective(idx, a.objective, beta=a.beta, label=label)
    q = idx.featurize(
        np.asarray(x)[None], objective=obj, seed=a.seed, labels=None if label is None else np.array([label])
    )
    qf = {c: v[0] for c, v in q.items()}
    directions = ["proponents", "opponents"] if a.direction == "both" else [a.direction]
    out: dict[str, Any] = {**query, "objective": a.objective, "convention": a.convention, "seed": a.seed}
    for d in directions:
        res = idx.top(qf, k=min(a.k, idx.n), direction=d, convention=a.convention)  # type: ignore[arg-type]
        out[d] = [
            {
                "rank": i + 1,
                "sample_id": int(sid),
                "score": float(s),
                "label": int(idx.labels[r]) if int(idx.labels[r]) >= 0 else None,
                "injected": bool(idx.injected[r]),
            }
            for i, (r, sid, s) in enumerate(zip(res.rows, res.ids, res.scores, strict=True))
        ]
        out[f"{d}_exact"] = bool(res.exact)
    if a.json:
        print(json.dumps(out))
        return 0
    for d in directions:
        print(f"{d} ({'exact' if out[f'{d}_exact'] else 'approximate'}):")
        for hit in out[d]:
            lab = "" if hit["label"] is None else f"  label {hit['label']}"
            inj = "  injected" if hit["injected"] else ""
            print(f"  {hit['rank']:3d}  id {hit['sample_id']:<8d} score {hit['score']:+.6g}{lab}{inj}")
    return 0


# ------------------------------------------------------------------------------------ registration


def register(sub: Any) -> None:
    c = sub.add_parser("classical", help="closed-form influence figures of k-NN / KDE / GMM on the six-cluster toy")
    c.add_argument("--method", choices=["knn", "kde", "gmm"], required=True)
    c.add_argument("--out", required=True, help="output directory for the PNG figures")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=_cmd_classical)

    f = sub.add_parser("factors", help="mutual information between the input and each latent factor")
    f.add_argument("--index", required=True)
    f.add_argument("--json", action="store_true", help="print JSON")
    f.add_argument("--threshold", type=float, default=0.01, help="nats; influential at or above (default 0.01)")
    f.add_argument("--max-rows", type=int, default=3000, help="subsample the index to this many rows (default 3000)")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=_cmd_factors)

    r = sub.add_parser("report", help="HTML report of the paper's analyses on an index")
    r.add_argument("--index", required=True)
    r.add_argument("--out", required=True, help="HTML file (numbers also go to the .json next to it)")
    r.add_argument("--queries", type=_ids_arg, help="sample ids, e.g. 1,2,3 or @FILE")
    r.add_argument("--outliers", type=_ids_arg, help="known outlier ids, e.g. 5,9 or @FILE (default: injected rows)")
    r.add_argument("--convention", choices=["lr", "visits"], default="lr")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=_cmd_report)

    i = sub.add_parser("influence", help="proponents / opponents of a stored sample or an image file (offline)")
    i.add_argument("--index", required=True)
    i.add_argument("--sample-id", type=int)
    i.add_argument("--image", help="image file (PNG, JPEG, .npy)")
    i.add_argument("--resize", action="store_true", help="resize the image to the index's shape")
    i.add_argument("--k", type=int, default=10)
    i.add_argument("--direction", choices=["proponents", "opponents", "both"], default="both")
    i.add_argument("--objective", default="elbo", help="elbo | reconstruction | kl | elbo_beta | probe")
    i.add_argument("--label", type=int, help="query label (objective probe; default: the stored sample's)")
    i.add_argument("--beta", type=float, help="β of objective elbo_beta")
    i.add_argument("--convention", choices=["lr", "visits"], default="lr")
    i.add_argument("--seed", type=int, default=0, help="query noise seed")
    i.add_argument("--device", default="cpu")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_cmd_influence)
