"""Sharded search: row-range features, the exact merge of the shards' top-k, and serving on Ray Serve.

The merge is held to the unsharded answer bit for bit (same ids, same scores, same per-hit
uncertainty) for every scoring, both directions, k larger than a shard, every feature mode; the
served version runs ``proponent serve --shards 2`` on a local Ray cluster and compares it with the
unsharded server through the real client, then takes a shard down.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from proponent.api.schemas import InfluenceParams
from proponent.client import InfluenceClient
from proponent.client.errors import APIError
from proponent.indexer.data import load_dataset
from proponent.indexer.job import IndexOptions, build_index, checkpoints_from_run
from proponent.indexer.training import TrainConfig, train
from proponent.model.architectures import ModelConfig
from proponent.model.projection import ProjectionSpec
from proponent.query.features import ServedFeatures
from proponent.query.index import InfluenceIndex, open_index
from proponent.query.searcher import (
    LocalSearcher,
    LocalShard,
    SearchRequest,
    ShardedSearcher,
    ShardUnavailable,
    shard_ranges,
)
from proponent.query.usecase import answer
from tests.conftest import REPO, svc_free_port, svc_run_server
from tests.helpers import answer_key

DATA = "digits,limit=150"
CHUNK = 16  # rows per chunk: 150 rows -> 10 chunks, so that shards hold a few chunks each


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharded")
    data = load_dataset(DATA)
    cfg = ModelConfig(kind="mlp", input_shape=data.shape, hidden=(24,), latent_dim=4)
    run = train(
        data, cfg, root / "run", TrainConfig(epochs=2, batch_size=32, checkpoints=2, seed=3), show_progress=False
    )
    specs, _ = checkpoints_from_run(run)
    out = {}
    for dtype in ("float32", "int8"):
        opts = IndexOptions(
            m=4,
            featurizer="dense",
            device="cpu",
            projection=ProjectionSpec(kind="kron", k=8),
            dtype=dtype,
            chunk_rows=CHUNK,
            unit_rows=CHUNK,
        )
        out[dtype] = Path(build_index(data, specs, root / dtype, opts, show_progress=False))
    return out


def _sharded(index: InfluenceIndex, shards: int, mode: str) -> ShardedSearcher:
    ranges = shard_ranges(index.n, index.manifest.storage.chunk_rows, shards)
    return ShardedSearcher(
        [
            LocalShard(
                LocalSearcher(ServedFeatures(index.store, len(index.checkpoints), mode=mode, rows=r), offset=r[0])
            )
            for r in ranges
        ]
    )


def _both(index: InfluenceIndex, searcher: ShardedSearcher, params: InfluenceParams, **q: object):
    whole = answer(index, params, **q)  # type: ignore[arg-type]
    local = index.searcher
    index.searcher = searcher
    try:
        parts = answer(index, params, **q)  # type: ignore[arg-type]
    finally:
        index.searcher = local
    return whole, parts


def test_shard_ranges_are_contiguous_chunk_aligned_and_refuse_too_many() -> None:
    for n, chunk, shards in [(150, 16, 2), (150, 16, 3), (150, 16, 10), (1000, 64, 7), (64, 64, 1)]:
        r = shard_ranges(n, chunk, shards)
        assert len(r) == shards and r[0][0] == 0 and r[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(r, r[1:]))
        assert all(lo % chunk == 0 and lo < hi for lo, hi in r)
        sizes = [hi - lo for lo, hi in r]
        assert max(sizes) - min(sizes) <= chunk  # as even as whole chunks allow
    with pytest.raises(ValueError, match="at most 10"):
        shard_ranges(150, 16, 11)


def test_row_range_features_are_the_slice_of_the_whole(tiny: dict[str, Path]) -> None:
    for dtype, modes in (("float32", ("memory", "quantized", "stream")), ("int8", ("memory", "stream"))):
        idx = open_index(tiny[dtype], device="cpu", feature_mode="memory")
        whole = idx.features
        for mode in modes:
            part = ServedFeatures(idx.store, len(idx.checkpoints), mode=mode, rows=(32, 96))
            assert part.n == 64 and part.describe()["rows"] == [32, 96]
            rows = np.array([0, 5, 17, 63])
            for c in range(len(idx.checkpoints)):
                np.testing.assert_array_equal(part.sq_norm[c], whole.sq_norm[c][32:96])
                np.testing.assert_array_equal(part.exact_rows(c, rows), whole.exact_rows(c, rows + 32))
            blocks = list(part.blocks([0]))
            assert blocks[0].lo == 0 and blocks[-1].hi == 64
        with pytest.raises(ValueError, match="aligned"):
            ServedFeatures(idx.store, len(idx.checkpoints), mode="stream", rows=(8, 96))


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_merged_shards_equal_the_unsharded_answer(tiny: dict[str, Path], dtype: str) -> None:
    idx = open_index(tiny[dtype], device="cpu", feature_mode="memory")
    x = (idx.input(7) * 0.5 + idx.input(40) * 0.5).astype(np.float32)
    shard_rows = max(hi - lo for lo, hi in shard_ranges(idx.n, CHUNK, 3))
    modes = ("memory", "quantized", "stream") if dtype == "float32" else ("memory", "stream")
    for mode in modes:
        searcher = _sharded(idx, 3, mode)
        for scoring in ("raw", "cosine", "relatif"):
            for k in (1, 5, shard_rows + 9):  # k larger than a shard: every shard returns all its rows
                params = InfluenceParams(k=k, direction="both", scoring=scoring, seed=2)
                whole, parts = _both(idx, searcher, params, x=x)
                assert answer_key(parts) == answer_key(whole), (mode, scoring, k)
                assert parts.exact and not parts.partial
                assert parts.search["proponents"].strategy.startswith("sharded[3]/")
        # stored-sample queries, a checkpoint subset and a pre-filter go through the same merge
        for params in (
            InfluenceParams(k=8, direction="both", checkpoints=[1], convention="visits"),
            InfluenceParams(k=6, direction="opponents", prefilter=60),
            InfluenceParams(k=4, features="stored"),
        ):
            whole, parts = _both(idx, searcher, params, sample_id=int(idx.meta.ids[11]))
            assert answer_key(parts) == answer_key(whole), (mode, params)


class _Down:
    """A shard that is down."""

    def __init__(self, rows: tuple[int, int]):
        self.rows = rows

    def search(self, request: SearchRequest, timeout_s: float):
        raise ConnectionError("replica unreachable")

    def describe(self, timeout_s: float):
        raise ConnectionError("replica unreachable")


def test_a_shard_down_refuses_unless_partial_is_allowed(tiny: dict[str, Path]) -> None:
    idx = open_index(tiny["float32"], device="cpu", feature_mode="memory")
    ok = _sharded(idx, 2, "memory")
    lo, hi = ok.shards[1].rows
    broken = ShardedSearcher([ok.shards[0], _Down((lo, hi))])
    idx.searcher = broken
    with pytest.raises(ShardUnavailable, match=r"1 of 2 shards did not answer: shard 1 \(rows"):
        answer(idx, InfluenceParams(k=5), sample_id=3)
    res = answer(idx, InfluenceParams(k=5, direction="both", allow_partial=True), sample_id=3)
    assert res.partial and not res.exact
    assert any(f"rows {lo}..{hi - 1}" in a for a in res.approximations)
    # the partial answer is the exact top-k of the rows that answered
    idx.searcher = ShardedSearcher([ok.shards[0]])
    alive = answer(idx, InfluenceParams(k=5, direction="both"), sample_id=3)
    assert [h.model_dump() for h in res.proponents or []] == [h.model_dump() for h in alive.proponents or []]
    assert all(idx.row_of(h.id) < lo for h in res.proponents or [])
    info = broken.describe_shards()
    assert [s["healthy"] for s in info] == [True, False] and info[1]["rows"] == [lo, hi]
    idx.searcher = ShardedSearcher([_Down((0, lo)), _Down((lo, hi))])
    with pytest.raises(ShardUnavailable):  # nothing answered: never an empty "partial" answer
        answer(idx, InfluenceParams(k=5, allow_partial=True), sample_id=3)


# ---------------------------------------------------------------------------------- resources before deploying
def test_replica_cpus_fit_the_cluster_or_refuse_naming_both() -> None:
    from proponent.service.sharded import DeployError, replica_cpus

    assert replica_cpus(2, None, 2.0) == 0.66 and replica_cpus(3, None, 2.0) == 0.5 and replica_cpus(1, None, 8) == 1.0
    assert replica_cpus(3, 0.5, 2.0) == 0.5
    with pytest.raises(
        DeployError,
        match=r"--shards 2 with --cpus-per-replica 1 needs 3 CPUs .* has 2 free; give "
        r"--cpus-per-replica 0.66 or less",
    ):
        replica_cpus(2, 1.0, 2.0)
    with pytest.raises(DeployError, match=r"needs 100 replicas .* only 2 free CPUs"):
        replica_cpus(99, None, 2.0)
    with pytest.raises(DeployError, match=r"needs 2 GPUs .* has 0 free"):
        replica_cpus(2, None, 2.0, 0.0, 1.0)


def test_a_replica_never_running_fails_start_up_within_the_limit(monkeypatch) -> None:
    from types import SimpleNamespace

    from proponent.service import sharded

    apps = {"proponent-shard-0": SimpleNamespace(status="RUNNING", message="")}
    apps["proponent"] = SimpleNamespace(status="DEPLOYING", message="")
    monkeypatch.setattr(sharded.serve, "status", lambda: SimpleNamespace(applications=apps))
    t0 = time.monotonic()
    with pytest.raises(sharded.DeployError, match=r"^proponent not running after 1 s \(a replica that Ray cannot"):
        sharded._wait_running(["proponent-shard-0", "proponent"], 1.0)
    assert time.monotonic() - t0 < 5
    apps["proponent"] = SimpleNamespace(status="DEPLOY_FAILED", message="boom\nin two lines")
    with pytest.raises(sharded.DeployError, match=r"^proponent failed to deploy: boom in two lines$"):
        sharded._wait_running(["proponent-shard-0", "proponent"], 60.0)


# ---------------------------------------------------------------------------------- on Ray Serve
def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"proponent serve --shards exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the sharded server did not become ready: {log.read_text()[-3000:]}")


@pytest.mark.timeout(300)
def test_serve_shards_on_ray_equal_unsharded_and_a_shard_down_is_503(
    tiny: dict[str, Path], ray_local: str, tmp_path: Path
) -> None:
    from ray import serve

    index = tiny["float32"]
    port = svc_free_port()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "proponent", "serve", "--index", str(index), "--shards", "2"]
    cmd += ["--ray-address", ray_local, "--port", str(port), "--state-dir", str(tmp_path / "state")]
    cmd += ["--feature-mode", "memory"]  # 3 replicas on 2 CPUs: sized to fit (0.66 each), not waiting for ever
    env = {**os.environ, "PROPONENT_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        with svc_run_server(index=index, state_dir=tmp_path / "plain", feature_mode="memory") as plain:
            _wait_ready(url, proc, log)
            one, many = InfluenceClient(plain.url, retries=0, timeout=120), InfluenceClient(url, retries=0, timeout=120)
            info = many.index_info()
            ranges = shard_ranges(info.n, CHUNK, 2)
            assert [s["rows"] for s in info.shards] == [list(r) for r in ranges]
            assert all(s["healthy"] and s["mode"] == "memory" for s in info.shards)
            assert info.serving["mode"] == "stream" and info.serving["resident_bytes"] == 0  # the router holds none
            k_big = max(hi - lo for lo, hi in ranges) + 5
            x = np.asarray(plain.index.input(9), np.float32)
            for kw in (
                {"sample_id": 3, "k": k_big, "direction": "both"},
                {"sample_id": 12, "k": 5, "direction": "opponents", "scoring": "relatif"},
                {"query": x, "k": 7, "direction": "both", "scoring": "cosine"},
                {"query": x, "k": 4, "scoring": "raw", "prefilter": 50},
            ):
                a, b = one.influence(**kw), many.influence(**kw)  # type: ignore[arg-type]
                assert answer_key(b) == answer_key(a), kw
                assert b.search[next(iter(b.search))].strategy.startswith("sharded[2]/")
            whole = one.influence(sample_id=3, k=info.n, direction="proponents")
            # one shard down: 503 with Retry-After, or an answer flagged partial when allowed
            serve.delete("proponent-shard-1")
            r = httpx.post(url + "/v1/influence/samples/3", json={"k": 5}, timeout=60)
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "shard_unavailable" and "shard 1" in r.json()["error"]["message"]
            with pytest.raises(APIError) as e:
                many.influence(sample_id=3, k=5)
            assert e.value.status == 503
            part = many.influence(sample_id=3, k=5, allow_partial=True)
            assert part.partial and not part.exact
            lo = ranges[1][0]
            want = [h for h in whole.proponents or [] if plain.index.row_of(h.id) < lo][:5]
            assert [(h.id, h.score) for h in part.proponents or []] == [(h.id, h.score) for h in want]
            shards = many.index_info().shards
            assert [s["healthy"] for s in shards] == [True, False]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        try:
            serve.shutdown()
        except Exception:
            pass


@pytest.mark.timeout(300)
def test_serve_shards_3_on_2_cpus_fails_fast_or_fits(tiny: dict[str, Path], ray_local: str, tmp_path: Path) -> None:
    """--shards 3 on this 2-CPU cluster: with 1 CPU per replica refused at once in one line naming both
    figures (before anything is deployed); without --cpus-per-replica sized to fit and serving."""
    index = tiny["float32"]
    port = svc_free_port()
    cmd = [sys.executable, "-m", "proponent", "serve", "--index", str(index), "--shards", "3"]
    cmd += ["--ray-address", ray_local, "--port", str(port), "--state-dir", str(tmp_path / "state")]
    env = {**os.environ, "PROPONENT_THREADS": "1"}
    t0 = time.monotonic()
    r = subprocess.run(
        [*cmd, "--cpus-per-replica", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("proponent: error:")]
    assert err and "--shards 3 with --cpus-per-replica 1 needs 4 CPUs" in err[0] and "has 2 free" in err[0]
    assert time.monotonic() - t0 < 90
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log)
        info = InfluenceClient(url, retries=0, timeout=120).index_info()
        assert len(info.shards) == 3 and all(s["healthy"] for s in info.shards)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
