"""Tests for proponent.indexer.data: every source reads small files written here in its real format."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from proponent.indexer.data import DataError, Dataset, load_dataset, load_image_bytes, parse_spec

# ---- writers ---------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, *, magic: int | None = None, cut: int = 0, gz: bool = False) -> Path:
    """Write a uint8 idx file (optionally gzipped, with a forced magic or truncated by ``cut`` bytes)."""
    array = np.asarray(array, dtype=np.uint8)
    magic = (0x0800 | array.ndim) if magic is None else magic
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if cut:
        raw = raw[:-cut]
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def make_mnist(directory: Path, n: int = 10, size: int = 4, *, seed: int = 0, prefix: str = "train", **kw):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    write_idx(directory / f"{prefix}-images-idx3-ubyte", images, **kw)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, **kw)
    return images, labels


def write_cifar_batch(path: Path, n: int, *, seed: int, overrides: dict | None = None) -> tuple[np.ndarray, list[int]]:
    """Write a CIFAR-10 python batch; ``overrides`` replaces entries (None removes one)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    batch = {b"batch_label": b"test", b"data": data, b"labels": labels, b"filenames": [b"f"] * n}
    batch.update(overrides or {})
    path.write_bytes(pickle.dumps({k: v for k, v in batch.items() if v is not None}, protocol=2))
    return data, labels


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# ---- digits ----------------------------------------------------------------------------------


def test_digits():
    ds = load_dataset("digits")
    assert len(ds) == 1797
    assert ds.shape == (1, 8, 8)
    assert ds.x.dtype == np.float32 and ds.x.min() == 0.0 and ds.x.max() == 1.0
    assert ds.labels is not None and set(ds.labels.tolist()) == set(range(10))
    assert np.array_equal(ds.ids, np.arange(1797))
    assert not ds.injected.any()
    assert ds.sources[0].kind == "digits" and ds.sources[0].n == 1797
    assert load_dataset("digits").fingerprint == ds.fingerprint
    assert load_dataset("digits,limit=100").fingerprint != ds.fingerprint


# ---- glyphs (generated outliers) ------------------------------------------------------------


def test_glyphs_deterministic_shapes_and_options():
    ds = load_dataset("glyphs:n=12")
    assert ds.shape == (1, 8, 8) and len(ds) == 12 and ds.labels is None
    assert ds.sources[0].kind == "glyphs" and dict(ds.sources[0].options) == {
        "n": 12,
        "size": 8,
        "seed": 0,
        "style": "letters",
    }
    again = load_dataset("glyphs,n=12")  # options after the colon or after a comma
    np.testing.assert_array_equal(again.x, ds.x)
    assert again.fingerprint == ds.fingerprint
    other = load_dataset("glyphs:n=12,seed=1")
    assert other.fingerprint != ds.fingerprint and not np.array_equal(other.x, ds.x)
    # a row depends on (seed, row) only: a longer set starts with the same images; offset/limit slice it
    longer = load_dataset("glyphs:n=20")
    np.testing.assert_array_equal(longer.x[:12], ds.x)
    np.testing.assert_array_equal(load_dataset("glyphs:n=20,offset=5,limit=3").x, longer.x[5:8])
    for style in ("letters", "negative", "shapes", "texture", "noise", "mix"):
        g = load_dataset(f"glyphs:n=6,size=28,style={style}")
        assert g.shape == (1, 28, 28) and g.x.dtype == np.float32
        assert 0.0 <= g.x.min() and g.x.max() <= 1.0
        assert g.x.mean() > 0.3  # dense, heavily filled: far more ink than a digit (digits: 0.31 at 8x8, 28x28)
        assert (g.x.reshape(6, -1).std(axis=1) > 0.3).all()  # high contrast


