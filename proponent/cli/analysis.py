"""Analysis commands of the ``proponent`` CLI: classical, factors, report.

Registered by :func:`register`, which ``proponent.cli.build_parser`` calls.
Bad input raises ``ValueError`` with one line, which ``cli.main``
prints as ``proponent: error: ...``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from proponent.analysis.factors import DEFAULT_MAX_ROWS
from proponent.api.registry import PRECONDITIONS, SCORINGS


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
    from proponent.analysis.classical import plot_classical  # lazy: CLI start-up

    paths = plot_classical(a.method, a.out, seed=a.seed)
    for p in paths:
        print(p)
    return 0


# ------------------------------------------------------------------------------------ factors


def _cmd_factors(a: argparse.Namespace) -> int:
    from proponent.analysis.factors import index_factors  # lazy: CLI start-up
    from proponent.query.index import open_index

    idx = open_index(a.index, device="cpu", use_gpu_faiss=False, feature_mode="stream")
    res = index_factors(idx, max_rows=a.max_rows, seed=a.seed, threshold=a.threshold)
    if a.json:
        print(json.dumps(res))
        return 0
    inf = set(res["influential"])
    print(f"mutual information I(x; z_j) on {res['rows_used']} samples (nats; threshold {res['threshold']:.3g}):")
    for j, v in enumerate(res["mi"]):
        print(f"  z{j:<3d} {v:8.4f}  {'influential' if j in inf else 'collapsed'}")
    print(f"influential: {res['influential']}")
    print(f"collapsed:   {res['collapsed']}")
    return 0


# ------------------------------------------------------------------------------------ report


def _cmd_report(a: argparse.Namespace) -> int:
    from proponent.analysis.report import write_report  # lazy: CLI start-up

    path = write_report(
        a.index,
        a.out,
        queries=a.queries,
        outliers=a.outliers,
        convention=a.convention,
        scoring=a.scoring,
        precondition=a.precondition,
        seed=a.seed,
    )
    numbers = json.loads(path.with_suffix(".json").read_text())
    extra = ""
    if numbers.get("detection"):
        extra = f"; outlier detection AUC {numbers['detection']['auc']:.3f}"
    print(f"wrote {path} (R² self-influence vs loss {numbers['self_influence_vs_loss']['r2']:.3f}{extra})")
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
    f.add_argument(
        "--max-rows",
        type=int,
        default=DEFAULT_MAX_ROWS,
        help=f"subsample to this many rows (default {DEFAULT_MAX_ROWS})",
    )
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=_cmd_factors)

    r = sub.add_parser("report", help="HTML report of the paper's analyses on an index")
    r.add_argument("--index", required=True)
    r.add_argument("--out", required=True, help="HTML file (numbers also go to the .json next to it)")
    r.add_argument("--queries", type=_ids_arg, help="sample ids, e.g. 1,2,3 or @FILE")
    r.add_argument("--outliers", type=_ids_arg, help="known outlier ids, e.g. 5,9 or @FILE (default: injected rows)")
    r.add_argument("--convention", choices=["lr", "visits"], default="lr")
    r.add_argument("--scoring", choices=list(SCORINGS), help=f"default: the API's default scoring ({SCORINGS.default})")
    r.add_argument(
        "--precondition",
        choices=list(PRECONDITIONS),
        default=PRECONDITIONS.default,
        help="the proponents/opponents section's preconditioner (gram, kfac, ekfac: need `proponent precondition "
        "[--kind]`)",
    )
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=_cmd_report)
