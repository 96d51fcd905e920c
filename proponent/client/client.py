"""Sync and async clients with one implementation of the API logic.

Every API call is written once, as an *operation*: a generator that yields
:class:`_Request` objects and receives the :class:`httpx.Response` for each, then returns
the parsed result. :class:`InfluenceClient` drives operations with ``httpx.Client`` and
:class:`AsyncInfluenceClient` with ``httpx.AsyncClient``; the public methods of both are
one-line wrappers. Retries (connection errors and 503 only, exponential backoff) live in the
two small ``_send`` drivers.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import sys
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx

from proponent.api.registry import PreconditionName
from proponent.api.schemas import (
    BatchInfluenceResponse,
    Convention,
    Direction,
    FactorsInfo,
    FeaturesMode,
    Health,
    IndexInfo,
    InfluenceParams,
    InfluenceResponse,
    JobInfo,
    JobResultPage,
    SampleInfo,
    Scoring,
    SearchMode,
    SelfInfluenceRow,
)
from proponent.client.errors import ConnectionFailed, ProponentError, error_from_response

T = TypeVar("T")
Op = Generator["_Request", httpx.Response, T]

__all__ = ["AsyncInfluenceClient", "AsyncJob", "InfluenceClient", "Job", "JobFailed"]

TERMINAL = ("succeeded", "failed", "cancelled")
_RETRY_EXC = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class JobFailed(ProponentError):
    """A job ended in state failed or cancelled."""

    def __init__(self, info: JobInfo):
        super().__init__(f"job {info.id} {info.state}: {info.error or 'no message'}")
        self.info = info


@dataclass
class _Request:
    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    files: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    content: bytes | None = None  # a raw body (with its content type in headers)
    headers: dict[str, str] | None = None


# ---------------------------------------------------------------------------------- helpers
def query_bytes(query: Any) -> tuple[str, bytes]:
    """(filename, bytes) of a query: a path, bytes, a numpy array (sent as .npy) or a PIL image."""
    if isinstance(query, (str, Path)):
        p = Path(query)
        return p.name, p.read_bytes()
    if isinstance(query, (bytes, bytearray, memoryview)):
        return "query", bytes(query)
    if hasattr(query, "__array_interface__") and hasattr(query, "dtype"):
        import numpy as np  # lazy: import proponent.client needs only httpx and pydantic

        buf = io.BytesIO()
        np.save(buf, np.asarray(query), allow_pickle=False)
        return "query.npy", buf.getvalue()
    if hasattr(query, "save") and hasattr(query, "mode"):  # PIL.Image.Image
        buf = io.BytesIO()
        query.save(buf, format="PNG")
        return "query.png", buf.getvalue()
    raise TypeError(f"query must be a path, bytes, a numpy array or a PIL image, not {type(query).__name__}")


def _params(arguments: dict[str, Any]) -> dict[str, Any]:
    """The query parameters among an ``influence`` method's arguments (``locals()``): every keyword but the
    query itself, None left out (the server's default; ``scoring=None`` is the server's default scoring)."""
    skip = {"self", "query", "sample_id"}
    return {k: (list(v) if k == "checkpoints" else v) for k, v in arguments.items() if k not in skip and v is not None}


def _json(resp: httpx.Response) -> Any:
    return resp.json()


# ---------------------------------------------------------------------------------- operations
def op_health() -> Op[Health]:
    r = yield _Request("GET", "/healthz")
    return Health.model_validate(_json(r))


def op_index_info() -> Op[IndexInfo]:
    r = yield _Request("GET", "/v1/index")
    return IndexInfo.model_validate(_json(r))


def _query_request(route: str, query: Any, sample_id: int | None, params: dict[str, Any]) -> _Request:
    """One query to ``route`` (``/v1/influence``, ``/v1/scores``): a stored sample (JSON body) or an upload
    (multipart, parameters as form fields)."""
    if (query is None) == (sample_id is None):
        raise ValueError("give exactly one of query or sample_id")
    if sample_id is not None:
        return _Request("POST", f"{route}/samples/{int(sample_id)}", json=params)
    name, data = query_bytes(query)
    form = {k: (json.dumps(v) if isinstance(v, (list, bool)) else str(v)) for k, v in params.items()}
    return _Request("POST", route, files={"file": (name, data, "application/octet-stream")}, data=form)


def op_influence(query: Any, sample_id: int | None, params: dict[str, Any]) -> Op[InfluenceResponse]:
    r = yield _query_request("/v1/influence", query, sample_id, params)
    return InfluenceResponse.model_validate(_json(r))


def _batch_params(**kw: Any) -> dict[str, Any]:
    """:meth:`InfluenceClient.influence`'s keywords (the API's query parameters) for a batch; None left out."""
    unknown = sorted(set(kw) - set(InfluenceParams.model_fields))
    if unknown:
        raise TypeError(f"influence_batch: unknown parameter(s) {', '.join(unknown)} (see InfluenceParams)")
    return _params(kw)


def op_influence_batch(queries: Any, sample_ids: Any, params: dict[str, Any]) -> Op[BatchInfluenceResponse]:
    """Many queries in one request: arrays (one .npy body ``[B, *shape]``, parameters in the query string) or
    stored sample ids (JSON)."""
    if (queries is None) == (sample_ids is None):
        raise ValueError("give exactly one of queries or sample_ids")
    if sample_ids is not None:
        r = yield _Request("POST", "/v1/influence/batch", json={**params, "sample_ids": [int(i) for i in sample_ids]})
    else:
        import numpy as np  # lazy: import proponent.client needs only httpx and pydantic

        arr = np.stack([np.asarray(q, np.float32) for q in queries]) if isinstance(queries, list) else queries
        buf = io.BytesIO()
        np.save(buf, np.asarray(arr, np.float32), allow_pickle=False)
        qs = {
            k: (
                ",".join(str(i) for i in v) if isinstance(v, list) else json.dumps(v) if isinstance(v, bool) else str(v)
            )
            for k, v in params.items()
        }
        r = yield _Request(
            "POST",
            "/v1/influence/batch",
            params=qs,
            content=buf.getvalue(),
            headers={"Content-Type": "application/octet-stream"},
        )
    return BatchInfluenceResponse.model_validate(_json(r))


def op_scores(query: Any, sample_id: int | None, params: dict[str, Any]) -> Op[Any]:
    """Every training sample's score: a numpy record array ``(id, score)`` from the server's ``.npy``."""
    import numpy as np  # lazy: import proponent.client needs only httpx and pydantic

    r = yield _query_request("/v1/scores", query, sample_id, params)
    return np.load(io.BytesIO(r.content), allow_pickle=False)


def op_sample(sample_id: int) -> Op[SampleInfo]:
    r = yield _Request("GET", f"/v1/samples/{int(sample_id)}")
    return SampleInfo.model_validate(_json(r))


def op_sample_image(sample_id: int, scale: int) -> Op[bytes]:
    r = yield _Request("GET", f"/v1/samples/{int(sample_id)}/image.png", params={"scale": scale})
    return r.content


def op_factors() -> Op[FactorsInfo]:
    r = yield _Request("GET", "/v1/factors")
    return FactorsInfo.model_validate(_json(r))


def op_start_self_influence(
    convention: str,
    checkpoints: list[int] | None,
    m: int | None,
    seed: int,
    estimator: str = "norm",
    precondition: str = "none",
) -> Op[JobInfo]:
    body = {
        "convention": convention,
        "checkpoints": checkpoints,
        "m": m,
        "seed": seed,
        "estimator": estimator,
        "precondition": precondition,
    }
    r = yield _Request("POST", "/v1/jobs/self-influence", json=body)
    return JobInfo.model_validate(_json(r))


def op_job(job_id: str) -> Op[JobInfo]:
    r = yield _Request("GET", f"/v1/jobs/{job_id}")
    return JobInfo.model_validate(_json(r))


def op_cancel_job(job_id: str) -> Op[JobInfo]:
    r = yield _Request("DELETE", f"/v1/jobs/{job_id}")
    return JobInfo.model_validate(_json(r))


def op_jobs() -> Op[list[JobInfo]]:
    r = yield _Request("GET", "/v1/jobs")
    return [JobInfo.model_validate(j) for j in _json(r)]


def op_job_result(job_id: str, fmt: str, page_size: int) -> Op[list[SelfInfluenceRow] | str]:
    if fmt == "csv":
        r = yield _Request("GET", f"/v1/jobs/{job_id}/result", params={"format": "csv"})
        return r.text
    if fmt != "json":
        raise ValueError(f"format must be 'json' or 'csv', got {fmt!r}")
    rows: list[SelfInfluenceRow] = []
    offset = 0
    while True:
        r = yield _Request("GET", f"/v1/jobs/{job_id}/result", params={"offset": offset, "limit": page_size})
        page = JobResultPage.model_validate(_json(r))
        rows.extend(page.items)
        offset += len(page.items)
        if not page.items or offset >= page.total:
            return rows


class _ProgressLine:
    """Job progress on the terminal: a tqdm bar when tqdm is installed, else one rewritten line."""

    def __init__(self, enabled: bool, desc: str):
        self.bar = None
        self.enabled = enabled
        self.desc = desc
        if enabled:
            try:
                from tqdm import tqdm  # lazy: import proponent.client needs only httpx and pydantic

                self.bar = tqdm(total=0, desc=desc, unit="chunk")
            except ImportError:
                self.bar = None

    def update(self, info: JobInfo) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.total = info.progress.total
            self.bar.n = info.progress.done
            self.bar.set_postfix_str(info.state)
            self.bar.refresh()
        else:
            sys.stderr.write(
                f"\r{self.desc}: {info.progress.done}/{info.progress.total} ({info.progress.fraction:.0%}) {info.state}"
            )
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


# ---------------------------------------------------------------------------------- shared base
class _Base:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.25,
        page_size: int = 1000,
        transport: Any = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.page_size = page_size
        self.transport = transport  # an httpx transport (tests, proxies); None = default

    def _delay(self, attempt: int, resp: httpx.Response | None) -> float:
        d = self.backoff * (2**attempt) * (1 + 0.25 * random.random())
        if resp is not None and resp.headers.get("retry-after"):
            try:
                d = max(d, float(resp.headers["retry-after"]))
            except ValueError:
                pass
        return min(d, 30.0)

    @staticmethod
    def _kwargs(req: _Request) -> dict[str, Any]:
        kw = {"params": req.params, "json": req.json, "files": req.files, "data": req.data}
        if req.content is not None:
            kw.update(content=req.content, headers=req.headers)
        return kw

    def _outcome(self, resp: httpx.Response, attempt: int) -> bool:
        """True when the response should be retried; raises the typed error for other failures."""
        if resp.status_code < 400:
            return False
        if resp.status_code == 503 and attempt < self.retries:
            return True
        raise error_from_response(resp.status_code, resp.content, resp.headers)

    def _connection_failed(self, e: Exception) -> ConnectionFailed:
        return ConnectionFailed(
            f"cannot reach {self.base_url} after {self.retries + 1} attempts: {type(e).__name__}: {e}"
        )


# ---------------------------------------------------------------------------------- sync
class InfluenceClient(_Base):
    """Synchronous client. ``with InfluenceClient(url) as c: c.proponents(image, k=10)``."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", **kw: Any):
        super().__init__(base_url, **kw)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=self.transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> InfluenceClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _send(self, req: _Request) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                resp = self._http.request(req.method, req.path, **self._kwargs(req))
            except _RETRY_EXC as e:
                if attempt >= self.retries:
                    raise self._connection_failed(e) from e
                time.sleep(self._delay(attempt, None))
                continue
            except httpx.TimeoutException as e:
                raise ProponentError(f"request to {req.path} timed out after {self.timeout}s") from e
            if not self._outcome(resp, attempt):
                return resp
            time.sleep(self._delay(attempt, resp))
        raise AssertionError("unreachable")

    def _run(self, op: Op[T]) -> T:
        try:
            req = next(op)
            while True:
                req = op.send(self._send(req))
        except StopIteration as stop:
            return stop.value

    def health(self) -> Health:
        return self._run(op_health())

    def index_info(self) -> IndexInfo:
        return self._run(op_index_info())

    def influence(
        self,
        query: Any = None,
        *,
        sample_id: int | None = None,
        k: int = 10,
        direction: Direction = "proponents",
        objective: str = "elbo",
        beta: float | None = None,
        label: int | None = None,
        checkpoints: list[int] | None = None,
        convention: Convention = "lr",
        seed: int = 0,
        allow_resize: bool = False,
        search: SearchMode = "auto",
        prefilter: int | None = None,
        scoring: Scoring | None = None,
        precondition: PreconditionName = "none",
        features: FeaturesMode = "recompute",
        uncertainty: bool = True,
        allow_partial: bool = False,
    ) -> InfluenceResponse:
        """Proponents / opponents of ``query`` (path, bytes, array, PIL image) or of ``sample_id``.

        The keywords are the API's query parameters, :class:`~proponent.api.schemas.InfluenceParams` (same
        names and defaults, checked by a test; docs/API.md); ``scoring=None`` uses the server's default.
        """
        p = _params(locals())
        return self._run(op_influence(query, sample_id, p))

    def influence_batch(
        self, queries: Any = None, *, sample_ids: list[int] | None = None, **params: Any
    ) -> BatchInfluenceResponse:
        """Many queries with the same parameters in one request: ``queries`` (an array ``[B, *shape]`` or a list of
        arrays) or stored ``sample_ids``; the keywords are :meth:`influence`'s. ``.results[i]`` answers query i."""
        return self._run(op_influence_batch(queries, sample_ids, _batch_params(**params)))

    def scores(
        self,
        query: Any = None,
        *,
        sample_id: int | None = None,
        objective: str = "elbo",
        beta: float | None = None,
        label: int | None = None,
        checkpoints: list[int] | None = None,
        convention: Convention = "lr",
        seed: int = 0,
        allow_resize: bool = False,
        scoring: Scoring | None = None,
        precondition: PreconditionName = "none",
        features: FeaturesMode = "recompute",
    ) -> Any:
        """Every training sample's score for ``query`` or ``sample_id``: a numpy record array of N rows
        ``(id int64, score float64)`` in row order (``r["score"]``, ``r["id"]``); same query path as ``influence``."""
        p = _params(locals())
        return self._run(op_scores(query, sample_id, p))

    def proponents(self, query: Any = None, **kw: Any) -> InfluenceResponse:
        """``influence(..., direction="proponents")``: hits in ``.proponents``."""
        return self.influence(query, direction="proponents", **kw)

    def opponents(self, query: Any = None, **kw: Any) -> InfluenceResponse:
        """``influence(..., direction="opponents")``: hits in ``.opponents``."""
        return self.influence(query, direction="opponents", **kw)

    def sample(self, sample_id: int) -> SampleInfo:
        return self._run(op_sample(sample_id))

    def sample_image(self, sample_id: int, scale: int = 1) -> bytes:
        return self._run(op_sample_image(sample_id, scale))

    def factors(self) -> FactorsInfo:
        return self._run(op_factors())

    def start_self_influence(
        self,
        convention: str = "lr",
        checkpoints: list[int] | None = None,
        m: int | None = None,
        seed: int = 0,
        estimator: Literal["norm", "unbiased"] = "norm",
        precondition: PreconditionName = "none",
    ) -> Job:
        return Job(self, self._run(op_start_self_influence(convention, checkpoints, m, seed, estimator, precondition)))

    def job(self, job_id: str) -> Job:
        return Job(self, self._run(op_job(job_id)))

    def jobs(self) -> list[Job]:
        return [Job(self, j) for j in self._run(op_jobs())]


