"""Indexing on Ray: a worker killed mid-unit is retried by Ray and the index is byte-identical to a local run."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proponent.format.integrity import verify_index
from tests.conftest import REPO

DATA = "digits,limit=192"

pytestmark = pytest.mark.timeout(300)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "proponent", *args]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ray_index") / "run"
    args = ["--data", DATA, "--out", str(out), "--epochs", "2", "--hidden", "24", "--latent-dim", "4"]
    subprocess.run(_cli("train", *args, "--checkpoints", "2", "--quiet"), check=True, cwd=REPO)
    return out


def _index(run: Path, out: Path, *extra: str) -> list[str]:
    return _cli(
        "index",
        "--run",
        str(run),
        "--out",
        str(out),
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
        "--quiet",
        *extra,
    )


def store_digests(out: Path) -> dict[str, str]:
    """sha256 of every file of the store (chunks and metadata), by path."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((out / "store.zarr").rglob("*"))
        if p.is_file()
    }


def test_killed_ray_worker_is_retried_and_the_index_is_byte_identical(
    run_dir: Path, tmp_path: Path, ray_local: str
) -> None:
    env = {**os.environ, "PROPONENT_CHUNK_ROWS": "32"}  # 6 units per checkpoint
    ref = tmp_path / "local"
    subprocess.run(_index(run_dir, ref), check=True, env=env, cwd=REPO)
    marker = tmp_path / "died"
    out = tmp_path / "ray"
    r = subprocess.run(
        _index(run_dir, out, "--engine", "ray", "--ray-address", ray_local, "--workers", "2"),
        env={**env, "PROPONENT_TEST_DIE_MARKER": str(marker)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # a worker really died: it wrote its pid, then os._exit(1) in the middle of a unit; that process is gone
    pid = int(marker.read_text())
    assert pid != os.getpid()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert verify_index(out) == [] and verify_index(out, deep=True) == []
    want, got = store_digests(ref), store_digests(out)
    assert len(got) > 20 and got == want


def test_whitened_index_on_ray_equals_the_local_one(run_dir: Path, tmp_path: Path, ray_local: str) -> None:
    """--whiten kfac on Ray: the driver makes and stores the factors, the workers read them; store and factor
    files byte-identical to a local run."""
    env = {**os.environ, "PROPONENT_CHUNK_ROWS": "64"}
    extra = ("--whiten", "kfac", "--featurizer", "kron")
    ref, out = tmp_path / "local", tmp_path / "ray"
    subprocess.run(_index(run_dir, ref, *extra), check=True, env=env, cwd=REPO)
    r = subprocess.run(
        _index(run_dir, out, *extra, "--engine", "ray", "--ray-address", ray_local, "--workers", "2"),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert verify_index(out) == []
    assert store_digests(out) == store_digests(ref)
    files = sorted(p.name for p in (ref / "whiten").iterdir())
    assert files and all((out / "whiten" / f).read_bytes() == (ref / "whiten" / f).read_bytes() for f in files)
