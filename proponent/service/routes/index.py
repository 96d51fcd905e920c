"""Index metadata."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from proponent.client.schemas import IndexInfo
from proponent.query.crossloss import QUERY_OBJECTIVES
from proponent.query.index import InfluenceIndex
from proponent.service.deps import IndexDep, StateDep
from proponent.service.errors import error_responses

router = APIRouter(tags=["index"])


def build_index_info(index: InfluenceIndex, max_k: int) -> dict[str, Any]:
    man = index.manifest
    cks = []
    for c, spec in enumerate(index.checkpoints):
        cks.append(
            {
                "index": c,
                "lr": spec.lr,
                "batch_size": spec.batch_size,
                "steps_since_prev": spec.steps_since_prev,
                "step": spec.step,
                "epoch": spec.epoch,
                "sha256": spec.sha256,
                "weight_lr": spec.weight("lr", index.n),
                "weight_visits": spec.weight("visits", index.n),
            }
        )
    ds = man["dataset"]
    return {
        "n": index.n,
        "dim": index.dim,
        "shape": list(index.shape),
        "checkpoints": cks,
        "objective": man["objective"],
        "projection": man["projection"],
        "featurizer": man["featurizer"],
        "index_kind": man["index"]["kind"],
        "exact": bool(man["index"]["exact"]),
        "dataset_spec": ds["spec"],
        "dataset_fingerprint": ds["fingerprint"],
        "dataset_sources": ds["sources"],
        "has_labels": bool(ds.get("has_labels", False)),
        "device": str(index.device),
        "faiss_gpu": bool(index.faiss_on_gpu),
        "query_objectives": list(QUERY_OBJECTIVES),
        "max_k": max_k,
    }


@router.get("/index", response_model=IndexInfo, responses=error_responses(401, 503), summary="What this server serves")
def index_info(index: IndexDep, state: StateDep) -> Any:
    if state.index_info is None:
        state.index_info = build_index_info(index, state.settings.max_k)
    return state.index_info
