"""Liveness, readiness and Prometheus metrics (open even when API keys are set)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proponent.api.schemas import ErrorBody, Health
from proponent.service.deps import StateDep
from proponent.service.errors import error_response

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness (always 200 while the process serves)")
def healthz(state: StateDep) -> Health:
    return Health(status="ok", index_loaded=state.ready)


@router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": ErrorBody, "description": "index not loaded yet"}},
    summary="Readiness (200 once the index is loaded)",
)
def readyz(state: StateDep) -> Response | Health:
    if state.damaged:
        return error_response(503, state.damaged, code="index_damaged")
    if not state.ready:
        return error_response(503, "the index is not loaded yet", code="not_ready", headers={"Retry-After": "1"})
    return Health(status="ready", index_loaded=True)


@router.get(
    "/metrics", summary="Prometheus metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}}
)
def metrics(state: StateDep) -> Response:
    if state.engine is not None:
        state.metrics.queue_depth.set(state.engine.depth)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