def test_glyphs_combine_with_digits_as_injected():
    ds = load_dataset("digits,limit=50+glyphs:n=5,injected")
    assert len(ds) == 55 and ds.injected.sum() == 5 and ds.injected[50:].all()
    assert ds.labels is not None and (ds.labels[50:] == -1).all() and (ds.labels[:50] >= 0).all()
    with pytest.raises(DataError, match="cannot combine"):
        load_dataset("digits,limit=5+glyphs:n=5,size=28")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("glyphs:n=0", "must be at least 1"),
        ("glyphs:style=bold", "expected one of letters, negative, shapes, texture, noise, mix"),
        ("glyphs:size=2", "must be at least 4"),
        ("glyphs:/tmp", "glyphs takes no argument"),
    ],
)
def test_glyphs_errors(spec, message):
    with pytest.raises(DataError, match=message):
        load_dataset(spec)


def test_digits_upscaled_and_augmented():
    plain = load_dataset("digits")
    up = load_dataset("digits,size=28")
    assert up.x.shape == (1797, 1, 28, 28) and up.x.dtype == np.float32
    assert np.array_equal(up.labels, plain.labels)
    # the digit sits in the central 20x20 box (MNIST layout): the border is empty
    assert up.x[:, :, :3].max() == 0 and up.x[:, :, :, -3:].max() == 0
    assert 0.0 <= up.x.min() and up.x.max() <= 1.0
    # mass is preserved up to the resampling: mean intensity scales with the box area
    ratio = up.x.sum(axis=(1, 2, 3)) / (plain.x.sum(axis=(1, 2, 3)) * (20 / 8) ** 2)
    assert np.all(np.abs(ratio - 1) < 0.15)

    aug = load_dataset("digits,size=28,augment=6,seed=3")
    assert aug.x.shape == (6 * 1797, 1, 28, 28) and len(aug) >= 10_000
    assert np.array_equal(aug.labels, np.tile(plain.labels, 6))
    assert np.array_equal(aug.source_row, np.arange(6 * 1797))
    assert 0.0 <= aug.x.min() and aug.x.max() <= 1.0
    # deterministic, keyed by (seed, variant, image): not by N, offset or limit
    again = load_dataset("digits,size=28,augment=2,seed=3")
    np.testing.assert_array_equal(again.x, aug.x[: 2 * 1797])
    window = load_dataset("digits,size=28,augment=6,seed=3,offset=1790,limit=20")
    np.testing.assert_array_equal(window.x, aug.x[1790:1810])
    assert np.array_equal(window.labels, aug.labels[1790:1810])
    # variants differ from each other, from the upscaled original, and with the seed
    assert not np.array_equal(aug.x[:1797], aug.x[1797 : 2 * 1797])
    assert np.abs(aug.x[:1797] - up.x).mean() > 0.01
    other = load_dataset("digits,size=28,augment=1,seed=4")
    assert not np.array_equal(other.x, aug.x[:1797])
    # fingerprints: the options count, and plain digits keeps its fingerprint
    fps = {d.fingerprint for d in (plain, up, aug, again, other)}
    assert len(fps) == 5
    assert load_dataset("digits,size=8").x.shape == plain.x.shape
    np.testing.assert_array_equal(load_dataset("digits,size=8").x, plain.x)


# ---- mnist-idx -------------------------------------------------------------------------------


def test_mnist_idx_values_labels_ids(tmp_path):
    images, labels = make_mnist(tmp_path / "m", n=12, size=5)
    ds = load_dataset(f"mnist-idx:{tmp_path / 'm'}")
    assert ds.x.shape == (12, 1, 5, 5) and ds.x.dtype == np.float32
    np.testing.assert_allclose(ds.x[:, 0], images / 255.0, rtol=1e-6)
    assert ds.labels.dtype == np.int64 and np.array_equal(ds.labels, labels)
    assert np.array_equal(ds.ids, np.arange(12))
    assert np.array_equal(ds.source_row, np.arange(12))
    assert ds.origin.dtype == np.int32 and not ds.origin.any()
    assert len(ds.sources[0].fingerprint) == 64


