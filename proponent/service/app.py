"""The app factory: ``create_app(settings) -> FastAPI``.

The lifespan opens and verifies the index once (a broken index stops start-up with a message
naming the problem), pins torch/FAISS threads, starts the query engine and the job manager
(resuming unfinished jobs), and on shutdown drains queued queries and stops the running job
between chunks so it resumes at the next start. uvicorn lets open requests finish before the
lifespan's shutdown runs; the running job is told to stop as soon as SIGTERM/SIGINT arrives
(not after that drain), so a long drain does not let it run on.

``create_app(settings, searcher_factory=...)`` is the router of a sharded server: the index is
opened without its features (stream mode, no ANN files: the router featurizes queries and reads
metadata), and ``index.searcher`` is replaced by the factory's searcher (a
:class:`~proponent.query.searcher.ShardedSearcher` that fans out to the shards).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proponent.format.store import StoreError
from proponent.query.index import InfluenceIndex, open_index
from proponent.query.searcher import Searcher
from proponent.service.deps import require_api_key
from proponent.service.engine import QueryEngine
from proponent.service.errors import BodyTooLarge, error_response, install_error_handlers, request_id_var
from proponent.service.jobs import JobManager
from proponent.service.metrics import Metrics
from proponent.service.routes import factors, health, index, influence, jobs, samples
from proponent.service.settings import Settings
from proponent.service.state import ServiceState
from proponent.threads import limit_malloc_arenas, set_threads

log = logging.getLogger("proponent.service")

#: The influence explorer (index.html, app.js, style.css), shipped as package data.
STATIC_DIR = Path(__file__).resolve().with_name("static")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get() or "-"
        return True


def _install_logging() -> None:
    if not any(isinstance(f, _RequestIdFilter) for f in log.filters):
        log.addFilter(_RequestIdFilter())
    for name in ("proponent.engine", "proponent.jobs"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _RequestIdFilter) for f in lg.filters):
            lg.addFilter(_RequestIdFilter())
    root = logging.getLogger("proponent")
    if not root.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
        h.addFilter(_RequestIdFilter())
        root.addHandler(h)
        root.setLevel(logging.INFO)
        root.propagate = False


def _json_error(
    status: int, message: str, rid: str, headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[Message, Message]:
    code = {413: "payload_too_large", 500: "internal_error"}.get(status, "error")
    body = json.dumps({"error": {"status": status, "code": code, "message": message, "request_id": rid}}).encode()
    hdrs = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    return (
        {"type": "http.response.start", "status": status, "headers": hdrs + (headers or [])},
        {"type": "http.response.body", "body": body},
    )


class _CORS(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered in the API's JSON error shape (Starlette's is plain
    text), its CORS headers kept."""

    def preflight_response(self, request_headers: Headers) -> Response:
        r = super().preflight_response(request_headers)
        if r.status_code != 400:
            return r
        keep = {k: v for k, v in r.headers.items() if k.lower() not in ("content-length", "content-type")}
        reason = bytes(r.body).decode(errors="replace")
        return error_response(400, f"CORS preflight refused: {reason}", code="cors_disallowed", headers=keep)


