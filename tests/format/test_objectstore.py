"""An index on object storage, against a real S3 API on loopback (moto's server, authentication enforced).

Indexed to ``s3://``, verified (and ``--deep``), served (memory and stream modes, stream through the
local chunk cache): the same bytes and the same answers as the same index built locally. Bad
credentials, a missing bucket and a network cut in the middle of writing a unit each stop the job
with one clear line and leave a resumable index -- never a half-written unit marked done -- and the
resumed job completes it byte-identically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from proponent.client import InfluenceClient
from proponent.format.fsio import IndexDir, ObjectStoreDir, StorageError, index_dir
from proponent.format.integrity import verify_index
from proponent.format.manifest import read_manifest
from proponent.format.store import FeatureStore, StoreError, ckpt_group
from tests.conftest import REPO, svc_run_server
from tests.helpers import answer_key

DATA = "digits,limit=160"
BUCKET = "proponent-test"

pytestmark = pytest.mark.timeout(300)


@dataclass
class S3:
    endpoint: str
    env: dict[str, str]  # the credentials of an IAM user allowed s3:*, and the endpoint


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    """moto's S3 server on a free loopback port; authentication enforced once a user and the bucket exist."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    admin = {"aws_access_key_id": "admin", "aws_secret_access_key": "admin", "region_name": "us-east-1"}
    iam = boto3.client("iam", endpoint_url=endpoint, **admin)
    iam.create_user(UserName="indexer")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="indexer", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="indexer")["AccessKey"]
    boto3.client("s3", endpoint_url=endpoint, **admin).create_bucket(Bucket=BUCKET)
    httpx.post(f"{endpoint}/moto-api/reset-auth", content=b"0").raise_for_status()  # every request authenticated
    env = {
        "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield S3(endpoint, env)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        httpx.post(f"{endpoint}/moto-api/reset-auth", content=b"inf")
        server.stop()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("s3") / "run"
    args = ["--data", DATA, "--out", str(out), "--epochs", "2", "--hidden", "24", "--latent-dim", "4"]
    subprocess.run(_cli("train", *args, "--checkpoints", "2", "--quiet"), check=True, cwd=REPO)
    return out


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "proponent", *args]


def _index(run: Path, out: str) -> list[str]:
    return _cli(
        "index",
        "--run",
        str(run),
        "--out",
        out,
        "--m",
        "3",
        "--featurizer",
        "dense",
        "--proj-k",
        "8",
        "--batch-size",
        "16",
        "--threads",
        "1",
        "--index-kind",
        "ivf:4:2",  # FAISS files too: written and read through the object store like every other file
        "--quiet",
    )


