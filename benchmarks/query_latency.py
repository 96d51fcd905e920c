"""End-to-end query latency of the influence server, against the float32 scan floor of the old layout.

Starts ``proponent serve`` in a subprocess on loopback, sends ``--n-queries`` upload queries (one
at a time, .npy bodies through the Python client) and prints p50/p99 end-to-end latency,
throughput, the server-side split (decode / featurize / search), the server's RSS and features
mode, and -- measured in the same run -- the *floor*: one numpy float32 matrix-vector product
per checkpoint over the first version's layout (D = 19,520 float32 per sample and checkpoint,
Kronecker k = 64), i.e. what an exact scan of the old index costs at best. The floor is timed
on a block of ``--floor-rows`` rows (cache-cold: larger than the last-level cache) and scaled
linearly to N rows and C checkpoints (a scan is memory-bound and linear). Medians throughout.

Index:
* default: a small real digits index (trained and built on first use under ``--workdir``);
* ``--synthetic``: the real index format with random features (``proponent.indexer.synthetic``),
  N rows, C checkpoints, dimension D, stored dtype, through the index job's own phases;
* ``--index DIR``: any index.

Usage::

    python benchmarks/query_latency.py                                   # digits index
    python benchmarks/query_latency.py --synthetic --n 60000 --n-queries 100
    python benchmarks/query_latency.py --synthetic --n 60000 --feature-mode stream
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OLD_DIM = 19_520  # the first version's default: Kronecker k = 64, float32 (78 KB per sample per checkpoint)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_digits_index(work: Path, featurizer: str = "kron") -> Path:
    idx = work / f"digits-v2-{featurizer}" / "idx"
    if (idx / "manifest.json").is_file():
        return idx
    run = idx.parent / "run"
    cli = [sys.executable, "-m", "proponent"]
    subprocess.run([*cli, "train", "--data", "digits", "--out", str(run), "--epochs", "5", "--quiet"], check=True)
    subprocess.run(
        [*cli, "index", "--run", str(run), "--out", str(idx), "--featurizer", featurizer, "--m", "4", "--quiet"],
        check=True,
    )
    return idx


def start_server(
    index_dir: Path, work: Path, env: dict[str, str], name: str = "server", extra: list[str] | None = None
) -> tuple[subprocess.Popen, str]:
    """``proponent serve`` on a free loopback port, logging to ``work/NAME.log``; returns once /readyz is 200."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "proponent", "serve", "--index", str(index_dir), "--port", str(port),
           "--state-dir", str(work / f"{name}-state"), "--log-level", "warning", *(extra or [])]  # fmt: skip
    log_path = work / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 1800
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not become ready:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (graceful: in-flight requests finish), then SIGKILL after 60 s."""
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def rss_bytes(pid: int) -> int:
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


def old_layout_floor(n: int, checkpoints: int, block_rows: int = 20_000, repeats: int = 7) -> float:
    """Median seconds of Σ_c F_c q_c over N rows of the old layout (float32, D = 19,520), scaled from a block."""
    rows = min(n, block_rows)
    rng = np.random.default_rng(0)
    f = rng.standard_normal((rows, OLD_DIM), dtype=np.float32)
    q = rng.standard_normal(OLD_DIM, dtype=np.float32)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        s = f @ q
        np.argpartition(-s, 10)[:10]
        times.append(time.perf_counter() - t)
    del f
    return statistics.median(times) * (n / rows) * checkpoints


def run_queries(url: str, shape: tuple[int, ...], n_queries: int, warmup: int, k: int, **kw: object) -> dict:
    from proponent.client import InfluenceClient

    client = InfluenceClient(url, retries=0, timeout=1800)
    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(n_queries + warmup):
        buf = io.BytesIO()
        np.save(buf, rng.random(shape, dtype=np.float32))
        bodies.append(buf.getvalue())
    for b in bodies[:warmup]:
        client.influence(b, k=k, **kw)  # type: ignore[arg-type]
    lat, feat, search, cand = [], [], [], []
    t_all = time.perf_counter()
    for b in bodies[warmup:]:
        t = time.perf_counter()
        r = client.influence(b, k=k, **kw)  # type: ignore[arg-type]
        lat.append(time.perf_counter() - t)
        feat.append(r.timings.featurize_ms)
        search.append(r.timings.search_ms)
        cand.append(r.search["proponents"].candidates)
        assert r.exact
    wall = time.perf_counter() - t_all
    lat_ms = np.array(lat) * 1e3
    return {
        "p50_ms": float(np.percentile(lat_ms, 50)),
        "p99_ms": float(np.percentile(lat_ms, 99)),
        "qps": n_queries / wall,
        "featurize_ms": statistics.median(feat),
        "search_ms": statistics.median(search),
        "candidates": statistics.median(cand),
        "strategy": r.search["proponents"].strategy,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--synthetic", action="store_true", help="the real format with random features")
    ap.add_argument("--n", type=int, default=60_000)
    ap.add_argument("--checkpoints", type=int, default=5)
    ap.add_argument(
        "--dim", type=int, default=None, help="synthetic: feature dimension (default: the default layout's)"
    )
    ap.add_argument("--dtype", default=None, help="synthetic: stored dtype (default: the default layout's)")
    ap.add_argument("--index", help="serve this index instead of building one")
    ap.add_argument("--n-queries", type=int, default=100)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--memory-budget", help="server memory budget (default: half the available RAM)")
    ap.add_argument("--feature-mode", default="auto", choices=["auto", "memory", "quantized", "stream"])
    ap.add_argument("--threads", type=int, default=None, help="server torch threads")
    ap.add_argument("--workdir", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "proponent-bench"))
    a = ap.parse_args()

    from proponent.format.fsio import IndexDir
    from proponent.format.manifest import read_manifest
    from proponent.indexer.job import IndexOptions
    from proponent.indexer.synthetic import synthetic_index

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if a.index:
        index_dir = Path(a.index)
    elif a.synthetic:
        defaults = IndexOptions()
        dim = a.dim or defaults.projection.sketch_dim or 4096
        dtype = a.dtype or defaults.dtype
        index_dir = work / f"synthetic-n{a.n}-c{a.checkpoints}-d{dim}-{dtype}"
        synthetic_index(index_dir, n=a.n, checkpoints=a.checkpoints, dim=dim, dtype=dtype)
    else:
        index_dir = build_digits_index(work)
    print(f"index {index_dir} ready in {time.perf_counter() - t0:.1f}s", flush=True)
    man = read_manifest(IndexDir(index_dir))

    env = {"PROPONENT_REQUEST_TIMEOUT_S": "1800"}
    if a.threads:
        env["PROPONENT_THREADS"] = str(a.threads)
    extra = ["--feature-mode", a.feature_mode] + (["--memory-budget", a.memory_budget] if a.memory_budget else [])
    t_start = time.perf_counter()
    proc, url = start_server(index_dir, work, env, extra=extra)
    try:
        import httpx

        print(f"server ready in {time.perf_counter() - t_start:.1f}s (open, verify, load)", flush=True)
        info = httpx.get(url + "/v1/index", timeout=60).json()
        res = run_queries(url, man.shape, a.n_queries, a.warmup, a.k)
        rss = rss_bytes(proc.pid)
    finally:
        stop_server(proc)
    floor = old_layout_floor(man.n, len(man.checkpoints))
    item = np.dtype(man.storage.dtype).itemsize
    print()
    print(
        f"index: N={man.n} C={len(man.checkpoints)} D={man.dim} {man.storage.dtype} ({man.dim * item} B per sample "
        f"per checkpoint) ({'synthetic' if a.synthetic else man.dataset.spec}); serving: {info['serving']['mode']}, "
        f"budget {info['serving']['budget_bytes'] / 2**30:.2f} GiB"
    )
    print(f"queries: {a.n_queries} uploads (.npy), k={a.k}, proponents, sequential, one client; {res['strategy']}")
    print(
        f"end-to-end latency  p50 {res['p50_ms']:9.2f} ms   p99 {res['p99_ms']:9.2f} ms   {res['qps']:7.2f} queries/s"
    )
    print(
        f"server medians      featurize {res['featurize_ms']:.2f} ms   search {res['search_ms']:.2f} ms   "
        f"rows rescored {res['candidates']:g}   server RSS {rss / 2**30:.2f} GiB"
    )
    print(
        f"old-layout floor    {floor * 1e3:9.2f} ms   (numpy float32 matvec, D={OLD_DIM}, "
        f"N={man.n}, C={len(man.checkpoints)})"
    )
    print(
        f"ratio search/floor  {res['search_ms'] / (floor * 1e3):6.3f}x   ratio end-to-end p50/floor "
        f"{res['p50_ms'] / (floor * 1e3):6.3f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
