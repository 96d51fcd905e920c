"""The wire format of the proponent API: the one definition, shared by the server and the client.

Pydantic v2 models only; the server uses them as response models (so /openapi.json documents
them) and the client parses every response with them.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from proponent.api.registry import PRECONDITIONS, SCORINGS, PreconditionName, ScoringName

Direction = Literal["proponents", "opponents", "both"]
Convention = Literal["lr", "visits"]
SearchMode = Literal["auto", "scan", "ann"]
FeaturesMode = Literal["recompute", "stored"]
Scoring = ScoringName  # the names are listed once, in proponent.api.registry
DEFAULT_SCORING: Scoring = cast(Scoring, SCORINGS.default)
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]

__all__ = [
    "BatchInfluenceResponse",
    "BatchTimings",
    "CheckpointInfo",
    "Convention",
    "Direction",
    "ErrorBody",
    "ErrorDetail",
    "FactorsInfo",
    "FeaturesMode",
    "Health",
    "Hit",
    "IndexInfo",
    "InfluenceParams",
    "InfluenceResponse",
    "JobInfo",
    "JobProgress",
    "JobResultPage",
    "JobState",
    "QueryInfo",
    "SampleInfo",
    "Scoring",
    "SearchMode",
    "SearchStats",
    "SelfInfluenceRequest",
    "SelfInfluenceRow",
    "Timings",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Health(_Model):
    status: str
    index_loaded: bool = False


class Hit(_Model):
    """One training sample in an influence answer."""

    rank: int = Field(0, description="1 = strongest")
    id: int
    score: float
    label: int | None
    source: str
    source_row: int
    injected: bool
    contributions: list[float] = Field(
        description="per-checkpoint terms of the score (raw: w_c<g_c(x), g_c(z)>), aligned with query.checkpoints"
    )
    stderr: float | None = Field(
        None, description="standard error of the score from the query's m draws (paper Theorem 1); null when m = 1"
    )
    separated_from_next: bool | None = Field(
        None,
        description="whether this hit's score exceeds the next hit's by at least two standard errors of the "
        "difference (null for the last hit or without draws)",
    )


class QueryInfo(_Model):
    seed: int = Field(description="query noise seed: the m draws of the query at checkpoint c come from (seed, c)")
    objective: str
    convention: Convention
    scoring: str = DEFAULT_SCORING
    precondition: str = Field("none", description="the preconditioner that answered (none | gram | kfac | ekfac)")
    checkpoints: list[int]
    shape: list[int]
    sample_id: int | None = None
    features: str = Field("recompute", description="recompute (fresh query draws) or stored (the index's features)")
    m: int = Field(1, description="draws per query gradient")


class SearchStats(_Model):
    strategy: str = Field(
        "scan",
        description="scan/<features mode>/<kernel> (one exact pass with a certificate), ann (FAISS, approximate) "
        "or prefilter (latent pre-filter, approximate)",
    )
    candidates: int = Field(description="rows rescored exactly at stored precision")
    exact: bool = True


class Timings(_Model):
    decode_ms: float
    featurize_ms: float
    search_ms: float
    total_ms: float


class InfluenceResponse(_Model):
    query: QueryInfo
    proponents: list[Hit] | None = None
    opponents: list[Hit] | None = None
    exact: bool = Field(description="true when the search is exact over the stored features (flat indexes)")
    approximations: list[str] = Field(
        default_factory=list,
        description="what separates this answer from exact VAE-TracIn over all parameters and checkpoints "
        "(random projection, layer subset, checkpoint subset, approximate index); empty = none",
    )
    search: dict[str, SearchStats] = Field(description="per direction")
    timings: Timings
    unresolved: dict[str, list[list[int]]] = Field(
        default_factory=dict,
        description="per direction, the pairs of adjacent ranks whose scores are not separated by two standard "
        "errors of their difference (their order is within the query's sampling noise)",
    )
    partial: bool = Field(False, description="true when some shards did not answer (only if allow_partial)")

    def ids(self, direction: str = "proponents") -> list[int]:
        hits = getattr(self, direction) or []
        return [h.id for h in hits]

    def scores(self, direction: str = "proponents") -> list[float]:
        hits = getattr(self, direction) or []
        return [h.score for h in hits]


class BatchTimings(_Model):
    total_ms: float = Field(description="the whole batch, decoding to the last answer")
    search_ms: float = Field(description="the batch's search: one pass over the rows for all its exact scans")
    queries_per_s: float


class BatchInfluenceResponse(_Model):
    """Answers to a batch of queries with the same parameters, in the order asked (each as its single answer)."""

    results: list[InfluenceResponse]
    timings: BatchTimings


class InfluenceParams(_Model):
    """Query parameters (JSON body fields, or form fields next to an uploaded file)."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(10, ge=1, description="number of hits per direction (1..max_k)")
    direction: Direction = "proponents"
    objective: str = Field(
        "elbo",
        max_length=64,
        description="query objective: elbo, reconstruction, kl, elbo_beta, ... (/v1/index query_objectives)",
        examples=["elbo", "reconstruction", "kl", "elbo_beta", "probe"],
    )
    beta: float | None = Field(None, ge=0, le=1e6, allow_inf_nan=False, description="β for elbo_beta")
    label: int | None = Field(None, ge=0, le=2**31 - 1, description="class label (objectives that need one)")
    checkpoints: list[int] | None = Field(None, max_length=4096, description="checkpoint subset (default: all)")
    convention: Convention = "lr"
    seed: int = Field(0, ge=0, le=2**63 - 1, description="query noise seed")
    allow_resize: bool = False
    prefilter: int | None = Field(
        None,
        ge=1,
        le=10**9,
        description="score only this many training samples nearest to the query in latent space "
        "(the paper's pre-filter; approximate, listed in approximations)",
    )
    scoring: Scoring = Field(
        DEFAULT_SCORING,
        description=SCORINGS.describe() + "; all exact over the stored features",
    )
    precondition: PreconditionName = Field(
        cast(PreconditionName, PRECONDITIONS.default),
        description=PRECONDITIONS.describe() + "; combined with every scoring",
    )
    features: FeaturesMode = Field(
        "recompute",
        description="stored-sample queries: recompute the query's gradient from the exact stored input with fresh "
        "query draws (as an upload of that input), or use the index's stored features of that sample",
    )
    uncertainty: bool = Field(True, description="standard errors per hit from the query's m draws")
    search: SearchMode = Field(
        "auto",
        description="auto: the exact scan, or the FAISS index when the index has one (approximate); "
        "scan: force the exact scan; ann: force the FAISS index",
    )
    allow_partial: bool = Field(
        False, description="sharded servers: answer from the shards that respond (flagged partial) instead of 503"
    )

    @field_validator("k", "beta", "label", "seed", "prefilter", "checkpoints", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, v: Any) -> Any:
        """``true`` is not the number 1 (JSON has both): a boolean where a number belongs is an error."""
        if isinstance(v, bool) or (isinstance(v, list) and any(isinstance(i, bool) for i in v)):
            raise PydanticCustomError("number_type", "must be a number, not a boolean")
        return v


