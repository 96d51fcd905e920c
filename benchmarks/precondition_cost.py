"""What ``precondition=gram`` costs: the time and bytes of ``proponent precondition`` on an existing index, and
the query latency with and without it (same index, same queries, same process).

    python benchmarks/precondition_cost.py --index DIR [--queries 20] [--alpha 1000] [--rank 2048]

The index is preconditioned in place (``DIR`` should be a copy). Prints one table; results go to
``benchmarks/results/precondition_cost_*.txt`` by the caller's redirection.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from proponent.format import precond
from proponent.format.fsio import index_dir
from proponent.format.integrity import open_store
from proponent.format.manifest import read_manifest
from proponent.query.index import open_index


def apply_cost(ckpt_dir: str, reps: int = 20) -> None:
    """The query side of one checkpoint: load + sha256 of its arrays, then P q and qᵀPq (medians of ``reps``)."""
    import hashlib
    from pathlib import Path

    d = Path(ckpt_dir)
    t0 = time.perf_counter()
    arrays = {}
    for name in ("vectors", "values", "leverage"):
        data = (d / f"{name}.npy").read_bytes()
        hashlib.sha256(data).hexdigest()
        arrays[name] = np.load(d / f"{name}.npy")
    load_s = time.perf_counter() - t0
    vec, val = arrays["vectors"], arrays["values"]
    pre = precond.CheckpointPreconditioner(vec, val, arrays["leverage"], float(val.mean()) * 1000)
    q = np.random.default_rng(0).standard_normal(vec.shape[0])
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        pre.apply_quad(q)
        times.append(time.perf_counter() - t0)
    size = sum((d / f"{n}.npy").stat().st_size for n in arrays)
    print(
        f"{ckpt_dir}: D={vec.shape[0]}, rank {vec.shape[1]}, {size} bytes; read + sha256 {load_s:.2f} s; "
        f"P q and qᵀPq (one pass): {np.median(times) * 1e3:.2f} ms (median of {reps})"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--alpha", type=float, default=precond.DEFAULT_ALPHA)
    ap.add_argument("--rank", type=int, default=precond.DEFAULT_RANK)
    ap.add_argument(
        "--apply-only",
        metavar="CKPT_DIR",
        help="time only the query side from one stored checkpoint's arrays (precond/<tag>/ckpt_000): "
        "reading and checking them, P q and qᵀPq",
    )
    a = ap.parse_args()
    if a.apply_only:
        apply_cost(a.apply_only)
        return
    where = index_dir(a.index)
    man = read_manifest(where)
    t0 = time.perf_counter()
    man = precond.compute(where, man, open_store(where, man), alpha=a.alpha, rank=a.rank)
    make_s = time.perf_counter() - t0
    rec = man.precondition
    assert rec is not None
    size = sum(where.size(f.path) for ck in rec.checkpoints for f in (ck.vectors, ck.values, ck.leverage))
    feats = sum(where.file_sizes("store.zarr").values())
    print(f"index {a.index}: N={man.n}, D={man.dim}, C={len(man.checkpoints)}, {man.storage.dtype}")
    print(
        f"proponent precondition: {make_s:.1f} s, {size} bytes stored ({size / feats:.2f}x the store's {feats} bytes); "
        f"ranks {[ck.rank for ck in rec.checkpoints]}, truncated {[ck.truncated for ck in rec.checkpoints]}"
    )
    idx = open_index(a.index, device="cpu")
    t0 = time.perf_counter()
    idx.preconditioner()
    print(f"first gram query loads and checks it: {time.perf_counter() - t0:.2f} s")
    ids = [int(i) for i in idx.meta.ids[:: max(1, idx.n // a.queries)][: a.queries]]
    print(
        f"{'precondition':>12} {'scoring':>8} {'p50 total ms':>13} {'p50 search ms':>14}  ({len(ids)} stored samples)"
    )
    for pre in ("none", "gram"):
        for scoring in ("raw", "cosine"):
            tot, srch = [], []
            for sid in ids:
                r = idx.influence(sample_id=sid, k=10, scoring=scoring, precondition=pre, features="stored")
                tot.append(r.timings.total_ms)
                srch.append(r.timings.search_ms)
            print(f"{pre:>12} {scoring:>8} {np.median(tot):13.2f} {np.median(srch):14.2f}")


if __name__ == "__main__":
    main()
