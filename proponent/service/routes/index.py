"""Index metadata."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from proponent.api.registry import SCORINGS
from proponent.api.schemas import DEFAULT_SCORING, IndexInfo
from proponent.model.sketch import storage_bytes
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
    ds = man.dataset
    sizes = index.where.file_sizes("store.zarr")  # one listing (object storage: one request per 1000 files)
    features_bytes = sum(size for f, size in sizes.items() if "/features/" in f)
    return {
        "n": index.n,
        "dim": index.dim,
        "shape": list(index.shape),
        "checkpoints": cks,
        "objective": man.objective.model_dump(),
        "projection": man.projection.model_dump(exclude={"layers"}) | {"layers": len(man.projection.layers)},
        "featurizer": man.featurizer,
        "index_kind": man.ann.kind,
        "exact": not index.has_ann,
        "storage": {
            "dtype": man.storage.dtype,
            "bytes_per_sample_per_checkpoint": storage_bytes(index.dim, man.storage.dtype),
            "features_bytes": int(features_bytes),
            "input_encoding": man.storage.input_encoding,
        },
        "serving": index.features.describe(),
        "fidelity": None if man.fidelity is None else man.fidelity.model_dump() | {"warning": man.fidelity.warning()},
        "whiten": None
        if man.whiten is None
        else man.whiten.model_dump(exclude={"checkpoints"})
        | {"checkpoints": [ck.model_dump(exclude={"factors"}) for ck in man.whiten.checkpoints]},
        "dataset_spec": ds.spec,
        "dataset_fingerprint": ds.fingerprint,
        "dataset_sources": ds.sources,
        "has_labels": index.meta.has_labels,
        "device": str(index.device),
        "faiss_gpu": bool(index.faiss_on_gpu),
        "query_objectives": list(QUERY_OBJECTIVES),
        "scorings": list(SCORINGS),
        "default_scoring": DEFAULT_SCORING,
        # gram, kfac, ekfac only with a stored preconditioner (`proponent precondition [--kind]`)
        "preconditions": ["none"]
        + (["gram"] if man.precondition is not None else [])
        + [k for k in ("kfac", "ekfac", "adam") if k in man.curvature and man.projection.is_exact],
        "self_influence_preconditions": ["none"]
        + (["gram"] if man.precondition is not None else [])
        + [k for k in ("kfac", "ekfac", "adam") if k in man.curvature],
        "max_k": max_k,
    }


@router.get("/index", response_model=IndexInfo, responses=error_responses(401, 503), summary="What this server serves")
def index_info(index: IndexDep, state: StateDep) -> Any:
    if state.index_info is None:
        state.index_info = build_index_info(index, state.settings.max_k)
    describe_shards = getattr(index.searcher, "describe_shards", None)
    if callable(describe_shards):  # a sharded server: each shard's rows, mode and health, asked now
        return {**state.index_info, "shards": describe_shards()}
    return state.index_info
