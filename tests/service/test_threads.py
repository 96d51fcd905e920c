"""Per-thread torch thread limits (proponent.threads): the server's job worker runs with one thread
of its own so that it starts no second OpenMP pool, while the rest of the process keeps its count."""

from __future__ import annotations

import threading

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