def test_mnist_idx_fingerprints(tmp_path):
    make_mnist(tmp_path / "a", seed=1)
    make_mnist(tmp_path / "b", seed=1)  # same data elsewhere
    make_mnist(tmp_path / "c", seed=2)
    fa = load_dataset(f"mnist-idx:{tmp_path / 'a'}").fingerprint
    assert load_dataset(f"mnist-idx:{tmp_path / 'a'}").fingerprint == fa
    assert load_dataset(f"mnist-idx:{tmp_path / 'b'}").fingerprint == fa
    assert load_dataset(f"mnist-idx:{tmp_path / 'c'}").fingerprint != fa
    assert load_dataset(f"mnist-idx:{tmp_path / 'a'},transpose").fingerprint != fa


def test_mnist_idx_gzip_prefix_and_dotted_names(tmp_path):
    images, labels = make_mnist(tmp_path / "gz", prefix="t10k", gz=True)
    ds = load_dataset(f"mnist-idx:{tmp_path / 'gz'},prefix=t10k")
    np.testing.assert_allclose(ds.x[:, 0], images / 255.0, rtol=1e-6)
    assert np.array_equal(ds.labels, labels)

    dotted = tmp_path / "dotted"
    dotted.mkdir()
    write_idx(dotted / "train-images.idx3-ubyte", images)
    write_idx(dotted / "train-labels.idx1-ubyte", labels)
    plain = load_dataset(f"mnist-idx:{dotted}")
    np.testing.assert_array_equal(plain.x, ds.x)
    # the fingerprint is over the decompressed payload: gzip or not, same data, same fingerprint
    assert plain.sources[0].fingerprint == ds.sources[0].fingerprint


def test_mnist_idx_transpose_and_no_labels(tmp_path):
    d = tmp_path / "emnist"
    d.mkdir()
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(d / "emnist-letters-train-images-idx3-ubyte", images)
    ds = load_dataset(f"mnist-idx:{d},prefix=emnist-letters-train,transpose")
    assert ds.shape == (1, 4, 3)
    np.testing.assert_allclose(ds.x[:, 0], images.transpose(0, 2, 1) / 255.0, rtol=1e-6)
    assert ds.labels is None


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_truncated(tmp_path, gz):
    make_mnist(tmp_path, n=5, cut=7, gz=gz)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*truncated: header declares 5x4x4 = 80 bytes"):
        load_dataset(f"mnist-idx:{tmp_path}")


def test_mnist_idx_short_header_and_trailing_bytes(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08")
    with pytest.raises(DataError, match="truncated: 3 bytes"):
        load_dataset(f"mnist-idx:{tmp_path}")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, 1, 2, 2) + bytes(5))
    with pytest.raises(DataError, match="1 unexpected bytes after"):
        load_dataset(f"mnist-idx:{tmp_path}")


def test_mnist_idx_bad_magic(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 2, 2)), magic=0x00000801)
    expected = r"mnist-idx: .*train-images-idx3-ubyte: bad magic 0x00000801, expected 0x00000803 \(images\)"
    with pytest.raises(DataError, match=expected):
        load_dataset(f"mnist-idx:{tmp_path}")
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 2, 2)), magic=0x00000D03)
    with pytest.raises(DataError, match=r"data type code 0x0d \(float32\)"):
        load_dataset(f"mnist-idx:{tmp_path}")


def test_mnist_idx_label_count_mismatch(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 2, 2)))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: label count 3 does not match image count 4"):
        load_dataset(f"mnist-idx:{tmp_path}")