ENV = {"PROPONENT_CHUNK_ROWS": "32"}  # 5 units per checkpoint


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env={**os.environ, **ENV, **env}, cwd=REPO, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def local_ref(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("s3ref") / "idx"
    r = _run(_index(run_dir, str(out)), {})
    assert r.returncode == 0, r.stderr
    return out


def digests(where: IndexDir, rel: str = "store.zarr") -> dict[str, str]:
    """sha256 of every file under ``rel``, by path (local or object store, the same paths)."""
    return {f: hashlib.sha256(where.read_bytes(f)).hexdigest() for f in where.walk_files(rel)}


def _error_line(r: subprocess.CompletedProcess[str]) -> str:
    """The one ``proponent: error:`` line of a failed command (and nothing else on stderr)."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("proponent: error: "), r.stderr[-2000:]
    return lines[0]


def test_index_verify_and_serve_from_s3_equal_local(s3: S3, run_dir: Path, local_ref: Path, tmp_path: Path) -> None:
    url = f"s3://{BUCKET}/idx"
    r = _run(_index(run_dir, url), {})
    assert r.returncode == 0, r.stderr
    where = index_dir(url)
    assert isinstance(where, ObjectStoreDir) and where.is_committed("store.zarr")
    assert digests(where) == digests(IndexDir(local_ref))  # the store byte for byte
    assert digests(where, "faiss") == digests(IndexDir(local_ref), "faiss") != {}  # and the FAISS files
    assert read_manifest(where).complete and verify_index(url) == [] and verify_index(url, deep=True) == []
    v = _run(_cli("verify", "--index", url, "--deep"), {})
    assert v.returncode == 0 and v.stdout.startswith(f"OK {url}"), v.stdout + v.stderr
    queries = [
        {"sample_id": 3, "k": 6, "direction": "both", "search": "scan"},  # the exact scan over every chunk
        {"sample_id": 40, "k": 5, "scoring": "cosine", "direction": "opponents"},  # auto: the FAISS index
    ]
    with svc_run_server(index=local_ref, state_dir=tmp_path / "a", feature_mode="memory") as ref:
        want = [InfluenceClient(ref.url, retries=0, timeout=120).influence(**q) for q in queries]  # type: ignore[arg-type]
        x = ref.index.input(17)
        want_x = InfluenceClient(ref.url, retries=0, timeout=120).influence(x, k=4, direction="both")
    for mode in ("memory", "stream"):
        with svc_run_server(index=url, state_dir=tmp_path / mode, feature_mode=mode, cache_dir=tmp_path / "cache") as s:
            c = InfluenceClient(s.url, retries=0, timeout=120)
            got = [c.influence(**q) for q in queries]  # type: ignore[arg-type]
            assert [answer_key(g) for g in got] == [answer_key(w) for w in want], mode
            assert got[0].exact and not got[1].exact and got[1].search["opponents"].strategy.startswith("ann/")
            assert answer_key(c.influence(x, k=4, direction="both")) == answer_key(want_x)
            assert c.index_info().storage["features_bytes"] > 0
            cache = s.index.store.cache
            if mode == "memory":
                assert cache is None  # everything was read at start-up
                continue
            assert cache is not None and cache.bytes > 0
            misses = cache.misses
            again = c.influence(**queries[0])  # type: ignore[arg-type]
            assert answer_key(again) == answer_key(want[0])
            assert cache.misses == misses and cache.hits > 0  # repeated queries read the local copies only
    # a damaged cache file is noticed (its checksum) and read again from the store
    victim = next(p for p in (tmp_path / "cache").rglob("*") if p.is_file() and "/features/c/" in str(p))
    victim.write_bytes(b"\0" * victim.stat().st_size)
    with svc_run_server(
        index=url, state_dir=tmp_path / "again", feature_mode="stream", cache_dir=tmp_path / "cache"
    ) as s:
        assert answer_key(InfluenceClient(s.url, retries=0, timeout=120).influence(**queries[0])) == answer_key(want[0])  # type: ignore[arg-type]


class CuttableProxy:
    """A TCP proxy in front of the S3 server that cuts every connection, and refuses new ones, the moment
    the client sends ``cut_on`` (a request line): a network failure in the middle of a write."""

    def __init__(self, upstream: str, cut_on: bytes):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.cut_on = cut_on
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.cut = threading.Event()
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.cut.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            with self.lock:
                self.socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, watch: bool) -> None:
        tail = b""
        try:
            while not self.cut.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if watch and self.cut_on in tail + data:
                    self.close()  # the request is never forwarded: that PUT does not happen
                    return
                tail = (tail + data)[-len(self.cut_on) :]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.cut.set()
        for s in [self.listener, *self.socks]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_bad_credentials_missing_bucket_and_network_cut_leave_a_resumable_index(
    s3: S3, run_dir: Path, local_ref: Path
) -> None:
    url = f"s3://{BUCKET}/faults"
    where = index_dir(url)
    # bad credentials: one clear line, nothing written
    line = _error_line(_run(_index(run_dir, url), {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}))
    assert "access denied" in line and "AWS_SECRET_ACCESS_KEY" in line, line
    assert where.walk_files("") == []
    # a missing bucket: one clear line
    line = _error_line(_run(_index(run_dir, "s3://no-such-bucket/idx"), {}))
    assert "s3://no-such-bucket" in line and "bucket does not exist" in line, line
    # the network fails while the first unit of checkpoint 1 is being written
    cut_on = f"PUT /{BUCKET}/faults/store.zarr/{ckpt_group(1)}/features/c/".encode()
    proxy = CuttableProxy(s3.endpoint, cut_on)
    line = _error_line(_run(_index(run_dir, url), {"AWS_ENDPOINT_URL": proxy.url}))
    assert proxy.cut.is_set() and "network error" in line and "run again" in line, line
    assert not read_manifest(where).complete and verify_index(url) != []  # an interrupted index is never sound
    store, ref = FeatureStore.open(where), FeatureStore.open(IndexDir(local_ref))
    assert store.done_mask(0).all() and not store.done_mask(1).any()
    want = digests(IndexDir(local_ref))
    have = digests(where)
    for c in range(store.n_checkpoints):
        for u in map(int, store.done_mask(c).nonzero()[0]):
            lo, hi = store.unit_range(u)
            unit_chunks = [f for f in want if f"/{ckpt_group(c)}/" in f and "/c/" in f and "/done/" not in f]
            mine = [f for f in unit_chunks if _chunk_rows(ref, f) & set(range(lo, hi))]
            assert mine and all(have.get(f) == want[f] for f in mine), (c, u)  # a done unit is whole and right
    assert all(have[f] == want[f] for f in have if "/c/" in f)  # every chunk there is whole (PUTs are atomic)
    # resumed with the network back: completes, byte-identical to the local run
    r = _run(_index(run_dir, url), {})
    assert r.returncode == 0, r.stderr
    assert digests(where) == want and verify_index(url, deep=True) == []
    assert digests(where, "faiss") == digests(IndexDir(local_ref), "faiss")


def _chunk_rows(store: FeatureStore, rel: str) -> set[int]:
    """The rows held by the chunk file ``rel`` of a per-row array."""
    name, idx = rel.removeprefix("store.zarr/").split("/c/")
    chunk = store.group[name].chunks[0]
    k = int(idx.split("/")[0])
    return set(range(k * chunk, (k + 1) * chunk))


def test_object_store_errors_are_one_clear_line(s3: S3) -> None:
    missing = ObjectStoreDir(f"s3://{BUCKET}/nothing-here")
    with pytest.raises(FileNotFoundError, match="nothing-here/manifest.json: file not found"):
        missing.read_bytes("manifest.json")
    assert not missing.is_file("manifest.json") and missing.is_empty()
    with pytest.raises(StorageError, match="the bucket does not exist"):
        ObjectStoreDir("s3://no-such-bucket/x").is_file("manifest.json")
    with pytest.raises(StorageError, match="no atomic rename"):
        missing.rename("a", "b")
    with pytest.raises(ValueError, match="unsupported storage scheme"):
        index_dir("gs://bucket/x")


def test_a_store_is_trusted_only_once_its_commit_marker_is_written(s3: S3) -> None:
    """Object stores cannot rename: the skeleton is built in place and committed by a marker written last."""
    where = index_dir(f"s3://{BUCKET}/uncommitted")
    building = where.stage_dir("store.zarr")
    assert building == "store.zarr"
    n = 8
    FeatureStore.create(
        where,
        building,
        dim=4,
        n_checkpoints=1,
        dtype="float32",
        latent_dim=0,
        inputs=np.zeros((n, 1, 2, 2), np.float32),
        ids=np.arange(n),
        labels=None,
        origin=np.zeros(n, np.int32),
        source_row=np.arange(n),
        injected=np.zeros(n, bool),
        chunk_rows=4,
        unit_rows=4,
    )
    assert where.is_file("store.zarr/zarr.json") and not where.is_committed("store.zarr")
    with pytest.raises(StoreError, match="commit marker"):
        FeatureStore.open(where)  # a kill before the commit: a resume starts the skeleton again
    where.commit_dir(building, "store.zarr")
    assert where.is_committed("store.zarr") and FeatureStore.open(where).n == n
    where.stage_dir("store.zarr")  # staging again takes the marker away first, then the contents
    assert not where.is_committed("store.zarr") and where.walk_files("store.zarr") == []
