"""The Python client (sync and async twins) against a real server on loopback."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from proponent.api.schemas import ErrorBody, InfluenceResponse
from proponent.client import (
    AsyncInfluenceClient,
    Conflict,
    ConnectionFailed,
    InfluenceClient,
    JobFailed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ServerError,
    UnsupportedMediaType,
    ValidationError,
    query_bytes,
)
from tests.conftest import svc_free_port

pytestmark = pytest.mark.timeout(300)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.round(a * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_query_kinds_agree(svc_client, svc_server, tmp_path: Path):
    """A path, bytes, a numpy array (.npy) and a PIL image of the same picture give the same answer."""
    img = svc_server.index.input(9)
    q8 = np.round(img * 255) / 255  # what an 8-bit PNG holds
    path = tmp_path / "q.png"
    path.write_bytes(_png(img[0]))
    kw = {"k": 4, "checkpoints": [4], "seed": 3}
    answers = [
        svc_client.influence(path, **kw),
        svc_client.influence(str(path), **kw),
        svc_client.influence(path.read_bytes(), **kw),
        svc_client.influence(q8.astype(np.float32), **kw),
        svc_client.influence(Image.open(path), **kw),
    ]
    ids = [[h.id for h in a.proponents] for a in answers]
    assert all(i == ids[0] for i in ids), ids
    for a in answers[1:]:
        np.testing.assert_allclose([h.score for h in a.proponents], [h.score for h in answers[0].proponents], rtol=1e-5)
    assert answers[0].query.seed == 3 and answers[0].query.checkpoints == [4]
    assert answers[0].opponents is None


def test_shortcuts_and_sample_queries(svc_client):
    pro = svc_client.proponents(sample_id=12, k=3).proponents
    opp = svc_client.opponents(sample_id=12, k=3).opponents
    both = svc_client.influence(sample_id=12, k=3, direction="both")
    assert [h.id for h in pro] == [h.id for h in both.proponents]
    assert [h.id for h in opp] == [h.id for h in both.opponents]
    assert pro[0].score >= pro[-1].score and opp[0].score <= opp[-1].score
    assert set(both.search) == {"proponents", "opponents"}
    with pytest.raises(ValueError):
        svc_client.influence(b"x", sample_id=1)


def test_typed_errors(svc_client, svc_server):
    with pytest.raises(NotFound) as e:
        svc_client.sample(10**6)
    assert e.value.status == 404 and e.value.code == "not_found" and e.value.request_id
    with pytest.raises(NotFound):
        svc_client.job("f" * 32)
    with pytest.raises(ValidationError, match="k"):
        svc_client.influence(sample_id=1, k=0)
    with pytest.raises(ValidationError, match=r"unknown checkpoint"):
        svc_client.influence(sample_id=1, checkpoints=[99])
    with pytest.raises(UnsupportedMediaType):
        svc_client.influence(b"definitely not an image")
    with pytest.raises(ValidationError, match="expected shape"):
        svc_client.influence(np.zeros((5, 5), np.float32))
    with pytest.raises(PayloadTooLarge):
        svc_client.influence(b"\x93NUMPY" + b"\x00" * (svc_server.state.settings.max_upload_bytes + 1))
    with pytest.raises(TypeError):
        query_bytes(12345)
    info = svc_client.index_info()
    assert info.n == 300


def test_jobs_paging_csv_cancel_and_conflict(svc_server):
    with InfluenceClient(svc_server.url, retries=0, page_size=7) as c:
        # The recompute job's chunks need the model lock: held here, it cannot finish before it is cancelled.
        lock = svc_server.index.runtime.featurize_lock
        lock.acquire()
        try:
            job = c.start_self_influence(convention="lr", checkpoints=[1, 3])  # stored norms: quick
            slow = c.start_self_influence(convention="lr", m=2, seed=1)  # queued behind it, then running
            queued_or_running = c.job(slow.id)
            with pytest.raises(Conflict, match="succeeded"):
                queued_or_running.result()
            job.wait(timeout=120, progress=True)
            rows = job.result()  # 300 rows in pages of 7
            assert [r.rank for r in rows] == list(range(1, 301))
            idx = svc_server.index
            expected = idx.self_influence("lr", [1, 3])
            got = {r.id: r.self_influence for r in rows}
            np.testing.assert_allclose([got[int(i)] for i in idx.meta.ids], expected, rtol=1e-12)
            assert all(rows[i].self_influence >= rows[i + 1].self_influence for i in range(len(rows) - 1))
            text = job.result(format="csv")
            assert text.splitlines()[0].startswith("rank,id,self_influence") and len(text.splitlines()) == 301
            slow.cancel()  # a running job stops at its next chunk boundary
        finally:
            lock.release()
        assert slow.state in ("running", "cancelled")
        with pytest.raises(JobFailed, match="cancelled"):
            slow.wait(timeout=60)
        with pytest.raises(Conflict):
            slow.cancel()
        assert {j.id for j in c.jobs()} >= {job.id, slow.id}


def test_connection_failed_after_retries():
    port = svc_free_port()
    t = time.monotonic()
    with pytest.raises(ConnectionFailed, match="3 attempts"):
        InfluenceClient(f"http://127.0.0.1:{port}", retries=2, backoff=0.01).health()
    assert time.monotonic() - t < 10


def test_retries_on_503_only():
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if request.url.path == "/healthz" and calls["n"] <= 2:
            return httpx.Response(
                503,
                headers={"Retry-After": "0"},
                json={"error": {"status": 503, "code": "overloaded", "message": "busy", "request_id": "r"}},
            )
        if request.url.path == "/healthz":
            return httpx.Response(200, json={"status": "ok", "index_loaded": True})
        return httpx.Response(
            500, json={"error": {"status": 500, "code": "internal_error", "message": "boom", "request_id": "r"}}
        )

    c = InfluenceClient("http://test", retries=3, backoff=0.001, transport=httpx.MockTransport(handler))
    assert c.health().status == "ok" and calls["n"] == 3
    calls["n"] = 0
    with pytest.raises(ServerError, match="boom"):
        c.index_info()
    assert calls["n"] == 1  # 500 is not retried
    calls["n"] = -100  # 503 forever
    c0 = InfluenceClient("http://test", retries=1, backoff=0.001, transport=httpx.MockTransport(handler))
    with pytest.raises(Overloaded) as e:
        c0.health()
    assert e.value.retry_after == 0.0 and calls["n"] == -98
    assert ErrorBody.model_validate({"error": {"status": 1, "code": "c", "message": "m", "request_id": None}})


def test_async_twin(svc_server):
    sync = InfluenceClient(svc_server.url, retries=0)

    async def main():
        async with AsyncInfluenceClient(svc_server.url, retries=0, page_size=50) as ac:
            assert (await ac.health()).status == "ok"
            assert (await ac.index_info()).n == 300
            answers = await asyncio.gather(*(ac.influence(sample_id=s, k=5, direction="both") for s in (1, 2, 3, 4)))
            for s, a in zip((1, 2, 3, 4), answers, strict=True):
                assert isinstance(a, InfluenceResponse)
                ref = sync.influence(sample_id=s, k=5, direction="both")
                assert [h.id for h in a.proponents] == [h.id for h in ref.proponents]
                assert [h.id for h in a.opponents] == [h.id for h in ref.opponents]
            img = svc_server.index.input(5)
            a = await ac.proponents(img, k=3, checkpoints=[2])
            assert [h.id for h in a.proponents] == [h.id for h in sync.proponents(img, k=3, checkpoints=[2]).proponents]
            assert (await ac.sample(3)).id == 3
            assert (await ac.sample_image(3)).startswith(b"\x89PNG")
            f = await ac.factors()
            assert len(f.mi) == 16 and sorted(f.influential + f.collapsed) == list(range(16))
            with pytest.raises(NotFound):
                await ac.sample(10**6)
            job = await ac.start_self_influence(convention="visits")
            await job.wait(timeout=120)
            rows = await job.result()
            sjob = sync.job(job.id)
            assert [r.id for r in rows] == [r.id for r in sjob.result()]
            assert (await job.result(format="csv")) == sjob.result(format="csv")
            assert job.id in [j.id for j in await ac.jobs()]

    asyncio.run(main())
