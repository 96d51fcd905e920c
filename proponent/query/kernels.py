"""Exact int8 products of stored rows with int8 query vectors: the scan's kernel, chosen at run time.

``int8_products(codes, z)`` returns ``codes[:, :D] @ z.T`` exactly, as int64 ``[n, m]``, for int8 codes
``[n, W ≥ D]`` (a resident copy may be wider than its rows: zero columns padded for the GPU's GEMM) and
``m`` int8 query vectors ``z [m, D]``. Two kernels give the same integers:

* ``native`` (CPU): ``proponent/query/_int8dot.c``, built by pip at install -- AVX-512 VNNI where the CPU
  has it (AVX2 or a plain loop otherwise), the rows split across ``torch.get_num_threads()`` threads. A
  query's two vectors: tiles of 8 rows x 2 vectors, reading the codes once at close to the memory bandwidth;
  a batch's (8 vectors or more): a register-blocked GEMM (3 rows x 8 vectors of int32 sums in registers
  over 4,096-column blocks, the rows read once for all vectors), at the compute rate the kernel reaches on
  an L1-resident tile (``_int8dot.peak``; ``benchmarks/scan_bandwidth.py``);
* ``torch``: ``torch._int_mm`` (oneDNN on the CPU, cuBLASLt on CUDA), which pads to the GEMM's
  shapes; the only kernel for codes on a GPU, and the fallback where the native one was not built.

``PROPONENT_INT8_KERNEL=auto|native|torch`` forces one. ``auto``: native for a query's vectors on CPU codes
where built; torch for a batch's (``BATCH_VECTORS`` or more), because oneDNN's int8 GEMM measured 1.5-2.0x
the native GEMM here (64 queries x 60,000 / 250,000 rows x D 7,996, 2 loaded cores: 382 vs 771 ms, 1,886 vs
3,280 ms; ``benchmarks/scan_bandwidth.py``, results/scan_bandwidth_batch.txt). The native GEMM stays the
tested fallback (``PROPONENT_INT8_KERNEL=native``).
Whichever runs, the scan's certificate is the same: integer products are exact in both.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import numpy as np
import torch

_native: ModuleType | None
try:
    from . import _int8dot as _native
except ImportError:  # no C compiler at install: the torch kernel serves
    _native = None

KERNELS = ("auto", "native", "torch")
INT32_SAFE_DIM = 65_536  # torch._int_mm sums in int32: exact for D·128·128 ≤ 2^30; longer rows are split
_MIN_ROWS_PER_THREAD = 2048
BATCH_VECTORS = 8  # from this many vectors (4 queries) ``auto`` multiplies with torch._int_mm: see the docstring
_pool: ThreadPoolExecutor | None = None


def native_kernel() -> str | None:
    """The native kernel's instruction set on this CPU (``avx512vnni``, ``avx2``, ``scalar``), None if not built."""
    return _native.kernel_name() if _native is not None else None


def available() -> list[str]:
    return ["native", "torch"] if _native is not None else ["torch"]


def choose(codes: torch.Tensor, kernel: str | None = None, vectors: int = 2) -> str:
    """The kernel that multiplies ``codes`` by ``vectors`` int8 vectors: ``native`` or ``torch`` (see the
    module docstring; ``auto`` gives a batch's GEMM to torch)."""
    name = kernel or os.environ.get("PROPONENT_INT8_KERNEL", "auto")
    if name not in KERNELS:
        raise ValueError(f"PROPONENT_INT8_KERNEL must be one of {', '.join(KERNELS)}, got {name!r}")
    on_cpu = codes.device.type == "cpu"
    if name == "native":
        if _native is None:
            raise ValueError("the native int8 kernel was not built (no C compiler at install): use torch")
        if not on_cpu:
            raise ValueError(f"the native int8 kernel runs on the CPU; these codes are on {codes.device}")
        return "native"
    if name == "auto" and on_cpu and _native is not None and vectors < BATCH_VECTORS:
        return "native"
    return "torch"


def int8_products(codes: torch.Tensor, z: np.ndarray, kernel: str | None = None) -> np.ndarray:
    """``codes[:, :D] @ z.T`` exactly, int64 ``[n, m]``, for int8 ``codes [n, W ≥ D]`` and ``z [m, D]``."""
    return int8_products_tensor(codes, z, kernel).T.to(torch.int64).cpu().numpy()


