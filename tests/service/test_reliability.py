"""Issue 19's reliability list: a client that disconnects mid-upload is not a server error, and damage
found by any route that reads the store is reported as the query routes report it (named, /readyz 503)."""

from __future__ import annotations

import re
import shutil
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest

from tests.conftest import svc_run_server


def _requests_total(url: str, status: str, route: str) -> float:
    want = {"method": "POST", "route": route, "status": status}
    for line in httpx.get(url + "/metrics").text.splitlines():
        m = re.match(r"proponent_requests_total\{(.*)\} (\S+)$", line)
        if m and dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))) == want:
            return float(m.group(2))
    return 0.0


def test_client_disconnect_mid_upload_is_not_a_500(svc_server) -> None:
    u = urlparse(svc_server.url)
    before_500 = _requests_total(svc_server.url, "500", "/v1/influence")
    boundary = "b0undary"
    head = (
        f"POST /v1/influence HTTP/1.1\r\nHost: {u.hostname}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 100000\r\n\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="q.npy"\r\n\r\n'
    ).encode()
    with socket.create_connection((u.hostname, u.port)) as s:
        s.sendall(head + b"x" * 500)
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _requests_total(svc_server.url, "499", "/v1/influence") < 1:
        time.sleep(0.1)
    assert _requests_total(svc_server.url, "499", "/v1/influence") >= 1
    assert _requests_total(svc_server.url, "500", "/v1/influence") == before_500


