"""End-to-end query latency of the influence server, against the memory-bandwidth floor.

Starts ``proponent serve`` in a subprocess on loopback, sends ``--n-queries`` upload queries
(one at a time, .npy bodies through the Python client) and prints p50/p99 end-to-end latency,
throughput, the server-side split (decode / featurize / search), and -- measured in the same
run over the same stored features -- the time of a raw numpy matrix-vector product
``Σ_c F_c q_c`` (every stored feature read once: the memory-bandwidth floor of an exact
answer), with the ratio search/floor and end-to-end/floor. Medians throughout.

Index:
* default: a small real digits index (trained and built on first use under ``--workdir``);
* ``--synthetic``: N=60,000, C=5 checkpoints, random features of D ≈ 4,096 written through
  ``proponent.format.store.FeatureStore`` and ``proponent.format.ann`` with a manifest that ``verify_index``
  accepts (the model is a randomly initialised MLP VAE whose Kronecker projection has
  dimension D, so uploaded queries are featurized for real).

Usage::

    python benchmarks/query_latency.py                       # digits index
    python benchmarks/query_latency.py --synthetic --n-queries 200
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
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


def build_digits_index(work: Path, featurizer: str) -> Path:
    idx = work / f"digits-{featurizer}" / "idx"
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


def build_synthetic_index(work: Path, n: int, n_ckpt: int, target_dim: int, featurizer: str, seed: int = 0) -> Path:
    """Random features in a real index layout (manifest, checkpoints, Zarr store, FAISS files)."""
    import torch

    from proponent.build.job import MANIFEST_VERSION, library_versions
    from proponent.build.training import training_objective
    from proponent.format import ann
    from proponent.format.fsio import atomic_write_json, sha256_file
    from proponent.format.store import FeatureStore, chunk_rows_for
    from proponent.model.architectures import ModelConfig, build_model
    from proponent.model.checkpoints import CheckpointSpec, save_checkpoint
    from proponent.model.projection import ProjectionSpec, build_projector

    out = work / f"synthetic-v2-n{n}-c{n_ckpt}-d{target_dim}-{featurizer}"
    if (out / "manifest.json").is_file() and json.loads((out / "manifest.json").read_text()).get("complete"):
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = ModelConfig(kind="mlp", input_shape=(1, 8, 8), hidden=(128, 64), latent_dim=16)
    torch.manual_seed(seed)
    model = build_model(cfg)
    # the projection size k whose feature dimension is closest to the target
    k = min(
        range(4, 96), key=lambda kk: abs(build_projector(model, "all", ProjectionSpec("kron", kk, 0)).dim - target_dim)
    )
    proj = build_projector(model, "all", ProjectionSpec("kron", k, 0))
    dim = proj.dim
    specs = []
    for c in range(n_ckpt):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        tmp = out / f"ckpt{c}.pt"
        save_checkpoint(
            tmp, model, cfg, lr=1e-3, batch_size=64, step=(c + 1) * 100, steps_since_prev=100, epoch=c + 1.0
        )
        sha = sha256_file(tmp)
        rel = f"checkpoints/{sha[:16]}.pt"
        (out / "checkpoints").mkdir(exist_ok=True)
        tmp.rename(out / rel)
        specs.append(CheckpointSpec(rel, 1e-3, 64, 100, (c + 1) * 100, c + 1.0, sha))
    rng = np.random.default_rng(seed)
    chunk_rows = chunk_rows_for(dim, 4)
    images = rng.random((n, 1, 8, 8), dtype=np.float32)
    store = FeatureStore.create(
        out / "store.zarr",
        n=n,
        dim=dim,
        n_checkpoints=n_ckpt,
        latent_dim=16,
        ids=np.arange(n),
        labels=rng.integers(0, 10, n),
        origin=np.zeros(n, np.int32),
        source_row=np.arange(n),
        injected=np.zeros(n, bool),
        images=images,
        chunk_rows=chunk_rows,
    )
    print(f"writing synthetic store N={n} C={n_ckpt} D={dim} (k={k}) to {out} ...", flush=True)
    # Like real TracIn features, a sample's features are correlated across checkpoints
    # (f_c(i) = u_i + 0.3 e_ci); independent random features would be the certificate's worst case.
    for c in range(n_ckpt):
        for kk in range(store.n_chunks):
            lo, hi = store.chunk_range(kk)
            base = np.random.default_rng([seed, kk]).standard_normal((hi - lo, dim), dtype=np.float32)
            f = base + 0.3 * rng.standard_normal((hi - lo, dim), dtype=np.float32)
            f = (f / np.sqrt(dim)).astype(np.float32)
            lat = (
                rng.standard_normal((hi - lo, 16), dtype=np.float32),
                rng.standard_normal((hi - lo, 16), dtype=np.float32),
            )
            sq = (f.astype(np.float64) ** 2).sum(axis=1)
            store.write_chunk(c, kk, f, sq, rng.random(hi - lo, dtype=np.float32), lat)
    files = []
    for c in range(n_ckpt):
        index = ann.build_index("flat", dim, (ch for _, ch in store.iter_feature_chunks(c)))
        fp = out / "faiss" / f"ckpt_{c:03d}.index"
        ann.write_atomic(index, fp)
        files.append({"path": f"faiss/ckpt_{c:03d}.index", "sha256": sha256_file(fp)})
    objective = training_objective(cfg, 4)
    manifest = {
        "format": "proponent-index",
        "version": MANIFEST_VERSION,
        "complete": True,
        "n": n,
        "dataset": {
            "spec": "synthetic",
            "fingerprint": hashlib.sha256(f"synthetic/{n}/{seed}".encode()).hexdigest(),
            "shape": [1, 8, 8],
            "sources": [{"spec": "synthetic", "kind": "synthetic", "n": n}],
            "has_labels": True,
        },
        "model_config": cfg.to_dict(),
        "objective": {**objective.spec(), "seed": 0},
        "projection": proj.manifest(),
        "layers": "all",
        "featurizer": featurizer,
        "dtype": "float32",
        "chunk_rows": chunk_rows,
        "checkpoints": [s.to_dict() for s in specs],
        "index": {"kind": "flat", "exact": True, "files": files},
        "library_versions": library_versions(),
    }
    atomic_write_json(out / "manifest.json", manifest)
    return out


def start_server(
    index_dir: Path, work: Path, env: dict[str, str], name: str = "server"
) -> tuple[subprocess.Popen, str]:
    """``proponent serve`` on a free loopback port, logging to ``work/NAME.log``; returns once /readyz is 200."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "proponent", "serve", "--index", str(index_dir), "--port", str(port),
           "--state-dir", str(work / f"{name}-state"), "--log-level", "warning"]  # fmt: skip
    log_path = work / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
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


