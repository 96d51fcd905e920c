"""FAISS inner-product indexes, one per checkpoint.

Index kinds: ``flat`` (exact, the default), ``ivf:NLIST[:NPROBE]`` and
``hnsw:M[:EF]`` (approximate; answers from them are flagged as approximate).
Files are written atomically (temporary file + rename).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import faiss
import numpy as np


class IndexSpecError(ValueError):
    pass


def parse_kind(kind: str) -> tuple[str, list[int]]:
    parts = kind.split(":")
    name, args = parts[0], parts[1:]
    try:
        nums = [int(a) for a in args]
    except ValueError:
        raise IndexSpecError(f"index kind {kind!r}: arguments must be integers") from None
    if name == "flat" and not nums:
        return name, nums
    if name == "ivf" and 1 <= len(nums) <= 2 and all(n > 0 for n in nums):
        return name, nums
    if name == "hnsw" and 1 <= len(nums) <= 2 and all(n > 0 for n in nums):
        return name, nums
    raise IndexSpecError(f"index kind {kind!r}: expected flat, ivf:NLIST[:NPROBE] or hnsw:M[:EF]")


def is_exact(kind: str) -> bool:
    return parse_kind(kind)[0] == "flat"


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


def build_index(
    kind: str, dim: int, chunks: Iterable[np.ndarray], train_sample: np.ndarray | None = None
) -> faiss.Index:
    """Build an inner-product index from row chunks (float32)."""
    name, nums = parse_kind(kind)
    if name == "flat":
        index: faiss.Index = faiss.IndexFlatIP(dim)
    elif name == "ivf":
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nums[0], faiss.METRIC_INNER_PRODUCT)
        if train_sample is None or len(train_sample) < nums[0]:
            raise IndexSpecError(f"ivf:{nums[0]} needs at least {nums[0]} training rows")
        if gpu_available():
            gi = to_gpu(index)
            gi.train(np.ascontiguousarray(train_sample, dtype=np.float32))
            index = faiss.index_gpu_to_cpu(gi)
        else:
            index.train(np.ascontiguousarray(train_sample, dtype=np.float32))
        index.nprobe = nums[1] if len(nums) > 1 else max(1, nums[0] // 8)  # type: ignore[attr-defined]
    else:
        index = faiss.IndexHNSWFlat(dim, nums[0], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = nums[1] if len(nums) > 1 else 128
    for chunk in chunks:
        index.add(np.ascontiguousarray(chunk, dtype=np.float32))
    return index


def write_atomic(index: faiss.Index, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read(path: str | Path) -> faiss.Index:
    try:
        return faiss.read_index(str(path))
    except Exception as e:
        raise IndexSpecError(f"{path}: cannot read FAISS index: {e}") from e
