"""PNG rendering of stored training images (Pillow), nearest-neighbour upscaling."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image


def to_png(image: np.ndarray, scale: int = 1) -> bytes:
    """``image`` is float in [0, 1], shaped (C, H, W) with C in 1, 3, 4, or flat (D,)."""
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 1:
        side = math.isqrt(a.size)
        if side * side == a.size:
            a = a.reshape(1, side, side)
        elif a.size % 3 == 0 and 3 * math.isqrt(a.size // 3) ** 2 == a.size:
            s = math.isqrt(a.size // 3)
            a = a.reshape(3, s, s)
        else:
            a = a.reshape(1, 1, a.size)
    u8 = np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)
    if u8.shape[0] == 1:
        img = Image.fromarray(u8[0], mode="L")
    else:
        img = Image.fromarray(np.ascontiguousarray(u8.transpose(1, 2, 0)), mode="RGB" if u8.shape[0] == 3 else "RGBA")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