def matvec_floor(index_dir: Path, queries: list[dict[int, np.ndarray]], repeats: int) -> float:
    """Median seconds of Σ_c F_c @ q_c over all stored features (float32, in memory)."""
    from proponent.format.store import FeatureStore

    store = FeatureStore.open(index_dir / "store.zarr")
    feats = [store.features(c) for c in range(store.n_checkpoints)]
    times = []
    for i in range(repeats):
        q = queries[i % len(queries)]
        t = time.perf_counter()
        total = feats[0] @ q[0]
        for c in range(1, len(feats)):
            total += feats[c] @ q[c]
        np.argpartition(-total, 10)[:10]
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--synthetic", action="store_true", help="N=60,000, C=5, D≈4,096 random features")
    ap.add_argument("--n", type=int, default=60_000)
    ap.add_argument("--checkpoints", type=int, default=5)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--index", help="serve this index instead of building one")
    ap.add_argument("--featurizer", default="kron", choices=["kron", "dense"], help="for built indexes (default kron)")
    ap.add_argument("--n-queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--search", default="auto", choices=["auto", "scan", "threshold"], help="search strategy")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="server torch/FAISS threads")
    ap.add_argument("--workdir", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "proponent-bench"))
    a = ap.parse_args()

    from proponent.client import InfluenceClient

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if a.index:
        index_dir = Path(a.index)
    elif a.synthetic:
        index_dir = build_synthetic_index(work, a.n, a.checkpoints, a.dim, a.featurizer)
    else:
        index_dir = build_digits_index(work, a.featurizer)
    print(f"index {index_dir} ready in {time.perf_counter() - t0:.1f}s", flush=True)
    man = json.loads((index_dir / "manifest.json").read_text())
    shape = tuple(man["dataset"]["shape"])

    env = {"PROPONENT_REQUEST_TIMEOUT_S": "600"}
    if a.threads:
        env["PROPONENT_THREADS"] = str(a.threads)
    t_start = time.perf_counter()
    proc, url = start_server(index_dir, work, env)
    try:
        client = InfluenceClient(url, retries=0, timeout=300)
        print(f"server ready in {time.perf_counter() - t_start:.1f}s (open + verify, sha256 of every file)", flush=True)
        info = client.index_info()
        rng = np.random.default_rng(0)
        xs = [rng.random(shape, dtype=np.float32) for _ in range(a.n_queries + a.warmup)]
        bodies = []
        for x in xs:
            buf = io.BytesIO()
            np.save(buf, x)
            bodies.append(buf.getvalue())
        for b in bodies[: a.warmup]:
            client.influence(b, k=a.k, search=a.search)
        lat, dec, feat, search, rounds = [], [], [], [], []
        t_all = time.perf_counter()
        for b in bodies[a.warmup :]:
            t = time.perf_counter()
            r = client.influence(b, k=a.k, search=a.search)
            lat.append(time.perf_counter() - t)
            dec.append(r.timings.decode_ms)
            feat.append(r.timings.featurize_ms)
            search.append(r.timings.search_ms)
            rounds.append(r.search["proponents"].rounds)
        wall = time.perf_counter() - t_all
    finally:
        stop_server(proc)

    # the floor, in this process, over the same stored features, with the server stopped
    from proponent.query.index import open_index

    idx = open_index(index_dir, device="cpu", use_gpu_faiss=False)
    w = idx.weights("lr")
    qs = []
    for x in xs[a.warmup : a.warmup + 20]:
        f = idx.featurize(x[None])
        qs.append({c: (w[c] * f[c][0]).astype(np.float32) for c in f})
    del idx
    floor = matvec_floor(index_dir, qs, repeats=21)

    lat_ms = np.array(lat) * 1e3
    p50, p99 = float(np.percentile(lat_ms, 50)), float(np.percentile(lat_ms, 99))
    print()
    print(
        f"index: N={info.n} C={len(info.checkpoints)} D={info.dim} featurizer={info.featurizer} "
        f"device={info.device} faiss_gpu={info.faiss_gpu} ({'synthetic' if a.synthetic else info.dataset_spec})"
    )
    print(f"queries: {a.n_queries} uploads (.npy), k={a.k}, proponents, search={a.search}, sequential, one client")
    print(f"end-to-end latency  p50 {p50:8.2f} ms   p99 {p99:8.2f} ms   throughput {a.n_queries / wall:7.1f} queries/s")
    print(
        f"server-side medians decode {statistics.median(dec):.2f} ms  featurize {statistics.median(feat):.2f} ms  "
        f"search {statistics.median(search):.2f} ms  "
        f"(search rounds median {statistics.median(rounds):g}, max {max(rounds)})"
    )
    gib = info.n * info.dim * 4 * len(info.checkpoints) / 2**30
    print(f"numpy matvec floor  {floor * 1e3:8.2f} ms   (Σ_c F_c q_c over {gib:.2f} GiB float32, median of 21)")
    print(
        f"ratio search/floor  {statistics.median(search) / (floor * 1e3):6.2f}x   "
        f"ratio end-to-end p50/floor {p50 / (floor * 1e3):6.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