class RequestContextMiddleware:
    """Request id (echoed or generated), body-size limit while reading, metrics and access log."""

    def __init__(self, app: ASGIApp, metrics: Metrics, max_body: int):
        self.app = app
        self.metrics = metrics
        self.max_body = max_body

    @staticmethod
    def _route_label(scope: Scope) -> str:
        """The route template (e.g. /v1/samples/{sample_id}), so metrics do not grow per id.

        ``scope["route"].path`` is relative to an included router's prefix; the prefix is the
        part of the request path before as many segments as the template has.
        """
        route = scope.get("route")
        template = getattr(route, "path", None)
        if not template:
            # the static-file mount sets no route; one label for all its files
            return "/static/{path}" if str(scope.get("path", "")).startswith("/static/") else "<unmatched>"
        path_parts = str(scope.get("path", "")).rstrip("/").split("/")
        n = len(template.rstrip("/").split("/")) - 1
        prefix = "/".join(path_parts[: len(path_parts) - n]) if n else str(scope.get("path", "")).rstrip("/")
        return prefix + template if not template.startswith(prefix + "/") else template

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        rid = headers.get("x-request-id", "")[:128] or uuid.uuid4().hex
        token = request_id_var.set(rid)
        t0 = time.perf_counter()
        status = {"code": 500, "started": False}
        rid_header = (b"x-request-id", rid.encode("latin-1", "replace"))

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
                hs = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                message = {**message, "headers": [*hs, rid_header]}
            await send(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        try:
            cl = headers.get("content-length")
            if cl is not None and cl.isdigit() and int(cl) > self.max_body:
                # Refuse before reading any of the body.
                start, body = _json_error(
                    413, f"request body of {cl} bytes is larger than the limit of {self.max_body} bytes", rid
                )
                await send_wrapper(start)
                await send(body)
            else:
                try:
                    await self.app(scope, limited_receive, send_wrapper)
                except BodyTooLarge as e:
                    if status["started"]:
                        raise
                    start, body = _json_error(413, str(e.detail), rid)
                    await send_wrapper(start)
                    await send(body)
                except ClientDisconnect:
                    status["code"] = 499  # the client closed the connection: nobody to answer, not an error
                except Exception as e:
                    # A bug. Answer 500 here, inside the request's context (request id in the log line and
                    # the body), instead of letting it reach Starlette's outermost handler, which answers
                    # without the request id and re-raises to uvicorn (which then drops the connection).
                    if status["started"]:
                        raise
                    log.exception("unhandled error on %s %s", scope.get("method", ""), scope.get("path"))
                    start, body = _json_error(500, f"internal error ({type(e).__name__}); see the server log", rid)
                    await send_wrapper(start)
                    await send(body)
        finally:
            path = self._route_label(scope)
            method = scope.get("method", "")
            dt = time.perf_counter() - t0
            self.metrics.requests.labels(method, path, str(status["code"])).inc()
            self.metrics.latency.labels(method, path).observe(dt)
            log.info("%s %s -> %s in %.1f ms", method, scope.get("path"), status["code"], dt * 1e3)
            request_id_var.reset(token)


SearcherFactory = Callable[[InfluenceIndex], Searcher]


def _startup(state: ServiceState, searcher_factory: SearcherFactory | None = None) -> None:
    s = state.settings
    if s.index is None:
        raise RuntimeError("no index configured: set PROPONENT_INDEX (or `proponent serve --index DIR`)")
    # verifies the manifest and every file's hash; in memory modes reads (and checksums) every feature chunk
    idx = open_index(
        s.index,
        device=s.device,
        memory_budget=s.memory_budget,
        feature_mode="stream" if searcher_factory else s.feature_mode,  # a router holds no features
        load_ann=searcher_factory is None,
        cache_dir=s.cache_dir,
        cache_bytes=s.cache_bytes,
    )
    if searcher_factory is not None:
        idx.searcher = searcher_factory(idx)
    state.index = idx
    state.losses = idx.losses()
    state.self_influence = idx.self_influence("lr")
    state.index_info = index.build_index_info(idx, s.max_k)


class _RevalidatedStaticFiles(StaticFiles):
    """Static files that the browser revalidates (ETag / 304) instead of caching stale code after an upgrade."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def _install_ui(app: FastAPI) -> None:
    """The influence explorer: ``/`` (the page) and ``/static/...``, open (static files; the API calls it
    makes need the key when keys are set), left out of the OpenAPI schema."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def ui_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", _RevalidatedStaticFiles(directory=STATIC_DIR), name="static")


