"""Loading image datasets from local files, and decoding uploaded images.

A dataset is described by a *spec string*::

    spec    := part ("+" part)*
    part    := KIND [":" ARG] ("," option)*
    option  := key "=" value | flag

Kinds (``ARG`` is a path; ``~`` is expanded):

``digits``
    scikit-learn's bundled 8x8 digits (1,797 images), shape ``[N, 1, 8, 8]``, labels 0..9.
    Options (a deterministic, larger stand-in for MNIST-size experiments):
    ``size=S`` renders every digit in an S x S frame (S in 8..256; default 8, the original
    images). For S > 8 the 8x8 digit is resampled (bilinear, zero outside) into a centred box of
    5/7 of the frame, MNIST's 20-in-28 layout. ``augment=N`` gives N random affine variants of
    every image instead of the image itself: rotation uniform in +-15 degrees, scale in
    [0.9, 1.1], shift in +-S/14 pixels on each axis (+-2 px at 28); one bilinear resampling from
    the 8x8 source. Rows are variant-major (row ``v * 1797 + i`` is variant v of image i) and
    keep image i's label. ``seed=K`` (default 0) keys the transforms: variant v of image i
    depends only on (K, v, i), not on N. Example: ``digits,size=28,augment=6`` (10,782 images).
``glyphs``
    generated outliers (no files): dense, high-contrast, heavily filled images to inject among
    digits, ``[N, 1, S, S]`` without labels. Options: ``n=N`` images (default 180), ``size=S``
    (default 8, the digits' size; 28 for MNIST-sized data), ``seed=N`` (default 0) and
    ``style=letters|negative|shapes|texture|noise|mix`` (default letters: bold capitals of
    Pillow's bundled font, edge to edge; negative: the same inverted; shapes: overlapping filled
    ellipses, rectangles and polygons; texture: stripes and checkerboards; noise: binary blobs;
    mix: each image one of these). Deterministic: image r depends only on (seed, r), see
    :func:`generate_glyphs`. Options may also follow a colon: ``digits+glyphs:n=180,injected``.
    Among digits upscaled to 28x28, 10% ``letters`` at ``size=28`` have a median self-influence
    7.7x the digits' and raw TracIn puts them among the top proponents of clean digits
    (``benchmarks/outliers.py``); at 8x8 the VAE fits them and their gradients stay ordinary.
``mnist-idx:DIR``
    idx files (optionally gzipped) of MNIST, Fashion-MNIST, KMNIST, EMNIST, notMNIST...:
    ``DIR/{prefix}-images-idx3-ubyte[.gz]`` (or ``{prefix}-images.idx3-ubyte``) and, optionally,
    ``DIR/{prefix}-labels-idx1-ubyte[.gz]``. Options: ``prefix=train`` (default; e.g. ``t10k``,
    ``emnist-letters-train``) and the flag ``transpose`` (EMNIST stores its images transposed).
``cifar10:DIR``
    the CIFAR-10 python batches ``data_batch_1`` .. ``data_batch_5`` (those present, in order) or
    ``test_batch``; option ``split=train|test`` (default train); shape ``[N, 3, 32, 32]``.
    **Pickle files can run code when loaded**: only name files you trust. They are read with a
    restricted unpickler that only rebuilds numpy arrays and plain containers, which blocks the
    usual attacks, but it is no licence to load pickles from untrusted sources.
``npz:FILE``
    a numpy ``.npz`` archive with an array ``x`` and an optional integer array ``y`` (labels).
    ``x`` may be ``N x D`` (flat vectors, kept flat), ``N x H x W`` (grey) or ``N x H x W x C``
    with C in {1, 3, 4} (moved to channels first; ``N x C x H x W`` is accepted as is).
    Integer ``x`` must hold 0..255 and is divided by 255; float ``x`` must already lie in [0, 1].
``folder:DIR``
    image files read with Pillow. When DIR has sub-folders, each is a class (sorted names give the
    labels 0..K-1; images are searched recursively inside them); otherwise the images directly in
    DIR are read without labels. Files are sorted by their path for stable ids. Options:
    ``mode=L|RGB`` (default: L when every image is grey, else RGB) and ``size=HxW`` (resize with
    bilinear filtering; by default all images must share one size).

Options every part accepts: ``limit=N`` (keep the first N rows after the offset), ``offset=N``
(skip N rows) and the flag ``injected`` (marks the part's rows as injected outliers, for the
outlier-detection report). Spaces around tokens are ignored; paths cannot contain ``+`` or ``,``.

Example: ``mnist-idx:/d/mnist+mnist-idx:/d/emnist,prefix=emnist-letters-train,limit=1000,injected,transpose``.

Every malformed input raises :class:`DataError` (a ``ValueError``) with one line naming the
file and the problem.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import pickle
import re
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DataError",
    "Dataset",
    "PartSpec",
    "SourceInfo",
    "load_dataset",
    "load_image_bytes",
    "parse_spec",
]

DEFAULT_MAX_PIXELS = 50_000_000
"""Largest image (width x height) decoded by :func:`load_image_bytes` and ``folder:`` datasets."""

_CHANNEL_COUNTS = (1, 3, 4)
_NPY_MAGIC = b"\x93NUMPY"
_GZIP_MAGIC = b"\x1f\x8b"
_IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".pnm"}
)
# ITU-R 601-2 luma weights, the ones Pillow's convert("L") uses.
_LUMA = np.array([299 / 1000, 587 / 1000, 114 / 1000], dtype=np.float32)


class DataError(ValueError):
    """A dataset spec, data file or uploaded image is malformed; the message is one line."""


# --------------------------------------------------------------------------------------------
# Public data structures
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceInfo:
    """One part of a combined dataset.

    ``fingerprint`` is the sha256 of the raw data read for the part (decompressed idx payloads,
    pickle file bytes, array bytes for npz/digits, file names and bytes for folders). It does
    not depend on the options; :attr:`Dataset.fingerprint` combines it with them.
    """

    spec: str  # the part as written in the spec
    kind: str
    path: str | None  # the ARG of the part, None for ``digits``
    fingerprint: str
    n: int  # rows this part contributes (after offset / limit)
    n_total: int  # rows in the source
    offset: int
    limit: int | None
    injected: bool
    class_names: tuple[str, ...] | None = None  # folder datasets with class sub-folders
    options: Mapping[str, Any] = field(default_factory=dict)  # kind options, defaults filled in


@dataclass
class Dataset:
    """Samples of a (possibly combined) dataset, with provenance for every row."""

    x: np.ndarray  # float32 in [0, 1]; [N, C, H, W] images or [N, D] vectors
    labels: np.ndarray | None  # int64 [N]; -1 for rows of unlabelled parts; None if no part has labels
    ids: np.ndarray  # int64 [N]: 0..N-1 in the order of the spec
    origin: np.ndarray  # int32 [N]: index into ``sources``
    source_row: np.ndarray  # int64 [N]: row of the sample in its own source (offset included)
    sources: list[SourceInfo]
    fingerprint: str  # sha256 hex identifying the data (see ``load_dataset``)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-sample shape: ``(C, H, W)`` or ``(D,)``."""
        return tuple(int(d) for d in self.x.shape[1:])

    @property
    def injected(self) -> np.ndarray:
        """bool [N]: True for rows whose source part is marked ``injected``."""
        flags = np.array([s.injected for s in self.sources], dtype=bool)
        return flags[self.origin]

    def subset(self, idx: Sequence[int] | np.ndarray) -> Dataset:
        """Rows ``idx`` (integer indices or a boolean mask); ids, origin and sources are kept.

        The fingerprint of the subset is derived from this dataset's fingerprint and the ids kept.
        """
        sel = np.asarray(idx)
        if sel.dtype == np.bool_:
            if sel.shape != (len(self),):
                raise ValueError(f"boolean mask of shape {sel.shape} for a dataset of {len(self)} rows")
            sel = np.flatnonzero(sel)
        elif sel.size == 0:
            sel = sel.astype(np.int64)
        elif sel.dtype.kind not in "ui":
            raise ValueError(f"subset indices must be integers or a boolean mask, got dtype {sel.dtype}")
        sel = sel.reshape(-1)
        ids = self.ids[sel]
        digest = hashlib.sha256(f"{self.fingerprint}/subset/".encode())
        digest.update(np.ascontiguousarray(ids, dtype="<i8").tobytes())
        return Dataset(
            x=self.x[sel],
            labels=None if self.labels is None else self.labels[sel],
            ids=ids,
            origin=self.origin[sel],
            source_row=self.source_row[sel],
            sources=list(self.sources),
            fingerprint=digest.hexdigest(),
        )


