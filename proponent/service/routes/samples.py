"""Stored training samples: metadata and image."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from starlette.concurrency import run_in_threadpool

from proponent.api.schemas import SampleInfo
from proponent.service.deps import IndexDep, SampleId, StateDep
from proponent.service.errors import ApiError, error_responses
from proponent.service.imaging import to_png

router = APIRouter(tags=["samples"])


def _row(index: Any, sample_id: int) -> int:
    try:
        return index.row_of(sample_id)
    except KeyError as e:
        raise ApiError(404, str(e.args[0])) from None


@router.get("/samples/{sample_id}", response_model=SampleInfo, responses=error_responses(401, 404, 422))
def sample(sample_id: SampleId, index: IndexDep, state: StateDep) -> Any:
    row = _row(index, sample_id)
    assert state.losses is not None and state.self_influence is not None
    mu = None if index.meta.latent_mu is None else [float(v) for v in index.meta.latent_mu[row]]
    return {
        **index.meta.hit_meta(row),
        "loss": float(state.losses[row]),
        "self_influence": float(state.self_influence[row]),
        "latent_mu": mu,
    }


@router.get(
    "/samples/{sample_id}/image.png",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "the stored image"},
        **error_responses(401, 404, 422),
    },
)
async def sample_image(
    sample_id: SampleId,
    index: IndexDep,
    scale: Annotated[int, Query(ge=1, le=16, description="nearest-neighbour upscale")] = 1,
) -> Response:
    row = _row(index, sample_id)
    png = await run_in_threadpool(lambda: to_png(index.input(row), scale))
    return Response(png, media_type="image/png")