def test_mnist_idx_missing_files(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        load_dataset(f"mnist-idx:{tmp_path / 'nope'}")
    make_mnist(tmp_path)
    with pytest.raises(DataError, match=r"no t10k-images-idx3-ubyte\[\.gz\] found \(idx3 files here: train-images"):
        load_dataset(f"mnist-idx:{tmp_path},prefix=t10k")


def test_mnist_idx_60000_is_fast(tmp_path):
    make_mnist(tmp_path, n=60_000, size=28)
    load_dataset(f"mnist-idx:{tmp_path}")  # warm the page cache
    start = time.perf_counter()
    ds = load_dataset(f"mnist-idx:{tmp_path}")
    elapsed = time.perf_counter() - start
    assert ds.x.shape == (60_000, 1, 28, 28)
    assert elapsed < 3.0, f"loading 60,000 idx images took {elapsed:.2f}s"


# ---- cifar10 ---------------------------------------------------------------------------------


def test_cifar10_train_and_test_splits(tmp_path):
    d1, l1 = write_cifar_batch(tmp_path / "data_batch_1", 3, seed=1)
    d2, l2 = write_cifar_batch(tmp_path / "data_batch_2", 2, seed=2)
    dt, lt = write_cifar_batch(tmp_path / "test_batch", 4, seed=3)
    train = load_dataset(f"cifar10:{tmp_path}")
    assert train.x.shape == (5, 3, 32, 32)
    expected = np.concatenate([d1, d2]).reshape(5, 3, 32, 32) / 255.0
    np.testing.assert_allclose(train.x, expected, rtol=1e-6)
    # row layout: 1024 red values, then green, then blue
    assert train.x[0, 1, 0, 0] == pytest.approx(d1[0, 1024] / 255.0)
    assert train.labels.tolist() == l1 + l2
    test = load_dataset(f"cifar10:{tmp_path},split=test")
    assert test.labels.tolist() == lt and len(test) == 4
    assert test.fingerprint != train.fingerprint
    assert load_dataset(f"cifar10:{tmp_path}").fingerprint == train.fingerprint


def test_cifar10_nested_folder(tmp_path):
    nested = tmp_path / "cifar-10-batches-py"
    nested.mkdir()
    write_cifar_batch(nested / "test_batch", 2, seed=0)
    assert len(load_dataset(f"cifar10:{tmp_path},split=test")) == 2


def test_cifar10_malformed(tmp_path):
    write_cifar_batch(tmp_path / "data_batch_1", 2, seed=0, overrides={b"labels": None})
    with pytest.raises(DataError, match=r"data_batch_1: missing key b'labels'"):
        load_dataset(f"cifar10:{tmp_path}")
    write_cifar_batch(tmp_path / "data_batch_1", 2, seed=0, overrides={b"data": np.zeros((2, 100), np.uint8)})
    with pytest.raises(DataError, match=r"must be a uint8 array of shape \[n, 3072\]"):
        load_dataset(f"cifar10:{tmp_path}")
    write_cifar_batch(tmp_path / "data_batch_1", 2, seed=0, overrides={b"labels": [1, 2, 3]})
    with pytest.raises(DataError, match="label count 3 does not match image count 2"):
        load_dataset(f"cifar10:{tmp_path}")
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataError, match="expected a pickled dict, got list"):
        load_dataset(f"cifar10:{tmp_path}")
    (tmp_path / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="could not unpickle"):
        load_dataset(f"cifar10:{tmp_path}")
    with pytest.raises(DataError, match=r"no test_batch found \(split=test\)"):
        load_dataset(f"cifar10:{tmp_path},split=test")


