"""The index job's units of work on Ray: a pool of actors, each a :class:`~proponent.indexer.job.UnitWorker`.

``build_index(..., engine=ray_engine(...))`` (``proponent index --engine ray``) runs the same
phases as a local run -- plan, stage and finish on the driver -- and hands the pending units
``(checkpoint, unit)`` to this engine. Each actor opens the index once, loads each checkpoint's
model once (units are dispatched checkpoint-major, so an actor switches model at most once per
checkpoint) and builds one projector; it featurizes whole units and writes them, done flag
last, straight into the store (a local directory that every node sees, or an object store).

**Failures.** An actor that dies (its process killed, its node lost) is restarted by Ray and its
unfinished units are retried there (``max_restarts`` / ``max_task_retries``). A retried unit
rewrites all of its chunks and then its done flag; a unit's bytes depend only on (seed,
checkpoint, sample ids) and the recorded batch size, so the index is byte-identical to a
single-process run. An error raised by the unit itself (e.g. the object store refusing a write)
is not retried: it stops the run with that error's own message, and running the job again resumes.

Threads: each actor pins torch and FAISS to its share of the node's CPUs
(``PROPONENT_THREADS`` overrides), since they share the process.

Test hook: with ``PROPONENT_TEST_DIE_MARKER=PATH`` in the environment, the first actor that has
finished a unit and can create PATH writes its pid there and exits (``os._exit(1)``) in the middle
of its next unit -- a real worker death, once per run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from proponent.format.fsio import IndexDir, index_dir
from proponent.format.store import FeatureStore
from proponent.indexer.job import IndexJobError, UnitWorker
from proponent.progress import progress
from proponent.raycluster import RayClusterError, connect, forwarded_env
from proponent.threads import set_threads

DIE_MARKER_ENV = "PROPONENT_TEST_DIE_MARKER"
IN_FLIGHT_PER_WORKER = 2  # one running, one queued: no idle gap between units


class UnitActor:
    """One Ray worker: a :class:`UnitWorker` over the index at ``location`` (see the module docstring)."""

    def __init__(self, location: str, device: str, threads: int):
        set_threads(threads)
        self.worker = UnitWorker(index_dir(location), device)
        self.units_done = 0

    def run(self, c: int, u: int) -> tuple[int, int, int, float]:
        """Featurize and write unit ``u`` of checkpoint ``c``; ``(c, u, rows, seconds)``."""
        t0 = time.perf_counter()
        lo, hi = self.worker.store.unit_range(u)
        self.worker.run(c, u, self._maybe_die)
        self.units_done += 1
        return c, u, hi - lo, time.perf_counter() - t0

    def _maybe_die(self, rows: int) -> None:
        marker = os.environ.get(DIE_MARKER_ENV)
        if not marker or self.units_done < 1:
            return
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(1)  # mid-unit: its first batch featurized, nothing of it written yet


def _worker_count(workers: int | None, gpus_per_worker: float, n_units: int) -> int:
    res = ray.cluster_resources()
    if workers is None:
        if gpus_per_worker > 0:
            workers = int(res.get("GPU", 0) // gpus_per_worker)
            if workers < 1:
                raise IndexJobError(f"--gpus-per-worker {gpus_per_worker}: the Ray cluster has no GPUs")
        else:
            workers = max(1, int(res.get("CPU", 1)))
    return max(1, min(int(workers), n_units))


def run_units(
    where: IndexDir,
    units: list[tuple[int, int]],
    *,
    workers: int | None = None,
    gpus_per_worker: float = 0.0,
    device: str = "auto",
    threads: int | None = None,
    max_restarts: int = 3,
    show_progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> None:
    """Run ``units`` of the index at ``where`` on the connected Ray cluster (see the module docstring)."""
    if not units:
        return
    n = len(units)
    count = _worker_count(workers, gpus_per_worker, n)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    per_worker = threads or int(os.environ.get("PROPONENT_THREADS", 0)) or max(1, cpus // count)
    actor_device = "cuda" if gpus_per_worker > 0 else ("cpu" if device == "auto" else device)
    actor_cls: Any = ray.remote(UnitActor)
    options: dict[str, Any] = {
        # more workers than CPUs share them (fractional CPUs) instead of waiting forever to be scheduled
        "num_cpus": min(1.0, cpus / count) if gpus_per_worker <= 0 else 0,
        "num_gpus": gpus_per_worker,
        "max_restarts": max_restarts,
        "max_task_retries": max_restarts,
        "runtime_env": {"env_vars": forwarded_env()},
    }
    actors = [actor_cls.options(**options).remote(str(where.location), actor_device, per_worker) for _ in range(count)]
    if log:
        kind = f"{gpus_per_worker:g} GPU" if gpus_per_worker > 0 else "1 CPU"
        log(f"ray: {count} workers ({kind}, {per_worker} threads each) for {n} units")
    # rows per unit, for the progress bar

    layout = FeatureStore.open(where).layout
    total = sum(layout.unit_range(u)[1] - layout.unit_range(u)[0] for _, u in units)
    bar = progress(total=total, desc="index (ray)", unit="sample", enabled=show_progress)
    queue = list(units)  # checkpoint-major: each actor loads a checkpoint's model about once
    in_flight: dict[Any, int] = {}
    try:
        for i in range(min(len(actors) * IN_FLIGHT_PER_WORKER, len(queue))):
            a = i % len(actors)
            c, u = queue.pop(0)
            in_flight[actors[a].run.remote(c, u)] = a
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            ref = ready[0]
            a = in_flight.pop(ref)
            try:
                _, _, rows, _ = ray.get(ref)
            except RayTaskError as e:
                cause = e.cause if isinstance(e.cause, BaseException) else None
                if cause is not None:
                    raise cause from None
                raise IndexJobError(f"a unit failed on a Ray worker: {str(e).splitlines()[0]}") from None
            except RayActorError as e:
                raise IndexJobError(
                    f"a Ray worker died more than {max_restarts} times ({str(e).splitlines()[0]}); "
                    "run the index job again to resume"
                ) from None
            bar.update(rows)
            if queue:
                c, u = queue.pop(0)
                in_flight[actors[a].run.remote(c, u)] = a
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)


def ray_engine(
    address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float = 0.0,
    device: str = "auto",
    threads: int | None = None,
    show_progress: bool = True,
    max_restarts: int = 3,
    log: Callable[[str], None] | None = None,
) -> Callable[[IndexDir, list[tuple[int, int]]], None]:
    """An engine for :func:`~proponent.indexer.job.build_index`: the units run on Ray (joined or started here)."""

    def engine(where: IndexDir, units: list[tuple[int, int]]) -> None:
        try:
            started = connect(address, num_cpus=None if workers is None or gpus_per_worker > 0 else workers)
        except RayClusterError as e:
            raise IndexJobError(str(e)) from None
        try:
            run_units(
                where,
                units,
                workers=workers,
                gpus_per_worker=gpus_per_worker,
                device=device,
                threads=threads,
                max_restarts=max_restarts,
                show_progress=show_progress,
                log=log,
            )
        finally:
            if started:
                ray.shutdown()

    return engine