@dataclass(frozen=True)
class PartSpec:
    """One parsed part of a spec string."""

    text: str
    kind: str
    arg: str | None
    offset: int
    limit: int | None
    injected: bool
    options: Mapping[str, Any]  # kind-specific options, defaults filled in

    @property
    def where(self) -> str:
        """Message prefix naming the part: ``"kind: path: "``."""
        return f"{self.kind}: {self.arg}: " if self.arg is not None else f"{self.kind}: "


# --------------------------------------------------------------------------------------------
# Spec parsing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Option:
    usage: str  # e.g. "limit=N", shown in messages
    convert: Callable[[str], Any] | None  # None for flags
    default: Any = None


def _integer(minimum: int) -> Callable[[str], int]:
    def convert(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError("not an integer") from None
        if number < minimum:
            raise ValueError(f"must be at least {minimum}")
        return number

    return convert


def _integer_range(minimum: int, maximum: int) -> Callable[[str], int]:
    at_least = _integer(minimum)

    def convert(value: str) -> int:
        number = at_least(value)
        if number > maximum:
            raise ValueError(f"must be at most {maximum}")
        return number

    return convert


def _choice(*choices: str) -> Callable[[str], str]:
    def convert(value: str) -> str:
        for choice in choices:
            if value.lower() == choice.lower():
                return choice
        raise ValueError(f"expected one of {', '.join(choices)}")

    return convert


def _size(value: str) -> tuple[int, int]:
    found = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
    if not found or int(found.group(1)) < 1 or int(found.group(2)) < 1:
        raise ValueError("expected HxW with positive integers, e.g. 28x28")
    return int(found.group(1)), int(found.group(2))


def _file_prefix(value: str) -> str:
    if "/" in value or "\\" in value:
        raise ValueError("a file name prefix, not a path")
    return value


_COMMON_OPTIONS: dict[str, _Option] = {
    "limit": _Option("limit=N", _integer(1)),
    "offset": _Option("offset=N", _integer(0), 0),
    "injected": _Option("injected", None, False),
}


def parse_spec(spec: str) -> list[PartSpec]:
    """Parse a dataset spec string (see the module docstring) without reading any file."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError("empty dataset spec")
    parts = []
    for text in spec.split("+"):
        text = text.strip()
        if not text:
            raise DataError(f"empty part in dataset spec {spec!r}")
        parts.append(_parse_part(text))
    return parts


def _parse_part(text: str) -> PartSpec:
    head, *raw_options = (token.strip() for token in text.split(","))
    name, has_arg, raw_arg = head.partition(":")
    kind_name = name.strip().lower()
    kind = _KINDS.get(kind_name)
    if kind is None:
        raise DataError(f"{text}: unknown kind {name.strip()!r} (known: {', '.join(sorted(_KINDS))})")
    arg = raw_arg.strip() if has_arg else None
    if kind.arg is None and arg is not None and "=" in arg:  # ``glyphs:n=180``: options may follow the colon
        raw_options = [arg, *raw_options]
        arg = None
    if kind.arg is None and arg is not None:
        raise DataError(f"{text}: {kind_name} takes no argument")
    if kind.arg is not None and not arg:
        raise DataError(f"{text}: {kind_name} needs a {kind.arg}: {kind_name}:{kind.arg}")

    allowed = {**_COMMON_OPTIONS, **kind.options}
    values: dict[str, Any] = {}
    for raw in raw_options:
        if not raw:
            raise DataError(f"{text}: empty option")
        key, has_value, value = (s.strip() for s in raw.partition("="))
        option = allowed.get(key)
        if option is None:
            raise DataError(f"{text}: unknown option {key!r} for {kind_name} (allowed: {', '.join(sorted(allowed))})")
        if key in values:
            raise DataError(f"{text}: option {key!r} given twice")
        if option.convert is None:
            if has_value:
                raise DataError(f"{text}: option {key!r} is a flag and takes no value")
            values[key] = True
            continue
        if not value:
            raise DataError(f"{text}: option {key!r} needs a value ({option.usage})")
        try:
            values[key] = option.convert(value)
        except ValueError as exc:
            raise DataError(f"{text}: bad value {value!r} for {option.usage}: {exc}") from None

    def get(key: str) -> Any:
        return values.get(key, allowed[key].default)

    return PartSpec(
        text=text,
        kind=kind_name,
        arg=arg,
        offset=get("offset"),
        limit=get("limit"),
        injected=get("injected"),
        options={key: get(key) for key in kind.options},
    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass
class _Loaded:
    """What a kind loader returns: only the rows inside the part's offset/limit window."""

    x: np.ndarray  # float32 in [0, 1], [n, C, H, W] or [n, D]
    labels: np.ndarray | None  # int64 [n]
    fingerprint: str
    n_total: int
    start: int  # source row of x[0]
    class_names: tuple[str, ...] | None = None


def load_dataset(spec: str) -> Dataset:
    """Load the dataset described by ``spec`` (grammar in the module docstring).

    Rows keep the order of the spec; ``ids`` are 0..N-1. The fingerprint is a sha256 over every
    part's data fingerprint, kind, options, offset, limit and injected flag (not its path), so
    the same data moved elsewhere keeps its fingerprint.
    """
    parts = parse_spec(spec)
    loaded: list[_Loaded] = []
    for part in parts:
        result = _KINDS[part.kind].load(part)
        if loaded and result.x.shape[1:] != loaded[0].x.shape[1:]:
            raise DataError(
                f"cannot combine {parts[0].text} (sample shape {_shape_text(loaded[0].x.shape[1:])}) with "
                f"{part.text} (sample shape {_shape_text(result.x.shape[1:])})"
            )
        loaded.append(result)

    sources = [
        SourceInfo(
            spec=part.text,
            kind=part.kind,
            path=part.arg,
            fingerprint=result.fingerprint,
            n=int(result.x.shape[0]),
            n_total=result.n_total,
            offset=part.offset,
            limit=part.limit,
            injected=part.injected,
            class_names=result.class_names,
            options=dict(part.options),
        )
        for part, result in zip(parts, loaded, strict=True)
    ]
    x = loaded[0].x if len(loaded) == 1 else np.concatenate([r.x for r in loaded])
    labels = None
    if any(r.labels is not None for r in loaded):
        labels = np.concatenate([r.labels if r.labels is not None else np.full(len(r.x), -1, np.int64) for r in loaded])
    counts = [len(r.x) for r in loaded]
    return Dataset(
        x=x,
        labels=labels,
        ids=np.arange(sum(counts), dtype=np.int64),
        origin=np.repeat(np.arange(len(loaded), dtype=np.int32), counts),
        source_row=np.concatenate([np.arange(r.start, r.start + len(r.x), dtype=np.int64) for r in loaded]),
        sources=sources,
        fingerprint=_combined_fingerprint(sources),
    )


# (kind, option) pairs added after fingerprint v1: recorded in the fingerprint only when given.
_LATE_OPTIONS = frozenset({("digits", "size"), ("digits", "augment"), ("digits", "seed")})


def _combined_fingerprint(sources: Sequence[SourceInfo]) -> str:
    digest = hashlib.sha256(b"proponent-dataset-v1\n")
    for s in sources:
        record = {
            "kind": s.kind,
            "fingerprint": s.fingerprint,
            "offset": s.offset,
            "limit": s.limit,
            "injected": s.injected,
            # options added after v1 that were not given are left out, so existing fingerprints hold
            "options": {k: v for k, v in s.options.items() if v is not None or (s.kind, k) not in _LATE_OPTIONS},
        }
        digest.update(json.dumps(record, sort_keys=True).encode() + b"\n")
    return digest.hexdigest()


def _window(n_total: int, part: PartSpec) -> slice:
    """The rows of a source of ``n_total`` rows selected by the part's offset and limit."""
    if n_total == 0:
        raise DataError(f"{part.where}no samples")
    if part.offset >= n_total:
        raise DataError(f"{part.where}offset={part.offset} is past the end ({n_total} rows)")
    stop = n_total if part.limit is None else min(n_total, part.offset + part.limit)
    return slice(part.offset, stop)


# ---- shared helpers --------------------------------------------------------------------------


def _one_line(exc: BaseException | str) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def _hash_arrays(*arrays: np.ndarray | None) -> str:
    """sha256 over dtype, shape and bytes of each array (None is hashed as absent)."""
    digest = hashlib.sha256()
    for array in arrays:
        if array is None:
            digest.update(b"none;")
            continue
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape};".encode())
        digest.update(array.reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


def _read_file(path: Path, where: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{where}cannot read: {_one_line(exc.strerror or exc)}") from None


def _read_maybe_gzip(path: Path, where: str) -> bytes:
    """File contents, gunzipped when the file starts with the gzip magic bytes."""
    raw = _read_file(path, where)
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{where}corrupt gzip data: {_one_line(exc)}") from None


def _existing_dir(part: PartSpec) -> Path:
    path = Path(str(part.arg)).expanduser()
    if not path.exists():
        raise DataError(f"{part.where}no such directory")
    if not path.is_dir():
        raise DataError(f"{part.where}not a directory")
    return path


def _existing_file(part: PartSpec) -> Path:
    path = Path(str(part.arg)).expanduser()
    if not path.exists():
        raise DataError(f"{part.where}no such file")
    if not path.is_file():
        raise DataError(f"{part.where}not a file")
    return path


def _unit_float(array: np.ndarray, where: str) -> np.ndarray:
    """``array`` as C-contiguous float32 in [0, 1].

    Integers must lie in 0..255 and are divided by 255; booleans become 0/1; floats must
    already lie in [0, 1] (the error names the min/max found). Shared by npz, npy and images.
    """
    kind = array.dtype.kind
    if kind == "b":
        return np.ascontiguousarray(array, dtype=np.float32)
    if kind in "ui":
        if array.dtype != np.uint8 and array.size:
            int_lo, int_hi = int(array.min()), int(array.max())
            if int_lo < 0 or int_hi > 255:
                raise DataError(f"{where}integer values must lie in 0..255, found min {int_lo}, max {int_hi}")
        out = np.empty(array.shape, dtype=np.float32)
        np.divide(array, np.float32(255), out=out, dtype=np.float32)
        return out
    if kind == "f":
        if array.size:
            lo, hi = float(np.min(array)), float(np.max(array))
            if math.isnan(lo) or math.isnan(hi):
                raise DataError(f"{where}float values contain NaN")
            if lo < 0 or hi > 1:
                raise DataError(f"{where}float values must lie in [0, 1], found min {lo:g}, max {hi:g}")
        return np.ascontiguousarray(array, dtype=np.float32)
    raise DataError(f"{where}unsupported dtype {array.dtype} (expected uint8, or floats in [0, 1])")


def _labels_array(labels: Any, n: int, where: str) -> np.ndarray:
    """Validate labels for ``n`` samples: 1-D non-negative integers; returns int64."""
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{where}labels must be 1-D, got shape {y.shape}")
    if y.dtype.kind not in "uib":
        raise DataError(f"{where}labels must be integers, got dtype {y.dtype}")
    if len(y) != n:
        raise DataError(f"{where}label count {len(y)} does not match image count {n}")
    if y.size and int(y.min()) < 0:
        raise DataError(f"{where}labels must be >= 0, found {int(y.min())}")
    return y.astype(np.int64)


# ---- digits ----------------------------------------------------------------------------------


def _load_digits(part: PartSpec) -> _Loaded:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images).astype(np.uint8)  # values 0..16
    labels = np.asarray(bunch.target).astype(np.int64)
    size, augment, seed = part.options["size"], part.options["augment"], part.options["seed"]
    fingerprint = _hash_arrays(images, labels)
    if size in (None, 8) and augment is None:  # the original images
        rows = _window(len(images), part)
        x = np.empty((rows.stop - rows.start, 1, 8, 8), dtype=np.float32)
        np.divide(images[rows, None], np.float32(16), out=x, dtype=np.float32)
        return _Loaded(x, labels[rows], fingerprint, len(images), rows.start)
    size = 8 if size is None else size
    n_img = len(images)
    n_total = n_img * (augment or 1)
    rows = _window(n_total, part)
    src = images.astype(np.float64) / 16.0
    out = np.empty((rows.stop - rows.start, 1, size, size), dtype=np.float32)
    for v in range(rows.start // n_img, (rows.stop - 1) // n_img + 1):
        lo, hi = max(rows.start, v * n_img), min(rows.stop, (v + 1) * n_img)
        idx = np.arange(lo - v * n_img, hi - v * n_img)
        if augment:
            params = _digit_affine_params(0 if seed is None else seed, v, n_img)[idx]
        else:
            params = np.tile([0.0, 1.0, 0.0, 0.0], (len(idx), 1))
        out[lo - rows.start : hi - rows.start, 0] = _render_digits(src[idx], size, params)
    labels_out = np.tile(labels, augment or 1)[rows]
    return _Loaded(out, labels_out, fingerprint, n_total, rows.start)


def _digit_affine_params(seed: int, variant: int, n: int) -> np.ndarray:
    """``[n, 4]``: (angle in radians, scale, shift x, shift y as fractions of the frame) of one variant."""
    gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([0x6469676974, seed, variant])))
    u = gen.random((n, 4))
    angle = np.deg2rad(15.0) * (2 * u[:, 0] - 1)
    scale = 0.9 + 0.2 * u[:, 1]
    shift = (2 * u[:, 2:] - 1) / 14.0
    return np.column_stack([angle, scale, shift])


