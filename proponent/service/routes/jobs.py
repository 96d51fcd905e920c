"""Batch jobs: self-influence ranking of the training set."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Response
from fastapi.responses import PlainTextResponse

from proponent.api.schemas import JobInfo, JobResultPage, SelfInfluenceRequest
from proponent.query.selfinfluence import rows_to_csv
from proponent.service.deps import JobsDep
from proponent.service.errors import ApiError, error_responses
from proponent.service.jobs import JobError

router = APIRouter(tags=["jobs"])

JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="job id (32 hex characters)")]


def _guard(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except JobError as e:
        raise ApiError(e.status, e.message) from None


@router.post(
    "/jobs/self-influence",
    status_code=202,
    response_model=JobInfo,
    responses=error_responses(401, 422, 503),
    summary="Start a self-influence ranking job",
)
def start_self_influence(jobs: JobsDep, response: Response, body: SelfInfluenceRequest | None = None) -> Any:
    body = body or SelfInfluenceRequest()  # no body: a job with every default
    info = _guard(jobs.create, body.convention, body.checkpoints, body.m, body.seed, body.estimator, body.precondition)
    response.headers["Location"] = f"/v1/jobs/{info['id']}"
    return info


@router.get("/jobs", response_model=list[JobInfo], responses=error_responses(401))
def list_jobs(jobs: JobsDep) -> Any:
    return jobs.list_jobs()


@router.get("/jobs/{job_id}", response_model=JobInfo, responses=error_responses(401, 404, 422))
def get_job(job_id: JobId, jobs: JobsDep) -> Any:
    return _guard(jobs.get, job_id)


@router.delete("/jobs/{job_id}", response_model=JobInfo, responses=error_responses(401, 404, 409, 422))
def cancel_job(job_id: JobId, jobs: JobsDep) -> Any:
    return _guard(jobs.cancel, job_id)


@router.get(
    "/jobs/{job_id}/result",
    response_model=JobResultPage,
    responses={200: {"content": {"text/csv": {}}}, **error_responses(401, 404, 409, 422)},
    summary="Ranked rows of a finished job (JSON pages, or CSV)",
)
def job_result(
    job_id: JobId,
    jobs: JobsDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int | None, Query(ge=1, le=100_000, description="default 1000 (JSON) / all (CSV)")] = None,
    format: Literal["json", "csv"] = "json",
) -> Any:
    rows = _guard(jobs.result_rows, job_id)
    if format == "csv":
        page = rows[offset:] if limit is None else rows[offset : offset + limit]
        return PlainTextResponse(rows_to_csv(page), media_type="text/csv")
    limit = 1000 if limit is None else limit
    return {
        "job_id": job_id,
        "total": len(rows),
        "offset": offset,
        "limit": limit,
        "items": rows[offset : offset + limit],
    }
