"""Limits and operations of the influence server: CORS, per-request timeout, resize policy, streamed
body limit, metrics, request-id logging, featurization vs. a running job, graceful SIGTERM.

Each limit is answered with its status and message, and the server answers correctly afterwards.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
import time
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proponent.client import InfluenceClient
from tests.conftest import svc_run_server
from tests.service.test_service import (
    JOB,
    _same_ranking,
    err,
    png_bytes,
    reference,
    svc_offline_self_influence,  # noqa: F401  (a fixture)
)

pytestmark = pytest.mark.timeout(300)


def _correct_answer(url: str, index: Any, sample_id: int = 4) -> None:
    """The server still answers a stored-sample query exactly (brute force)."""
    r = InfluenceClient(url, retries=0).influence(sample_id=sample_id, k=3)
    ids, _ = reference(index, index.input(index.row_of(sample_id)), 3, "proponents")
    assert [h.id for h in r.proponents] == ids


# ---------------------------------------------------------------------------------- CORS
def test_cors_only_when_configured(svc_index_dir, tmp_path, svc_server):
    origin = "https://app.example.org"
    preflight = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key",
    }
    with svc_run_server(index=svc_index_dir, state_dir=tmp_path, cors_origins=[origin]) as s:
        with httpx.Client(base_url=s.url) as h:
            r = h.options("/v1/influence", headers=preflight)
            assert r.status_code == 200
            assert r.headers["access-control-allow-origin"] == origin
            assert "POST" in r.headers["access-control-allow-methods"]
            assert "x-api-key" in r.headers["access-control-allow-headers"].lower()
            r = h.get("/v1/samples/3", headers={"Origin": origin})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
            assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
            # another origin: no CORS grant
            r = h.options("/v1/influence", headers={**preflight, "Origin": "https://evil.example"})
            assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
            # refused in the API's JSON error shape, naming why, with the request id
            assert r.headers["content-type"] == "application/json"
            err = r.json()["error"]
            assert err["code"] == "cors_disallowed" and "origin" in err["message"] and err["request_id"]
            assert r.headers["x-request-id"] == err["request_id"]
            r = h.options("/v1/influence", headers={**preflight, "Access-Control-Request-Method": "PUT"})
            assert r.status_code == 400 and "method" in r.json()["error"]["message"]
            r = h.get("/v1/samples/3", headers={"Origin": "https://evil.example"})
            assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        _correct_answer(s.url, s.index)
    # CORS off (the default): no CORS headers at all, a preflight is just an unsupported method
    with httpx.Client(base_url=svc_server.url) as h:
        r = h.options("/v1/influence", headers=preflight)
        assert r.status_code == 405 and not any(k.startswith("access-control-") for k in r.headers)
        r = h.get("/v1/samples/3", headers={"Origin": origin})
        assert r.status_code == 200 and not any(k.startswith("access-control-") for k in r.headers)


# ---------------------------------------------------------------------------------- 504
def test_request_timeout_504(svc_index_dir, tmp_path):
    with svc_run_server(index=svc_index_dir, state_dir=tmp_path, request_timeout_s=3.0, query_workers=1) as s:
        results: list[httpx.Response] = []

        def query() -> None:  # featurizes (objective != elbo): needs the featurize lock
            body = {"objective": "reconstruction", "k": 3}
            results.append(httpx.post(s.url + "/v1/influence/samples/4", json=body, timeout=60))

        with (
            s.state.index.runtime.featurize_lock
        ):  # the worker blocks inside the first query; the second waits in the queue
            ts = [threading.Thread(target=query) for _ in range(2)]
            deadline = time.monotonic() + 30
            ts[0].start()
            while s.state.engine.active < 1:  # the worker has taken the first query
                assert time.monotonic() < deadline
                time.sleep(0.01)
            ts[1].start()
            for t in ts:
                t.join()
            depth = next(
                f
                for f in text_string_to_metric_families(httpx.get(s.url + "/metrics").text)
                if f.name == "proponent_query_queue_depth"
            )
            assert depth.samples[0].value == 1  # the abandoned second query is still queued
        assert [r.status_code for r in results] == [504, 504]
        for r in results:
            e = err(r)
            assert e["code"] == "timeout" and "did not finish within 3s" in e["message"]
        # the worker finishes the first (abandoned) query, skips the second, and serves new ones
        deadline = time.monotonic() + 30
        while s.state.engine.depth:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        _correct_answer(s.url, s.index)
        r = httpx.post(s.url + "/v1/influence/samples/4", json={"objective": "reconstruction", "k": 3}, timeout=60)
        assert r.status_code == 200
        assert 'status="504"' in httpx.get(s.url + "/metrics").text


# ---------------------------------------------------------------------------------- allow_resize
def test_allow_resize(svc_server):
    idx = svc_server.index
    small = idx.input(9)[0]
    big = np.kron(small, np.ones((2, 2)))  # 16 x 16: the same digit at twice the size
    with httpx.Client(base_url=svc_server.url, timeout=120) as h:
        r = h.post("/v1/influence", files={"file": ("q.png", png_bytes(big), "image/png")}, data={"k": "3"})
        assert r.status_code == 422
        msg = err(r)["message"]
        assert "expected shape (1, 8, 8), got (1, 16, 16)" in msg and "resizing is not allowed" in msg
        r = h.post(
            "/v1/influence",
            files={"file": ("q.png", png_bytes(big), "image/png")},
            data={"k": "3", "allow_resize": "true"},
        )
        assert r.status_code == 200, r.text
        resized = r.json()
        # the JSON body follows the same policy
        r = h.post("/v1/influence", json={"x": big[None].tolist(), "k": 3})
        assert r.status_code == 422 and "expected the index's input shape [1, 8, 8]" in err(r)["message"]
        assert "allow_resize" in err(r)["message"]
        r = h.post("/v1/influence", json={"x": big[None].tolist(), "k": 3, "allow_resize": True})
        assert r.status_code == 200
        assert [x["id"] for x in r.json()["proponents"]] == [x["id"] for x in resized["proponents"]]
        r = h.post("/v1/influence", json={"x": (2 * small[None]).tolist(), "k": 3})
        assert r.status_code == 422 and "[0, 1]" in err(r)["message"]
    # the client passes the flag through
    with InfluenceClient(svc_server.url, retries=0) as c:
        assert [x.id for x in c.influence(png_bytes(big), k=3, allow_resize=True).proponents] == [
            x["id"] for x in resized["proponents"]
        ]
    _correct_answer(svc_server.url, idx)


# ---------------------------------------------------------------------------------- streamed body limit
def test_body_limit_enforced_while_streaming(svc_server):
    """A chunked body (no Content-Length) is refused with 413 as soon as it passes the limit, before it ends."""
    limit = svc_server.state.settings.max_upload_bytes
    u = urlparse(svc_server.url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/influence HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        piece = b"\x00" * 16384
        sent = 0
        while sent <= limit:
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
            # paced, so the server has read all we sent when it refuses: closing a socket with unread
            # input makes the kernel answer with a reset, which can overtake the 413 on the client side
            time.sleep(0.02)
        # the body has not ended (no terminating chunk): the answer comes anyway, then the server closes
        data = b""
        while chunk := sock.recv(65536):  # (a socket timeout here would mean the connection stayed open)
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"connection: close" in head.lower()
    payload = json.loads(body[: body.rindex(b"}") + 1])
    assert payload["error"]["code"] == "payload_too_large" and str(limit) in payload["error"]["message"]
    _correct_answer(svc_server.url, svc_server.index)


# ---------------------------------------------------------------------------------- metrics, logs
def _families(url: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}


def _total(fam: Any, suffix: str = "", **labels: str) -> float:
    return sum(
        s.value
        for s in fam.samples
        if s.name == fam.name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_metrics_change_with_traffic(svc_server, svc_client):
    names = ("proponent_requests", "proponent_request_seconds", "proponent_query_queue_depth",
             "proponent_search_candidates", "proponent_jobs", "proponent_queries_rejected")  # fmt: skip
    before = _families(svc_server.url)
    for n in names:
        assert n in before, n  # (the parser strips a counter's _total)
    route = "/v1/influence/samples/{sample_id}"
    svc_client.influence(sample_id=5, k=3, direction="both")
    svc_client.influence(svc_server.index.input(5), k=3)
    job = svc_client.start_self_influence().wait(timeout=120)
    assert job.state == "succeeded"
    with httpx.Client(base_url=svc_server.url) as h:
        assert h.get("/v1/samples/999999").status_code == 404
    after = _families(svc_server.url)
    req_b, req_a = before["proponent_requests"], after["proponent_requests"]
    assert _total(req_a, "_total", route=route, status="200") >= _total(req_b, "_total", route=route, status="200") + 1
    assert _total(req_a, "_total", route="/v1/samples/{sample_id}", status="404") >= 1
    assert _total(req_a, "_total", route="/v1/influence", status="200") > _total(
        req_b, "_total", route="/v1/influence", status="200"
    )
    lat_b, lat_a = before["proponent_request_seconds"], after["proponent_request_seconds"]
    assert _total(lat_a, "_count", route=route) >= _total(lat_b, "_count", route=route) + 1
    assert _total(lat_a, "_sum", route=route) > _total(lat_b, "_sum", route=route)
    rb, ra = before["proponent_search_candidates"], after["proponent_search_candidates"]
    assert _total(ra, "_count") >= _total(rb, "_count") + 3  # both directions + one upload
    jb, ja = before["proponent_jobs"], after["proponent_jobs"]
    assert _total(ja, state="succeeded") >= _total(jb, state="succeeded") + 1
    assert {s.labels["state"] for s in ja.samples} == {"queued", "running", "succeeded", "failed", "cancelled"}
    assert after["proponent_query_queue_depth"].samples[0].value == 0
    # no label per id: the route template, not the path
    assert not any("/v1/samples/999999" in s.labels.get("route", "") for s in req_a.samples)


def test_log_lines_carry_request_id(svc_server):
    records: list[logging.LogRecord] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    h = Grab()
    lg = logging.getLogger("proponent.service")
    lg.addHandler(h)
    try:
        r = httpx.post(svc_server.url + "/v1/influence/samples/2", json={"k": 2}, headers={"X-Request-ID": "trace-42"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
        r = httpx.get(svc_server.url + "/v1/samples/999999", headers={"X-Request-ID": "trace-43"})
        assert err(r)["request_id"] == "trace-43"
        deadline = time.monotonic() + 10  # the access log line is written after the response is sent
        while {"trace-42", "trace-43"} - {getattr(rec, "request_id", None) for rec in records}:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        lg.removeHandler(h)
    mine = {getattr(rec, "request_id", None): rec.getMessage() for rec in records}
    assert "/v1/influence/samples/2 -> 200" in mine["trace-42"]
    assert "/v1/samples/999999 -> 404" in mine["trace-43"]


# ---------------------------------------------------------------------------------- featurization vs. jobs
def test_queries_during_recompute_job_are_unaffected(
    svc_server,
    svc_client,
    svc_offline_self_influence,  # noqa: F811
):
    """Query featurization and a job's recomputed gradients share the models: they must not interleave."""
    idx = svc_server.index
    x = idx.input(17)
    ref = svc_client.influence(x, k=5, objective="reconstruction", seed=3)
    job = svc_client.start_self_influence(**JOB)
    answers = []
    while job.refresh().state in ("queued", "running"):
        answers.append(svc_client.influence(x, k=5, objective="reconstruction", seed=3))
    assert job.state == "succeeded", job.info.error
    assert len(answers) >= 2
    for a in answers:
        assert [h.id for h in a.proponents] == [h.id for h in ref.proponents]
        np.testing.assert_allclose([h.score for h in a.proponents], [h.score for h in ref.proponents], rtol=1e-6)
    _same_ranking([r.model_dump() for r in job.result()], svc_offline_self_influence)