class _Exploit:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar10_refuses_arbitrary_globals(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": _Exploit()}))
    with pytest.raises(DataError, match=r"could not unpickle: global (posix|nt)\.getcwd is not allowed"):
        load_dataset(f"cifar10:{tmp_path}")


# ---- npz -------------------------------------------------------------------------------------


def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(4, 5, 6), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", x=grey, y=np.arange(4))
    ds = load_dataset(f"npz:{tmp_path / 'grey.npz'}")
    assert ds.x.shape == (4, 1, 5, 6)
    np.testing.assert_allclose(ds.x[:, 0], grey / 255.0, rtol=1e-6)
    assert ds.labels.tolist() == [0, 1, 2, 3]

    rgb = rng.random((3, 5, 6, 3)).astype(np.float32)
    np.savez(tmp_path / "rgb.npz", x=rgb)
    ds = load_dataset(f"npz:{tmp_path / 'rgb.npz'}")
    assert ds.x.shape == (3, 3, 5, 6) and ds.labels is None
    np.testing.assert_array_equal(ds.x, rgb.transpose(0, 3, 1, 2))

    flat = rng.random((7, 10))
    np.savez(tmp_path / "flat.npz", x=flat)
    ds = load_dataset(f"npz:{tmp_path / 'flat.npz'}")
    assert ds.shape == (10,) and ds.x.dtype == np.float32


def test_npz_fingerprint(tmp_path):
    x = np.zeros((3, 2, 2), np.uint8)
    np.savez(tmp_path / "a.npz", x=x)
    np.savez(tmp_path / "b.npz", x=x)
    np.savez(tmp_path / "c.npz", x=x + 1)
    fa = load_dataset(f"npz:{tmp_path / 'a.npz'}").fingerprint
    assert load_dataset(f"npz:{tmp_path / 'b.npz'}").fingerprint == fa
    assert load_dataset(f"npz:{tmp_path / 'c.npz'}").fingerprint != fa


def test_npz_malformed(tmp_path):
    np.savez(tmp_path / "nox.npz", images=np.zeros((2, 2, 2)))
    with pytest.raises(DataError, match=r"nox.npz: no array 'x' \(arrays found: images\)"):
        load_dataset(f"npz:{tmp_path / 'nox.npz'}")
    np.savez(tmp_path / "range.npz", x=np.array([[[0.0, 1.5]], [[-0.25, 0.5]]]))
    with pytest.raises(DataError, match=r"range.npz: x: float values must lie in \[0, 1\], found min -0.25, max 1.5"):
        load_dataset(f"npz:{tmp_path / 'range.npz'}")
    np.savez(tmp_path / "ylen.npz", x=np.zeros((3, 4)), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="y: label count 2 does not match image count 3"):
        load_dataset(f"npz:{tmp_path / 'ylen.npz'}")
    np.savez(tmp_path / "obj.npz", x=np.array([None, 1], dtype=object))
    with pytest.raises(DataError, match="could not read npz"):
        load_dataset(f"npz:{tmp_path / 'obj.npz'}")
    np.savez(tmp_path / "5d.npz", x=np.zeros((1, 2, 2, 2, 2)))
    with pytest.raises(DataError, match=r"x has shape \(1, 2, 2, 2, 2\)"):
        load_dataset(f"npz:{tmp_path / '5d.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.npz: could not read npz"):
        load_dataset(f"npz:{tmp_path / 'junk.npz'}")
    with pytest.raises(DataError, match="no such file"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}")


# ---- folder ----------------------------------------------------------------------------------


def make_folder(root: Path, classes: dict[str, list[np.ndarray]]) -> None:
    for name, images in classes.items():
        (root / name).mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(root / name / f"{i:03d}.png")


def test_folder_classes_grey(tmp_path):
    a = [np.full((6, 5), 10 * i, np.uint8) for i in range(3)]
    b = [np.full((6, 5), 200, np.uint8)]
    make_folder(tmp_path, {"cat": a, "ant": b})
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.x.shape == (4, 1, 6, 5)
    assert ds.sources[0].class_names == ("ant", "cat")
    assert ds.labels.tolist() == [0, 1, 1, 1]  # sorted classes, files sorted inside
    np.testing.assert_allclose(ds.x[:, 0, 0, 0], [200 / 255, 0, 10 / 255, 20 / 255], rtol=1e-6)
    assert load_dataset(f"folder:{tmp_path}").fingerprint == ds.fingerprint


def test_folder_rgb_modes_and_resize(tmp_path):
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[..., 0] = 255
    Image.fromarray(colour).save(tmp_path / "a.png")
    Image.fromarray(np.full((4, 4), 128, np.uint8)).save(tmp_path / "b.png")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.shape == (3, 4, 4) and ds.labels is None  # one colour image: RGB
    np.testing.assert_allclose(ds.x[0, :, 0, 0], [1, 0, 0])
    np.testing.assert_allclose(ds.x[1, :, 0, 0], [128 / 255] * 3, rtol=1e-6)

    grey = load_dataset(f"folder:{tmp_path},mode=L")
    assert grey.shape == (1, 4, 4)
    assert grey.x[0, 0, 0, 0] == pytest.approx(Image.fromarray(colour).convert("L").getpixel((0, 0)) / 255)
    assert grey.fingerprint != ds.fingerprint

    resized = load_dataset(f"folder:{tmp_path},size=2x3")
    assert resized.shape == (3, 2, 3)
    np.testing.assert_allclose(resized.x[1], 128 / 255, rtol=1e-5)


def test_folder_mixed_sizes(tmp_path):
    make_folder(tmp_path, {"a": [np.zeros((4, 4), np.uint8)], "b": [np.zeros((5, 4), np.uint8)]})
    with pytest.raises(DataError, match=r"images differ in size: a/000.png is 4x4 and b/000.png is 5x4"):
        load_dataset(f"folder:{tmp_path}")
    assert load_dataset(f"folder:{tmp_path},size=4x4").shape == (1, 4, 4)


def test_folder_malformed(tmp_path):
    with pytest.raises(DataError, match="no image files"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match="broken.png: could not decode image"):
        load_dataset(f"folder:{tmp_path}")


# ---- combination, limit, offset, subset ------------------------------------------------------


def test_combination_origin_injected_limit_offset(tmp_path):
    images, labels = make_mnist(tmp_path / "m", n=10, size=4, seed=1)
    other = np.random.default_rng(5).integers(0, 256, size=(6, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "o.npz", x=other)
    spec = f"mnist-idx:{tmp_path / 'm'},offset=2,limit=3 + npz:{tmp_path / 'o.npz'},injected,offset=4"
    ds = load_dataset(spec)
    assert len(ds) == 5 and ds.shape == (1, 4, 4)
    assert ds.ids.tolist() == [0, 1, 2, 3, 4]
    assert ds.origin.tolist() == [0, 0, 0, 1, 1]
    assert ds.source_row.tolist() == [2, 3, 4, 4, 5]
    assert ds.injected.tolist() == [False, False, False, True, True]
    assert ds.labels.tolist() == labels[2:5].tolist() + [-1, -1]
    np.testing.assert_allclose(ds.x[:3, 0], images[2:5] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(ds.x[3:, 0], other[4:] / 255.0, rtol=1e-6)
    assert [s.n for s in ds.sources] == [3, 2] and [s.n_total for s in ds.sources] == [10, 6]
    assert [s.injected for s in ds.sources] == [False, True]
    assert load_dataset(spec).fingerprint == ds.fingerprint
    assert load_dataset(spec.replace("limit=3", "limit=4")).fingerprint != ds.fingerprint
    assert load_dataset(spec.replace(",injected", "")).fingerprint != ds.fingerprint
    with pytest.raises(DataError, match=r"offset=10 is past the end \(10 rows\)"):
        load_dataset(f"mnist-idx:{tmp_path / 'm'},offset=10")


def test_combination_without_labels_and_shape_mismatch(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 4, 4), np.uint8))
    np.savez(tmp_path / "b.npz", x=np.zeros((2, 5, 5), np.uint8))
    assert load_dataset(f"npz:{tmp_path / 'a.npz'}+npz:{tmp_path / 'a.npz'}").labels is None
    expected = r"cannot combine .*a.npz \(sample shape 1x4x4\) with .*b.npz \(sample shape 1x5x5\)"
    with pytest.raises(DataError, match=expected):
        load_dataset(f"npz:{tmp_path / 'a.npz'}+npz:{tmp_path / 'b.npz'}")


def test_subset_keeps_ids_and_origin():
    ds = load_dataset("digits,limit=5+digits,offset=100,limit=5,injected")
    sub = ds.subset([1, 7, 9])
    assert isinstance(sub, Dataset)
    assert sub.ids.tolist() == [1, 7, 9] and sub.origin.tolist() == [0, 1, 1]
    assert sub.source_row.tolist() == [1, 102, 104]
    assert sub.injected.tolist() == [False, True, True]
    np.testing.assert_array_equal(sub.x, ds.x[[1, 7, 9]])
    mask = np.zeros(len(ds), bool)
    mask[[1, 7, 9]] = True
    assert ds.subset(mask).fingerprint == sub.fingerprint != ds.fingerprint


# ---- spec errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mnst:/d", r"unknown kind 'mnst' \(known: cifar10, digits, folder, glyphs, mnist-idx, npz\)"),
        (
            "digits,colour=red",
            r"unknown option 'colour' for digits \(allowed: augment, injected, limit, offset, seed, size\)",
        ),
        ("digits,size=4", "bad value '4' for size=S: must be at least 8"),
        ("digits,size=300", "must be at most 256"),
        ("digits,augment=0", "bad value '0' for augment=N: must be at least 1"),
        ("mnist-idx:/d,split=test", "unknown option 'split' for mnist-idx"),
        ("digits,limit=abc", r"bad value 'abc' for limit=N: not an integer"),
        ("digits,limit=0", "bad value '0' for limit=N: must be at least 1"),
        ("digits,offset=-1", "must be at least 0"),
        ("digits,limit", r"option 'limit' needs a value \(limit=N\)"),
        ("digits,injected=yes", "option 'injected' is a flag and takes no value"),
        ("digits,limit=1,limit=2", "option 'limit' given twice"),
        ("cifar10:/d,split=val", "expected one of train, test"),
        ("folder:/d,size=28", "expected HxW"),
        ("digits:/x", "digits takes no argument"),
        ("npz", "npz needs a FILE: npz:FILE"),
        ("digits+", "empty part"),
        ("", "empty dataset spec"),
    ],
)
def test_spec_errors(spec, message):
    with pytest.raises(DataError, match=message):
        load_dataset(spec)


