"""Influential latent factors: I(x; z_j) per latent dimension (arXiv 1809.01804)."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from proponent.analysis.factors import classify_factors, latent_mutual_information
from proponent.client.schemas import FactorsInfo
from proponent.service.deps import IndexDep, StateDep
from proponent.service.errors import ApiError, error_responses
from proponent.service.state import ServiceState

router = APIRouter(tags=["factors"])


def compute_factors(state: ServiceState) -> dict[str, Any]:
    with state.factors_lock:  # computed once; concurrent first requests wait for it
        if state.factors is None:
            index = state.index
            assert index is not None
            mu = np.asarray(index.store.array("latent_mu"), np.float64)
            lv = np.asarray(index.store.array("latent_logvar"), np.float64)
            limit = state.settings.factors_max_rows
            if len(mu) > limit:  # the estimate is O(N²): a fixed random subsample keeps it fast
                rows = np.sort(np.random.default_rng(0).choice(len(mu), size=limit, replace=False))
                mu, lv = mu[rows], lv[rows]
            mi = latent_mutual_information(mu, lv)
            split = classify_factors(mi)
            state.factors = {
                "mi": [float(v) for v in mi],
                "influential": [int(v) for v in split.influential],
                "collapsed": [int(v) for v in split.collapsed],
                "threshold": float(split.threshold),
                "rows_used": len(mu),
            }
        return state.factors


@router.get(
    "/factors", response_model=FactorsInfo, responses=error_responses(401, 404), summary="Mutual information per latent"
)
async def factors(index: IndexDep, state: StateDep) -> Any:
    if "latent_mu" not in index.store.group or "latent_logvar" not in index.store.group:
        raise ApiError(404, "this index stores no latent posteriors (not a VAE index)")
    return await run_in_threadpool(compute_factors, state)
