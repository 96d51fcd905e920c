"""Storage on one machine: disk pre-flight, a full disk mid-write, old indexes, and serving within a memory budget."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from proponent.format.fsio import IndexDir, StorageError
from proponent.format.integrity import verify_index
from proponent.format.store import FeatureStore
from proponent.indexer.job import IndexJobError, IndexOptions, build_index, checkpoints_from_run
from proponent.indexer.training import TrainConfig, train
from proponent.model.architectures import ModelConfig
from proponent.model.projection import ProjectionSpec
from proponent.query.index import IndexOpenError, open_index
from tests.conftest import svc_run_server

DATA = "digits,limit=150"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from proponent.indexer.data import load_dataset

    data = load_dataset(DATA)
    cfg = ModelConfig(kind="mlp", input_shape=data.shape, hidden=(16,), latent_dim=4)
    return train(
        data, cfg, tmp_path_factory.mktemp("run") / "run", TrainConfig(epochs=2, checkpoints=2), show_progress=False
    )


def _build(run: Path, out: Path, **kw) -> Path:
    specs, r = checkpoints_from_run(run)
    opts = IndexOptions(m=2, projection=ProjectionSpec(kind="kron", k=6), device="cpu", chunk_rows=32, unit_rows=32)
    for key, v in kw.items():
        setattr(opts, key, v)
    return build_index(r["data"]["spec"], specs, out, opts, show_progress=False)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((path / "store.zarr").rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


def test_preflight_refuses_with_need_and_free_space(run, tmp_path, monkeypatch):
    monkeypatch.setattr(IndexDir, "free_bytes", lambda self: 10_000)
    with pytest.raises(IndexJobError, match=r"needs about .* GB \(store .*\) but only 0\.00 GB are free"):
        _build(run, tmp_path / "idx")
    assert not (tmp_path / "idx").exists() or not any((tmp_path / "idx").iterdir())  # nothing written


def test_full_disk_mid_write_is_a_clear_error_and_resumes_identically(run, tmp_path, monkeypatch):
    ref = _build(run, tmp_path / "ref")
    calls = {"n": 0}
    original = FeatureStore.write_unit

    def failing(self, *a, **kw):  # the third unit hits a full disk
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *a, **kw)

    monkeypatch.setattr(FeatureStore, "write_unit", failing)
    with pytest.raises(StorageError, match=r"writing unit \d+ of checkpoint \d+ failed .*run again to resume"):
        _build(run, tmp_path / "idx")
    monkeypatch.setattr(FeatureStore, "write_unit", original)
    problems = verify_index(tmp_path / "idx")
    assert any("unfinished units" in p for p in problems) and any("incomplete" in p for p in problems)
    _build(run, tmp_path / "idx")  # resume
    assert verify_index(tmp_path / "idx", deep=True) == []
    assert _digest(tmp_path / "idx") == _digest(ref)


def test_old_format_is_refused_with_how_to_rebuild(run, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format": "proponent-index", "version": 1, "complete": True}))
    (old / "keep.bin").write_bytes(b"data")
    with pytest.raises(IndexOpenError, match=r"format version 1 .* rebuild it with `proponent index"):
        open_index(old)
    with pytest.raises(IndexJobError, match="use another --out or --overwrite"):
        _build(run, old)
    assert (old / "keep.bin").read_bytes() == b"data" and json.loads((old / "manifest.json").read_text())[
        "version"
    ] == 1


@pytest.mark.parametrize("budget, mode", [("1K", "stream"), ("60K", "quantized")])
def test_memory_budget_modes_answer_like_memory(run, tmp_path, budget, mode):
    idx = _build(run, tmp_path / "idx", dtype="float16")
    full = open_index(idx, device="cpu")
    assert full.features.mode == "memory"
    with svc_run_server(index=idx, state_dir=tmp_path / "s", memory_budget=budget) as s:
        info = httpx.get(s.url + "/v1/index").json()
        assert info["serving"]["mode"] == mode and info["serving"]["budget_bytes"] == int(budget[:-1]) * 1024
        assert info["serving"]["resident_bytes"] < full.features.resident_bytes
        for sid in (0, 77):
            for scoring in ("raw", "cosine", "relatif"):
                body = {"k": 12, "direction": "both", "scoring": scoring}
                got = httpx.post(f"{s.url}/v1/influence/samples/{sid}", json=body, timeout=120).json()
                want = full.influence(sample_id=sid, **body).model_dump(mode="json")
                assert got["exact"] and got["search"]["proponents"]["strategy"].startswith(f"scan/{mode}")
                for d in ("proponents", "opponents"):
                    assert [h["id"] for h in got[d]] == [h["id"] for h in want[d]]
                    np.testing.assert_allclose([h["score"] for h in got[d]], [h["score"] for h in want[d]], rtol=1e-12)


def test_streamed_server_refuses_a_damaged_chunk_at_query_time(run, tmp_path):
    idx = _build(run, tmp_path / "idx")
    copy = tmp_path / "copy"
    shutil.copytree(idx, copy)
    chunk = copy / "store.zarr" / "ckpt_001" / "features" / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 1
    chunk.write_bytes(bytes(data))
    with svc_run_server(index=copy, state_dir=tmp_path / "s", feature_mode="stream") as s:
        r = httpx.post(f"{s.url}/v1/influence/samples/3", json={"k": 3}, timeout=120)
        assert r.status_code == 500 and r.json()["error"]["code"] == "index_damaged"
        assert "ckpt_001/features/c/2/0: damaged (checksum mismatch)" in r.json()["error"]["message"]
        assert httpx.get(s.url + "/readyz").status_code == 503  # no more answers from this index
        assert httpx.post(f"{s.url}/v1/influence/samples/3", json={"k": 3}, timeout=120).status_code == 500


def test_both_crc32c_implementations_agree_and_the_gil_free_one_serves(run, tmp_path, monkeypatch) -> None:
    """The store checksums chunks with ICRAR's crc32c (GIL released) and falls back to zarr's google_crc32c: the
    same values, incrementally too; a streamed index reads with either, and refuses a damaged chunk with either."""
    from proponent.format import store as st

    rng = np.random.default_rng(0)
    for n in (0, 1, 31, 4096, 1 << 17):
        b = rng.integers(0, 256, n, dtype=np.uint8)
        assert st.crc32c_icrar(b) == st.crc32c_google(b)
        assert st.crc32c_icrar(b[7:], st.crc32c_icrar(b[:7])) == st.crc32c_google(b) == st.crc32c_icrar(bytes(b))
    assert st.crc32c_of is st.crc32c_icrar  # the dependency is installed: the fast one serves
    idx_dir = _build(run, tmp_path / "idx")
    answers = []
    for impl in (st.crc32c_icrar, st.crc32c_google):
        monkeypatch.setattr(st, "crc32c_of", impl)
        idx = open_index(idx_dir, feature_mode="stream")
        r = idx.influence(sample_id=3, k=5, direction="both")
        answers.append((r.ids("proponents"), r.ids("opponents")))
    assert answers[0] == answers[1]
    chunk = idx_dir / "store.zarr" / "ckpt_001" / "features" / "c" / "2" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[10] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    for impl in (st.crc32c_icrar, st.crc32c_google):
        monkeypatch.setattr(st, "crc32c_of", impl)
        with pytest.raises(Exception, match="ckpt_001/features/c/2/0: damaged \\(checksum mismatch\\)"):
            open_index(idx_dir, feature_mode="stream").influence(sample_id=3, k=5, direction="both")
