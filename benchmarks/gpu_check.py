"""The GPU path, checked and measured in one command (about 5 minutes; at most 8) when a GPU is there.

1. **Answers**: a small real index (digits, MLP VAE, Kronecker features, int8, an IVF ANN index) opened
   on the GPU and on the CPU. For a few stored and uploaded queries: the GPU's query features equal the
   CPU's (to float32 rounding), and the exact scan over the GPU-resident int8 codes (CUDA
   ``torch._int_mm``) returns the CPU scan's rows and scores from the same query features, single and
   batched (one GEMM for the batch); the ANN search (faiss-gpu where the faiss module has GPU support)
   returns the CPU's candidates' exact scores.
2. **Featurization**: ``benchmarks/index_throughput.py --layouts-only --device cuda`` (rows/s of the
   default layout's tensor sketches against the bare forward + backward floor, same run).
3. **Scan bandwidth**: ``--rows`` (default 1,000,000) synthetic int8 rows of D = the default layout's
   width held on the GPU; the GPU's read bandwidth measured in the same run (a sum over a buffer of the
   same size), the scan kernel's bytes/s for one query and for a batch of 64, as a fraction of it.

Without a GPU it prints one line saying so and exits 0. ``--device cpu`` runs the same functions on
the CPU with small sizes (a dry run of this script; CI never needs a GPU).

Usage::

    python benchmarks/gpu_check.py | tee benchmarks/results/gpu_check.txt
    python benchmarks/gpu_check.py --device cpu --rows 20000        # dry run on the CPU
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FAILED: list[str] = []


def section(name: str):
    def wrap(fn):
        def run(*a, **kw):
            print(f"\n== {name}", flush=True)
            t0 = time.perf_counter()
            try:
                fn(*a, **kw)
                print(f"   ({time.perf_counter() - t0:.0f}s)", flush=True)
            except Exception as e:  # one failed section does not hide the others' figures
                FAILED.append(f"{name}: {type(e).__name__}: {e}")
                traceback.print_exc()
                print(f"FAILED {name}: {type(e).__name__}: {e}", flush=True)

        return run

    return wrap


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int = 5) -> float:
    fn()
    _sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def _sum_time(nbytes: int, device) -> float:
    """Median time of a float32 sum over ``nbytes`` on ``device`` (a read of every byte)."""
    import torch

    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    return timed(lambda: buf.sum(), device)


@section("answers: GPU against CPU on a small index")
def check_answers(device, work: Path) -> None:
    import torch

    from proponent.format import ann
    from proponent.indexer.data import load_dataset
    from proponent.indexer.job import IndexOptions, build_index, checkpoints_from_run
    from proponent.indexer.training import TrainConfig, train
    from proponent.model.architectures import ModelConfig
    from proponent.model.projection import ProjectionSpec
    from proponent.query.index import open_index
    from proponent.query.scan import restricted, scan, scan_batch
    from proponent.query.scoring import scored_query

    data = load_dataset("digits,limit=400")
    cfg = ModelConfig(kind="mlp", input_shape=data.shape, hidden=(32,), latent_dim=4)
    run = train(data, cfg, work / "run", TrainConfig(epochs=3, checkpoints=2), show_progress=False)
    specs, _ = checkpoints_from_run(run)
    opts = IndexOptions(
        m=4, projection=ProjectionSpec(kind="kron", k=8), device=str(device), index_kind="ivf:8", dtype="int8"
    )
    out = build_index(data, specs, work / "idx", opts, show_progress=False)
    gpu, cpu = open_index(out, device=str(device)), open_index(out, device="cpu", use_gpu_faiss=False)
    served = gpu.features
    print(f"   features on {served.describe()['device']}: mode {served.mode}, kernel {served.kernel_kind()}")
    gpus = ann.faiss.get_num_gpus() if hasattr(ann.faiss, "get_num_gpus") else 0
    print(f"   faiss GPUs: {gpus}; ANN indexes on the GPU: {gpu.faiss_on_gpu}")
    assert served.kernel_kind() == "int8" and served.resident[0] is not None
    assert served.resident[0].device.type == device.type, "int8 codes should be held on the device"
    cks = list(range(len(gpu.checkpoints)))
    vecs, norms = [], []
    worst = 0.0
    for row in (0, 17, 123, 301):
        x = data.x[row]
        qg = gpu.runtime.featurize(x[None], seed=5, checkpoints=cks)
        qc = cpu.runtime.featurize(x[None], seed=5, checkpoints=cks)
        for c in cks:
            np.testing.assert_allclose(qg.mean[c], qc.mean[c], rtol=1e-4, atol=1e-6)
            worst = max(worst, float(np.abs(qg.mean[c] - qc.mean[c]).max()))
        vecs.append({c: qc.mean[c][0] for c in cks})  # the same query features on both: searches must agree exactly
        norms.append({c: float(qc.sq_norm[c][0]) for c in cks})
    print(f"   query features GPU vs CPU: max |difference| {worst:.2e}")
    both = ("proponents", "opponents")
    for scoring in ("raw", "cosine", "relatif"):
        sg = [scored_query(served, gpu.weights(), cks, v, n, scoring) for v, n in zip(vecs, norms, strict=True)]
        sc = [scored_query(cpu.features, cpu.weights(), cks, v, n, scoring) for v, n in zip(vecs, norms, strict=True)]
        batch = scan_batch(served, sg, 10, both)
        for a_sq, b_sq, a_batch in zip(sg, sc, batch, strict=True):
            a, b = scan(served, a_sq, 10, both), scan(cpu.features, b_sq, 10, both)
            for d in both:
                assert a[d].rows.tolist() == b[d].rows.tolist() == a_batch[d].rows.tolist(), (scoring, d)
                np.testing.assert_array_equal(a[d].scores, b[d].scores)
                np.testing.assert_array_equal(a_batch[d].scores, b[d].scores)
                assert a[d].exact
        # ANN candidates (faiss-gpu when available), rescored exactly: the CPU's candidates' exact scores
        for a_sq, b_sq in zip(sg, sc, strict=True):
            for d in both:
                sign = 1.0 if d == "proponents" else -1.0
                q = np.ascontiguousarray(sign * a_sq.vectors[0][None, :], dtype=np.float32)
                _, ids_g = gpu.ann_indexes[0].search(q, 32)
                _, ids_c = cpu.ann_indexes[0].search(q, 32)
                rows = np.intersect1d(ids_g[0][ids_g[0] >= 0], ids_c[0][ids_c[0] >= 0])
                ra = restricted(served, a_sq, rows, 5, (d,))[d]
                rb = restricted(cpu.features, b_sq, rows, 5, (d,))[d]
                np.testing.assert_array_equal(ra.scores, rb.scores)
    print("   scan (single and batched) and ANN rescoring: GPU rows and scores equal the CPU's, 3 scorings x 4 queries")
    del gpu, cpu, served
    if device.type == "cuda":
        torch.cuda.empty_cache()


@section("featurization: default layout against the forward+backward floor (index_throughput.py)")
def check_featurization(device, timeout_s: int, layouts: str) -> None:
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "index_throughput.py"),
        "--models",
        "mlp",
        "--layouts-only",
        "--layouts",
        layouts,
        "--repeats",
        "2",
        "--device",
        str(device),
    ]
    print("   $ " + " ".join(cmd[1:]), flush=True)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"index_throughput.py took longer than {timeout_s}s") from e
    print("\n".join("   " + line for line in r.stdout.strip().splitlines()[-15:]))
    if r.returncode != 0:
        raise RuntimeError(f"index_throughput.py exited {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")


@section("scan bandwidth: int8 codes held on the device")
def check_scan(device, rows: int, dim: int) -> None:
    import torch

    from proponent.query import kernels
    from proponent.query.features import COL_ALIGN
    from proponent.query.scan import _Int8Batch, _Int8Query

    width = -(-dim // COL_ALIGN) * COL_ALIGN
    gen = torch.Generator(device=device).manual_seed(0)
    codes = torch.randint(-127, 128, (rows, width), dtype=torch.int8, device=device, generator=gen)
    nbytes = rows * dim
    bw = nbytes / _sum_time(nbytes, device)
    rng = np.random.default_rng(0)
    one = _Int8Batch([_Int8Query(rng.standard_normal(dim))])
    t1 = timed(lambda: one.products(codes), device)
    queries = [_Int8Query(rng.standard_normal(dim)) for _ in range(64)]
    many = _Int8Batch(queries)
    t64 = timed(lambda: many.products(codes), device, reps=3)
    # exactness on a slice: the device's integer products equal the CPU's
    part = codes[:4096].cpu()
    want = kernels.int8_products(part, many.z, "torch" if kernels._native is None else "native")
    got = kernels.int8_products(codes[:4096], many.z, "torch")
    assert np.array_equal(got, want), "the device's int8 products differ from the CPU's"
    print(f"   {rows:,} rows x D={dim} int8 ({nbytes / 2**30:.2f} GiB) on {device}")
    print(f"   device read bandwidth (sum over {nbytes / 2**30:.2f} GiB): {bw / 1e9:8.1f} GB/s")
    print(f"   scan, 1 query : {t1 * 1e3:8.1f} ms  {nbytes / t1 / 1e9:8.1f} GB/s  {nbytes / t1 / bw:5.2f}x bandwidth")
    print(
        f"   scan, 64 queries (one GEMM): {t64 * 1e3:8.1f} ms  {64 / t64:8.1f} queries/s  "
        f"{(64 / t64) / (1 / t1):5.1f}x the throughput of single queries"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda (default when a GPU is there) or cpu (a dry run)")
    ap.add_argument("--rows", type=int, default=None, help="scan rows (default 1,000,000 on a GPU, 20,000 on the CPU)")
    ap.add_argument("--dim", type=int, default=None, help="row width (default: the default layout's)")
    ap.add_argument("--featurize-timeout", type=int, default=180)
    ap.add_argument(
        "--featurize-layouts",
        default="ts7996:int8,tsf7996:int8",
        help="index_throughput.py --layouts (default: the default layout's tensor sketches)",
    )
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: answers, featurization, scan")
    a = ap.parse_args()

    import torch

    if a.device is None:
        if not torch.cuda.is_available():
            print("gpu_check: no GPU found (torch.cuda.is_available() is False): nothing to check; exit 0")
            return 0
        a.device = "cuda"
    device = torch.device(a.device)
    from proponent.indexer.job import IndexOptions
    from proponent.query import kernels

    dim = a.dim or IndexOptions().projection.sketch_dim or IndexOptions().projection.dim
    rows = a.rows or (1_000_000 if device.type == "cuda" else 20_000)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"gpu_check: {name}; torch {torch.__version__}; CPU int8 kernel: {kernels.native_kernel() or 'torch'}")
    skip = set(filter(None, a.skip.split(",")))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check") as tmp:
        if "answers" not in skip:
            check_answers(device, Path(tmp))
    if "featurization" not in skip:
        check_featurization(device, a.featurize_timeout, a.featurize_layouts)
    if "scan" not in skip:
        check_scan(device, rows, dim)
    print(f"\ngpu_check: {len(FAILED)} failed section(s) in {time.perf_counter() - t0:.0f}s")
    for f in FAILED:
        print("  FAILED " + f)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