def int8_products_tensor(codes: torch.Tensor, z: np.ndarray, kernel: str | None = None) -> torch.Tensor:
    """``z @ codes[:, :D].T`` exactly, ``[m, n]`` on the codes' device (int32 where the sums fit it, else int64;
    possibly a transposed view): the orientation the scan works in, one row per query vector."""
    if codes.dtype != torch.int8 or z.dtype != np.int8:
        raise TypeError(f"int8_products takes int8 codes and vectors, got {codes.dtype} and {z.dtype}")
    z = np.ascontiguousarray(z)
    m, d = z.shape
    if codes.ndim != 2 or codes.shape[1] < d:
        raise ValueError(f"codes of shape {tuple(codes.shape)} are narrower than the {d} query columns")
    if choose(codes, kernel, m) == "native":
        return torch.from_numpy(_native_products(codes, z)).T
    return _torch_products(codes, z, rows_last=codes.device.type == "cpu")


def _native_products(codes: torch.Tensor, z: np.ndarray) -> np.ndarray:
    global _pool
    assert _native is not None
    if codes.stride(1) != 1:
        codes = codes.contiguous()
    n = codes.shape[0]
    m, d = z.shape
    out = np.empty((n, m), np.int64)
    if n == 0:
        return out
    base, stride = codes.data_ptr(), codes.stride(0)
    zp, op = z.ctypes.data, out.ctypes.data
    threads = max(1, min(torch.get_num_threads(), n // _MIN_ROWS_PER_THREAD))
    if threads == 1:
        _native.products(base, n, d, stride, zp, m, op)
        return out
    if _pool is None or _pool._max_workers < threads:
        _pool = ThreadPoolExecutor(max_workers=max(threads, os.cpu_count() or 1), thread_name_prefix="int8dot")
    bounds = np.linspace(0, n, threads + 1).astype(np.int64)
    parts = [
        (base + int(a) * stride, int(b - a), d, stride, zp, m, op + int(a) * m * 8)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    futures = [_pool.submit(_native.products, *p) for p in parts[1:]]
    _native.products(*parts[0])  # the calling thread takes a share itself: one wake-up fewer per call
    for f in futures:
        f.result()
    return out


def _torch_products(codes: torch.Tensor, z: np.ndarray, rows_last: bool = False) -> torch.Tensor:
    """``[m, n]`` products by ``torch._int_mm``. ``rows_last`` (the CPU's): ``z @ codes.T``, as fast in oneDNN as
    ``codes @ zt`` (64 queries x 16,384 rows x 8,000: 14.9 vs 14.3 ms) and already in the scan's [vectors, rows]
    orientation (a transposed int32 result cost 2.8 ms per block to convert); otherwise (CUDA's) ``codes @ zt``,
    zt ``[W, ≥8]``, padded to the shapes cuBLASLt requires (more than 16 rows, widths a multiple of 8; resident
    codes already are, streamed blocks of an odd width are copied), returned as a transposed view. Both run
    on the CPU in the tests."""
    n, width = codes.shape
    m, d = z.shape
    cols = max(8, -(-m // 8) * 8)
    zt = np.zeros((width, cols), np.int8)
    zt[:d, :m] = z.T
    ztt = torch.from_numpy(zt).to(codes.device)
    # the same shapes on every device, so that the CPU runs (and the tests cover) what cuBLASLt gets
    pad_rows = 17 - n if n <= 16 else 0
    if pad_rows:
        codes = torch.cat([codes, torch.zeros((pad_rows, width), dtype=torch.int8, device=codes.device)])
    if width % 8:
        codes = torch.nn.functional.pad(codes, (0, 8 - width % 8))
        ztt = torch.nn.functional.pad(ztt, (0, 0, 0, 8 - width % 8))
    total = None
    for j in range(0, codes.shape[1], INT32_SAFE_DIM):
        a, b = codes[:, j : j + INT32_SAFE_DIM], ztt[j : j + INT32_SAFE_DIM]
        part = torch._int_mm(b.T.contiguous(), a.T) if rows_last else torch._int_mm(a.contiguous(), b.contiguous()).T
        part = part[:m, :n]
        if codes.shape[1] <= INT32_SAFE_DIM:
            return part
        total = part.to(torch.int64) if total is None else total + part
    assert total is not None
    return total