class CheckpointInfo(_Model):
    index: int
    lr: float
    batch_size: int
    steps_since_prev: int
    step: int
    epoch: float
    sha256: str
    weight_lr: float
    weight_visits: float


class IndexInfo(_Model):
    n: int
    dim: int
    shape: list[int]
    checkpoints: list[CheckpointInfo]
    objective: dict[str, Any]
    projection: dict[str, Any]
    featurizer: str
    index_kind: str = Field(description="ANN index kind (none: exact scan only)")
    exact: bool = Field(description="whether default answers are exact over the stored features")
    storage: dict[str, Any] = Field(default_factory=dict, description="feature dtype, bytes per sample, sizes")
    serving: dict[str, Any] = Field(
        default_factory=dict, description="features mode (memory | quantized | stream), memory budget, resident bytes"
    )
    fidelity: dict[str, Any] | None = Field(
        None,
        description="the index job's fidelity check: per checkpoint, median recall@10 of the exact top-10 "
        "proponents/opponents and the relative score error of the stored features against exact gradients, "
        "the bar, and a warning when below it (null: an index built before the check existed)",
    )
    whiten: dict[str, Any] | None = Field(
        None,
        description="index-time whitening (proponent index --whiten): kind (kfac | adam), alpha and each checkpoint's "
        "per-layer dampings; stored features are L G Rᵀ per layer, so every score is a preconditioned inner product "
        "(null: the plain gradients)",
    )
    scorings: list[str] = Field(default_factory=lambda: list(SCORINGS))
    preconditions: list[str] = Field(
        default_factory=lambda: ["none"],
        description="the preconditioners this index's queries can answer with (gram: stored; kfac, ekfac: stored, "
        "on an index of exact gradients only)",
    )
    self_influence_preconditions: list[str] = Field(
        default_factory=lambda: ["none"],
        description="the preconditioned self-influence (leverage) a job can rank by: every stored one",
    )
    default_scoring: str = DEFAULT_SCORING
    shards: list[dict[str, Any]] = Field(default_factory=list, description="sharded serving: one entry per shard")
    dataset_spec: str
    dataset_fingerprint: str
    dataset_sources: list[dict[str, Any]]
    has_labels: bool
    device: str
    faiss_gpu: bool
    query_objectives: list[str]
    max_k: int


