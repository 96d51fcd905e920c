"""Stream mode's read-ahead: blocks in order into reused buffers, a reader's error raised at its block,
and an early stop leaving no reader thread or open chunk file behind."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from proponent.format.store import StoreError
from proponent.query import features as features_mod
from proponent.query.features import ServedFeatures
from proponent.query.scan import scan
from proponent.query.scoring import scored_query
from tests.query.test_search import make_store, planted, reference_top


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of two 64-row chunks, so a 1,000-row store streams as 8 blocks (3 buffers, 2 in flight)."""
    monkeypatch.setattr(features_mod, "BLOCK_ROWS", 128)


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("prefetch")]


def _open_chunk_files(root: Path) -> list[str]:
    fds = Path("/proc/self/fd")
    out = []
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(root)):
            out.append(target)
    return out


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_streamed_blocks_are_the_stored_rows_in_order(tmp_path, small_blocks, dtype):
    fs, qs = planted(seed=11, n=1000, d=40, c=2)
    store = make_store(tmp_path, fs, dtype, chunk_rows=64)
    streamed = ServedFeatures(store, 2, mode="stream")
    held = ServedFeatures(store, 2, mode="memory")
    los, buffers = [], set()
    for block in streamed.blocks([0, 1]):
        los.append((block.lo, block.hi))
        for c in (0, 1):
            want = held.resident[c][block.lo : block.hi, : held.dim].numpy()
            got = block.data[c].numpy()
            np.testing.assert_array_equal(got, want.astype(got.dtype))
            buffers.add(got.__array_interface__["data"][0])
    assert los == [(lo, min(1000, lo + 128)) for lo in range(0, 1000, 128)]
    if dtype == "int8":  # the codes the kernel takes are the read buffers: per checkpoint, a ring of them
        assert len(buffers) == 2 * (features_mod.READ_AHEAD + 1)
    # and the scan over those blocks is the exact answer
    sq = scored_query(streamed, np.ones(2), [0, 1], {0: qs[0], 1: qs[1]}, {}, "raw")
    res = scan(streamed, sq, 7, ("proponents", "opponents"))
    for d in ("proponents", "opponents"):
        want_rows, s = reference_top(held, sq, 7, d)
        assert res[d].rows.tolist() == want_rows.tolist()
        np.testing.assert_allclose(res[d].scores, s[want_rows], rtol=1e-12)


def test_a_readers_error_ends_the_query_at_its_block(tmp_path, small_blocks):
    fs, qs = planted(seed=12, n=1000, d=40, c=1)
    store = make_store(tmp_path, fs, "int8", chunk_rows=64)
    served = ServedFeatures(store, 1, mode="stream")
    key = tmp_path / "store.zarr" / "ckpt_000" / "features" / "c" / "9" / "0"  # rows 576..639: block 4
    data = bytearray(key.read_bytes())
    data[5] ^= 0x01
    key.write_bytes(bytes(data))
    seen = []
    with pytest.raises(StoreError, match=r"ckpt_000/features/c/9/0: damaged \(checksum mismatch\)"):
        for block in served.blocks([0]):
            seen.append(block.lo)
    assert seen == [0, 128, 256, 384]  # every block before the damaged one, none after
    sq = scored_query(served, np.ones(1), [0], {0: qs[0]}, {}, "raw")
    key.unlink()
    with pytest.raises(StoreError, match=r"ckpt_000/features/c/9/0: chunk missing"):
        scan(served, sq, 5)
    assert not _prefetch_threads() and not _open_chunk_files(tmp_path)


def test_stopping_early_leaves_no_reader_thread_or_open_file(tmp_path, small_blocks):
    fs, _ = planted(seed=13, n=1000, d=40, c=2)
    store = make_store(tmp_path, fs, "int8", chunk_rows=64)
    served = ServedFeatures(store, 2, mode="stream")
    before = len(_prefetch_threads())
    it = served.blocks([0, 1])
    first = next(it)
    assert first.lo == 0 and len(_prefetch_threads()) > before  # the readers are at work
    it.close()  # a cancelled query: the generator is closed with reads in flight
    assert len(_prefetch_threads()) == before
    assert not _open_chunk_files(tmp_path)


def test_a_read_buffer_that_does_not_fit_is_refused(tmp_path):
    fs, _ = planted(seed=14, n=300, d=16, c=1)
    store = make_store(tmp_path, fs, "int8", chunk_rows=64)
    with pytest.raises(ValueError, match="cannot hold 128 rows"):
        store.feature_chunks(0, range(0, 2), np.empty((64, 16), np.int8))
    with pytest.raises(ValueError, match="cannot hold"):
        store.feature_chunks(0, range(0, 2), np.empty((128, 16), np.float32))
    buf = np.full((200, 16), 7, np.int8)
    got = store.feature_chunks(0, range(3, 5), buf)  # the last, partial chunk: 44 rows
    assert len(got) == 300 - 192 and np.shares_memory(got, buf)
    np.testing.assert_array_equal(got, np.concatenate([store.feature_chunk(0, k) for k in (3, 4)]))
