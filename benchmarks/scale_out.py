"""Scale-out, measured in one run: Ray indexing workers and sharded serving beside the single-process figures.

Sections (each prints a table; ratios are against the single-process figure of the same run):

1. **featurization** -- the index job's units on a real model (MLP VAE trained on ``--data``): the
   single-process job, then ``--engine ray`` with 1 and 2 workers on a local Ray cluster
   (``--ray-cpus`` logical CPUs). rows/s counts samples x checkpoints; only the featurization
   phase is timed (Ray: actor start-up and model loading included, cluster start-up reported
   apart). The three stores are checked to be byte-identical.
2. **queries** -- a synthetic index (``proponent.indexer.synthetic``: N=``--n`` rows, C checkpoints,
   D, dtype) served by ``proponent serve`` (one process), then by ``proponent serve --shards 1``
   and ``--shards 2`` on Ray Serve; ``--queries`` stored-sample queries through the Python client,
   one at a time: p50 / p99 end-to-end latency. The answers are checked to be identical.
3. **per shard** (``--shard-rows R``, e.g. 1000000): one shard's figures at R rows -- disk, time to
   write, resident memory, exact-scan latency per query (memory and stream modes, no HTTP), the
   numbers docs/scale.md extrapolates from.

Usage::

    python benchmarks/scale_out.py --quick                     # small, a few minutes on 2 cores
    python benchmarks/scale_out.py --shard-rows 1000000 --checkpoints 1 --skip-index --skip-queries
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(v: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(v), q))


def _store_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((path / "store.zarr").rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------- 1. featurization
def featurization(a: argparse.Namespace, work: Path) -> None:
    import ray

    from proponent.indexer.job import IndexOptions, build_index, checkpoints_from_run, featurize_pending
    from proponent.indexer.ray_engine import run_units
    from proponent.raycluster import connect
    from proponent.threads import set_threads

    run = work / "run"
    if not (run / "run.json").is_file():
        cmd = [sys.executable, "-m", "proponent", "train", "--data", a.data, "--out", str(run)]
        cmd += ["--epochs", "2", "--checkpoints", str(a.checkpoints), "--quiet"]
        subprocess.run(cmd, check=True)
    specs, run_json = checkpoints_from_run(run)
    opts = IndexOptions(m=a.m, featurizer="kron", device="cpu", batch_size=256)
    timings: dict[str, tuple[float, int]] = {}

    def timed(name: str, inner):  # noqa: ANN001, ANN202
        def engine(where, units):  # noqa: ANN001, ANN202
            rows = 0
            from proponent.format.store import FeatureStore

            layout = FeatureStore.open(where).layout
            rows = sum(layout.unit_range(u)[1] - layout.unit_range(u)[0] for _, u in units)
            t0 = time.perf_counter()
            inner(where, units)
            timings[name] = (time.perf_counter() - t0, rows)

        return engine

    outs = {}
    threads_of = {}
    for t in sorted({a.threads, 1}, reverse=True):
        name = "single process" if t == a.threads else f"single process, {t} thread"
        set_threads(t)
        outs[name] = work / f"idx-local{t}"
        threads_of[name] = t
        build_index(
            run_json["data"]["spec"],
            specs,
            outs[name],
            opts,
            overwrite=True,
            show_progress=False,
            engine=timed(name, lambda w, u: featurize_pending(w, u, "cpu", show_progress=False)),
        )
    set_threads(a.threads)
    t0 = time.perf_counter()
    started = connect(None, num_cpus=a.ray_cpus)
    t_ray = time.perf_counter() - t0
    try:
        for workers in (1, 2):
            name = f"ray, {workers} worker{'s' if workers > 1 else ''}"
            outs[name] = work / f"idx-ray{workers}"
            per = max(1, a.threads // workers)
            threads_of[name] = per
            build_index(
                run_json["data"]["spec"],
                specs,
                outs[name],
                opts,
                overwrite=True,
                show_progress=False,
                engine=timed(
                    name, lambda w, u, n=workers, t=per: run_units(w, u, workers=n, threads=t, show_progress=False)
                ),
            )
    finally:
        if started:
            ray.shutdown()
    digests = {k: _store_digest(v) for k, v in outs.items()}
    base = timings["single process"][1] / timings["single process"][0]
    print(f"\nfeaturization: {run_json['data']['spec']}, C={len(specs)}, m={a.m}, kron, batch 256, {a.threads} threads")
    print(f"(local Ray cluster of {a.ray_cpus} CPUs started in {t_ray:.1f}s, not counted)")
    print(f"{'engine':<26} {'threads/worker':>14} {'rows':>8} {'seconds':>8} {'rows/s':>9} {'ratio':>6}  bytes")
    for name, (sec, rows) in timings.items():
        per = threads_of[name]
        same = "identical" if digests[name] == digests["single process"] else "DIFFER"
        print(f"{name:<26} {per:>14} {rows:>8} {sec:>8.2f} {rows / sec:>9.0f} {rows / sec / base:>6.2f}  {same}")


# ---------------------------------------------------------------------------------- 2. queries
def _wait(url: str, proc: subprocess.Popen, timeout: float = 300) -> float:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become ready")


def _measure(url: str, ids: list[int], k: int) -> tuple[list[float], list[tuple]]:
    from proponent.client import InfluenceClient

    c = InfluenceClient(url, retries=0, timeout=300)
    c.influence(sample_id=ids[0], k=k)  # warm-up
    lat, answers = [], []
    for i in ids:
        t0 = time.perf_counter()
        r = c.influence(sample_id=i, k=k, direction="both")
        lat.append((time.perf_counter() - t0) * 1e3)
        answers.append((tuple(r.ids()), tuple(r.scores()), tuple(r.ids("opponents")), tuple(r.scores("opponents"))))
    return lat, answers


def queries(a: argparse.Namespace, work: Path) -> None:
    import ray
    from ray import serve

    from proponent.format.fsio import index_dir
    from proponent.format.manifest import read_manifest
    from proponent.indexer.synthetic import synthetic_index
    from proponent.raycluster import connect

    idx = Path(
        synthetic_index(
            work / f"syn-n{a.n}-c{a.checkpoints}-d{a.dim}-{a.dtype}",
            n=a.n,
            checkpoints=a.checkpoints,
            dim=a.dim,
            dtype=a.dtype,
            show_progress=False,
        )
    )
    man = read_manifest(index_dir(idx))
    ids = [int(i) for i in np.random.default_rng(0).choice(man.n, size=a.queries, replace=False)]
    started = connect(None, num_cpus=a.ray_cpus)
    address = ray.get_runtime_context().gcs_address
    rows = {}
    answers = {}
    try:
        for shards, threads in [
            (0, a.threads),
            *([(0, 1)] if a.threads > 1 else []),
            (1, a.threads),
            (2, a.threads // 2),
        ]:
            threads = max(1, threads)
            port = _free_port()
            cmd = [sys.executable, "-m", "proponent", "serve", "--index", str(idx), "--port", str(port)]
            cmd += ["--state-dir", str(work / "state"), "--feature-mode", "memory", "--log-level", "warning"]
            if shards:
                cmd += ["--shards", str(shards), "--ray-address", address, "--cpus-per-replica", "0.5"]
            env = {**os.environ, "PROPONENT_THREADS": str(threads)}
            log = (work / f"serve-{shards}-{threads}.log").open("wb")
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            url = f"http://127.0.0.1:{port}"
            try:
                ready = _wait(url, proc)
                lat, ans = _measure(url, ids, a.k)
            finally:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                if shards:
                    serve.shutdown()
            name = f"{shards} shard{'s' if shards > 1 else ''} (Ray Serve)"
            if shards == 0:
                name = "single process" if threads == a.threads else f"single process, {threads} thread"
            rows[name] = (threads, ready, _pct(lat, 50), _pct(lat, 99), statistics.mean(lat))
            answers[name] = ans
    finally:
        if started:
            ray.shutdown()
    base = rows["single process"]
    print(
        f"\nqueries: synthetic N={man.n} C={len(man.checkpoints)} D={man.dim} {man.storage.dtype}, memory mode, "
        f"{a.queries} stored-sample queries (k={a.k}, both directions, with per-hit uncertainty), one client"
    )
    print(
        f"{'server':<26} {'threads/replica':>15} {'ready s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p50 ratio':>9}  answers"
    )
    for name, (threads, ready, p50, p99, _) in rows.items():
        same = "identical" if answers[name] == answers["single process"] else "DIFFER"
        print(f"{name:<26} {threads:>15} {ready:>8.1f} {p50:>8.1f} {p99:>8.1f} {p50 / base[2]:>9.2f}  {same}")


# ---------------------------------------------------------------------------------- 3. one shard
def per_shard(a: argparse.Namespace, work: Path) -> None:
    import psutil

    from proponent.format.fsio import index_dir
    from proponent.format.manifest import read_manifest
    from proponent.format.store import FeatureStore
    from proponent.indexer.synthetic import synthetic_index
    from proponent.query.features import ServedFeatures
    from proponent.query.searcher import LocalSearcher, SearchRequest
    from proponent.threads import set_threads

    set_threads(a.threads)
    out = work / f"shard-n{a.shard_rows}-c{a.checkpoints}-d{a.dim}-{a.dtype}"
    t0 = time.perf_counter()
    synthetic_index(out, n=a.shard_rows, checkpoints=a.checkpoints, dim=a.dim, dtype=a.dtype, show_progress=False)
    t_write = time.perf_counter() - t0
    where = index_dir(out)
    man = read_manifest(where)
    sizes = where.file_sizes("store.zarr")
    feat = sum(v for f, v in sizes.items() if "/features/" in f)
    total = sum(sizes.values())
    store = FeatureStore.open(where)
    c_all = list(range(len(man.checkpoints)))
    rng = np.random.default_rng(1)
    probe = rng.choice(man.n, size=a.queries, replace=False)
    reqs = []
    for r in probe:
        vec = {c: store.feature_rows(c, np.array([r]))[0].astype(np.float32) for c in c_all}
        vec = {
            c: v + 0.5 * float(np.abs(v).mean()) * rng.standard_normal(len(v)).astype(np.float32)
            for c, v in vec.items()
        }
        reqs.append(
            SearchRequest(
                vectors=vec,
                sq_norms={c: float((v.astype(np.float64) ** 2).sum()) for c, v in vec.items()},
                weights=np.array(man.weights("lr")),
                checkpoints=c_all,
                scoring="raw",
                k=a.k,
                directions=("proponents", "opponents"),
            )
        )
    print(
        f"\nper shard: N={man.n} rows, C={len(man.checkpoints)}, D={man.dim} {man.storage.dtype}; "
        f"written in {t_write:.0f}s ({man.n * len(man.checkpoints) / t_write:,.0f} rows/s, synthetic)"
    )
    print(
        f"disk: features {feat / 2**30:.2f} GiB, store {total / 2**30:.2f} GiB "
        f"({total / man.n / len(man.checkpoints):.0f} B per row per checkpoint)"
    )
    print(f"{'mode':<8} {'load s':>7} {'resident GiB':>12} {'RSS GiB':>8} {'p50 ms':>8} {'p99 ms':>8} {'cand.':>6}")
    proc = psutil.Process()
    for mode in ("memory", "stream"):
        t0 = time.perf_counter()
        served = ServedFeatures(store, len(man.checkpoints), mode=mode, budget_bytes=1 << 40)
        t_load = time.perf_counter() - t0
        searcher = LocalSearcher(served)
        lat, cand = [], []
        for req in reqs[: a.queries if mode == "memory" else max(3, a.queries // 5)]:
            t0 = time.perf_counter()
            res = searcher.search(req)
            lat.append((time.perf_counter() - t0) * 1e3)
            cand.append(res["proponents"].candidates)
        rss = proc.memory_info().rss / 2**30
        print(
            f"{mode:<8} {t_load:>7.1f} {served.resident_bytes / 2**30:>12.2f} {rss:>8.2f} "
            f"{_pct(lat, 50):>8.1f} {_pct(lat, 99):>8.1f} {int(np.median(cand)):>6}"
        )
        del served, searcher
    if a.drop_shard:
        shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/proponent-scale-out")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--data", default="digits", help="featurization: data spec of the trained model")
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--checkpoints", type=int, default=5)
    p.add_argument("--n", type=int, default=100_000, help="queries: rows of the synthetic index")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--dtype", default="int8", choices=["int8", "float16", "float32"])
    p.add_argument("--queries", type=int, default=40)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--shard-rows", type=int, default=0, help="per-shard section at this many rows (0: skip)")
    p.add_argument("--drop-shard", action="store_true", help="delete the per-shard index afterwards")
    p.add_argument("--skip-index", action="store_true")
    p.add_argument("--skip-queries", action="store_true")
    p.add_argument("--quick", action="store_true", help="small sizes (--n 20000, 20 queries)")
    a = p.parse_args()
    if a.quick:
        a.n, a.queries = min(a.n, 20_000), min(a.queries, 20)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"scale_out: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, threads {a.threads}")
    if not a.skip_index:
        featurization(a, work)
    if not a.skip_queries:
        queries(a, work)
    if a.shard_rows:
        per_shard(a, work)
    print(f"\nload average at end {os.getloadavg()[0]:.1f} (other processes on the machine skew all timings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
