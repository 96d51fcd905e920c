"""Host-side half of docker/smoke.sh: talks to a proponent container through the Python client.

Only the documented client API is used (InfluenceClient(url).influence(...), .start_self_influence(),
.job(id), Job.wait().result()), so that the smoke test survives refactors of the server internals.

    python docker/smoke_client.py check URL [--api-key KEY]
    python docker/smoke_client.py start-job URL --m 64            # prints the job id
    python docker/smoke_client.py wait-progress URL JOB --fraction 0.2
    python docker/smoke_client.py progress URL JOB
    python docker/smoke_client.py finish URL JOB --csv OUT
    python docker/smoke_client.py compare-csv A B
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time

import httpx
import numpy as np

from proponent.client import InfluenceClient


def fail(msg: str) -> None:
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def client(a: argparse.Namespace) -> InfluenceClient:
    return InfluenceClient(a.url, api_key=a.api_key or None, timeout=120)


def cmd_check(a: argparse.Namespace) -> None:
    for path, want in (("/healthz", "ok"), ("/readyz", "ready")):
        r = httpx.get(a.url + path, timeout=10)
        if r.status_code != 200 or r.json().get("status") != want:
            fail(f"GET {path} -> {r.status_code} {r.text}")
        print(f"GET {path} -> {r.status_code} {r.json()}")
    r = httpx.get(a.url + "/", timeout=10)  # the web UI where the server has one (package data in the wheel)
    if r.status_code >= 500 or (r.status_code == 200 and "html" not in r.headers.get("content-type", "")):
        fail(f"GET / -> {r.status_code} {r.headers.get('content-type')}")
    print(f"GET / -> {r.status_code} {r.headers.get('content-type', '')}")
    if a.api_key:
        r = httpx.get(a.url + "/v1/index", timeout=10)
        if r.status_code != 401:
            fail(f"GET /v1/index without the API key -> {r.status_code}, expected 401")
        print("GET /v1/index without the API key -> 401 (keys enforced)")
    with client(a) as c:
        info = c.index_info()
        print(
            f"index: N={info.n} D={info.dim} shape={info.shape} checkpoints={len(info.checkpoints)} "
            f"device={info.device} exact={info.exact}"
        )
        png = c.sample_image(3)
        r = c.influence(png, k=5, direction="both")
        top = [h.id for h in r.proponents or []]
        print(
            f"upload (PNG of sample 3): proponents {top} opponents {[h.id for h in r.opponents or []]} "
            f"({r.timings.total_ms:.0f} ms)"
        )
        if len(top) != 5 or len(r.opponents or []) != 5:
            fail("upload: expected 5 proponents and 5 opponents")
        x = np.random.default_rng(0).random(info.shape, dtype=np.float32)
        r = c.influence(x, k=3)
        print(f"upload (numpy {list(x.shape)}): proponents {[h.id for h in r.proponents or []]}")
        r = c.influence(sample_id=3, k=5)
        top = [h.id for h in r.proponents or []]
        print(f"stored sample 3: proponents {top} scores {[round(h.score, 4) for h in r.proponents or []]}")
        if len(top) != 5:
            fail("stored sample: expected 5 proponents")
        t0 = time.perf_counter()
        rows = c.start_self_influence().wait(timeout=600).result()
        print(
            f"self-influence job (stored norms): {len(rows)} rows in {time.perf_counter() - t0:.1f}s, "
            f"top {[(row.id, round(row.self_influence, 4)) for row in rows[:3]]}"
        )
        if len(rows) != info.n or [row.rank for row in rows[:3]] not in ([0, 1, 2], [1, 2, 3]):
            fail(f"self-influence: {len(rows)} rows, expected {info.n} ranked rows")


def cmd_start_job(a: argparse.Namespace) -> None:
    with client(a) as c:
        job = c.start_self_influence(m=a.m)
        print(job.id)


def _progress(c: InfluenceClient, job_id: str) -> tuple[str, int, int]:
    info = c.job(job_id).info
    return info.state, info.progress.done, info.progress.total


def cmd_progress(a: argparse.Namespace) -> None:
    with client(a) as c:
        state, done, total = _progress(c, a.job)
        print(state, done, total)


def cmd_wait_progress(a: argparse.Namespace) -> None:
    deadline = time.monotonic() + a.timeout
    with client(a) as c:
        while True:
            state, done, total = _progress(c, a.job)
            if state in ("succeeded", "failed", "cancelled"):
                fail(f"job {a.job} already {state} ({done}/{total}) before reaching {a.fraction:.0%}: make it longer")
            if total and done / total >= a.fraction:
                print(state, done, total)
                return
            if time.monotonic() > deadline:
                fail(f"job {a.job} at {done}/{total} after {a.timeout}s")
            time.sleep(0.2)


def cmd_finish(a: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    with client(a) as c:
        job = c.job(a.job).wait(timeout=a.timeout)
        text = job.result(format="csv")
        with open(a.csv, "w") as f:
            f.write(text)
        p = job.info.progress
        print(
            f"job {a.job[:8]} {job.state} ({p.done}/{p.total} chunks) after {time.perf_counter() - t0:.1f}s more; "
            f"{len(text.splitlines()) - 1} rows -> {a.csv}"
        )


def _read(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def cmd_compare_csv(a: argparse.Namespace) -> None:
    x, y = _read(a.a), _read(a.b)
    if len(x) != len(y) or not x:
        fail(f"{a.a}: {len(x)} rows, {a.b}: {len(y)} rows")
    ids_equal = [r["id"] for r in x] == [r["id"] for r in y]
    worst = max(
        abs(float(r["self_influence"]) - float(s["self_influence"])) / max(abs(float(s["self_influence"])), 1e-300)
        for r, s in zip(sorted(x, key=lambda r: r["id"]), sorted(y, key=lambda r: r["id"]))
    )
    same_bytes = open(a.a).read() == open(a.b).read()
    print(
        f"resumed job vs uninterrupted CLI run: {len(x)} rows, same ranking: {ids_equal}, "
        f"max relative difference {worst:.2e}, identical CSV: {same_bytes}"
    )
    if not ids_equal or not math.isfinite(worst) or worst > 1e-6:
        fail("the resumed job's result differs from an uninterrupted run")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(required=True)

    def add(name: str, func, url: bool = True) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
        p = sub.add_parser(name)
        if url:
            p.add_argument("url")
            p.add_argument("--api-key", default="")
        p.set_defaults(func=func)
        return p

    add("check", cmd_check)
    add("start-job", cmd_start_job).add_argument("--m", type=int, required=True)
    add("progress", cmd_progress).add_argument("job")
    p = add("wait-progress", cmd_wait_progress)
    p.add_argument("job")
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--timeout", type=float, default=300)
    p = add("finish", cmd_finish)
    p.add_argument("job")
    p.add_argument("--csv", required=True)
    p.add_argument("--timeout", type=float, default=900)
    p = add("compare-csv", cmd_compare_csv, url=False)
    p.add_argument("a")
    p.add_argument("b")
    a = ap.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
