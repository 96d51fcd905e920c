"""Fault injection: a flipped byte anywhere in an index is found by ``verify --deep`` and never answered from.

Random bytes are flipped in random files of every kind (features, norms, losses, labels, inputs,
done flags, latents, scales, Zarr metadata, the manifest, checkpoints, FAISS files). Every flip
must be named by ``verify_index(deep=True)``; and the server's open (memory mode: it reads and
checks everything) must refuse the index. In stream mode, which reads features per query, a
query must fail with an error naming the damaged chunk instead of answering.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from proponent.cli import main as cli_main
from proponent.format.fsio import index_dir as index_dir_of
from proponent.format.integrity import verify_index
from proponent.format.manifest import read_manifest, write_manifest
from proponent.format.store import POSITIONS_FILE, StoreError
from proponent.query.index import IndexOpenError, open_index

pytestmark = pytest.mark.timeout(900)

KINDS = {
    "features": lambda f: "/features/c/" in f,
    "scale": lambda f: "/scale/c/" in f,
    "feat_norm": lambda f: "/feat_norm/c/" in f,
    "sq_norm": lambda f: "/sq_norm/c/" in f,
    "loss": lambda f: "/loss/c/" in f,
    "done": lambda f: "/done/c/" in f,
    "labels": lambda f: f.startswith("store.zarr/labels/c/"),
    "ids": lambda f: f.startswith("store.zarr/ids/c/"),
    "inputs": lambda f: f.startswith("store.zarr/inputs/c/"),
    "latent": lambda f: f.startswith("store.zarr/latent_"),
    "zarr.json": lambda f: f.endswith("zarr.json"),
    "manifest": lambda f: f == "manifest.json",
    "checkpoint": lambda f: f.startswith("checkpoints/"),
    "faiss": lambda f: f.startswith("faiss/"),
    "positions": lambda f: f == POSITIONS_FILE,
}


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("integrity")
    cmd = [sys.executable, "-m", "proponent"]
    subprocess.run(
        [*cmd, "train", "--data", "digits,limit=200", "--hidden", "16", "--latent-dim", "4", "--epochs", "2"]
        + ["--checkpoints", "2", "--out", str(root / "run"), "--quiet"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [*cmd, "index", "--run", str(root / "run"), "--out", str(root / "idx"), "--m", "2", "--proj-k", "8"]
        + ["--dtype", "int8", "--index-kind", "ivf:4:2", "--quiet"],
        check=True,
        capture_output=True,
        env={**__import__("os").environ, "PROPONENT_CHUNK_ROWS": "64"},
    )
    assert verify_index(root / "idx", deep=True) == []
    return root / "idx"


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _flip(path: Path, rng: np.random.Generator) -> int:
    data = bytearray(path.read_bytes())
    pos = int(rng.integers(len(data)))
    data[pos] ^= int(rng.integers(1, 256))
    path.write_bytes(bytes(data))
    return pos


def _refused_or_fails(copy: Path, rel: str) -> None:
    """The server's open refuses the damaged index (memory mode); in stream mode a query fails."""
    with pytest.raises((IndexOpenError, StoreError)):
        open_index(copy, device="cpu", feature_mode="memory")
    try:
        idx = open_index(copy, device="cpu", feature_mode="stream")
    except (IndexOpenError, StoreError):
        return
    # stream mode opens without reading features (or inputs): the damaged chunk fails the query that reads it
    assert "/features/c/" in rel or "/inputs/c/" in rel, rel
    if "/features/c/" in rel:
        with pytest.raises(StoreError, match="damaged"):
            idx.influence(idx.input(0), k=3)
    else:
        rows_per_chunk = idx.store.group["inputs"].chunks[0]
        row = int(rel.split("/c/")[1].split("/")[0]) * rows_per_chunk
        with pytest.raises(StoreError, match="inputs"):
            idx.influence(sample_id=int(idx.meta.ids[row]), k=3)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_flip_is_detected_and_never_answered(index_dir, tmp_path, kind):
    rng = np.random.default_rng(sum(map(ord, kind)))
    candidates = [f for f in _files(index_dir) if KINDS[kind](f)]
    assert candidates, kind
    for trial in range(3):
        copy = tmp_path / f"copy{trial}"
        shutil.copytree(index_dir, copy)
        rel = candidates[int(rng.integers(len(candidates)))]
        pos = _flip(copy / rel, rng)
        problems = verify_index(copy, deep=True)
        assert problems, f"flip at byte {pos} of {rel} not detected"
        named = rel if kind != "manifest" else "manifest.json"
        assert any(named in p or Path(rel).parent.as_posix() in p for p in problems), (rel, problems)
        _refused_or_fails(copy, rel)
        if trial == 0:  # the CLI says it too, with exit status 1
            assert cli_main(["verify", "--index", str(copy), "--deep"]) == 1
        shutil.rmtree(copy)


