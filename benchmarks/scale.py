"""Scale on one machine: bytes on disk, index time, server RSS and exact query latency against N.

For each N (``--sizes``), at the default feature layout:

* N ≤ ``--real-max``: a real index through the real indexer on synthetic 28×28 data
  (``digits,size=28,augment=N``: affine variants of scikit-learn's digits, upscaled) with an
  MNIST-size MLP VAE (784→512→256→16, trained ``--epochs``), m = 16, 5 checkpoints;
* larger N: the real index format with random features (``proponent.indexer.synthetic``), same
  layout, C = 5, through the index job's own phases;

then ``proponent serve`` in memory mode (when the features fit the budget) and in stream mode,
``--queries`` sequential uploads each, and beside them the float32 numpy scan floor over the
first version's layout (D = 19,520 per checkpoint: Kronecker k = 64, float32), measured in the same
run (``query_latency.old_layout_floor``). Prints one table; medians.

Targets (issue "Scale on one machine"): N = 60,000 at defaults ≤ 3 GB on disk, served exactly with
RSS ≤ 4 GB and query p50 ≤ 0.25× the floor; N = 1,000,000 served exactly on a 24 GB machine
(streamed), p50 reported.

Usage::

    python benchmarks/scale.py                                  # 10k, 60k real; 250k, 1M synthetic
    python benchmarks/scale.py --sizes 10000,60000 --queries 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.query_latency import old_layout_floor, rss_bytes, run_queries, start_server, stop_server  # noqa: E402


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def real_index(work: Path, n: int, epochs: int) -> tuple[Path, float]:
    """Train an MNIST-size VAE on N synthetic 28×28 digits and index it at the defaults; returns (dir, index s)."""
    root = work / f"real-{n}"
    idx = root / "idx"
    if (idx / "manifest.json").is_file():
        from proponent.format.fsio import IndexDir
        from proponent.format.manifest import read_manifest

        man = read_manifest(IndexDir(idx))
        timings = idx / "timings.json"
        if man.complete:
            return idx, float(json.loads(timings.read_text())["seconds"]) if timings.is_file() else 0.0
    shutil.rmtree(root, ignore_errors=True)
    cli = [sys.executable, "-m", "proponent"]
    data = f"digits,size=28,augment={-(-n // 1797)},limit={n}"  # 1,797 images per affine variant
    subprocess.run(
        [*cli, "train", "--data", data, "--out", str(root / "run"), "--hidden", "512,256", "--epochs", str(epochs)]
        + ["--batch-size", "128", "--quiet"],
        check=True,
    )
    t = time.perf_counter()
    subprocess.run([*cli, "index", "--run", str(root / "run"), "--out", str(idx), "--quiet"], check=True)
    return idx, time.perf_counter() - t


def synthetic(work: Path, n: int) -> tuple[Path, float]:
    from proponent.indexer.job import IndexOptions
    from proponent.indexer.synthetic import synthetic_index

    d = IndexOptions()
    dim = d.projection.sketch_dim or d.projection.dim  # the default layout's width (tensor: 7,996)
    out = work / f"synthetic-{n}-d{dim}-{d.dtype}"
    t = time.perf_counter()
    synthetic_index(out, n=n, checkpoints=5, dim=dim, dtype=d.dtype)
    return out, time.perf_counter() - t


def serve_and_measure(index: Path, work: Path, mode: str, queries: int, budget: str | None) -> dict:
    import httpx

    extra = ["--feature-mode", mode] + (["--memory-budget", budget] if budget else [])
    env = {"PROPONENT_REQUEST_TIMEOUT_S": "3600"}
    t = time.perf_counter()
    proc, url = start_server(index, work, env, name=f"scale-{mode}", extra=extra)
    try:
        ready_s = time.perf_counter() - t
        info = httpx.get(url + "/v1/index", timeout=60).json()
        res = run_queries(url, tuple(info["shape"]), queries, 2, 10)
        res["rss"] = rss_bytes(proc.pid)
        res["ready_s"] = ready_s
        res["mode"] = info["serving"]["mode"]
    finally:
        stop_server(proc)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,60000,250000,1000000")
    ap.add_argument("--real-max", type=int, default=60_000, help="largest N indexed for real (larger: synthetic)")
    ap.add_argument("--epochs", type=int, default=2, help="training epochs of the real indexes")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--stream-queries", type=int, default=5, help="queries per streamed server (slow at 1M)")
    ap.add_argument("--memory-budget", help="server budget (default: half the available RAM)")
    ap.add_argument("--workdir", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "proponent-scale"))
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    from proponent.format.fsio import IndexDir
    from proponent.format.manifest import read_manifest

    rows = []
    for n in (int(s) for s in a.sizes.split(",")):
        idx, t_index = real_index(work, n, a.epochs) if n <= a.real_max else synthetic(work, n)
        man = read_manifest(IndexDir(idx))
        floor_ms = old_layout_floor(n, len(man.checkpoints)) * 1e3
        row = {
            "n": n,
            "kind": "real" if n <= a.real_max else "synthetic",
            "d": man.dim,
            "dtype": man.storage.dtype,
            "disk": dir_bytes(idx),
            "index_s": t_index,
            "floor_ms": floor_ms,
        }
        mem = serve_and_measure(idx, work, "auto", a.queries, a.memory_budget)
        row["auto"] = mem
        if mem["mode"] != "stream":
            row["stream"] = serve_and_measure(idx, work, "stream", a.stream_queries, a.memory_budget)
        rows.append(row)
        print(f"N={n}: {row}", flush=True)

    print()
    head = (
        f"{'N':>9} {'data':>9} {'D':>5} {'dtype':>7} {'disk/sample':>11} {'disk GB':>8} {'index s':>8} "
        f"{'mode':>8} {'RSS GiB':>8} {'p50 ms':>9} {'p99 ms':>9} {'floor ms':>9} {'p50/floor':>9}"
    )
    print(head)
    for r in rows:
        for key in ("auto", "stream"):
            if key not in r:
                continue
            m = r[key]
            print(
                f"{r['n']:>9} {r['kind']:>9} {r['d']:>5} {r['dtype']:>7} {r['disk'] / r['n'] / 1024:>9.1f}KB "
                f"{r['disk'] / 1e9:>8.2f} {r['index_s']:>8.0f} {m['mode']:>8} {m['rss'] / 2**30:>8.2f} "
                f"{m['p50_ms']:>9.1f} {m['p99_ms']:>9.1f} {r['floor_ms']:>9.1f} {m['p50_ms'] / r['floor_ms']:>9.3f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
