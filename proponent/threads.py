"""Thread counts of torch (OpenMP, MKL) and FAISS in one process.

``set_threads`` pins the process-wide counts. ``limit_this_thread`` changes only the calling
thread's, which matters in a server: GNU OpenMP keeps one pool of helper threads per thread
that starts parallel work, and once the helpers of all pools outnumber the CPUs it stops
spinning between parallel regions and puts them to sleep instead. Every small kernel then
pays a wake-up: measured here (2 cores), a 16×512 @ 512×784 matmul takes 88 µs with one pool
and 175-210 µs in *every* thread once a second thread has a pool of its own, and a query's
featurization 11.6 ms against 30 ms. So the server runs its multithreaded torch work on one
thread (the query engine's worker) and limits every other thread that touches torch (the job
worker) to one thread of its own, which starts no pool.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
from collections.abc import Callable

import torch

log = logging.getLogger("proponent.threads")

_local = threading.local()
_setters: list[Callable[[int], object]] | None = None
_setters_lock = threading.Lock()


def set_threads(n: int | None = None) -> int:
    """Pin torch and FAISS (OpenMP) thread counts explicitly (they share the process); ``n``:
    ``PROPONENT_THREADS`` or the CPU count by default. Returns the count."""
    n = n or int(os.environ.get("PROPONENT_THREADS", 0)) or (os.cpu_count() or 1)
    torch.set_num_threads(n)
    try:
        import faiss  # optional: no faiss wheel on Windows

        faiss.omp_set_num_threads(n)
    except Exception:
        pass
    return n


def _thread_setters() -> list[Callable[[int], object]]:
    """``omp_set_num_threads`` of the OpenMP runtime torch loaded (its own, not FAISS's) and MKL's thread-local
    ``MKL_Set_Num_Threads_Local`` (torch's global setting overrides OpenMP's for MKL calls),
    found among the loaded libraries; empty where neither is (then limiting is a no-op)."""
    global _setters
    with _setters_lock:
        if _setters is not None:
            return _setters
        found: list[Callable[[int], object]] = []
        try:
            with open("/proc/self/maps") as f:
                paths = set(re.findall(r"(/\S+\.so[\.\d]*)\s*$", f.read(), re.M))
        except OSError:
            paths = set()
        names = {"omp": ("omp_set_num_threads", r"lib(g|i)?omp"), "mkl": ("MKL_Set_Num_Threads_Local", r"libtorch_cpu")}
        torch_dir = os.path.dirname(torch.__file__)
        # torch's own runtime first (FAISS wheels bring another libgomp, with pools of their own)
        ordered = sorted(paths, key=lambda p: (not p.startswith(torch_dir), p))
        for symbol, pattern in names.values():
            for p in ordered:
                if not re.search(pattern, os.path.basename(p)):
                    continue
                try:
                    fn = getattr(ctypes.CDLL(p), symbol)
                except (OSError, AttributeError):
                    continue
                fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                found.append(fn)
                break
        if not found:
            log.debug("no OpenMP/MKL thread setters found: per-thread limits are not applied")
        _setters = found
        return found


def limit_this_thread(n: int = 1) -> None:
    """Limit torch's intra-op threads *in the calling thread only* to ``n`` (once per thread;
    other threads keep the process-wide count)."""
    if getattr(_local, "limited", None) == n:
        return
    # ATen sets each new thread's OpenMP count on its first parallel use: make that happen first
    torch.get_num_threads()
    torch.ones(1).sum()
    for fn in _thread_setters():
        fn(n)
    _local.limited = n


M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def limit_malloc_arenas(n: int | None) -> bool:
    """Cap glibc's malloc arenas at ``n`` for the rest of the process (``mallopt(M_ARENA_MAX, n)``); True when
    applied. A server's many request threads each get an arena of their own otherwise, and freed chunk buffers
    stay in them: stream mode under 16 clients held 551 MiB at peak with glibc's default against 479 MiB with 2
    (``benchmarks/load.py``). ``n`` None or 0, a ``MALLOC_ARENA_MAX`` in the environment (it wins) or another
    C library: nothing is changed."""
    if not n or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, int(n)) == 1)
