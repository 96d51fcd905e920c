"""Self-influence jobs: persisted, run in a background thread, resumed after a restart.

Layout under ``state_dir/jobs/<id>/``::

    job.json      the JobInfo (state, progress, params, times, error), rewritten atomically
    state/        the SelfInfluenceJob's resumable state (per-chunk partial sums)
    result.json   ranked rows (when succeeded)
    result.csv    the same rows as CSV (identical to ``proponent self-influence --out``)

Jobs run one at a time in submission order. On shutdown the running job stops between
chunks (its finished chunks are already on disk) and keeps state ``running``; on the next
start-up every queued or running job is queued again and resumes from its chunks.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proponent.format.fsio import atomic_write_bytes, atomic_write_json, read_json
from proponent.query.index import InfluenceIndex
from proponent.query.selfinfluence import SelfInfluenceJob, SelfInfluenceParams, ranking_rows, rows_to_csv
from proponent.service.metrics import Metrics
from proponent.threads import limit_this_thread

log = logging.getLogger("proponent.jobs")

JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
STATES = ("queued", "running", "succeeded", "failed", "cancelled")


class JobError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class JobManager:
    def __init__(
        self,
        index: InfluenceIndex,
        state_dir: Path,
        metrics: Metrics,
        compute: Callable[[Callable[[], Any]], Any] | None = None,
    ):
        self.index = index
        self.compute = compute  # runs a chunk's gradient work (the query engine's worker), or None: here
        self.root = Path(state_dir) / "jobs"
        self.metrics = metrics
        self._jobs: dict[str, dict[str, Any]] = {}
        self._cancel: set[str] = set()
        self._lock = threading.Lock()
        self._queue: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._result_cache: tuple[str, list[dict[str, Any]]] | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> list[str]:
        """Load persisted jobs, queue unfinished ones again, start the worker; returns resumed ids."""
        self.root.mkdir(parents=True, exist_ok=True)
        resumed = []
        for d in sorted(self.root.iterdir()):
            if not (JOB_ID_RE.match(d.name) and (d / "job.json").is_file()):
                continue
            try:
                info = read_json(d / "job.json")
            except (ValueError, FileNotFoundError) as e:
                log.warning("skipping unreadable job %s: %s", d.name, e)
                continue
            self._jobs[d.name] = info
        for info in sorted(self._jobs.values(), key=lambda j: j["created_at"]):
            if info["state"] in ("queued", "running"):
                info["state"] = "queued"
                self._persist(info)
                self._queue.put(info["id"])
                resumed.append(info["id"])
        self._update_gauge()
        self._thread = threading.Thread(target=self._work, name="job-worker", daemon=True)
        self._thread.start()
        if resumed:
            log.info("resuming %d unfinished job(s): %s", len(resumed), ", ".join(resumed))
        return resumed

    def request_stop(self) -> None:
        """Tell the running job to stop before its next chunk (returns at once; safe in a signal handler)."""
        self._stop.set()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop between chunks; progress is on disk and the job resumes at the next start."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ API
    def create(
        self,
        convention: str,
        checkpoints: list[int] | None,
        m: int | None,
        seed: int,
        estimator: str = "norm",
        precondition: str = "none",
    ) -> dict[str, Any]:
        params = SelfInfluenceParams(
            convention=convention,
            checkpoints=checkpoints,
            m=m,
            seed=seed,
            estimator=estimator,
            precondition=precondition,
        )
        job_id = uuid.uuid4().hex
        d = self.root / job_id
        try:
            sij = SelfInfluenceJob(self.index, params, d / "state")  # validates checkpoints, convention, m
        except ValueError as e:
            raise JobError(422, str(e)) from None
        total = sij.total_units
        info = {
            "id": job_id,
            "kind": "self-influence",
            "state": "queued",
            "progress": {"done": 0, "total": total, "fraction": 0.0},
            "params": {
                "convention": convention,
                "checkpoints": sij.cks,
                "m": params.m,
                "seed": seed,
                "estimator": estimator,
                "precondition": precondition,  # gram / kfac / ekfac: the leverage under the stored preconditioner
            },
            "created_at": time.time(),
            "started_at": None,
            "finished_at": None,
            "error": None,
        }
        d.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._jobs[job_id] = info
            self._persist(info)
        self._queue.put(job_id)
        self._update_gauge()
        return dict(info)

    def get(self, job_id: str) -> dict[str, Any]:
        if not JOB_ID_RE.match(job_id):
            raise JobError(404, f"job {job_id!r} not found (job ids are 32 hex characters)")
        with self._lock:
            info = self._jobs.get(job_id)
            if info is None:
                raise JobError(404, f"job {job_id} not found")
            return json.loads(json.dumps(info))

    def list_jobs(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(json.dumps(j)) for j in sorted(self._jobs.values(), key=lambda j: j["created_at"])]

    def cancel(self, job_id: str) -> dict[str, Any]:
        info = self.get(job_id)
        if info["state"] in ("succeeded", "failed", "cancelled"):
            raise JobError(409, f"job {job_id} already {info['state']}")
        with self._lock:
            self._cancel.add(job_id)
            if self._jobs[job_id]["state"] == "queued":
                self._finish(self._jobs[job_id], "cancelled")
        return self.get(job_id)

    def result_rows(self, job_id: str) -> list[dict[str, Any]]:
        info = self.get(job_id)
        if info["state"] != "succeeded":
            raise JobError(409, f"job {job_id} is {info['state']}; its result exists once it has succeeded")
        cache = self._result_cache
        if cache is not None and cache[0] == job_id:
            return cache[1]
        rows = read_json(self.root / job_id / "result.json")
        self._result_cache = (job_id, rows)
        return rows

    def result_csv_path(self, job_id: str) -> Path:
        self.result_rows(job_id)
        return self.root / job_id / "result.csv"

    # ------------------------------------------------------------------ worker
    def _persist(self, info: dict[str, Any]) -> None:
        atomic_write_json(self.root / info["id"] / "job.json", info)

    def _update_gauge(self) -> None:
        with self._lock:
            counts = dict.fromkeys(STATES, 0)
            for j in self._jobs.values():
                counts[j["state"]] = counts.get(j["state"], 0) + 1
        for s, n in counts.items():
            self.metrics.jobs.labels(state=s).set(n)

    def _finish(self, info: dict[str, Any], state: str, error: str | None = None) -> None:
        info["state"] = state
        info["finished_at"] = time.time()
        info["error"] = error
        self._persist(info)

    def _work(self) -> None:
        # one thread of its own for what runs here: an OpenMP pool would slow every query's small kernels
        # (proponent.threads); the gradient work goes to the engine (self.compute)
        limit_this_thread(1)
        while not self._stop.is_set():
            try:
                job_id = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            with self._lock:
                info = self._jobs.get(job_id)
                if info is None or info["state"] != "queued":
                    continue
                info["state"] = "running"
                info["started_at"] = info["started_at"] or time.time()
                self._persist(info)
            self._update_gauge()
            try:
                self._run(info)
            except Exception as e:  # a job failure is reported in the job, never kills the worker
                log.exception("job %s failed", job_id)
                with self._lock:
                    self._finish(info, "failed", f"{type(e).__name__}: {e}")
            self._update_gauge()

    def _run(self, info: dict[str, Any]) -> None:
        job_id = info["id"]
        d = self.root / job_id
        p = info["params"]
        sij = SelfInfluenceJob(
            self.index,
            SelfInfluenceParams(
                p["convention"],
                p["checkpoints"],
                p["m"],
                p["seed"],
                p.get("estimator", "norm"),
                p.get("precondition", "none"),
            ),
            d / "state",
        )
        done0 = sij.units_done()

        def on_progress(done: int, total: int) -> None:
            with self._lock:
                info["progress"] = {"done": done, "total": total, "fraction": done / total if total else 1.0}
                self._persist(info)

        on_progress(done0, sij.total_units)

        def should_stop() -> bool:  # called before each chunk
            return self._stop.is_set() or job_id in self._cancel

        # Chunks that recompute gradients take the index's featurize lock (shared models), as queries do,
        # and run on the query engine's worker, between queries (one OpenMP pool: proponent.threads).
        scores = sij.run(on_progress, should_stop, self.compute)
        if scores is None:
            with self._lock:
                if job_id in self._cancel:
                    self._finish(info, "cancelled")
                    shutil.rmtree(d / "state", ignore_errors=True)
                # else: shutting down; state stays "running" and resumes at the next start
            return
        rows = ranking_rows(self.index, scores)
        atomic_write_bytes(d / "result.csv", rows_to_csv(rows).encode())
        atomic_write_json(d / "result.json", rows)
        with self._lock:
            info["progress"] = {"done": sij.total_units, "total": sij.total_units, "fraction": 1.0}
            self._finish(info, "succeeded")
