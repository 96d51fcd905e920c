"""Optional FAISS inner-product indexes for sublinear, approximate search, one per checkpoint.

The exact scan reads the Zarr store's features directly; FAISS is used only for what it adds:
``ivf:NLIST[:NPROBE]`` (IVF-Flat), ``ivfsq8:NLIST[:NPROBE]`` (IVF with 8-bit scalar quantization),
``ivfpq:NLIST:M[:NPROBE]`` (IVF with product quantization, M sub-quantizers of 8 bits) and
``hnsw:M[:EF]``. Answers that use them are flagged ``exact: false``. ``none`` (the default)
builds nothing. Files are written atomically and hashed in the manifest.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

import faiss
import numpy as np

from .fsio import IndexDir

KINDS = "none | ivf:NLIST[:NPROBE] | ivfsq8:NLIST[:NPROBE] | ivfpq:NLIST:M[:NPROBE] | hnsw:M[:EF]"


class IndexSpecError(ValueError):
    pass


def parse_kind(kind: str) -> tuple[str, list[int]]:
    parts = kind.strip().split(":")
    name, args = parts[0], parts[1:]
    try:
        nums = [int(a) for a in args]
    except ValueError:
        raise IndexSpecError(f"index kind {kind!r}: arguments must be integers") from None
    if any(n <= 0 for n in nums):
        raise IndexSpecError(f"index kind {kind!r}: arguments must be positive")
    ok = {
        "none": len(nums) == 0,
        "flat": len(nums) == 0,  # accepted for compatibility: the exact scan needs no FAISS file
        "ivf": 1 <= len(nums) <= 2,
        "ivfsq8": 1 <= len(nums) <= 2,
        "ivfpq": 2 <= len(nums) <= 3,
        "hnsw": 1 <= len(nums) <= 2,
    }
    if not ok.get(name, False):
        raise IndexSpecError(f"index kind {kind!r}: expected {KINDS}")
    return ("none" if name == "flat" else name), nums


def normalize_kind(kind: str) -> str:
    name, nums = parse_kind(kind)
    return ":".join([name, *map(str, nums)])


def is_exact(kind: str) -> bool:
    """Whether answers from this kind are exact (only ``none``: the exact scan)."""
    return parse_kind(kind)[0] == "none"


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_GPU_RES = None


def to_gpu(index: faiss.Index) -> faiss.Index:
    """Move an index to GPU 0 when the GPU build of faiss and a GPU are present."""
    global _GPU_RES
    if not gpu_available():
        return index
    if _GPU_RES is None:
        _GPU_RES = faiss.StandardGpuResources()
    try:
        return faiss.index_cpu_to_gpu(_GPU_RES, 0, index)
    except Exception:  # HNSW has no GPU implementation: keep it on the CPU
        return index


def train_rows_needed(kind: str) -> int:
    name, nums = parse_kind(kind)
    if name in ("ivf", "ivfsq8", "ivfpq"):
        return nums[0] * (39 if name != "ivfpq" else 39)
    return 0


def build_index(kind: str, dim: int, chunks: Iterable[np.ndarray], train_sample: np.ndarray | None) -> faiss.Index:
    """Build an inner-product index from row chunks (float32)."""
    name, nums = parse_kind(kind)
    if name == "none":
        raise IndexSpecError("index kind 'none' builds no FAISS index")
    index: faiss.Index
    if name == "hnsw":
        index = faiss.IndexHNSWFlat(dim, nums[0], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = nums[1] if len(nums) > 1 else 128
    else:
        nlist = nums[0]
        quantizer = faiss.IndexFlatIP(dim)
        if name == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            nprobe = nums[1] if len(nums) > 1 else None
        elif name == "ivfsq8":
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
            nprobe = nums[1] if len(nums) > 1 else None
        else:
            m = nums[1]
            if dim % m:
                raise IndexSpecError(f"ivfpq: the feature dimension {dim} must be divisible by M={m}")
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
            nprobe = nums[2] if len(nums) > 2 else None
        index.own_fields = True
        quantizer.this.disown()  # type: ignore[attr-defined]
        if train_sample is None or len(train_sample) < nlist:
            raise IndexSpecError(f"{kind}: needs at least {nlist} training rows")
        sample = np.ascontiguousarray(train_sample, dtype=np.float32)
        if gpu_available():
            gi = to_gpu(index)
            gi.train(sample)
            index = faiss.index_gpu_to_cpu(gi)
        else:
            index.train(sample)
        index.nprobe = nprobe or max(1, nlist // 8)  # type: ignore[attr-defined]
    for chunk in chunks:
        index.add(np.ascontiguousarray(chunk, dtype=np.float32))
    return index


def write(index: faiss.Index, where: IndexDir, rel: str) -> None:
    """Write atomically into the index (through a local temporary file)."""
    fd, tmp = tempfile.mkstemp(suffix=".faiss")
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        with open(tmp, "rb") as f:
            where.write_bytes(rel, f.read())
    finally:
        os.unlink(tmp)


def read(where: IndexDir, rel: str) -> faiss.Index:
    try:
        data = np.frombuffer(where.read_bytes(rel), dtype=np.uint8)
        return faiss.deserialize_index(data)
    except Exception as e:
        raise IndexSpecError(f"{where.describe(rel)}: cannot read FAISS index: {e}") from e
