"""Load test of the influence server: many concurrent clients for a bounded time.

Starts ``proponent serve`` in a subprocess on loopback (the digits index of
``benchmarks/query_latency.py``, built on first use under ``--workdir``), runs a warm-up, then
``--clients`` concurrent :class:`client.AsyncInfluenceClient` loops for ``--seconds``, each sending
a mix of stored-sample queries (``POST /v1/influence/samples/{id}``) and uploads (``.npy`` bodies,
featurized by the server). Prints requests/s, p50/p99 latency (all and per kind), the error count
(must be 0), requests shed with 503 (the queue is sized for the clients, so normally 0), and the
server's RSS (psutil) after the warm-up, its peak during the run, and after it: the growth must stay
small (no per-request leak).

Usage::

    python benchmarks/load.py                      # 32 clients, 30 s
    python benchmarks/load.py --clients 64 --seconds 60 --upload-fraction 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.query_latency import build_digits_index, start_server, stop_server  # noqa: E402


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


class RssSampler(threading.Thread):
    """The server's RSS every ``interval`` seconds while running."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.samples: list[int] = []
        self._halt = threading.Event()

    def rss(self) -> int:
        return int(self.proc.memory_info().rss)

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                self.samples.append(self.rss())
            except Exception:
                return

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


async def _client_loop(
    url: str,
    ids: list[int],
    bodies: list[bytes],
    upload_fraction: float,
    k: int,
    until: float,
    seed: int,
    out: list[tuple[str, float, str]],
    server: list[tuple[str, float, float]],
) -> None:
    from proponent.client import AsyncInfluenceClient, Overloaded

    rng = random.Random(seed)
    async with AsyncInfluenceClient(url, retries=0, timeout=300) as c:
        while time.perf_counter() < until:
            kind = "upload" if rng.random() < upload_fraction else "sample"
            t = time.perf_counter()
            try:
                if kind == "upload":
                    r = await c.influence(bodies[rng.randrange(len(bodies))], k=k)
                else:
                    r = await c.influence(sample_id=ids[rng.randrange(len(ids))], k=k)
                server.append((kind, r.timings.featurize_ms, r.timings.search_ms))
                outcome = "ok"
            except Overloaded:
                outcome = "shed"
            except Exception as e:  # counted and reported
                outcome = f"error: {type(e).__name__}: {e}"[:200]
            out.append((kind, time.perf_counter() - t, outcome))


async def _run_clients(
    url: str, n: int, seconds: float, ids: list[int], bodies: list[bytes], upload_fraction: float, k: int, seed: int
) -> tuple[list[tuple[str, float, str]], list[tuple[str, float, float]], float]:
    out: list[tuple[str, float, str]] = []
    server: list[tuple[str, float, float]] = []
    t0 = time.perf_counter()
    until = t0 + seconds
    await asyncio.gather(
        *(_client_loop(url, ids, bodies, upload_fraction, k, until, seed + i, out, server) for i in range(n))
    )
    return out, server, time.perf_counter() - t0