def _render_digits(src: np.ndarray, size: int, params: np.ndarray) -> np.ndarray:
    """Resample 8x8 images ``src [n, 8, 8]`` into ``[n, size, size]`` frames (bilinear, zero outside).

    Output pixel centres are mapped back to the source through the inverse of (scale into the
    digit box, rotate, shift); ``params`` rows are (angle, scale, shift_x, shift_y) as drawn by
    :func:`_digit_affine_params` (identity: 0, 1, 0, 0).
    """
    n = len(src)
    box = 8.0 if size == 8 else size * 5.0 / 7.0  # side of the digit box in output pixels
    c_out, c_src = (size - 1) / 2.0, 3.5
    grid = np.arange(size, dtype=np.float64) - c_out
    gy, gx = np.meshgrid(grid, grid, indexing="ij")
    angle, scale = params[:, 0, None, None], params[:, 1, None, None]
    px = gx[None] - params[:, 2, None, None] * size
    py = gy[None] - params[:, 3, None, None] * size
    cos, sin = np.cos(angle), np.sin(angle)
    factor = 8.0 / (box * scale)  # output pixels -> source pixels
    sx = (cos * px + sin * py) * factor + c_src
    sy = (-sin * px + cos * py) * factor + c_src
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = sx - x0, sy - y0
    padded = np.zeros((n, 10, 10), dtype=np.float64)  # one ring of zeros around the source
    padded[:, 1:9, 1:9] = src
    out = np.zeros((n, size, size), dtype=np.float64)
    img = np.arange(n)[:, None, None]
    for ox, oy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + ox + 1, y0 + oy + 1
        inside = (xi >= 0) & (xi < 10) & (yi >= 0) & (yi < 10)
        out += w * np.where(inside, padded[img, np.clip(yi, 0, 9), np.clip(xi, 0, 9)], 0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# ---- glyphs (generated outliers) -------------------------------------------------------------

GLYPH_STYLES = ("letters", "negative", "shapes", "texture", "noise", "mix")
_GLYPH_SUPERSAMPLE = 8  # drawn at 8x the target size, then box-filtered down (smooth grey edges)
_GLYPH_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _glyph_letter(rng: np.random.Generator, side: int, negative: bool) -> np.ndarray:
    """A bold capital letter filling most of a ``side`` x ``side`` canvas (uint8, 255 = ink)."""
    from PIL import ImageDraw, ImageFont

    letter = _GLYPH_ALPHABET[int(rng.integers(len(_GLYPH_ALPHABET)))]
    size = int(side * rng.uniform(0.95, 1.25))
    try:
        font: Any = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only a fixed-size bitmap font
        font = ImageFont.load_default()
    stroke = max(1, int(side * rng.uniform(0.07, 0.12)))  # heavy strokes: dense, high-contrast ink
    canvas = Image.new("L", (2 * side, 2 * side), 0)
    draw = ImageDraw.Draw(canvas)
    draw.text((side // 2, side // 2), letter, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    box = canvas.getbbox()
    if box is None:  # pragma: no cover - every letter of the bundled font has ink
        box = (0, 0, 2 * side, 2 * side)
    glyph = canvas.crop(box)
    margin = rng.uniform(0.0, 0.08)  # almost edge to edge, like notMNIST's letters
    target = max(1, int(round(side * (1.0 - 2 * margin))))
    scale = target / max(glyph.size)
    glyph = glyph.resize(
        (max(1, round(glyph.size[0] * scale)), max(1, round(glyph.size[1] * scale))), Image.Resampling.BILINEAR
    )
    glyph = glyph.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR, expand=False)
    out = Image.new("L", (side, side), 0)
    out.paste(glyph, ((side - glyph.size[0]) // 2, (side - glyph.size[1]) // 2))
    ink = np.asarray(out, dtype=np.uint8)
    return 255 - ink if negative else ink


def _glyph_shapes(rng: np.random.Generator, side: int) -> np.ndarray:
    """Two to four filled ellipses, rectangles and polygons, overlapping, covering much of the canvas."""
    from PIL import ImageDraw

    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 5))):
        cx, cy = rng.uniform(0.25, 0.75, size=2) * side
        rx, ry = rng.uniform(0.2, 0.45, size=2) * side
        kind = int(rng.integers(3))
        box = [cx - rx, cy - ry, cx + rx, cy + ry]
        if kind == 0:
            draw.ellipse(box, fill=255)
        elif kind == 1:
            draw.rectangle(box, fill=255)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(3, 7))))
            radius = rng.uniform(0.6, 1.0, size=len(angles))
            points = [(cx + rx * r * np.cos(a), cy + ry * r * np.sin(a)) for a, r in zip(angles, radius)]
            draw.polygon(points, fill=255)
    return np.asarray(canvas, dtype=np.uint8)