class SampleInfo(_Model):
    id: int
    label: int | None
    source: str
    source_row: int
    injected: bool
    loss: float
    self_influence: float = Field(description="Σ_c η_c ||g_c||² (lr convention, all checkpoints)")
    latent_mu: list[float] | None = None


class JobProgress(_Model):
    done: int
    total: int
    fraction: float


class JobInfo(_Model):
    id: str
    kind: str
    state: JobState
    progress: JobProgress
    params: dict[str, Any]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None


class SelfInfluenceRequest(_Model):
    model_config = ConfigDict(extra="forbid")

    convention: Convention = "lr"
    checkpoints: list[int] | None = Field(None, max_length=4096)
    m: int | None = Field(
        None, ge=1, le=256, description="recompute gradients with m fresh draws, 1..256 (default: stored norms)"
    )
    seed: int = Field(0, ge=0, le=2**63 - 1)
    precondition: PreconditionName = Field(
        "none",
        description="none: Σ_c w_c ||g_c||² (or recomputed, m); gram: the leverage Σ_c w_c f_cᵀ P_c f_c of the "
        "stored features under the stored Gram preconditioner; kfac / ekfac: the leverage Σ_c w_c g_cᵀ P_c g_c of "
        "the exact gradients under the stored K-FAC / EK-FAC preconditioner",
    )
    estimator: Literal["norm", "unbiased"] = Field(
        "norm",
        description="norm: ||mean gradient||² (the paper's code, biased up by tr(Var)/m); "
        "unbiased: <g, g'> over two independent sets of m draws (recomputes with the dense path)",
    )


class SelfInfluenceRow(_Model):
    rank: int
    id: int
    self_influence: float
    loss: float
    label: int | None
    source: str
    source_row: int
    injected: bool


class JobResultPage(_Model):
    job_id: str
    total: int
    offset: int
    limit: int
    items: list[SelfInfluenceRow]


class FactorsInfo(_Model):
    mi: list[float] = Field(description="I(x; z_j) per latent dimension, nats")
    influential: list[int]
    collapsed: list[int]
    threshold: float
    rows_used: int = 0


class ErrorDetail(_Model):
    status: int
    code: str
    message: str
    request_id: str | None = None


class ErrorBody(_Model):
    error: ErrorDetail
