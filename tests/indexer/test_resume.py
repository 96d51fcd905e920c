"""Indexing survives SIGKILL at any moment: resuming gives a bit-identical index."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from proponent.format.fsio import IndexDir
from proponent.format.integrity import verify_index
from proponent.format.manifest import read_manifest, write_manifest
from proponent.format.store import FeatureStore

DATA = "digits,limit=400"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "proponent", *args]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "run"
    subprocess.run(
        _cli(
            "train",
            "--data",
            DATA,
            "--out",
            str(out),
            "--epochs",
            "2",
            "--hidden",
            "32",
            "--latent-dim",
            "4",
            "--checkpoints",
            "3",
            "--quiet",
        ),
        check=True,
    )
    return out


def _index_args(run: Path, out: Path) -> list[str]:
    # small chunks and a dense featurizer: many units of work, a few seconds in all
    return _cli(
        "index",
        "--run",
        str(run),
        "--out",
        str(out),
        "--m",
        "4",
        "--featurizer",
        "dense",
        "--proj-k",
        "8",
        "--batch-size",
        "16",
        "--threads",
        "1",
        "--index-kind",
        "ivf:4:2",  # an ANN index too, so that a kill can land while FAISS files are written
        "--quiet",
    )


def _digest(out: Path) -> str:
    """sha256 over the manifest, every file of the store and every FAISS file."""
    h = hashlib.sha256()
    for p in sorted([out / "manifest.json", *(out / "store.zarr").rglob("*"), *(out / "faiss").glob("*.index")]):
        if p.is_file():
            h.update(str(p.relative_to(out)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _kill_when(cmd: list[str], ready: object, timeout: float = 120) -> bool:
    """Start cmd, SIGKILL it as soon as ready() holds; True if it was killed before finishing."""
    env = {**os.environ, "PROPONENT_CHUNK_ROWS": "64"}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < timeout:
        if ready():  # type: ignore[operator]
            p.send_signal(signal.SIGKILL)
            p.wait()
            return True
        time.sleep(0.005)
    p.wait()
    return False


def test_sigkill_then_resume_is_bit_identical(run_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PROPONENT_CHUNK_ROWS": "64"}
    ref = tmp_path / "ref"
    subprocess.run(_index_args(run_dir, ref), check=True, env=env)
    assert verify_index(ref) == []
    want = _digest(ref)

    out = tmp_path / "killed"
    rng = np.random.default_rng(0)

    def chunks_done() -> int:
        try:
            st = FeatureStore.open(IndexDir(out))
            return sum(int(st.done_mask(c).sum()) for c in range(st.n_checkpoints))
        except Exception:
            return 0

    kills = 0
    # kill at random points during featurization ...
    for _ in range(3):
        target = int(rng.integers(1, 18))
        kills += _kill_when(_index_args(run_dir, out), lambda t=target: chunks_done() >= t)
    # ... right at the start (while creating the store), and while FAISS files are being written
    kills += _kill_when(_index_args(run_dir, out), lambda: (out / "faiss").exists())
    assert kills >= 2
    assert verify_index(out) != [] or _digest(out) == want  # an interrupted index is never reported sound
    subprocess.run(_index_args(run_dir, out), check=True, env=env)
    assert verify_index(out) == []
    assert _digest(out) == want


def test_verify_cli_names_the_problem(run_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PROPONENT_CHUNK_ROWS": "64"}
    out = tmp_path / "idx"
    subprocess.run(_index_args(run_dir, out), check=True, env=env)
    ok = subprocess.run(_cli("verify", "--index", str(out)), capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout
    st = FeatureStore.open(IndexDir(out), mode="r+")
    st.group["ckpt_001/done"][0] = 0  # pretend a unit never finished
    bad = subprocess.run(_cli("verify", "--index", str(out)), capture_output=True, text=True)
    # a finished index's done flags are recorded by position too: the changed flag is named as such
    assert bad.returncode == 1 and "ckpt_001/done/c/0: holds other data than the index recorded" in bad.stdout
    man = read_manifest(IndexDir(out))  # an index finished before position maps: the flag itself is reported
    write_manifest(
        IndexDir(out), man.model_copy(update={"storage": man.storage.model_copy(update={"positions": None})})
    )
    bad = subprocess.run(_cli("verify", "--index", str(out)), capture_output=True, text=True)
    assert bad.returncode == 1 and "checkpoint 1 has 1 unfinished units" in bad.stdout
    missing = subprocess.run(_cli("verify", "--index", str(tmp_path / "nope")), capture_output=True, text=True)
    assert missing.returncode == 1 and "manifest missing" in missing.stdout