def _glyph_texture(rng: np.random.Generator, side: int) -> np.ndarray:
    """Stripes or a checkerboard of random period, phase and orientation (half the pixels inked)."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64) / side
    period = rng.uniform(0.2, 0.5)
    theta = rng.uniform(0, np.pi)
    u = (xx * np.cos(theta) + yy * np.sin(theta)) / period + rng.uniform()
    if rng.uniform() < 0.5:
        ink = np.floor(u * 2) % 2
    else:
        v = (-xx * np.sin(theta) + yy * np.cos(theta)) / period + rng.uniform()
        ink = (np.floor(u * 2) + np.floor(v * 2)) % 2
    return (ink * 255).astype(np.uint8)


def _glyph_noise(rng: np.random.Generator, side: int, size: int) -> np.ndarray:
    """Binary blob noise: a uniform field on a coarse grid (1 to 2 target pixels per cell), thresholded."""
    cell = int(rng.integers(1, 3)) * (side // size)
    cells = -(-side // cell)
    field = rng.uniform(size=(cells, cells)) < rng.uniform(0.4, 0.7)
    big = np.kron(field, np.ones((cell, cell), dtype=bool))[:side, :side]
    return (big * 255).astype(np.uint8)


def generate_glyphs(n: int, size: int = 8, seed: int = 0, style: str = "letters") -> np.ndarray:
    """``n`` generated outlier images, uint8 ``[n, size, size]`` (255 = ink), deterministic in the arguments.

    Each image is drawn at 8x ``size`` from its own generator keyed by ``(seed, row)`` (so a row
    does not depend on ``n``) and box-filtered down to ``size``. Styles: ``letters`` (bold capitals
    of Pillow's bundled font, edge to edge), ``negative`` (the same, inverted: dark letter on a
    white ground), ``shapes`` (overlapping filled ellipses, rectangles and polygons), ``texture``
    (stripes, checkerboards), ``mix`` (each row one of the four, chosen by its generator).
    """
    if style not in GLYPH_STYLES:
        raise ValueError(f"style must be one of {', '.join(GLYPH_STYLES)}, got {style!r}")
    side = size * _GLYPH_SUPERSAMPLE
    out = np.empty((n, size, size), dtype=np.uint8)
    for row in range(n):
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([0x61797068, seed, row])))
        kind = GLYPH_STYLES[int(rng.integers(len(GLYPH_STYLES) - 1))] if style == "mix" else style
        if kind == "letters":
            big = _glyph_letter(rng, side, negative=False)
        elif kind == "negative":
            big = _glyph_letter(rng, side, negative=True)
        elif kind == "shapes":
            big = _glyph_shapes(rng, side)
        elif kind == "noise":
            big = _glyph_noise(rng, side, size)
        else:
            big = _glyph_texture(rng, side)
        out[row] = np.asarray(Image.fromarray(big).resize((size, size), Image.Resampling.BOX), dtype=np.uint8)
    return out


def _load_glyphs(part: PartSpec) -> _Loaded:
    opts = part.options
    size = int(opts["size"])
    images = generate_glyphs(int(opts["n"]), size=size, seed=int(opts["seed"]), style=str(opts["style"]))
    rows = _window(len(images), part)
    x = np.empty((rows.stop - rows.start, 1, size, size), dtype=np.float32)
    np.divide(images[rows, None], np.float32(255), out=x, dtype=np.float32)
    return _Loaded(x, None, _hash_arrays(images), len(images), rows.start)


# ---- idx (MNIST family) ----------------------------------------------------------------------

_IDX_TYPES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}


def _parse_idx(raw: bytes, ndim: int, what: str, where: str) -> np.ndarray:
    """Parse an idx file of unsigned bytes with ``ndim`` dimensions (3 for images, 1 for labels)."""
    expected = 0x0800 | ndim
    if len(raw) < 4:
        raise DataError(f"{where}truncated: {len(raw)} bytes, too short for an idx header")
    (magic,) = struct.unpack_from(">I", raw, 0)
    if magic != expected:
        if magic >> 16:
            hint = "not an idx file"
        elif (magic >> 8) & 0xFF != 0x08:
            code = (magic >> 8) & 0xFF
            hint = f"data type code 0x{code:02x} ({_IDX_TYPES.get(code, 'unknown')}); only 0x08 (unsigned byte) is read"
        else:
            hint = f"the file has {magic & 0xFF} dimension(s), {what} have {ndim}"
        raise DataError(f"{where}bad magic 0x{magic:08x}, expected 0x{expected:08x} ({what}): {hint}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{where}truncated: {len(raw)} bytes, too short for the {header}-byte idx header")
    dims = struct.unpack_from(f">{ndim}I", raw, 4)
    count = math.prod(dims)
    available = len(raw) - header
    if available < count:
        raise DataError(
            f"{where}truncated: header declares {_shape_text(dims)} = {count} bytes of data, only {available} present"
        )
    if available > count:
        raise DataError(
            f"{where}{available - count} unexpected bytes after the {_shape_text(dims)} data declared in the header"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=count, offset=header).reshape(dims)


def _find_idx(directory: Path, stems: Sequence[str]) -> Path | None:
    for stem in stems:
        for suffix in ("", ".gz"):
            candidate = directory / (stem + suffix)
            if candidate.is_file():
                return candidate
    return None


def _load_mnist_idx(part: PartSpec) -> _Loaded:
    directory = _existing_dir(part)
    prefix = part.options["prefix"]
    images_path = _find_idx(directory, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"])
    if images_path is None:
        present = sorted(p.name for p in directory.iterdir() if "idx3" in p.name)[:6]
        listing = f" (idx3 files here: {', '.join(present)})" if present else " (no idx3 files here)"
        raise DataError(f"{part.where}no {prefix}-images-idx3-ubyte[.gz] found{listing}")
    where = f"mnist-idx: {images_path}: "
    raw_images = _read_maybe_gzip(images_path, where)
    images = _parse_idx(raw_images, 3, "images", where)
    if 0 in images.shape[1:]:
        raise DataError(f"{where}empty images of size {_shape_text(images.shape[1:])}")
    digest = hashlib.sha256(b"images:")
    digest.update(raw_images)

    labels = None
    labels_path = _find_idx(directory, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"])
    if labels_path is not None:
        labels_where = f"mnist-idx: {labels_path}: "
        raw_labels = _read_maybe_gzip(labels_path, labels_where)
        labels = _labels_array(_parse_idx(raw_labels, 1, "labels", labels_where), len(images), labels_where)
        digest.update(b"labels:")
        digest.update(raw_labels)

    rows = _window(len(images), part)
    window = images[rows]
    if part.options["transpose"]:
        window = window.transpose(0, 2, 1)
    x = _unit_float(window, where)[:, None]
    return _Loaded(x, None if labels is None else labels[rows], digest.hexdigest(), len(images), rows.start)


# ---- CIFAR-10 --------------------------------------------------------------------------------


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays (plus builtin containers and scalars).

    Any other global (os.system, builtins.eval, ...) is refused. This blocks the usual pickle
    exploits, but pickles should still only be loaded from sources you trust.
    """

    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _unpickle(raw: bytes, where: str) -> Any:
    try:
        return _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # unpickling raises many exception types for malformed input
        raise DataError(f"{where}could not unpickle: {_one_line(exc)}") from None


