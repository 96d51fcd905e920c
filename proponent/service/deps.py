"""FastAPI dependencies (``Annotated``): settings, index, engine, jobs, API-key auth."""

from __future__ import annotations

import hmac
import json
import re
from typing import Annotated

from fastapi import Depends, Path, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from proponent.query.index import InfluenceIndex
from proponent.service.engine import QueryEngine
from proponent.service.errors import ApiError
from proponent.service.jobs import JobManager
from proponent.service.settings import Settings
from proponent.service.state import ServiceState


def get_state(request: Request) -> ServiceState:
    return request.app.state.proponent


StateDep = Annotated[ServiceState, Depends(get_state)]


def get_settings(state: StateDep) -> Settings:
    return state.settings


def get_index(state: StateDep) -> InfluenceIndex:
    if state.damaged:
        raise ApiError(500, state.damaged, code="index_damaged")
    if not state.ready or state.index is None:
        raise ApiError(503, "the index is not loaded yet", code="not_ready", headers={"Retry-After": "1"})
    return state.index


def get_engine(state: StateDep) -> QueryEngine:
    if state.engine is None:
        raise ApiError(503, "the query engine is not running", code="not_ready", headers={"Retry-After": "1"})
    return state.engine


def get_jobs(state: StateDep) -> JobManager:
    if state.jobs is None:
        raise ApiError(503, "the job manager is not running", code="not_ready", headers={"Retry-After": "1"})
    return state.jobs


SettingsDep = Annotated[Settings, Depends(get_settings)]
IndexDep = Annotated[InfluenceIndex, Depends(get_index)]
EngineDep = Annotated[QueryEngine, Depends(get_engine)]
JobsDep = Annotated[JobManager, Depends(get_jobs)]

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key (or Authorization: Bearer)")
_bearer = HTTPBearer(auto_error=False, description="API key as a bearer token")


def require_api_key(
    settings: SettingsDep,
    api_key: Annotated[str | None, Security(_api_key_header)] = None,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
) -> None:
    """Open when no keys are configured; else X-API-Key or a bearer token must match one key."""
    if not settings.api_keys:
        return
    given = api_key or (bearer.credentials if bearer else None)
    if not given:
        raise ApiError(
            401, "missing API key: send X-API-Key or Authorization: Bearer", headers={"WWW-Authenticate": "Bearer"}
        )
    ok = False
    for key in settings.api_keys:  # compare with every key: timing does not reveal which one matched
        ok |= hmac.compare_digest(given.encode(), key.encode())
    if not ok:
        raise ApiError(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})


_CANONICAL_ID = re.compile(r"(0|[1-9][0-9]{0,18})")


def canonical_sample_id(
    sample_id: Annotated[
        str, Path(description="training sample id: a non-negative integer without sign, spaces or leading zeros")
    ],
) -> int:
    """The path's sample id, only in its canonical form (``+1``, `` 1`` and ``003`` are not ids)."""
    if not _CANONICAL_ID.fullmatch(sample_id) or int(sample_id) > 2**63 - 1:
        raise ApiError(
            422,
            "sample_id: must be a non-negative integer without sign, spaces or leading zeros, "
            f"got {json.dumps(sample_id)}",
        )
    return int(sample_id)


SampleId = Annotated[int, Depends(canonical_sample_id)]