def _stop_jobs_on_signal(jobs: JobManager) -> Callable[[], None]:
    """Chain a handler in front of the server's SIGTERM/SIGINT handlers that tells the job manager to stop
    at its next chunk boundary, then calls the handler it replaced; returns the function that restores
    them. Signal handlers belong to the main thread: elsewhere (an in-process test client) nothing is
    installed and the job stops at the lifespan's shutdown as before."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous: dict[int, Any] = {}

    def handler(sig: int, frame: Any) -> None:
        jobs.request_stop()
        prev = previous.get(sig)
        if callable(prev):
            prev(sig, frame)
        elif prev == signal.SIG_DFL:  # no server handler: behave as the default would
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, prev in previous.items():
            if signal.getsignal(sig) is handler and prev is not None:
                signal.signal(sig, prev)

    return restore


def create_app(settings: Settings | None = None, searcher_factory: SearcherFactory | None = None) -> FastAPI:
    settings = settings or Settings()
    _install_logging()
    metrics = Metrics()
    state = ServiceState(settings=settings, metrics=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        set_threads(settings.threads)  # before the workers exist: each new thread takes the count on first use
        limit_malloc_arenas(settings.malloc_arenas)  # before the request and worker threads make arenas
        state.engine = QueryEngine(settings.query_workers, settings.queue_size, settings.request_timeout_s, metrics)
        state.engine.start()
        try:  # on the engine's worker: the torch thread of the server (proponent.threads)
            await state.engine.call(lambda: _startup(state, searcher_factory))
        except BaseException:
            await run_in_threadpool(state.engine.stop)
            raise
        assert state.index is not None
        state.jobs = JobManager(state.index, settings.state_dir, metrics, compute=state.engine.compute)
        state.jobs.start()
        restore_signals = _stop_jobs_on_signal(state.jobs)
        state.ready = True
        served = state.index.features.describe()
        log.info(
            "serving %s (N=%d, D=%d %s, %d checkpoints) on %s; features: %s mode, %.2f GiB resident of a %.2f GiB "
            "memory budget",
            settings.index,
            state.index.n,
            state.index.dim,
            served["stored_dtype"],
            len(state.index.checkpoints),
            state.index.device,
            served["mode"],
            int(served["resident_bytes"]) / 2**30,  # type: ignore[call-overload]
            int(served["budget_bytes"]) / 2**30,  # type: ignore[call-overload]
        )
        try:
            yield
        finally:
            state.ready = False
            await run_in_threadpool(state.jobs.stop)  # first: a job's chunk in progress runs on the engine
            await run_in_threadpool(state.engine.stop)
            restore_signals()
            log.info("stopped")

    app = FastAPI(
        title="proponent",
        version="0.1.0",
        summary="Which training samples are most responsible for this sample? (VAE-TracIn as a service)",
        lifespan=lifespan,
    )
    app.state.proponent = state
    install_error_handlers(app)

    @app.exception_handler(StoreError)
    async def _damaged(request: Request, exc: StoreError) -> Response:
        """Damaged index data found by any route that reads the store: named, and the server stops serving
        (the query routes answer index_damaged from now on, /readyz 503), as the query path does."""
        state.damaged = str(exc)
        state.ready = False
        log.error("index damaged: %s", exc)
        return error_response(500, str(exc), code="index_damaged")

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        """The client went away mid-request: not a server error (logged and counted as 499, nothing sent)."""
        return Response(status_code=499)

    app.include_router(health.router)
    _install_ui(app)
    for r in (index.router, influence.router, samples.router, jobs.router, factors.router):
        app.include_router(r, prefix="/v1", dependencies=[Depends(require_api_key)])
    if settings.cors_origins:
        app.add_middleware(
            _CORS,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Retry-After", "Location"],
        )
    app.add_middleware(RequestContextMiddleware, metrics=metrics, max_body=settings.max_upload_bytes)
    return app


def app_from_env() -> Any:
    """``uvicorn --factory service.app:app_from_env``."""
    return create_app()