class Job:
    """A server-side job. ``job.wait(progress=True).result()``."""

    def __init__(self, client: InfluenceClient, info: JobInfo):
        self.client = client
        self.info = info

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def state(self) -> str:
        return self.info.state

    def refresh(self) -> Job:
        self.info = self.client._run(op_job(self.id))
        return self

    def cancel(self) -> Job:
        self.info = self.client._run(op_cancel_job(self.id))
        return self

    def wait(self, progress: bool = False, timeout: float | None = None, poll: float = 0.2) -> Job:
        line = _ProgressLine(progress, f"job {self.id[:8]}")
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                self.refresh()
                line.update(self.info)
                if self.info.state in TERMINAL:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id} still {self.info.state} after {timeout}s")
                time.sleep(poll)
        finally:
            line.close()
        if self.info.state != "succeeded":
            raise JobFailed(self.info)
        return self

    def result(self, format: Literal["json", "csv"] = "json") -> Any:
        return self.client._run(op_job_result(self.id, format, self.client.page_size))

    def __repr__(self) -> str:
        return f"Job({self.id!r}, state={self.state!r})"


# ---------------------------------------------------------------------------------- async
class AsyncInfluenceClient(_Base):
    """The asynchronous twin of :class:`InfluenceClient` (same methods, awaitable)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", **kw: Any):
        super().__init__(base_url, **kw)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=self.transport
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncInfluenceClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _send(self, req: _Request) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                resp = await self._http.request(req.method, req.path, **self._kwargs(req))
            except _RETRY_EXC as e:
                if attempt >= self.retries:
                    raise self._connection_failed(e) from e
                await asyncio.sleep(self._delay(attempt, None))
                continue
            except httpx.TimeoutException as e:
                raise ProponentError(f"request to {req.path} timed out after {self.timeout}s") from e
            if not self._outcome(resp, attempt):
                return resp
            await asyncio.sleep(self._delay(attempt, resp))
        raise AssertionError("unreachable")

    async def _run(self, op: Op[T]) -> T:
        try:
            req = next(op)
            while True:
                req = op.send(await self._send(req))
        except StopIteration as stop:
            return stop.value

    async def health(self) -> Health:
        return await self._run(op_health())

    async def index_info(self) -> IndexInfo:
        return await self._run(op_index_info())

    async def influence(
        self,
        query: Any = None,
        *,
        sample_id: int | None = None,
        k: int = 10,
        direction: Direction = "proponents",
        objective: str = "elbo",
        beta: float | None = None,
        label: int | None = None,
        checkpoints: list[int] | None = None,
        convention: Convention = "lr",
        seed: int = 0,
        allow_resize: bool = False,
        search: SearchMode = "auto",
        prefilter: int | None = None,
        scoring: Scoring | None = None,
        precondition: PreconditionName = "none",
        features: FeaturesMode = "recompute",
        uncertainty: bool = True,
        allow_partial: bool = False,
    ) -> InfluenceResponse:
        """Proponents / opponents of ``query`` (path, bytes, array, PIL image) or of ``sample_id``.

        The keywords are the API's query parameters, :class:`~proponent.api.schemas.InfluenceParams` (same
        names and defaults, checked by a test; docs/API.md); ``scoring=None`` uses the server's default.
        """
        p = _params(locals())
        return await self._run(op_influence(query, sample_id, p))

    async def influence_batch(
        self, queries: Any = None, *, sample_ids: list[int] | None = None, **params: Any
    ) -> BatchInfluenceResponse:
        """Many queries with the same parameters in one request (see :meth:`InfluenceClient.influence_batch`)."""
        return await self._run(op_influence_batch(queries, sample_ids, _batch_params(**params)))

    async def scores(
        self,
        query: Any = None,
        *,
        sample_id: int | None = None,
        objective: str = "elbo",
        beta: float | None = None,
        label: int | None = None,
        checkpoints: list[int] | None = None,
        convention: Convention = "lr",
        seed: int = 0,
        allow_resize: bool = False,
        scoring: Scoring | None = None,
        precondition: PreconditionName = "none",
        features: FeaturesMode = "recompute",
    ) -> Any:
        """See :meth:`InfluenceClient.scores`."""
        p = _params(locals())
        return await self._run(op_scores(query, sample_id, p))

    async def proponents(self, query: Any = None, **kw: Any) -> InfluenceResponse:
        return await self.influence(query, direction="proponents", **kw)

    async def opponents(self, query: Any = None, **kw: Any) -> InfluenceResponse:
        return await self.influence(query, direction="opponents", **kw)

    async def sample(self, sample_id: int) -> SampleInfo:
        return await self._run(op_sample(sample_id))

    async def sample_image(self, sample_id: int, scale: int = 1) -> bytes:
        return await self._run(op_sample_image(sample_id, scale))

    async def factors(self) -> FactorsInfo:
        return await self._run(op_factors())

    async def start_self_influence(
        self,
        convention: str = "lr",
        checkpoints: list[int] | None = None,
        m: int | None = None,
        seed: int = 0,
        estimator: Literal["norm", "unbiased"] = "norm",
        precondition: PreconditionName = "none",
    ) -> AsyncJob:
        job = await self._run(op_start_self_influence(convention, checkpoints, m, seed, estimator, precondition))
        return AsyncJob(self, job)

    async def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, await self._run(op_job(job_id)))

    async def jobs(self) -> list[AsyncJob]:
        return [AsyncJob(self, j) for j in await self._run(op_jobs())]


class AsyncJob:
    """The asynchronous twin of :class:`Job`."""

    def __init__(self, client: AsyncInfluenceClient, info: JobInfo):
        self.client = client
        self.info = info

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def state(self) -> str:
        return self.info.state

    async def refresh(self) -> AsyncJob:
        self.info = await self.client._run(op_job(self.id))
        return self

    async def cancel(self) -> AsyncJob:
        self.info = await self.client._run(op_cancel_job(self.id))
        return self

    async def wait(self, progress: bool = False, timeout: float | None = None, poll: float = 0.2) -> AsyncJob:
        line = _ProgressLine(progress, f"job {self.id[:8]}")
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                await self.refresh()
                line.update(self.info)
                if self.info.state in TERMINAL:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id} still {self.info.state} after {timeout}s")
                await asyncio.sleep(poll)
        finally:
            line.close()
        if self.info.state != "succeeded":
            raise JobFailed(self.info)
        return self

    async def result(self, format: Literal["json", "csv"] = "json") -> Any:
        return await self.client._run(op_job_result(self.id, format, self.client.page_size))

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r}, state={self.state!r})"


__all__ += ["query_bytes"]