def _cifar_batch(batch: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one CIFAR-10 batch dict; returns (uint8 [n, 3072], int64 [n])."""
    if not isinstance(batch, dict):
        raise DataError(f"{where}expected a pickled dict, got {type(batch).__name__}")

    def get(key: str) -> Any:
        for candidate in (key.encode(), key):
            if candidate in batch:
                return batch[candidate]
        keys = ", ".join(sorted(repr(k) for k in batch)[:8])
        raise DataError(f"{where}missing key {key.encode()!r} (keys found: {keys or 'none'})")

    data, labels = get("data"), get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where}b'data' must be a uint8 array of shape [n, 3072], got {got}")
    try:
        label_array = np.asarray(labels)
    except Exception as exc:  # arbitrary objects from the pickle
        raise DataError(f"{where}b'labels' is not an array: {_one_line(exc)}") from None
    return data, _labels_array(label_array, len(data), where)


def _load_cifar10(part: PartSpec) -> _Loaded:
    directory = _existing_dir(part)
    if part.options["split"] == "train":
        names = [f"data_batch_{i}" for i in range(1, 6)]
    else:
        names = ["test_batch"]
    nested = directory / "cifar-10-batches-py"
    if not any((directory / n).is_file() for n in names) and nested.is_dir():
        directory = nested
    paths = [directory / n for n in names if (directory / n).is_file()]
    if not paths:
        wanted = "data_batch_1..data_batch_5" if len(names) > 1 else names[0]
        raise DataError(f"{part.where}no {wanted} found (split={part.options['split']})")

    digest = hashlib.sha256()
    data_parts, label_parts = [], []
    for path in paths:
        where = f"cifar10: {path}: "
        raw = _read_file(path, where)
        digest.update(f"{path.name}:{len(raw)}:".encode())
        digest.update(raw)
        data, labels = _cifar_batch(_unpickle(raw, where), where)
        data_parts.append(data)
        label_parts.append(labels)
    data = np.concatenate(data_parts) if len(data_parts) > 1 else data_parts[0]
    labels = np.concatenate(label_parts)
    rows = _window(len(data), part)
    x = _unit_float(data[rows].reshape(-1, 3, 32, 32), part.where)
    return _Loaded(x, labels[rows], digest.hexdigest(), len(data), rows.start)


# ---- npz -------------------------------------------------------------------------------------


def _samples_first(x: np.ndarray, where: str) -> np.ndarray:
    """Lay out a batch of samples as [N, D] or [N, C, H, W] (channels first)."""
    if x.ndim == 2:
        layout = x
    elif x.ndim == 3:
        layout = x[:, None]
    elif x.ndim == 4 and x.shape[3] in _CHANNEL_COUNTS:
        layout = x.transpose(0, 3, 1, 2)
    elif x.ndim == 4 and x.shape[1] in _CHANNEL_COUNTS:
        layout = x
    else:
        raise DataError(f"{where}x has shape {x.shape}; expected N x D, N x H x W or N x H x W x C with C in 1, 3, 4")
    if 0 in layout.shape[1:]:
        raise DataError(f"{where}x has shape {x.shape} with an empty dimension")
    return layout


def _load_npz(part: PartSpec) -> _Loaded:
    path = _existing_file(part)
    where = part.where
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # zipfile / numpy format errors come in many types
        raise DataError(f"{where}could not read npz: {_one_line(exc)}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):  # a plain .npy gives the array itself
        raise DataError(f"{where}not an .npz archive (a single .npy array?)")
    with archive:
        if "x" not in archive.files:
            raise DataError(f"{where}no array 'x' (arrays found: {', '.join(archive.files) or 'none'})")
        try:
            x = archive["x"]
            y = archive["y"] if "y" in archive.files else None
        except Exception as exc:  # corrupt members, pickled object arrays...
            raise DataError(f"{where}could not read npz: {_one_line(exc)}") from None
    samples = _samples_first(x, where + "x: ")
    labels = None if y is None else _labels_array(y, len(samples), where + "y: ")
    rows = _window(len(samples), part)
    x_window = _unit_float(samples[rows], where + "x: ")
    return _Loaded(x_window, None if labels is None else labels[rows], _hash_arrays(x, y), len(samples), rows.start)


# ---- folder ----------------------------------------------------------------------------------


def _image_files(directory: Path, recursive: bool) -> list[Path]:
    found = directory.rglob("*") if recursive else directory.iterdir()
    files = [
        p
        for p in found
        if p.suffix.lower() in _IMAGE_SUFFIXES
        and not any(s.startswith(".") for s in p.relative_to(directory).parts)
        and p.is_file()
    ]
    return sorted(files, key=lambda p: p.relative_to(directory).as_posix())


def _is_grey(image: Image.Image, where: str) -> bool:
    bands = [b for b in image.getbands() if b not in ("A", "a")]
    if image.mode in ("P", "PA"):
        rgb = np.asarray(_decoded(image, where).convert("RGB"))
        return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    return all(b in ("L", "1", "I", "F") for b in bands)


def _load_folder(part: PartSpec) -> _Loaded:
    directory = _existing_dir(part)
    class_dirs = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[Path] = []
    labels_list: list[int] = []
    class_names: tuple[str, ...] | None = None
    if class_dirs:
        loose = _image_files(directory, recursive=False)
        if loose:
            raise DataError(f"{part.where}has both class sub-folders and loose images (e.g. {loose[0].name})")
        class_names = tuple(d.name for d in class_dirs)
        for label, class_dir in enumerate(class_dirs):
            found = _image_files(class_dir, recursive=True)
            files.extend(found)
            labels_list.extend([label] * len(found))
    else:
        files = _image_files(directory, recursive=False)
    if not files:
        raise DataError(f"{part.where}no image files ({', '.join(sorted(_IMAGE_SUFFIXES))})")

    # Header pass over every file: fingerprint, sizes and colour modes (nothing decoded but palettes).
    digest = hashlib.sha256()
    sizes: list[tuple[int, int]] = []  # (H, W)
    all_grey = True
    for path in files:
        where = f"folder: {path}: "
        raw = _read_file(path, where)
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(raw).digest())
        image = _open_image(raw, where, DEFAULT_MAX_PIXELS)
        sizes.append((image.height, image.width))
        if part.options["mode"] is None and all_grey:
            all_grey = _is_grey(image, where)

    mode = part.options["mode"] or ("L" if all_grey else "RGB")
    channels = 1 if mode == "L" else 3
    target = part.options["size"]
    if target is None:
        target = sizes[0]
        for path, size in zip(files, sizes, strict=True):
            if size != target:
                raise DataError(
                    f"{part.where}images differ in size: {files[0].relative_to(directory)} is "
                    f"{_shape_text(target)} and {path.relative_to(directory)} is {_shape_text(size)} (HxW); "
                    "use size=HxW to resize"
                )

    rows = _window(len(files), part)
    x = np.empty((rows.stop - rows.start, channels, *target), dtype=np.float32)
    for i, path in enumerate(files[rows]):
        where = f"folder: {path}: "
        chw = _image_to_chw(_open_image(_read_file(path, where), where, DEFAULT_MAX_PIXELS), channels, where)
        x[i] = chw if chw.shape[1:] == tuple(target) else _resize_chw(chw, target)
    labels = np.asarray(labels_list, dtype=np.int64)[rows] if class_names is not None else None
    return _Loaded(x, labels, digest.hexdigest(), len(files), rows.start, class_names)


# ---- kind registry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Kind:
    arg: str | None  # what ARG names (for messages); None when the kind takes no ARG
    options: dict[str, _Option]
    load: Callable[[PartSpec], _Loaded]


_KINDS: dict[str, _Kind] = {
    "digits": _Kind(
        None,
        {
            "size": _Option("size=S", _integer_range(8, 256), None),
            "augment": _Option("augment=N", _integer(1), None),
            "seed": _Option("seed=K", _integer(0), None),
        },
        _load_digits,
    ),
    "glyphs": _Kind(
        None,
        {
            "n": _Option("n=N", _integer(1), 180),
            "size": _Option("size=S", _integer(4), 8),
            "seed": _Option("seed=N", _integer(0), 0),
            "style": _Option(f"style={'|'.join(GLYPH_STYLES)}", _choice(*GLYPH_STYLES), "letters"),
        },
        _load_glyphs,
    ),
    "mnist-idx": _Kind(
        "DIR",
        {
            "prefix": _Option("prefix=NAME", _file_prefix, "train"),
            "transpose": _Option("transpose", None, False),
        },
        _load_mnist_idx,
    ),
    "cifar10": _Kind("DIR", {"split": _Option("split=train|test", _choice("train", "test"), "train")}, _load_cifar10),
    "npz": _Kind("FILE", {}, _load_npz),
    "folder": _Kind(
        "DIR",
        {
            "mode": _Option("mode=L|RGB", _choice("L", "RGB"), None),
            "size": _Option("size=HxW", _size, None),
        },
        _load_folder,
    ),
}


# --------------------------------------------------------------------------------------------
# Images: decoding, channel conversion, resizing
# --------------------------------------------------------------------------------------------


def _open_image(data: bytes, where: str, max_pixels: int) -> Image.Image:
    """Open (header only) an image Pillow can read, refusing more than ``max_pixels`` pixels."""
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:  # Pillow's own limit, checked before ours
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = int(found.group(1)) if found else max_pixels + 1
        limit = max_pixels if pixels > max_pixels else 2 * (Image.MAX_IMAGE_PIXELS or 0)  # Pillow's refusal
        raise DataError(f"{where}image has {pixels} pixels, more than the limit {limit}") from None
    except Exception as exc:  # Pillow raises many exception types for malformed input
        raise DataError(f"{where}could not decode image: {_one_line(exc)}") from None
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise DataError(f"{where}image has {pixels} pixels, more than the limit {max_pixels}")
    return image


def _decoded(image: Image.Image, where: str) -> Image.Image:
    """Decode the pixel data of an opened image (first frame)."""
    try:
        image.load()
    except Exception as exc:  # truncated / corrupt data: OSError, SyntaxError, ValueError, zlib.error...
        raise DataError(f"{where}could not decode image: {_one_line(exc)}") from None
    return image


def _image_to_chw(image: Image.Image, channels: int, where: str) -> np.ndarray:
    """Decode an opened image to float32 [channels, H, W] in [0, 1].

    Transparent images are composited on black (unless 4 channels are wanted); RGB to grey uses
    Pillow's convert("L"); 16-bit grey is divided by 65535; float images must lie in [0, 1].
    """
    image = _decoded(image, where)
    try:
        if image.mode in ("I", "F") or image.mode.startswith("I;"):
            plane = np.asarray(image)
            if image.mode != "F":
                plane = plane.astype(np.int64)
                if plane.size and (plane.min() < 0 or plane.max() > 65535):
                    raise DataError(f"{where}{image.mode} image values outside 0..65535")
                plane = plane.astype(np.float32) / np.float32(65535)
            return _convert_channels(_unit_float(plane, where)[None], channels)
        if channels == 4:
            image = image.convert("RGBA")
        else:
            transparent = any(b in ("A", "a") for b in image.getbands()) or "transparency" in image.info
            if transparent:
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
            image = image.convert("L" if channels == 1 else "RGB")
        pixels = np.asarray(image)
    except DataError:
        raise
    except Exception as exc:  # unusual modes Pillow cannot convert
        raise DataError(f"{where}could not convert image of mode {image.mode}: {_one_line(exc)}") from None
    chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return _unit_float(chw, where)


def _convert_channels(chw: np.ndarray, channels: int) -> np.ndarray:
    """Convert float [C, H, W] between 1 (grey), 3 (RGB) and 4 (RGBA) channels.

    RGBA loses its alpha by compositing on black; RGB becomes grey with Pillow's luma weights;
    grey is repeated to RGB; an added alpha channel is opaque.
    """
    have = chw.shape[0]
    if have == channels:
        return chw
    if have == 4:
        chw = chw[:3] * chw[3:]
        have = 3
    if channels == 1:
        return np.tensordot(_LUMA, chw, axes=1)[None].astype(np.float32)
    rgb = np.repeat(chw, 3, axis=0) if have == 1 else chw
    if channels == 3:
        return np.ascontiguousarray(rgb, dtype=np.float32)
    return np.concatenate([rgb, np.ones_like(rgb[:1])]).astype(np.float32)


def _resize_chw(chw: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize float [C, H, W] to ``size`` = (H, W) with Pillow's bilinear filter, per channel."""
    height, width = int(size[0]), int(size[1])
    out = np.empty((chw.shape[0], height, width), dtype=np.float32)
    for c, plane in enumerate(chw):
        image = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))  # mode "F"
        out[c] = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
    return np.clip(out, 0.0, 1.0, out=out)


