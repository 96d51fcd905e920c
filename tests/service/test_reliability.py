"""Issue 19's reliability list: a client that disconnects mid-upload is not a server error, and damage
found by any route that reads the store is reported as the query routes report it (named, /readyz 503)."""

from __future__ import annotations

import re
import shutil
import socket
import time
from urllib.parse import urlparse

import httpx

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
