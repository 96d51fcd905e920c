"""The int8 scan against the machine's own limits, measured in the same run: memory and disk bandwidth.

For each N (``--sizes``), D = the default layout's width, int8 rows:

* **memory bandwidth** (the floor): a STREAM-style sum -- ``torch.sum`` of a float32 buffer of
  ``--stream-mib`` MiB (far larger than the last-level cache), same thread count as the scan, median;
* **kernel**: the scan's integer products (``proponent.query.kernels.int8_products``: a query's two
  int8 vectors against N resident rows) with each kernel this machine has (``native``: the C kernel;
  ``torch``: ``torch._int_mm``), bytes of rows read per second and the fraction of the bandwidth;
* **served scan**: the whole exact scan (``proponent.query.scan.scan``: products, per-row bounds,
  the certificate's threshold and the float64 rescoring) over a synthetic index in the real format
  (``proponent.indexer.synthetic``, C = ``--checkpoints``) held in memory, then **streamed**: the same
  scan reading the store chunk by chunk with the page cache of the store's files dropped before
  every query (``posix_fadvise(DONTNEED)``), against the disk's sequential read bandwidth measured
  on the same files with ``O_DIRECT`` (no page cache).

* **batch queries**: ``--batch`` (64) uploaded queries answered through the use case
  (:func:`proponent.query.usecase.answer`, featurization included) one by one, then as one batch
  (:func:`~proponent.query.usecase.answer_batch`: one pass over the rows), on the same index held in
  memory; queries/s of each and their ratio (the answers are checked equal).

Targets (issue 22): in-memory scan ≥ 0.6× the memory bandwidth at 60,000 and 250,000 rows; streamed
scan ≥ 0.7× the disk bandwidth; a batch of 64 queries ≥ 8× the throughput of 64 single queries. The
machine this runs on may be shared: ratios are same-run, medians.

Usage::

    python benchmarks/scan_bandwidth.py                          # 60k and 250k rows
    python benchmarks/scan_bandwidth.py --sizes 60000 --reps 5 --no-stream
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def median_time(fn, reps: int, before=None) -> float:
    ts = []
    for i in range(reps + 1):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        if i:  # the first call warms up
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def memory_bandwidth(mib: int, reps: int) -> float:
    """Bytes/s of a float32 sum over ``mib`` MiB (STREAM-style read; torch's threads)."""
    import torch

    buf = torch.ones(mib * (1 << 20) // 4)
    return buf.numel() * 4 / median_time(lambda: float(buf.sum()), reps)


def drop_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # a freshly written file's dirty pages are not dropped until written back
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def buffered_read(paths: list[Path]) -> float:
    """Bytes/s of reading ``paths`` through the page cache right after :func:`drop_cache`: at about the
    ``O_DIRECT`` rate when the drop worked (far above it when the files were still cached)."""
    drop_cache(paths)
    buf = bytearray(max(p.stat().st_size for p in paths))
    total = 0
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            total += f.readinto(buf)
    return total / (time.perf_counter() - t0)


def disk_bandwidth(paths: list[Path], block: int = 8 << 20) -> tuple[float, int]:
    """Sequential read bytes/s of ``paths`` with O_DIRECT (no page cache), and the bytes read."""
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT wants
    total = 0
    t0 = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
        try:
            while True:
                got = os.readv(fd, [buf])
                total += got
                if got < block:
                    break
        finally:
            os.close(fd)
    return total / (time.perf_counter() - t0), total


def gemm_peak(native, threads: int, reps: int = 20000) -> float:
    """GMAC/s of the native GEMM kernel on an L1-resident tile, ``threads`` at once (median of 5)."""
    from concurrent.futures import ThreadPoolExecutor

    rates = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            t0 = time.perf_counter()
            macs = sum(m for _, m in pool.map(lambda _: native.peak("auto", reps), range(threads)))
            rates.append(macs / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def kernel_rows(n: int, d: int, reps: int, bw: float, batch: int) -> list[str]:
    import torch

    from proponent.query import kernels
    from proponent.query.features import COL_ALIGN
    from proponent.query.scan import _Int8Batch, _Int8Query

    rng = np.random.default_rng(0)
    width = -(-d // COL_ALIGN) * COL_ALIGN
    codes = torch.zeros((n, width), dtype=torch.int8)
    for lo in range(0, n, 16384):  # random codes, written in blocks to keep the temporaries small
        hi = min(n, lo + 16384)
        codes[lo:hi, :d] = torch.from_numpy(rng.integers(-127, 128, (hi - lo, d), dtype=np.int8))
    q = _Int8Query(rng.standard_normal(d))
    out = []
    peak = 0.0
    if kernels._native is not None and batch:  # the GEMM kernel's compute peak: a tile in L1, on every thread
        peak = gemm_peak(kernels._native, torch.get_num_threads())
        out.append(f"{n:>8} {'GEMM peak (L1 tile, threads)':<28} {'':>9} {'':>8} {'':>6}  {peak:.1f} GMAC/s")
    want = None
    for name in kernels.available():
        t = median_time(lambda name=name: kernels.int8_products(codes, q.z, name), reps)
        got = kernels.int8_products(codes, q.z, name)
        want = got if want is None else want
        assert np.array_equal(got, want), "kernels disagree"
        rate = n * d / t
        label = f"native ({kernels.native_kernel()})" if name == "native" else "torch (_int_mm)"
        out.append(f"{n:>8} {'kernel ' + label:<28} {t * 1e3:>9.1f} {rate / 1e9:>8.2f} {rate / bw:>6.2f}")
        if batch:  # the batch's products: one GEMM of 2 x batch int8 vectors against the rows
            many = _Int8Batch([_Int8Query(rng.standard_normal(d)) for _ in range(batch)])
            tb = median_time(lambda name=name, many=many: kernels.int8_products(codes, many.z, name), max(1, reps // 2))
            gmac = n * d * 2 * batch / tb / 1e9
            of_peak = f", {gmac / peak:.2f}x the peak" if name == "native" and peak else ""
            out.append(
                f"{n:>8} {f'  same, {batch} queries (GEMM)':<28} {tb * 1e3:>9.1f} {'':>8} {'':>6}"
                f"  {batch * t / tb:.2f}x the throughput of {batch} single products ({gmac:.1f} GMAC/s{of_peak})"
            )
    return out


def served_rows(
    n: int,
    d: int,
    c: int,
    reps: int,
    bw: float,
    work: Path,
    modes: list[str],
    crcs: tuple[str, ...] = ("crc32c",),
    warm: bool = False,
) -> list[str]:
    """``crcs``: the chunk checksum implementations the streamed scan is timed with, one after the other
    (``crc32c``: ICRAR's, the store's default; ``google``: google_crc32c, zarr's, which holds the GIL); ``warm``:
    also time the streamed scan with the store's files in the page cache."""
    import torch

    from proponent.format import store as store_mod
    from proponent.format.fsio import IndexDir
    from proponent.format.store import FeatureStore
    from proponent.indexer.synthetic import synthetic_index
    from proponent.query.features import ServedFeatures
    from proponent.query.scan import scan
    from proponent.query.scoring import scored_query

    where = work / f"synthetic-n{n}-c{c}-d{d}-int8"
    t0 = time.perf_counter()
    synthetic_index(where, n=n, checkpoints=c, dim=d, dtype="int8", show_progress=False)
    print(f"# index {where} ready in {time.perf_counter() - t0:.0f}s", flush=True)
    store = FeatureStore.open(IndexDir(where))
    rng = np.random.default_rng(1)
    vec = {k: rng.standard_normal(store.dim).astype(np.float32) for k in range(c)}
    out = []
    for mode in modes:
        served = ServedFeatures(store, c, mode=mode, budget_bytes=1 << 40)
        sq = scored_query(served, np.ones(c), list(range(c)), vec, {}, "raw")
        nbytes = served.n * served.dim * c
        timings: list[dict[str, float]] = []

        def once(served=served, sq=sq, timings=timings):
            res = scan(served, sq, 10, ("proponents", "opponents"))
            timings.append(res["proponents"].timings)

        if mode == "memory":
            t = median_time(once, reps)
            scan_s = statistics.median(x["scan_s"] for x in timings[1:])
            rate = nbytes / t
            out.append(f"{n:>8} {'served scan, memory':<28} {t * 1e3:>9.1f} {rate / 1e9:>8.2f} {rate / bw:>6.2f}")
            out.append(
                f"{n:>8} {'  of which products+bounds':<28} {scan_s * 1e3:>9.1f} {nbytes / scan_s / 1e9:>8.2f} "
                f"{nbytes / scan_s / bw:>6.2f}"
            )
        else:
            files = sorted(p for p in (where / "store.zarr").rglob("*") if p.is_file() and "features" in p.parts)
            drop_cache(files)
            disk, disk_bytes = disk_bandwidth(files)
            cold = buffered_read(files)
            out.append(
                f"{n:>8} {'disk read, O_DIRECT':<28} {disk_bytes / disk * 1e3:>9.1f} {disk / 1e9:>8.2f}   (floor)"
            )
            out.append(
                f"{n:>8} {'  read after the drop':<28} {disk_bytes / cold * 1e3:>9.1f} {cold / 1e9:>8.2f} "
                f"{cold / disk:>6.2f}"
                "  (file by file through the page cache: the drop leaves nothing cached)"
            )
            default = store_mod.crc32c_of
            impls = {"crc32c": store_mod.crc32c_icrar, "google": store_mod.crc32c_google}
            for crc in crcs:
                store_mod.crc32c_of = impls[crc]
                try:
                    t = median_time(once, max(1, reps // 2), before=lambda files=files: drop_cache(files))
                finally:
                    store_mod.crc32c_of = default
                rate = disk_bytes / t
                label = "served scan, stream (cold)" if len(crcs) == 1 else f"stream (cold), {crc}"
                out.append(
                    f"{n:>8} {label:<28} {t * 1e3:>9.1f} {rate / 1e9:>8.2f} {rate / disk:>6.2f}"
                    f"  (of the disk; {disk_bytes / 2**30:.2f} GiB on disk, {nbytes / 2**30:.2f} GiB of rows)"
                )
            if warm:  # the store's files in the page cache (read once): what the readers' CPU costs
                for crc in crcs:
                    store_mod.crc32c_of = impls[crc]
                    try:
                        t = median_time(once, reps)
                    finally:
                        store_mod.crc32c_of = default
                    out.append(
                        f"{n:>8} {f'stream (warm), {crc}':<28} {t * 1e3:>9.1f} {nbytes / t / 1e9:>8.2f} "
                        f"{nbytes / t / bw:>6.2f}  (of the memory floor; page cache warm)"
                    )
        del served
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def batch_rows(n: int, d: int, c: int, batch: int, work: Path, reps: int = 3) -> list[str]:
    from proponent.api.schemas import InfluenceParams
    from proponent.query.index import open_index
    from proponent.query.usecase import answer, answer_batch

    where = work / f"synthetic-n{n}-c{c}-d{d}-int8"
    idx = open_index(where, device="cpu", feature_mode="memory", memory_budget=1 << 40)
    rng = np.random.default_rng(2)
    xs = rng.uniform(0, 1, (batch, *idx.shape)).astype(np.float32)
    params = InfluenceParams(k=10, direction="both", scoring="raw", uncertainty=False)
    answer(idx, params, x=xs[0])  # warm-up
    # alternating runs, medians: one-shot timings of either side swing 2x on a shared machine
    singles, batches = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        single = [answer(idx, params, x=x) for x in xs]
        singles.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        many = answer_batch(idx, params, xs=list(xs))
        batches.append(time.perf_counter() - t0)
    t_single, t_batch = statistics.median(singles), statistics.median(batches)
    for a, b in zip(single, many, strict=True):  # equal up to the float32 rounding of the batched featurization
        assert a.ids("proponents") == b.ids("proponents") and a.ids("opponents") == b.ids("opponents")
        np.testing.assert_allclose(a.scores("opponents"), b.scores("opponents"), rtol=1e-5)
    feat = statistics.median(r.timings.featurize_ms for r in single)
    return [
        f"{n:>8} {f'{batch} single queries':<28} {t_single * 1e3:>9.1f} {batch / t_single:>8.1f} q/s"
        f"  (featurize p50 {feat:.1f} ms, search p50 {statistics.median(r.timings.search_ms for r in single):.1f} ms)",
        f"{n:>8} {f'1 batch of {batch} (median of {len(batches)})':<28} {t_batch * 1e3:>9.1f}"
        f" {batch / t_batch:>8.1f} q/s"
        f"  {t_single / t_batch:>5.2f}x the single queries' throughput (search {many[0].timings.search_ms:.0f} ms,"
        f" featurize {sum(r.timings.featurize_ms for r in many):.0f} ms)",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="60000,250000")
    ap.add_argument("--dim", type=int, default=None, help="row width (default: the default layout's)")
    ap.add_argument("--checkpoints", type=int, default=1, help="checkpoints of the served index")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--stream-mib", type=int, default=1024, help="STREAM buffer, MiB")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: PROPONENT_THREADS or all)")
    ap.add_argument("--no-served", action="store_true", help="kernels only (no synthetic index)")
    ap.add_argument("--no-stream", action="store_true", help="no streamed scan")
    ap.add_argument("--stream-only", action="store_true", help="the streamed scan and its disk floor only (large N)")
    ap.add_argument("--batch", type=int, default=64, help="queries in the batch-throughput run (0: none)")
    ap.add_argument("--warm", action="store_true", help="also time the streamed scan on a warm page cache")
    ap.add_argument(
        "--crc32c",
        default="crc32c",
        help="checksum implementations the streamed scan is timed with, comma-separated: crc32c (the store's), google",
    )
    ap.add_argument("--workdir", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "proponent-bench"))
    a = ap.parse_args()

    import torch

    from proponent.indexer.job import IndexOptions
    from proponent.threads import set_threads

    threads = set_threads(a.threads)
    d = a.dim or IndexOptions().projection.sketch_dim or IndexOptions().projection.dim
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"# scan_bandwidth: D={d} int8, threads={threads}, torch {torch.__version__}, cpu: {_cpu()}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, C={a.checkpoints}")
    print(f"# load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'N':>8} {'what':<28} {'ms':>9} {'GB/s':>8} {'x floor':>6}")
    for n in (int(s) for s in a.sizes.split(",")):
        bw = memory_bandwidth(a.stream_mib, a.reps)
        print(f"{n:>8} {'memory read (sum, floor)':<28} {'':>9} {bw / 1e9:>8.2f}", flush=True)
        for line in [] if a.stream_only else kernel_rows(n, d, a.reps, bw, a.batch):
            print(line, flush=True)
        if not a.no_served:
            modes = ["stream"] if a.stream_only else ["memory"] if a.no_stream else ["memory", "stream"]
            for line in served_rows(n, d, a.checkpoints, a.reps, bw, work, modes, tuple(a.crc32c.split(",")), a.warm):
                print(line, flush=True)
            if a.batch and not a.stream_only:
                for line in batch_rows(n, d, a.checkpoints, a.batch, work, a.reps):
                    print(line, flush=True)
        bw2 = memory_bandwidth(a.stream_mib, a.reps)
        print(f"{n:>8} {'memory read again (floor)':<28} {'':>9} {bw2 / 1e9:>8.2f}", flush=True)
        print(f"# load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)


def _cpu() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
        model = Path("/proc/cpuinfo").read_text().split("model name", 1)[1].split("\n", 1)[0].strip(": \t")
    except (OSError, IndexError):
        return "unknown"
    isa = [f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni") if f in flags]
    return f"{model}, {os.cpu_count()} CPUs, {' '.join(isa)}"


if __name__ == "__main__":
    main()