def _array_to_chw(array: np.ndarray, target: tuple[int, int, int], where: str) -> np.ndarray:
    """Lay out one array sample (H, W), (C, H, W), (H, W, C) or flat (C*H*W,) as float [C, H, W]."""
    a = array
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 1 and a.size == math.prod(target):
        chw = a.reshape(target)
    elif a.ndim == 2:
        chw = a[None]
    elif a.ndim == 3 and (a.shape[0] in _CHANNEL_COUNTS or a.shape[2] in _CHANNEL_COUNTS):
        first, last = a.shape[0] in _CHANNEL_COUNTS, a.shape[2] in _CHANNEL_COUNTS
        if first and last:  # ambiguous, e.g. (3, 8, 4): prefer the reading whose H x W matches
            first = a.shape[1:] == target[1:] or a.shape[:2] != target[1:]
        chw = a if first else a.transpose(2, 0, 1)
    else:
        raise DataError(f"{where}array of shape {array.shape} is not an image; expected (H, W), (C, H, W) or (H, W, C)")
    if 0 in chw.shape:
        raise DataError(f"{where}array of shape {array.shape} is empty")
    return _convert_channels(_unit_float(chw, where), target[0])


def _flat_as_image(size: int) -> tuple[int, int, int] | None:
    """Image shape that a flat vector of ``size`` stands for: (1, s, s) or (3, s, s), else None."""
    side = math.isqrt(size)
    if side * side == size:
        return (1, side, side)
    side = math.isqrt(size // 3)
    if size % 3 == 0 and 3 * side * side == size:
        return (3, side, side)
    return None


def load_image_bytes(
    data: bytes,
    shape: Sequence[int],
    *,
    allow_resize: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode an uploaded image to a float32 array of the dataset's per-sample ``shape``.

    ``data`` is anything Pillow reads (PNG, JPEG, ...) or a ``.npy`` array (recognised by its
    magic bytes; loaded without pickle) of shape (H, W), (C, H, W), (H, W, C) or flat (D,).
    ``shape`` is (C, H, W) with C in 1, 3, 4, or (D,) for flat datasets; a flat D is read as a
    grey s x s image when D = s*s, or a channels-first RGB s x s image when D = 3*s*s.

    Channels are converted (RGBA composited on black, RGB to grey with Pillow's ``convert("L")``,
    grey repeated to RGB); uint8 is divided by 255; floats must lie in [0, 1]. A different
    H x W is an error unless ``allow_resize`` (bilinear). Images larger than ``max_pixels``
    (width x height) are refused from their header, before any pixel is decoded.
    """
    target = tuple(int(d) for d in shape)
    if len(target) == 3 and target[0] in _CHANNEL_COUNTS and min(target) > 0:
        image_shape: tuple[int, int, int] | None = (target[0], target[1], target[2])
    elif len(target) == 1 and target[0] > 0:
        image_shape = _flat_as_image(target[0])
    else:
        raise DataError(f"unsupported dataset shape {target}; expected (C, H, W) with C in 1, 3, 4, or (D,)")

    if bytes(data[:6]) == _NPY_MAGIC:
        where = "npy: "
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:  # numpy format errors come in several types
            raise DataError(f"{where}could not decode array: {_one_line(exc)}") from None
        if len(target) == 1 and array.shape[-1:] == target and all(d == 1 for d in array.shape[:-1]):
            return _unit_float(array.reshape(target), where)
        if image_shape is None:
            raise DataError(f"{where}expected shape {target}, got {array.shape}")
        chw = _array_to_chw(array, image_shape, where)
        if chw.shape[1] * chw.shape[2] > max_pixels:
            raise DataError(f"{where}image has {chw.shape[1] * chw.shape[2]} pixels, more than the limit {max_pixels}")
    else:
        if image_shape is None:
            raise DataError(f"an image cannot be converted to the flat dataset shape {target}")
        chw = _image_to_chw(_open_image(bytes(data), "", max_pixels), image_shape[0], "")

    if chw.shape != image_shape:
        if not allow_resize:
            raise DataError(f"expected shape {image_shape}, got {tuple(chw.shape)}; resizing is not allowed")
        chw = _resize_chw(chw, image_shape[1:])
    return chw.reshape(target)
