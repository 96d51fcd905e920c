"""Per-thread torch thread limits (proponent.threads): the server's job worker runs with one thread
of its own so that it starts no second OpenMP pool, while the rest of the process keeps its count."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from proponent.threads import _thread_setters, limit_this_thread, set_threads


def test_limit_applies_to_the_calling_thread_only() -> None:
    before = torch.get_num_threads()
    try:
        set_threads(2)
        assert _thread_setters(), "the OpenMP runtime torch loaded was not found"
        seen: dict[str, int] = {}

        def worker() -> None:
            seen["fresh"] = torch.get_num_threads()
            limit_this_thread(1)
            torch.ones(64, 64) @ torch.ones(64, 64)  # torch work after the limit keeps it
            seen["limited"] = torch.get_num_threads()

        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert seen == {"fresh": 2, "limited": 1}
        assert torch.get_num_threads() == 2  # the calling thread (and the process setting) unchanged

        other: list[int] = []
        t = threading.Thread(target=lambda: other.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert other == [2]  # new threads still take the process-wide count
    finally:
        torch.set_num_threads(before)


def test_engine_compute_runs_on_the_worker_and_raises_its_errors() -> None:
    import pytest

    from proponent.service.engine import QueryEngine
    from proponent.service.metrics import Metrics

    engine = QueryEngine(1, 4, 5.0, Metrics())
    with pytest.raises(RuntimeError, match="not running"):
        engine.compute(lambda: 1)
    engine.start()
    try:
        assert engine.compute(lambda: threading.current_thread().name) == "query-worker-0"
        with pytest.raises(ZeroDivisionError):
            engine.compute(lambda: 1 / 0)
        assert engine.active == 0
    finally:
        engine.stop()


def test_two_query_workers_share_the_threads() -> None:
    """More than one query worker: each takes its share of the thread count (no oversubscribed pools)."""
    from proponent.service.engine import QueryEngine
    from proponent.service.metrics import Metrics

    before = torch.get_num_threads()
    try:
        set_threads(2)
        engine = QueryEngine(2, 4, 5.0, Metrics())
        engine.start()
        try:
            seen = {engine.compute(torch.get_num_threads) for _ in range(8)}
        finally:
            engine.stop()
        assert seen == {1}
        assert torch.get_num_threads() == 2
        one = QueryEngine(1, 4, 5.0, Metrics())
        one.start()
        try:
            assert one.compute(torch.get_num_threads) == 2  # one worker keeps the process's count
        finally:
            one.stop()
    finally:
        torch.set_num_threads(before)


_ARENAS_SCRIPT = """
import ctypes, sys, threading
from proponent.threads import limit_malloc_arenas
print(limit_malloc_arenas(int(sys.argv[1])), flush=True)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
hold, together = [], threading.Barrier(8)
def work():  # a new thread takes an arena of its own on its first malloc (up to the limit) and keeps it while alive
    hold.append(libc.malloc(4096))
    together.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
libc.malloc_stats()  # one "Arena i:" block per arena, on stderr
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_malloc_arenas_are_capped() -> None:
    """The server caps glibc's arenas (PROPONENT_MALLOC_ARENAS, default 2): eight threads share two arenas,
    where glibc's default gives them more."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}

    def arenas(n: int) -> tuple[str, int]:
        r = subprocess.run([sys.executable, "-c", _ARENAS_SCRIPT, str(n)], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip(), sum(1 for line in r.stderr.splitlines() if line.startswith("Arena "))

    applied, capped = arenas(2)
    assert applied == "True" and capped == 2
    applied, default = arenas(0)
    assert applied == "False" and default > 2
