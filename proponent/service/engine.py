"""The query engine: a bounded queue in front of worker thread(s).

Featurization (torch) and FAISS search block and release the GIL, so they do not belong on
the event loop. Each query is a callable put on a bounded queue; a worker thread runs it and
hands the result back to the waiting coroutine through an asyncio future. A full queue is
answered at once with 503 + Retry-After (back-pressure instead of unbounded latency), and so is a
query that the queue cannot finish in time: admission control estimates its wait from the queries
ahead of it and a running mean of how long queries take, and sheds it (503 + Retry-After) when
that exceeds ``request_timeout_s``, instead of admitting work that would end in 504. A query that
still does not finish within ``request_timeout_s`` is answered with 504 and skipped by the
workers if it has not started yet.

The workers are the server's torch threads: start-up, the factors route and the gradient work
of self-influence jobs (chunk by chunk, between queries) run here too, so that one thread's
OpenMP pool does the multithreaded work (see :mod:`proponent.threads`; more
than one worker splits the process's thread count between them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from proponent.service.errors import ApiError
from proponent.service.metrics import Metrics
from proponent.threads import limit_this_thread

log = logging.getLogger("proponent.engine")
T = TypeVar("T")


@dataclass
class _Task:
    fn: Callable[[], Any]
    settle: Callable[[Any, BaseException | None], None]  # hands the result (or error) to the waiter
    abandoned: threading.Event = field(default_factory=threading.Event)
    query: bool = False  # a query (its duration feeds the admission estimate)


def _async_settle(
    loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any]
) -> Callable[[Any, BaseException | None], None]:
    def settle(result: Any, error: BaseException | None) -> None:
        try:
            loop.call_soon_threadsafe(_settle, fut, result, error)
        except RuntimeError:  # event loop already closed (shutdown)
            log.debug("query finished after its event loop closed")

    return settle


class QueryEngine:
    def __init__(self, workers: int, queue_size: int, timeout_s: float, metrics: Metrics):
        self.workers = workers
        self.queue_size = queue_size
        self.timeout_s = timeout_s
        self.metrics = metrics
        self._q: queue.Queue[_Task | None] = queue.Queue(maxsize=queue_size)
        self._threads: list[threading.Thread] = []
        self._active = 0
        self._active_lock = threading.Lock()
        self.mean_s: float | None = None  # running mean of an answered query's time on a worker (admission control)

    def start(self) -> None:
        for i in range(self.workers):
            t = threading.Thread(target=self._work, name=f"query-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 30.0) -> None:
        """Let queued queries finish, then stop the workers."""
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    @property
    def depth(self) -> int:
        return self._q.qsize()

    @property
    def active(self) -> int:
        """Queries a worker has taken and not yet finished."""
        return self._active

    def _set_active(self, delta: int) -> None:
        with self._active_lock:
            self._active += delta
            self.metrics.in_flight.set(self._active)

    async def run(self, fn: Callable[[], Any], *, timeout: bool = True) -> Any:
        """Run ``fn`` on a worker; 503 when the queue is full, 504 after ``timeout_s`` (unless
        ``timeout=False``: work that may take long, such as the factors' first computation)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        task = _Task(fn, _async_settle(loop, fut), query=True)
        wait = self.expected_wait()
        # with nothing ahead a query is always admitted (so that one slow query cannot shut the queue for good)
        if timeout and wait is not None and wait > self.timeout_s and self.depth + self.active > 0:
            self.metrics.rejected.inc()
            retry = max(1, math.ceil(wait - self.timeout_s))
            raise ApiError(
                503,
                f"the query queue cannot finish this query within the {self.timeout_s:g} s timeout (expected "
                f"{wait:.1f} s: {self.depth + self.active} queries ahead, about {self.mean_s:.2f} s each); "
                f"retry in {retry} s",
                code="overloaded",
                headers={"Retry-After": str(retry)},
            )
        try:
            self._q.put_nowait(task)
        except queue.Full:
            self.metrics.rejected.inc()
            raise ApiError(
                503,
                f"query queue is full ({self.queue_size} waiting); retry later",
                code="overloaded",
                headers={"Retry-After": "1"},
            ) from None
        self.metrics.queue_depth.set(self._q.qsize())
        if not timeout:
            return await fut
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except asyncio.TimeoutError:
            task.abandoned.set()
            raise ApiError(504, f"query did not finish within {self.timeout_s:g}s", code="timeout") from None

    def expected_wait(self) -> float | None:
        """Seconds until a query submitted now would be answered: the queries ahead of it (queued and
        running) shared among the workers, plus its own time, at the running mean; None before any."""
        if self.mean_s is None:
            return None
        ahead = self.depth + self.active
        return (ahead / max(1, self.workers) + 1) * self.mean_s

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on a worker, waiting for room in the queue and for as long as it takes (start-up)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        await asyncio.to_thread(self._q.put, _Task(fn, _async_settle(loop, fut)))
        return await fut

    def compute(self, fn: Callable[[], T]) -> T:
        """From another thread (the job worker): run ``fn`` on a worker between queries and return its
        result (or raise its error). Blocks while the queue is full; queries wait at most one such call."""
        if not self._threads:
            raise RuntimeError("the query engine is not running")
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def settle(result: Any, error: BaseException | None) -> None:
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)

        self._q.put(_Task(fn, settle))
        return done.result()

    def _work(self) -> None:
        if self.workers > 1:  # one OpenMP pool per worker: share the cores instead of oversubscribing them
            limit_this_thread(max(1, torch.get_num_threads() // self.workers))
        while True:
            task = self._q.get()
            self.metrics.queue_depth.set(self._q.qsize())
            if task is None:
                return
            if task.abandoned.is_set():
                continue
            self._set_active(1)
            t0 = time.perf_counter()
            try:
                result, error = task.fn(), None
            except BaseException as e:  # handed to the waiting request, which maps it to a status
                result, error = None, e
            finally:
                self._set_active(-1)
            if task.query and error is None:  # a refused or failed query says nothing of a query's cost
                dt = time.perf_counter() - t0
                self.mean_s = dt if self.mean_s is None else 0.8 * self.mean_s + 0.2 * dt
            task.settle(result, error)


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
