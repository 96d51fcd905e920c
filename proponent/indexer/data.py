"""Loading image datasets from local files: one loader per kind of the spec grammar (:mod:`proponent.indexer.spec`).

:func:`load_dataset` parses a spec string, runs each part's loader and combines the parts into a
:class:`Dataset` with provenance for every row. Every malformed input raises :class:`DataError`
(a ``ValueError``) with one line naming the file and the problem. Image decoding is shared with
the server's uploads (:mod:`proponent.format.images`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import pickle
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from proponent.format.images import (
    CHANNEL_COUNTS,
    DEFAULT_MAX_PIXELS,
    DataError,
    decoded_image,
    image_to_chw,
    load_image_bytes,
    one_line,
    open_image,
    resize_chw,
    unit_float,
)
from proponent.indexer.spec import GLYPH_STYLES, PartSpec, parse_spec

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DataError",
    "Dataset",
    "PartSpec",
    "SourceInfo",
    "load_dataset",
    "load_image_bytes",  # re-exported: decoding lives in proponent.format.images
    "parse_spec",  # re-exported: the grammar lives in proponent.indexer.spec
]

_GZIP_MAGIC = b"\x1f\x8b"
_IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".pnm"}
)


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
        result = _LOADERS[part.kind](part)
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
        raise DataError(f"{where}cannot read: {one_line(exc.strerror or exc)}") from None


def _read_maybe_gzip(path: Path, where: str) -> bytes:
    """File contents, gunzipped when the file starts with the gzip magic bytes."""
    raw = _read_file(path, where)
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{where}corrupt gzip data: {one_line(exc)}") from None


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
    from sklearn.datasets import load_digits  # lazy: scikit-learn takes ~1 s to import

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

_GLYPH_SUPERSAMPLE = 8  # drawn at 8x the target size, then box-filtered down (smooth grey edges)
_GLYPH_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _glyph_letter(rng: np.random.Generator, side: int, negative: bool) -> np.ndarray:
    """A bold capital letter filling most of a ``side`` x ``side`` canvas (uint8, 255 = ink)."""
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
    x = unit_float(window, where)[:, None]
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
        raise DataError(f"{where}could not unpickle: {one_line(exc)}") from None


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
        raise DataError(f"{where}b'labels' is not an array: {one_line(exc)}") from None
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
    x = unit_float(data[rows].reshape(-1, 3, 32, 32), part.where)
    return _Loaded(x, labels[rows], digest.hexdigest(), len(data), rows.start)


# ---- npz -------------------------------------------------------------------------------------


def _samples_first(x: np.ndarray, where: str) -> np.ndarray:
    """Lay out a batch of samples as [N, D] or [N, C, H, W] (channels first)."""
    if x.ndim == 2:
        layout = x
    elif x.ndim == 3:
        layout = x[:, None]
    elif x.ndim == 4 and x.shape[3] in CHANNEL_COUNTS:
        layout = x.transpose(0, 3, 1, 2)
    elif x.ndim == 4 and x.shape[1] in CHANNEL_COUNTS:
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
        raise DataError(f"{where}could not read npz: {one_line(exc)}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):  # a plain .npy gives the array itself
        raise DataError(f"{where}not an .npz archive (a single .npy array?)")
    with archive:
        if "x" not in archive.files:
            raise DataError(f"{where}no array 'x' (arrays found: {', '.join(archive.files) or 'none'})")
        try:
            x = archive["x"]
            y = archive["y"] if "y" in archive.files else None
        except Exception as exc:  # corrupt members, pickled object arrays...
            raise DataError(f"{where}could not read npz: {one_line(exc)}") from None
    samples = _samples_first(x, where + "x: ")
    labels = None if y is None else _labels_array(y, len(samples), where + "y: ")
    rows = _window(len(samples), part)
    x_window = unit_float(samples[rows], where + "x: ")
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
        rgb = np.asarray(decoded_image(image, where).convert("RGB"))
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
        image = open_image(raw, where, DEFAULT_MAX_PIXELS)
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
        chw = image_to_chw(open_image(_read_file(path, where), where, DEFAULT_MAX_PIXELS), channels, where)
        x[i] = chw if chw.shape[1:] == tuple(target) else resize_chw(chw, target)
    labels = np.asarray(labels_list, dtype=np.int64)[rows] if class_names is not None else None
    return _Loaded(x, labels, digest.hexdigest(), len(files), rows.start, class_names)


# ---- the loader of each kind -----------------------------------------------------------------

_LOADERS: dict[str, Callable[[PartSpec], _Loaded]] = {
    "digits": _load_digits,
    "glyphs": _load_glyphs,
    "mnist-idx": _load_mnist_idx,
    "cifar10": _load_cifar10,
    "npz": _load_npz,
    "folder": _load_folder,
}