# ---------------------------------------------------------------------------------- SIGTERM
def test_sigterm_drains_and_job_resumes(
    svc_index_dir,
    tmp_path,
    svc_process_factory,
    svc_offline_self_influence,  # noqa: F811
):
    """SIGTERM: an in-flight query completes with 200, the server exits, the running job keeps its progress
    on disk and, after a restart, finishes with the result of an uninterrupted run."""
    state = tmp_path / "state"
    srv = svc_process_factory(svc_index_dir, state).start()
    c = InfluenceClient(srv.url, retries=0, timeout=120)
    job = c.start_self_influence(**JOB)

    # An upload whose body arrives in two parts: the request is in flight when SIGTERM comes.
    x = np.random.default_rng(7).random((1, 8, 8), dtype=np.float32)
    body = json.dumps({"x": x.tolist(), "k": 5, "objective": "reconstruction", "direction": "both", "seed": 9}).encode()
    sent_first = threading.Event()
    release = threading.Event()
    answer: dict[str, Any] = {}

    def parts():
        yield body[:100]
        sent_first.set()
        release.wait(30)
        yield body[100:]

    def upload() -> None:
        try:
            answer["r"] = httpx.post(
                srv.url + "/v1/influence", content=parts(), headers={"content-type": "application/json"}, timeout=120
            )
        except Exception as e:  # reported by the assertion below
            answer["error"] = e

    t = threading.Thread(target=upload)
    t.start()
    assert sent_first.wait(30)
    deadline = time.monotonic() + 120
    while job.refresh().info.progress.done == 0:
        assert job.state in ("queued", "running") and time.monotonic() < deadline, job.info
        time.sleep(0.01)
    # The signal stops the job before its next chunk, whatever the drain of the upload takes: one chunk
    # may be in flight, so at least two must be left for the job to be caught between chunks.
    assert job.info.progress.done <= job.info.progress.total - 2, job.info
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGTERM)  # the upload's headers and first bytes have long arrived
    time.sleep(3.0)  # a long drain: the job must not run on through it
    release.set()
    t.join(60)
    assert "error" not in answer, answer.get("error")
    r = answer["r"]
    assert r.status_code == 200, r.text
    srv.proc.wait(60)
    assert srv.proc.returncode in (0, -signal.SIGTERM)
    log = srv.log.read_text()
    assert "stopped" in log
    with pytest.raises(httpx.TransportError):
        httpx.get(srv.url + "/healthz", timeout=2)

    persisted = json.loads((state / "jobs" / job.id / "job.json").read_text())
    assert persisted["state"] == "running", persisted  # stopped between chunks, not finished, not failed
    assert 0 < persisted["progress"]["done"] < persisted["progress"]["total"], persisted
    assert (state / "jobs" / job.id / "state").is_dir()

    srv2 = svc_process_factory(svc_index_dir, state, port=srv.port).start()
    c2 = InfluenceClient(srv2.url, retries=3, timeout=120)
    job2 = c2.job(job.id).wait(timeout=240)
    print(f"job stopped at {persisted['progress']['done']}/{persisted['progress']['total']} chunks, resumed")
    assert job2.state == "succeeded"
    _same_ranking([row.model_dump() for row in job2.result()], svc_offline_self_influence)
    # the answer given while shutting down is the answer the restarted server gives
    again = httpx.post(
        srv2.url + "/v1/influence", content=body, headers={"content-type": "application/json"}, timeout=120
    )
    assert again.status_code == 200
    for d in ("proponents", "opponents"):
        assert [h["id"] for h in r.json()[d]] == [h["id"] for h in again.json()[d]]
        np.testing.assert_allclose([h["score"] for h in r.json()[d]], [h["score"] for h in again.json()[d]], rtol=1e-6)
    srv2.terminate()