def test_parse_spec_defaults():
    (part,) = parse_spec(" mnist-idx:/d/emnist , prefix=emnist-letters-train, limit=1000, injected, transpose ")
    assert part.kind == "mnist-idx" and part.arg == "/d/emnist"
    assert part.limit == 1000 and part.offset == 0 and part.injected
    assert dict(part.options) == {"prefix": "emnist-letters-train", "transpose": True}


# ---- load_image_bytes ------------------------------------------------------------------------


def test_image_bytes_grey_and_rgb_round_trip():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(6, 5), dtype=np.uint8)
    out = load_image_bytes(png_bytes(grey), (1, 6, 5))
    assert out.dtype == np.float32 and out.shape == (1, 6, 5)
    np.testing.assert_allclose(out[0], grey / 255.0, rtol=1e-6)

    rgb = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    out = load_image_bytes(png_bytes(rgb), (3, 6, 5))
    np.testing.assert_allclose(out, rgb.transpose(2, 0, 1) / 255.0, rtol=1e-6)

    as_grey = load_image_bytes(png_bytes(rgb), (1, 6, 5))
    np.testing.assert_allclose(as_grey[0], np.asarray(Image.fromarray(rgb).convert("L")) / 255.0, rtol=1e-6)
    as_rgb = load_image_bytes(png_bytes(grey), (3, 6, 5))
    np.testing.assert_allclose(as_rgb, np.repeat(grey[None] / 255.0, 3, axis=0), rtol=1e-6)

    flat = load_image_bytes(png_bytes(grey[:5]), (25,))
    np.testing.assert_allclose(flat, grey[:5].reshape(-1) / 255.0, rtol=1e-6)