def test_damage_found_by_the_image_route_is_named_and_stops_serving(svc_index_dir, tmp_path) -> None:
    copy = tmp_path / "idx"
    shutil.copytree(svc_index_dir, copy)
    chunk = sorted(p for p in (copy / "store.zarr" / "inputs" / "c").rglob("*") if p.is_file())[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with svc_run_server(index=copy, state_dir=tmp_path / "s", feature_mode="stream") as s:  # reads on demand
        assert httpx.get(s.url + "/readyz").status_code == 200
        r = httpx.get(s.url + "/v1/samples/0/image.png", timeout=60)
        assert r.status_code == 500 and r.json()["error"]["code"] == "index_damaged", r.text
        assert "store.zarr/inputs: chunk (0, 0, 0, 0) damaged (checksum mismatch)" in r.json()["error"]["message"]
        ready = httpx.get(s.url + "/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "index_damaged"
        q = httpx.post(s.url + "/v1/influence/samples/5", json={"k": 3}, timeout=60)
        assert q.status_code == 500 and q.json()["error"]["code"] == "index_damaged"


def test_strict_types_and_messages_that_name_field_and_value(svc_server) -> None:
    with httpx.Client(base_url=svc_server.url, timeout=120) as h:

        def err(r: httpx.Response) -> str:
            assert r.status_code == 422, r.text
            msg = r.json()["error"]["message"]
            assert " object at 0x" not in msg and "<" not in msg, msg
            return msg

        assert "k: must be a number, not a boolean, got true" in err(
            h.post("/v1/influence/samples/3", json={"k": True})
        )
        assert "checkpoints" in err(h.post("/v1/influence/samples/3", json={"checkpoints": [0, True]}))
        assert "beta: Input should be a finite number, got NaN" in err(
            h.post("/v1/influence/samples/3", content=b'{"beta": NaN}', headers={"content-type": "application/json"})
        )
        for bad in ("+1", "%201", "00003", "3.0", "-0"):
            msg = err(h.post(f"/v1/influence/samples/{bad}", json={}))
            assert msg.startswith("sample_id: must be a non-negative integer without sign") and "got" in msg
            assert err(h.get(f"/v1/samples/{bad}")).startswith("sample_id:")
        assert h.get("/v1/samples/0").status_code == 200 and h.get("/v1/samples/3").status_code == 200
        x = [[[0.5] * 8 for _ in range(8)]]
        x[0][1][2] = "0.5"  # type: ignore[call-overload]
        assert "x must be a nested list of numbers" in err(h.post("/v1/influence", json={"x": x}))
        x[0][1][2] = True  # type: ignore[call-overload]
        assert "x must be a nested list of numbers" in err(h.post("/v1/influence", json={"x": x}))
        for junk in (b"\xff\xd8\xffnot a jpeg at all", b"\x93NUMPY\x01\x00v\x00{'descr': __import__('os').getpid()}"):
            r = h.post("/v1/influence", files={"file": ("q", junk, "application/octet-stream")})
            assert r.status_code in (415, 422) and " object at 0x" not in r.json()["error"]["message"], r.text


def test_admission_control_sheds_what_cannot_finish_in_time() -> None:
    """64 clients at a queue that finishes one 0.3 s query at a time within a 1 s timeout: the queue admits
    what it can answer in time and sheds the rest at once (503 + Retry-After) -- no 504s."""
    import asyncio

    from proponent.service.engine import QueryEngine
    from proponent.service.errors import ApiError
    from proponent.service.metrics import Metrics

    async def scenario() -> list[int]:
        engine = QueryEngine(1, 64, 1.0, Metrics())
        engine.start()
        try:
            await engine.run(lambda: time.sleep(0.3))  # the running mean: ~0.3 s a query
            assert engine.mean_s is not None and 0.25 < engine.mean_s < 1.0

            async def one() -> int:
                try:
                    await engine.run(lambda: time.sleep(0.3))
                    return 200
                except ApiError as e:
                    if e.status == 503:
                        assert int(e.headers["Retry-After"]) >= 1 and "within the 1 s timeout" in e.message
                    return e.status

            return list(await asyncio.gather(*(one() for _ in range(64))))
        finally:
            engine.stop()

    statuses = asyncio.run(scenario())
    assert statuses.count(504) == 0
    assert 1 <= statuses.count(200) <= 4 and statuses.count(503) == 64 - statuses.count(200)


def test_admission_estimate_ignores_failed_queries() -> None:
    """Queries that fail at once (a bad upload, a refused parameter) must not pull the running mean down:
    otherwise a stream of bad requests makes the queue admit good ones it cannot finish in time."""
    import asyncio

    from proponent.service.engine import QueryEngine
    from proponent.service.metrics import Metrics

    def fail() -> None:
        raise ValueError("bad query")

    async def scenario() -> tuple[float | None, float | None]:
        engine = QueryEngine(1, 8, 5.0, Metrics())
        engine.start()
        try:
            await engine.run(lambda: time.sleep(0.2))
            before = engine.mean_s
            for _ in range(10):
                with pytest.raises(ValueError):
                    await engine.run(fail)
            return before, engine.mean_s
        finally:
            engine.stop()

    before, after = asyncio.run(scenario())
    assert before is not None and before >= 0.15 and after == before


def test_oversize_chunked_multipart_is_413_early(svc_index_dir, tmp_path) -> None:
    """A chunked multipart upload (no Content-Length) over the limit: 413 as soon as the limit is passed,
    the connection closed, most of the body never read."""
    limit = 64 * 1024
    with svc_run_server(index=svc_index_dir, state_dir=tmp_path / "s", max_upload_bytes=limit) as s:
        u = urlparse(s.url)
        head = (
            f"POST /v1/influence HTTP/1.1\r\nHost: {u.hostname}\r\nTransfer-Encoding: chunked\r\n"
            "Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n"
        ).encode()
        part = b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="q.npy"\r\n\r\n'
        sent, reply = 0, b""
        with socket.create_connection((u.hostname, u.port)) as sock:
            sock.sendall(head + b"%x\r\n%s\r\n" % (len(part), part))
            sock.settimeout(0.05)
            chunk = b"x" * 16384
            try:
                while sent < 200 * limit and not reply:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent += len(chunk)
                    try:
                        reply = sock.recv(65536)
                    except TimeoutError:
                        pass
            except OSError:  # the server closed the connection while we were still sending
                pass
            sock.settimeout(10)
            while b"\r\n\r\n" not in reply:
                more = sock.recv(65536)
                if not more:
                    break
                reply += more
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert b"payload_too_large" in reply or b"larger than the limit" in reply
        assert sent < 20 * limit  # refused early, not after the whole body