def test_verify_deep_names_every_damaged_chunk(index_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(index_dir, copy)
    damaged = ["store.zarr/ckpt_000/features/c/1/0", "store.zarr/ckpt_001/sq_norm/c/0", "store.zarr/labels/c/0"]
    for rel in damaged:
        _flip(copy / rel, np.random.default_rng(0))
    assert cli_main(["verify", "--index", str(copy)]) == 0  # the quick check does not read chunks...
    capsys.readouterr()
    assert cli_main(["verify", "--index", str(copy), "--deep"]) == 1  # ...the deep one names each
    out = capsys.readouterr().out
    for rel in damaged:
        assert f"{rel}: damaged (checksum mismatch)" in out, out
    (copy / "store.zarr/ckpt_001/loss/c/0").unlink()
    assert any("ckpt_001/loss/c/0: chunk missing" in p for p in verify_index(copy))


def test_a_chunk_of_another_array_in_its_place_is_refused(index_dir, tmp_path):
    """Its own checksum holds, so only its size gives it away: named, never read as features."""
    copy = tmp_path / "copy"
    shutil.copytree(index_dir, copy)
    shutil.copyfile(copy / "store.zarr/ckpt_000/scale/c/0", copy / "store.zarr/ckpt_000/features/c/0/0")
    with pytest.raises(IndexOpenError, match=r"ckpt_000/features/c/0/0: wrong size"):
        open_index(copy, device="cpu", feature_mode="memory")
    idx = open_index(copy, device="cpu", feature_mode="stream")
    with pytest.raises(StoreError, match=r"ckpt_000/features/c/0/0: wrong size"):
        idx.influence(sample_id=int(idx.meta.ids[0]), k=3)


def _swap(a: Path, b: Path) -> None:
    da, db = a.read_bytes(), b.read_bytes()
    assert da != db and len(da) == len(db)
    a.write_bytes(db)
    b.write_bytes(da)


MOVED = "holds other data than the index recorded at this position"


def test_swapped_feature_chunks_are_refused(index_dir, tmp_path):
    """Two chunk files of one array trade places: both checksums hold, the positions do not."""
    copy = tmp_path / "copy"
    shutil.copytree(index_dir, copy)
    _swap(copy / "store.zarr/ckpt_001/features/c/0/0", copy / "store.zarr/ckpt_001/features/c/1/0")
    problems = verify_index(copy, deep=True)
    assert any("ckpt_001/features/c/0/0: " + MOVED in p for p in problems), problems
    assert any("ckpt_001/features/c/1/0: " + MOVED in p for p in problems), problems
    assert verify_index(copy) == []  # the quick check reads no chunk
    with pytest.raises(IndexOpenError, match=r"ckpt_001/features/c/0/0: " + MOVED):
        open_index(copy, device="cpu", feature_mode="memory")
    idx = open_index(copy, device="cpu", feature_mode="stream")
    with pytest.raises(StoreError, match=r"ckpt_001/features/c/0/0: " + MOVED):
        idx.influence(idx.input(5), k=3)
    with pytest.raises(StoreError, match=MOVED):  # a stored sample's own features are read by position too
        idx.influence(sample_id=int(idx.meta.ids[1]), k=3)


@pytest.mark.parametrize("array", ["sq_norm", "scale", "loss"])
def test_an_array_copied_from_another_checkpoint_is_refused(index_dir, tmp_path, array):
    """Per-row arrays of the same shape copied across checkpoints (or indexes): each chunk's own checksum
    holds, so the reads through zarr re-encode what they decoded and compare it with the recorded crc32c."""
    copy = tmp_path / "copy"
    shutil.copytree(index_dir, copy)
    src, dst = copy / f"store.zarr/ckpt_000/{array}/c", copy / f"store.zarr/ckpt_001/{array}/c"
    shutil.rmtree(dst)
    shutil.copytree(src, dst)
    assert any(f"ckpt_001/{array}/c/0: " + MOVED in p for p in verify_index(copy, deep=True))
    for mode in ("memory", "stream"):  # both read every per-row array at open
        with pytest.raises(IndexOpenError, match=rf"ckpt_001/{array}/c/0: " + MOVED):
            open_index(copy, device="cpu", feature_mode=mode)


def test_swapped_input_chunks_are_refused(index_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(index_dir, copy)
    _swap(copy / "store.zarr/inputs/c/0/0/0/0", copy / "store.zarr/inputs/c/1/0/0/0")
    with pytest.raises(IndexOpenError, match=r"inputs/c/0/0/0/0: " + MOVED):
        open_index(copy, device="cpu", feature_mode="memory")
    idx = open_index(copy, device="cpu", feature_mode="stream")  # inputs are read one sample at a time
    with pytest.raises(StoreError, match=r"inputs/c/0/0/0/0: " + MOVED):
        idx.input(0)


def test_position_map_record_and_older_indexes(index_dir, tmp_path):
    """The map is hashed in the manifest (a missing map is named); an index finished before maps existed
    (no record) is served, checked by its chunks' own checksums only; its answers are the same."""
    man = read_manifest(index_dir_of(index_dir))
    assert man.storage.positions is not None and man.storage.positions.path == POSITIONS_FILE
    copy = tmp_path / "copy"
    shutil.copytree(index_dir, copy)
    (copy / POSITIONS_FILE).unlink()
    assert any(POSITIONS_FILE in p and "missing" in p for p in verify_index(copy)), verify_index(copy)
    with pytest.raises(IndexOpenError, match=POSITIONS_FILE):
        open_index(copy, device="cpu")
    storage = man.storage.model_copy(update={"positions": None})
    write_manifest(index_dir_of(copy), man.model_copy(update={"storage": storage}))
    assert verify_index(copy, deep=True) == []
    old, new = open_index(copy, device="cpu"), open_index(index_dir, device="cpu")
    a, b = old.influence(sample_id=int(old.meta.ids[3]), k=5), new.influence(sample_id=int(new.meta.ids[3]), k=5)
    assert [h.id for h in a.proponents] == [h.id for h in b.proponents]
    assert [h.score for h in a.proponents] == [h.score for h in b.proponents]


def test_streamed_blocks_read_into_one_array_with_every_check(index_dir, tmp_path):
    """``row_chunks`` (stream mode's block reads, straight into one array) equals the chunks read one by
    one, the last partial chunk included, and refuses a missing chunk by name."""
    idx = open_index(index_dir, device="cpu", feature_mode="stream")
    st = idx.store
    n = st.layout.n_chunks
    for ks in (range(0, 1), range(0, n), range(max(0, n - 2), n)):
        got = st.feature_chunks(1, ks)
        want = np.concatenate([st.feature_chunk(1, k) for k in ks])
        assert got.flags.writeable and got.dtype == want.dtype and np.array_equal(got, want), ks
    assert sum(len(st.feature_chunks(0, range(k, k + 1))) for k in range(n)) == idx.n
    copy = tmp_path / "copy"
    shutil.copytree(index_dir, copy)
    idx = open_index(copy, device="cpu", feature_mode="stream")
    (copy / "store.zarr/ckpt_001/features/c/0/0").unlink()  # after the open, which would refuse it
    with pytest.raises(StoreError, match=r"ckpt_001/features/c/0/0: chunk missing"):
        idx.influence(idx.input(0), k=3)
    with pytest.raises(IndexOpenError, match=r"ckpt_001/features/c/0/0: chunk missing"):
        open_index(copy, device="cpu", feature_mode="stream")
