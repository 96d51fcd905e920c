"""Decoding images and arrays to the float32 ``[C, H, W]`` layout in [0, 1] the models take.

Neutral ground for every caller: the server and the CLI decode uploaded query images with
:func:`load_image_bytes`; the indexer's ``folder:`` datasets and array sources use the same
decoding and checks (:mod:`proponent.indexer.data`). Every malformed input raises
:class:`DataError` (a ``ValueError``) with one line naming the problem.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = [
    "CHANNEL_COUNTS",
    "DEFAULT_MAX_PIXELS",
    "DataError",
    "decoded_image",
    "image_to_chw",
    "load_image_bytes",
    "one_line",
    "open_image",
    "resize_chw",
    "unit_float",
]

DEFAULT_MAX_PIXELS = 50_000_000
"""Largest image (width x height) decoded by :func:`load_image_bytes` and ``folder:`` datasets."""

CHANNEL_COUNTS = (1, 3, 4)
_NPY_MAGIC = b"\x93NUMPY"
# ITU-R 601-2 luma weights, the ones Pillow's convert("L") uses.
_LUMA = np.array([299 / 1000, 587 / 1000, 114 / 1000], dtype=np.float32)


class DataError(ValueError):
    """A dataset spec, data file or uploaded image is malformed; the message is one line."""


_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


def one_line(exc: BaseException | str) -> str:
    """An exception (or text) as one line: whitespace collapsed, the type name when empty."""
    text = " ".join(str(exc).split())
    # never a Python repr (``<_io.BytesIO object at 0x…>``, ``<ast.Call object at 0x…>``): the upload, or the kind
    text = _REPR.sub(lambda m: "" if m.group(1).endswith("BytesIO") else m.group(1).rsplit(".", 1)[-1], text)
    text = " ".join(text.split())
    return text or type(exc).__name__


def unit_float(array: np.ndarray, where: str) -> np.ndarray:
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


def open_image(data: bytes, where: str, max_pixels: int) -> Image.Image:
    """Open (header only) an image Pillow can read, refusing more than ``max_pixels`` pixels."""
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:  # Pillow's own limit, checked before ours
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = int(found.group(1)) if found else max_pixels + 1
        limit = max_pixels if pixels > max_pixels else 2 * (Image.MAX_IMAGE_PIXELS or 0)  # Pillow's refusal
        raise DataError(f"{where}image has {pixels} pixels, more than the limit {limit}") from None
    except Exception as exc:  # Pillow raises many exception types for malformed input
        raise DataError(f"{where}could not decode image: {one_line(exc)}") from None
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise DataError(f"{where}image has {pixels} pixels, more than the limit {max_pixels}")
    return image


def decoded_image(image: Image.Image, where: str) -> Image.Image:
    """Decode the pixel data of an opened image (first frame)."""
    try:
        image.load()
    except Exception as exc:  # truncated / corrupt data: OSError, SyntaxError, ValueError, zlib.error...
        raise DataError(f"{where}could not decode image: {one_line(exc)}") from None
    return image


def image_to_chw(image: Image.Image, channels: int, where: str) -> np.ndarray:
    """Decode an opened image to float32 [channels, H, W] in [0, 1].

    Transparent images are composited on black (unless 4 channels are wanted); RGB to grey uses
    Pillow's convert("L"); 16-bit grey is divided by 65535; float images must lie in [0, 1].
    """
    image = decoded_image(image, where)
    try:
        if image.mode in ("I", "F") or image.mode.startswith("I;"):
            plane = np.asarray(image)
            if image.mode != "F":
                plane = plane.astype(np.int64)
                if plane.size and (plane.min() < 0 or plane.max() > 65535):
                    raise DataError(f"{where}{image.mode} image values outside 0..65535")
                plane = plane.astype(np.float32) / np.float32(65535)
            return _convert_channels(unit_float(plane, where)[None], channels)
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
        raise DataError(f"{where}could not convert image of mode {image.mode}: {one_line(exc)}") from None
    chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return unit_float(chw, where)


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


def resize_chw(chw: np.ndarray, size: Sequence[int]) -> np.ndarray:
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
    elif a.ndim == 3 and (a.shape[0] in CHANNEL_COUNTS or a.shape[2] in CHANNEL_COUNTS):
        first, last = a.shape[0] in CHANNEL_COUNTS, a.shape[2] in CHANNEL_COUNTS
        if first and last:  # ambiguous, e.g. (3, 8, 4): prefer the reading whose H x W matches
            first = a.shape[1:] == target[1:] or a.shape[:2] != target[1:]
        chw = a if first else a.transpose(2, 0, 1)
    else:
        raise DataError(f"{where}array of shape {array.shape} is not an image; expected (H, W), (C, H, W) or (H, W, C)")
    if 0 in chw.shape:
        raise DataError(f"{where}array of shape {array.shape} is empty")
    return _convert_channels(unit_float(chw, where), target[0])


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
    if len(target) == 3 and target[0] in CHANNEL_COUNTS and min(target) > 0:
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
            raise DataError(f"{where}could not decode array: {one_line(exc)}") from None
        if len(target) == 1 and array.shape[-1:] == target and all(d == 1 for d in array.shape[:-1]):
            return unit_float(array.reshape(target), where)
        if image_shape is None:
            raise DataError(f"{where}expected shape {target}, got {array.shape}")
        chw = _array_to_chw(array, image_shape, where)
        if chw.shape[1] * chw.shape[2] > max_pixels:
            raise DataError(f"{where}image has {chw.shape[1] * chw.shape[2]} pixels, more than the limit {max_pixels}")
    else:
        if image_shape is None:
            raise DataError(f"an image cannot be converted to the flat dataset shape {target}")
        chw = image_to_chw(open_image(bytes(data), "", max_pixels), image_shape[0], "")

    if chw.shape != image_shape:
        if not allow_resize:
            raise DataError(f"expected shape {image_shape}, got {tuple(chw.shape)}; resizing is not allowed")
        chw = resize_chw(chw, image_shape[1:])
    return chw.reshape(target)