def test_image_bytes_rgba_on_black_and_jpeg():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0
    rgba[0, 0, 3] = 255
    out = load_image_bytes(png_bytes(rgba), (3, 2, 2))
    assert out[0, 0, 0] == pytest.approx(200 / 255) and out[0, 1, 1] == 0.0

    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(buffer, format="JPEG")
    out = load_image_bytes(buffer.getvalue(), (3, 8, 8))
    np.testing.assert_allclose(out, 100 / 255, atol=3 / 255)


def test_image_bytes_npy():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_allclose(load_image_bytes(npy_bytes(grey), (1, 3, 4))[0], grey / 255.0, rtol=1e-6)
    chw = np.random.default_rng(0).random((3, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(load_image_bytes(npy_bytes(chw), (3, 3, 4)), chw)
    np.testing.assert_array_equal(load_image_bytes(npy_bytes(chw.transpose(1, 2, 0)), (3, 3, 4)), chw)
    vec = np.linspace(0, 1, 10)
    np.testing.assert_allclose(load_image_bytes(npy_bytes(vec), (10,)), vec, rtol=1e-6)
    with pytest.raises(DataError, match=r"npy: float values must lie in \[0, 1\], found min 0, max 2"):
        load_image_bytes(npy_bytes(np.array([[0.0, 2.0]])), (1, 1, 2))
    with pytest.raises(DataError, match=r"npy: expected shape \(10,\), got \(11,\)"):
        load_image_bytes(npy_bytes(np.zeros(11)), (10,))
    with pytest.raises(DataError, match="npy: could not decode array"):
        load_image_bytes(npy_bytes(np.zeros(100))[:-10], (1, 10, 10))
    with pytest.raises(DataError, match="npy: could not decode array"):
        load_image_bytes(npy_bytes(np.array([None], dtype=object)), (1, 1, 1))


def test_image_bytes_shape_and_resize():
    data = png_bytes(np.full((8, 8), 255, np.uint8))
    with pytest.raises(DataError, match=r"expected shape \(1, 4, 4\), got \(1, 8, 8\)"):
        load_image_bytes(data, (1, 4, 4))
    out = load_image_bytes(data, (1, 4, 4), allow_resize=True)
    assert out.shape == (1, 4, 4)
    np.testing.assert_allclose(out, 1.0, rtol=1e-6)
    with pytest.raises(DataError, match="unsupported dataset shape"):
        load_image_bytes(data, (2, 8, 8))
    with pytest.raises(DataError, match="cannot be converted to the flat dataset shape"):
        load_image_bytes(data, (10,))


def test_image_bytes_pixel_limit():
    data = png_bytes(np.zeros((100, 100), np.uint8))
    with pytest.raises(DataError, match="image has 10000 pixels, more than the limit 5000"):
        load_image_bytes(data, (1, 100, 100), max_pixels=5000)


def _bomb_png(side: int) -> bytes:
    """A 1-bit side x side PNG of zeros, a few tens of kilobytes, written without decoding anything."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)
    idat = b"".join(compressor.compress(row * 1000) for _ in range(side // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_image_bytes_decompression_bomb_is_not_decoded():
    bomb = _bomb_png(20_000)  # 400 million pixels
    assert len(bomb) < 200_000
    start = time.perf_counter()
    with pytest.raises(DataError, match="image has 400000000 pixels, more than the limit 50000000"):
        load_image_bytes(bomb, (1, 28, 28), allow_resize=True)
    assert time.perf_counter() - start < 1.0


def test_image_bytes_corrupt():
    with pytest.raises(DataError, match="could not decode image"):
        load_image_bytes(b"definitely not an image", (1, 4, 4))
    truncated = png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))[:200]
    with pytest.raises(DataError, match="could not decode image"):
        load_image_bytes(truncated, (1, 64, 64))
