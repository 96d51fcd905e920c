"""Why the server keeps one OpenMP pool: a query's featurization on one thread's pool, on a worker
thread once a second pool exists, and on a worker limited with ``proponent.threads.limit_this_thread``.

GNU OpenMP keeps a pool of helper threads per thread that starts parallel work; once the helpers of
all pools outnumber the CPUs it stops spinning between parallel regions, and every small kernel pays
a wake-up. The server therefore runs its torch work on the query engine's worker and limits the job
worker to one thread (``proponent/threads.py``). All three rows are measured in the same run, in
this order, in one process (the second pool cannot be removed once it exists):

1. ``one pool``: featurization on a worker thread, no other thread has run torch;
2. ``limited other``: another thread ran torch after ``limit_this_thread(1)`` (no pool): as 1;
3. ``two pools``: another thread ran torch with the process's thread count: every kernel slower.

The index is a small real one (28×28 digits, MLP 784→512→256→16, m = 16, 5 checkpoints), built
under ``--workdir`` on first use, or ``--index DIR``. Medians of ``--repeats`` featurizations of
one upload (the per-draw features included, as the server's default asks).

Usage::

    python benchmarks/query_threads.py --threads 2
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def build(work: Path) -> Path:
    idx = work / "idx"
    if (idx / "manifest.json").is_file():
        return idx
    cli = [sys.executable, "-m", "proponent"]
    data = "digits,size=28,limit=1797"
    subprocess.run([*cli, "train", "--data", data, "--out", str(work / "run"), "--hidden", "512,256", "--epochs", "3",
                    "--quiet"], check=True)  # fmt: skip
    subprocess.run([*cli, "index", "--run", str(work / "run"), "--out", str(idx), "--quiet"], check=True)
    return idx


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--index", help="an index directory (default: a small digits index under --workdir)")
    ap.add_argument("--workdir", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "proponent-query-threads"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=40)
    a = ap.parse_args()
    index_dir = Path(a.index) if a.index else build(Path(a.workdir))

    import numpy as np
    import torch

    from proponent.query.index import open_index
    from proponent.threads import limit_this_thread, set_threads

    n = set_threads(a.threads)
    worker = cf.ThreadPoolExecutor(1, thread_name_prefix="engine")  # the server's query worker
    idx = worker.submit(open_index, str(index_dir)).result()  # all torch work so far on this thread
    cks = list(range(len(idx.manifest.checkpoints)))
    x = np.random.default_rng(0).random(idx.shape, dtype=np.float32)[None]

    def featurize_ms() -> float:
        ts = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            idx.runtime.featurize(x, checkpoints=cks, per_draw=True)
            ts.append(time.perf_counter() - t)
        return statistics.median(ts[2:]) * 1e3

    def torch_work(limit: bool) -> None:
        if limit:
            limit_this_thread(1)
        for _ in range(20):
            torch.randn(256, 512) @ torch.randn(512, 512)

    # the other threads stay alive, as a server's job worker does (a thread's pool goes when it exits)
    limited, unlimited = cf.ThreadPoolExecutor(1), cf.ThreadPoolExecutor(1)
    rows = [("one pool", worker.submit(featurize_ms).result())]
    limited.submit(torch_work, True).result()
    rows.append(("limited other thread", worker.submit(featurize_ms).result()))
    unlimited.submit(torch_work, False).result()
    rows.append(("two pools", worker.submit(featurize_ms).result()))
    print(f"query featurization (5 checkpoints, m = 16, per-draw features), {n} threads, N = {idx.n}")
    print(f"{'':24} {'p50 ms':>8} {'vs one pool':>12}")
    for name, ms in rows:
        print(f"{name:24} {ms:8.1f} {ms / rows[0][1]:12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
