"""Influential latent factors: I(x; z_j) per latent dimension (arXiv 1809.01804)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from proponent.analysis.factors import index_factors
from proponent.api.schemas import FactorsInfo

from ..deps import IndexDep, StateDep
from ..errors import ApiError, error_responses
from ..state import ServiceState

router = APIRouter(tags=["factors"])


def compute_factors(state: ServiceState) -> dict[str, Any]:
    with state.factors_lock:  # computed once; concurrent first requests wait for it
        if state.factors is None:
            assert state.index is not None
            state.factors = index_factors(state.index, max_rows=state.settings.factors_max_rows)
        return state.factors


@router.get(
    "/factors", response_model=FactorsInfo, responses=error_responses(401, 404), summary="Mutual information per latent"
)
async def factors(index: IndexDep, state: StateDep) -> Any:
    if index.meta.latent_mu is None:
        raise ApiError(404, "this index stores no latent posteriors (not a VAE index)")
    assert state.engine is not None
    return await state.engine.run(lambda: compute_factors(state), timeout=False)  # torch: on the engine's thread
