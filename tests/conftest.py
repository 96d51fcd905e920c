"""Shared pytest fixtures.

Service/client fixtures (prefix ``svc_``): a small real index built once per session from
``digits,limit=300`` and real uvicorn servers on loopback.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
SVC_DATA = "digits,limit=300"


def svc_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proponent(*args: str, cwd: Path) -> None:
    exe = Path(sys.executable).with_name("proponent")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "proponent"]
    subprocess.run([*cmd, *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def svc_index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real index (MLP VAE, 5 checkpoints, dense featurizer, m=4) over 300 digits."""
    cache = os.environ.get("PROPONENT_TEST_INDEX_CACHE")  # reuse a built index across sessions (development)
    root = Path(cache) if cache else tmp_path_factory.mktemp("svc_index")
    if cache and (root / "idx" / "manifest.json").is_file():
        return root / "idx"
    root.mkdir(parents=True, exist_ok=True)
    _proponent("train", "--data", SVC_DATA, "--out", str(root / "run"), "--epochs", "5", "--quiet", cwd=root)
    _proponent(
        "index",
        "--run",
        str(root / "run"),
        "--out",
        str(root / "idx"),
        "--featurizer",
        "dense",
        "--m",
        "4",
        "--quiet",
        cwd=root,
    )
    return root / "idx"


@dataclass
class SvcServer:
    url: str
    app: Any
    server: Any

    @property
    def state(self) -> Any:
        return self.app.state.proponent

    @property
    def index(self) -> Any:
        return self.state.index


@contextlib.contextmanager
def svc_run_server(**settings: Any) -> Iterator[SvcServer]:
    """A uvicorn server for ``create_app(Settings(**settings))`` in a thread on a free loopback port."""
    import uvicorn

    from proponent.service.app import create_app
    from proponent.service.settings import Settings

    app = create_app(Settings(**settings))
    port = svc_free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not t.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield SvcServer(f"http://127.0.0.1:{port}", app, server)
    finally:
        server.should_exit = True
        t.join(30)


@pytest.fixture(scope="session")
def svc_server(svc_index_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SvcServer]:
    """The main test server (open, small upload limit so oversize tests are cheap)."""
    state = tmp_path_factory.mktemp("svc_state")
    with svc_run_server(
        index=svc_index_dir, state_dir=state, max_upload_bytes=256 * 1024, max_image_pixels=1_000_000
    ) as s:
        yield s


@pytest.fixture()
def svc_client(svc_server: SvcServer) -> Iterator[Any]:
    from proponent.client import InfluenceClient

    with InfluenceClient(svc_server.url, retries=0, timeout=120) as c:
        yield c


class SvcProcess:
    """``proponent serve`` in a subprocess (for restart / SIGKILL tests)."""

    def __init__(self, index: Path, state_dir: Path, port: int | None = None, env: dict[str, str] | None = None):
        self.index, self.state_dir = index, state_dir
        self.port = port or svc_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PROPONENT_THREADS": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state_dir / f"server-{self.port}.log"

    def start(self, timeout: float = 60) -> SvcProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "proponent",
            "serve",
            "--index",
            str(self.index),
            "--state-dir",
            str(self.state_dir),
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server process did not become ready")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture()
def svc_process_factory() -> Iterator[Any]:
    procs: list[SvcProcess] = []

    def make(index: Path, state_dir: Path, **kw: Any) -> SvcProcess:
        p = SvcProcess(index, state_dir, **kw)
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.kill()


@pytest.fixture(scope="session")
def ray_local() -> Iterator[str]:
    """A small local Ray cluster (2 logical CPUs) started for the tests; yields its address.

    A Ray that cannot start fails the tests that use it (no skip).
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=256 << 20,
            log_to_driver=False,
            configure_logging=False,
        )
    address = ray.get_runtime_context().gcs_address
    yield address
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