def _pct(lat: list[float], q: float) -> float:
    return float(np.percentile(np.array(lat) * 1e3, q)) if lat else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="measured duration (default 30)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of the same load before measuring")
    ap.add_argument("--upload-fraction", type=float, default=0.5, help="share of upload queries (rest: sample ids)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--index", help="serve this index instead of building the digits one")
    ap.add_argument("--featurizer", default="kron", choices=["kron", "dense"], help="for the built index")
    ap.add_argument("--queue-size", type=int, default=None, help="server queue (default: 2 x clients, at least 64)")
    ap.add_argument("--threads", type=int, default=None, help="server torch/FAISS threads")
    ap.add_argument("--workers", type=int, default=1, help="server query workers (PROPONENT_QUERY_WORKERS)")
    ap.add_argument("--feature-mode", choices=["auto", "memory", "quantized", "stream"], help="PROPONENT_FEATURE_MODE")
    ap.add_argument(
        "--malloc-arenas",
        type=int,
        help="PROPONENT_MALLOC_ARENAS for the server (glibc arenas; 0: glibc's default; default: the server's)",
    )
    ap.add_argument("--workdir", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "proponent-bench"))
    a = ap.parse_args()

    import httpx

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    index_dir = Path(a.index) if a.index else build_digits_index(work, a.featurizer)
    from proponent.format.fsio import IndexDir
    from proponent.format.store import FeatureStore

    store = FeatureStore.open(IndexDir(index_dir))
    ids = [int(i) for i in store.array("ids")]
    images = store.inputs(slice(0, min(store.n, 256)))
    rng = np.random.default_rng(0)
    # uploads: stored images with a little noise (distinct bodies, realistic content)
    bodies = [_npy(np.clip(im + 0.05 * rng.standard_normal(im.shape), 0, 1).astype(np.float32)) for im in images]

    queue_size = a.queue_size or max(64, 2 * a.clients)
    env = {
        "PROPONENT_QUEUE_SIZE": str(queue_size),
        "PROPONENT_REQUEST_TIMEOUT_S": "300",
        "PROPONENT_QUERY_WORKERS": str(a.workers),
    }
    if a.threads:
        env["PROPONENT_THREADS"] = str(a.threads)
    if a.feature_mode:
        env["PROPONENT_FEATURE_MODE"] = a.feature_mode
    if a.malloc_arenas is not None:
        env["PROPONENT_MALLOC_ARENAS"] = str(a.malloc_arenas)
    proc, url = start_server(index_dir, work, env, name="load-server")
    try:
        sampler = RssSampler(proc.pid)
        rss_ready = sampler.rss()
        info = httpx.get(url + "/v1/index").json()
        print(
            f"index: N={info['n']} C={len(info['checkpoints'])} D={info['dim']} featurizer={info['featurizer']} "
            f"({info['dataset_spec']}); server queue {queue_size}, {a.workers} query worker(s), pid {proc.pid}; "
            f"features {info['serving'].get('mode')}, malloc arenas "
            f"{'server default (2)' if a.malloc_arenas is None else a.malloc_arenas or 'glibc default'}",
            flush=True,
        )
        args = (ids, bodies, a.upload_fraction, a.k)
        warm, _, _ = asyncio.run(_run_clients(url, a.clients, a.warmup, *args, seed=10_000))
        rss_warm = sampler.rss()
        sampler.start()
        res, srv_t, wall = asyncio.run(_run_clients(url, a.clients, a.seconds, *args, seed=0))
        sampler.stop()
        time.sleep(0.5)
        rss_after = sampler.rss()
        metrics = httpx.get(url + "/metrics").text
    finally:
        stop_server(proc)

    ok = [r for r in res if r[2] == "ok"]
    shed = [r for r in res if r[2] == "shed"]
    errors = [r for r in res if r[2] not in ("ok", "shed")]
    warm_bad = sum(1 for r in warm if r[2] != "ok")
    mib = 2**20
    print(
        f"load: {a.clients} concurrent clients (AsyncInfluenceClient), {a.seconds:g} s after a {a.warmup:g} s warm-up "
        f"({len(warm)} requests, {warm_bad} not ok); {a.upload_fraction:.0%} uploads (.npy, featurized), "
        f"rest stored-sample queries; k={a.k}"
    )
    print(f"requests        {len(res):7d}   ok {len(ok)}   shed (503) {len(shed)}   errors {len(errors)}")
    print(f"throughput      {len(ok) / wall:9.1f} requests/s (ok)")
    lat = [r[1] for r in ok]
    print(f"latency all     p50 {_pct(lat, 50):8.1f} ms   p99 {_pct(lat, 99):8.1f} ms")
    for kind in ("sample", "upload"):
        lk = [r[1] for r in ok if r[0] == kind]
        st = [(f, s) for kd, f, s in srv_t if kd == kind]
        med = np.median(np.array(st), axis=0) if st else (float("nan"), float("nan"))
        print(
            f"latency {kind:7s} p50 {_pct(lk, 50):8.1f} ms   p99 {_pct(lk, 99):8.1f} ms   (n={len(lk)}; "
            f"server-side medians featurize {med[0]:.1f} ms, search {med[1]:.1f} ms)"
        )
    peak = max(sampler.samples or [rss_after])
    print(
        f"server RSS      ready {rss_ready / mib:.1f} MiB, after warm-up {rss_warm / mib:.1f} MiB, "
        f"peak {peak / mib:.1f} MiB, after {rss_after / mib:.1f} MiB; "
        f"growth over the run {(rss_after - rss_warm) / mib:+.1f} MiB ({(rss_after - rss_warm) / rss_warm:+.1%})"
    )
    rejected = [ln for ln in metrics.splitlines() if ln.startswith("proponent_queries_rejected_total ")]
    print(f"server metrics  {rejected[0] if rejected else 'proponent_queries_rejected_total ?'}")
    for e in sorted({r[2] for r in errors})[:5]:
        print("  ", e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
