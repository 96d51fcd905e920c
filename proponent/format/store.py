"""The Zarr v3 feature store (DESIGN.md §3).

Layout under ``store.zarr``::

    ckpt_{c:03d}/features   [N, D]  float32 | float16, chunked by rows (>= 1 MiB per chunk)
    ckpt_{c:03d}/sq_norm    [N]     float64  exact ||g||² (unprojected)
    ckpt_{c:03d}/loss       [N]     float32  per-sample objective
    ckpt_{c:03d}/done       [n_chunks] uint8 one flag per row chunk, its own storage chunk
    latent_mu, latent_logvar [N, L] float32  encoder outputs at the final checkpoint
    ids, labels, origin, source_row, injected   [N]
    images                  [N, *shape] uint8   the training images (for display and reports)

All per-row arrays share one row chunking, so a writer that owns a row chunk owns
every storage chunk it touches: resumption and sharding never split a chunk. A
chunk's ``done`` flag is written after its data, so a killed job redoes at most
the chunks that were in flight.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr

MIB = 1 << 20


class StoreError(RuntimeError):
    """The store is missing, incomplete or does not match what it should hold."""


def chunk_rows_for(dim: int, itemsize: int, min_bytes: int = MIB) -> int:
    """Rows per chunk so that a feature chunk holds at least ``min_bytes`` (multiple of 64)."""
    rows = math.ceil(min_bytes / max(1, dim * itemsize))
    return int(math.ceil(rows / 64) * 64)


def ckpt_group(c: int) -> str:
    return f"ckpt_{c:03d}"


class FeatureStore:
    def __init__(self, group: zarr.Group, path: Path):
        self.group = group
        self.path = path
        attrs: dict[str, Any] = dict(group.attrs)
        try:
            self.n = int(attrs["n"])
            self.dim = int(attrs["dim"])
            self.n_checkpoints = int(attrs["n_checkpoints"])
            self.chunk_rows = int(attrs["chunk_rows"])
            self.dtype = np.dtype(attrs["dtype"])
            self.latent_dim = int(attrs["latent_dim"])
        except KeyError as e:
            raise StoreError(f"{path}: store attributes lack {e.args[0]!r}; not a proponent store") from None

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        n: int,
        dim: int,
        n_checkpoints: int,
        dtype: str = "float32",
        latent_dim: int = 0,
        ids: np.ndarray,
        labels: np.ndarray | None,
        origin: np.ndarray,
        source_row: np.ndarray,
        injected: np.ndarray,
        images: np.ndarray | None = None,
        chunk_rows: int | None = None,
    ) -> FeatureStore:
        path = Path(path)
        dt = np.dtype(dtype)
        if dt not in (np.float32, np.float16):
            raise StoreError(f"feature dtype must be float32 or float16, got {dtype}")
        rows = chunk_rows or chunk_rows_for(dim, dt.itemsize)
        n_chunks = math.ceil(n / rows)
        g = zarr.open_group(str(path), mode="w", zarr_format=3)
        g.attrs.update(
            {
                "n": n,
                "dim": dim,
                "n_checkpoints": n_checkpoints,
                "chunk_rows": rows,
                "dtype": dt.name,
                "latent_dim": latent_dim,
            }
        )

        def arr(name: str, shape: tuple[int, ...], dtype: Any, data: np.ndarray | None = None) -> None:
            chunks = (rows, *shape[1:]) if shape[0] == n else shape
            a = g.create_array(name, shape=shape, chunks=chunks, dtype=dtype, compressors=None, fill_value=0)
            if data is not None:
                a[...] = data

        arr("ids", (n,), "int64", np.asarray(ids, dtype=np.int64))
        arr("labels", (n,), "int64", np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64))
        arr("origin", (n,), "int32", np.asarray(origin, np.int32))
        arr("source_row", (n,), "int64", np.asarray(source_row, np.int64))
        arr("injected", (n,), "bool", np.asarray(injected, bool))
        if images is not None:  # the training images, 8-bit, so the index can show them without the source
            arr("images", tuple(images.shape), "uint8", np.round(np.clip(images, 0, 1) * 255).astype(np.uint8))
        if latent_dim:
            arr("latent_mu", (n, latent_dim), "float32")
            arr("latent_logvar", (n, latent_dim), "float32")
        for c in range(n_checkpoints):
            cg = ckpt_group(c)
            arr(f"{cg}/features", (n, dim), dt.name)
            arr(f"{cg}/sq_norm", (n,), "float64")
            arr(f"{cg}/loss", (n,), "float32")
            g.create_array(f"{cg}/done", shape=(n_chunks,), chunks=(1,), dtype="uint8", compressors=None, fill_value=0)
        return cls(g, path)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> FeatureStore:
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"{path}: no Zarr v3 store here (zarr.json missing)")
        try:
            g = zarr.open_group(str(path), mode=mode, zarr_format=3)  # type: ignore[arg-type]
        except Exception as e:  # zarr raises several types for corrupt metadata
            raise StoreError(f"{path}: cannot open Zarr store: {e}") from e
        return cls(g, path)

    def _a(self, name: str) -> zarr.Array:
        return cast(zarr.Array, self.group[name])

    # ------------------------------------------------------------------ chunks
    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n / self.chunk_rows)

    def chunk_range(self, k: int) -> tuple[int, int]:
        return k * self.chunk_rows, min(self.n, (k + 1) * self.chunk_rows)

    def done_mask(self, c: int) -> np.ndarray:
        return np.asarray(self._a(f"{ckpt_group(c)}/done")[:], dtype=bool)

    def pending_chunks(self, c: int) -> list[int]:
        return [int(k) for k in np.flatnonzero(~self.done_mask(c))]

    def is_complete(self) -> bool:
        return all(self.done_mask(c).all() for c in range(self.n_checkpoints))

    def write_chunk(
        self,
        c: int,
        k: int,
        features: np.ndarray,
        sq_norm: np.ndarray,
        loss: np.ndarray,
        latent: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Write row chunk ``k`` of checkpoint ``c`` and then mark it done."""
        lo, hi = self.chunk_range(k)
        if features.shape != (hi - lo, self.dim):
            raise StoreError(f"chunk {k}: features shape {features.shape}, expected {(hi - lo, self.dim)}")
        cg = ckpt_group(c)
        self._a(f"{cg}/features")[lo:hi] = features.astype(self.dtype, copy=False)
        self._a(f"{cg}/sq_norm")[lo:hi] = sq_norm.astype(np.float64, copy=False)
        self._a(f"{cg}/loss")[lo:hi] = loss.astype(np.float32, copy=False)
        if latent is not None and self.latent_dim:
            self._a("latent_mu")[lo:hi] = latent[0].astype(np.float32, copy=False)
            self._a("latent_logvar")[lo:hi] = latent[1].astype(np.float32, copy=False)
        self._a(f"{cg}/done")[k] = 1

    # ------------------------------------------------------------------ reads
    def features(self, c: int) -> np.ndarray:
        """All features of checkpoint ``c`` as float32 ``[N, D]``."""
        return np.asarray(self._a(f"{ckpt_group(c)}/features")[:], dtype=np.float32)

    def iter_feature_chunks(self, c: int) -> Iterator[tuple[int, np.ndarray]]:
        arr = self._a(f"{ckpt_group(c)}/features")
        for k in range(self.n_chunks):
            lo, hi = self.chunk_range(k)
            yield lo, np.asarray(arr[lo:hi], dtype=np.float32)

    def sq_norm(self, c: int) -> np.ndarray:
        return np.asarray(self._a(f"{ckpt_group(c)}/sq_norm")[:], dtype=np.float64)

    def loss(self, c: int) -> np.ndarray:
        return np.asarray(self._a(f"{ckpt_group(c)}/loss")[:], dtype=np.float32)

    def array(self, name: str) -> np.ndarray:
        return np.asarray(self._a(name)[:])

    def images(self, rows: Any) -> np.ndarray:
        """Training images as float32 in [0, 1] (8-bit quantised)."""
        return np.asarray(self._a("images")[rows], dtype=np.float32) / 255.0

    def array_meta(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        a = self._a(name)
        return tuple(a.shape), np.dtype(str(a.dtype))
