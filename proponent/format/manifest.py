"""The index manifest: one typed record of everything an index holds, with its reader and writer.

``manifest.json`` is the only description of an index that the index job, the server,
``proponent verify`` and the benchmarks read; they all go through :func:`read_manifest`, which
refuses (with a message that says what to do) a file that is missing, damaged, of another format
version, or that does not validate. The manifest carries its own sha256 (``checksum``, computed
over the canonical JSON of every other field), so a flipped byte in it is detected too.

Format history: version 1 (proponent 0.1) stored Kronecker k=64 float32 features twice (Zarr and
flat FAISS files), 8-bit copies of the training inputs and no checksums. Version 2 stores the
features once (compact, chunk-checksummed), the exact training inputs, and hashes of every
other file. A version-1 index is refused with the command that rebuilds it; nothing is deleted.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .fsio import IndexDir, sha256_bytes

MANIFEST_VERSION = 2
MANIFEST_FILE = "manifest.json"
FORMAT_NAME = "proponent-index"

Convention = Literal["lr", "visits"]


class ManifestError(ValueError):
    """The manifest is missing, damaged, of another version, or invalid: the message says which."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CheckpointSpec(_Record):
    """A TracIn checkpoint and the training metadata its weight needs (docs/design.md §3)."""

    path: str
    lr: float
    batch_size: int
    steps_since_prev: int
    step: int = 0
    epoch: float = 0.0
    sha256: str = ""
    name: str = ""  # the file name it came from (display)

    def weight(self, convention: str, n_train: int) -> float:
        """TracIn checkpoint weight: ``lr`` (Pruthi et al.) or ``visits`` (VAE-TracIn code)."""
        if convention == "lr":
            return float(self.lr)
        if convention == "visits":
            return float(self.lr) * self.batch_size * self.steps_since_prev / n_train
        raise ValueError(f"weight convention must be 'lr' or 'visits', got {convention!r}")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointSpec:
        return cls.model_validate({k: v for k, v in d.items() if k in cls.model_fields})


class FileRecord(_Record):
    path: str
    sha256: str


class DatasetRecord(_Record):
    spec: str
    fingerprint: str
    shape: list[int]
    sources: list[dict[str, Any]]
    has_labels: bool
    num_classes: int | None = None


class PluginRecord(_Record):
    """A user's model code (``--model-code FILE.py:FACTORY``): loading it runs it."""

    code: str  # the file path (absolute) or module name
    factory: str
    sha256: str  # of the code file
    options: dict[str, Any] = Field(default_factory=dict)
    # every file of the model's code (absolute paths): the plugin file, each module it imports from outside
    # the standard library and site-packages, and every .py file under code_dir (--model-code-dir)
    files: list[FileRecord] = Field(default_factory=list)
    code_dir: str | None = None


class ModelRecord(_Record):
    kind: Literal["builtin", "plugin"]
    config: dict[str, Any] | None = None  # ModelConfig of a built-in model
    plugin: PluginRecord | None = None
    checkpoint_key: str | None = None  # key path of the state dict inside checkpoint files
    latent_dim: int = 0  # 0 for models without a latent space (classifiers)
    supervised: bool = False  # the objective needs labels (classifiers)


class ObjectiveRecord(_Record):
    name: str
    m: int
    seed: int = 0
    beta: float | None = None
    likelihood: str | None = None
    recon_weight: float = 1.0
    scale: float = 1.0


class LayerRecord(_Record):
    name: str
    kind: str
    params: list[str]
    in_dim: int
    out_dim: int
    k_in: int
    k_out: int
    offset: int
    projected_in: bool
    projected_out: bool
    # a bias that is its own block after the weight's (ConvTranspose2d: per output channel)
    bias_dim: int = 0
    k_bias: int = 0
    projected_bias: bool = False
    tensor: bool = False  # the block is a tensor sketch of the layer's gradient (k_in = its dimension, k_out = 1)


class SketchRecord(_Record):
    kind: str
    in_dim: int
    out_dim: int
    seed: int
    params: dict[str, Any] = Field(default_factory=dict)


class ProjectionRecord(_Record):
    kind: Literal["tensor", "kron", "none"]
    k: int
    seed: int
    selection: str = "all"  # which layers (all | encoder | decoder | last:K | prefixes)
    stage1_dim: int  # the per-layer (Kronecker) stage's dimension
    dim: int  # the stored feature dimension (after the sketch, if any)
    layers: list[LayerRecord]
    sketch: SketchRecord | None = None

    @property
    def is_exact(self) -> bool:
        return self.sketch is None and not any(
            l.projected_in or l.projected_out or l.projected_bias for l in self.layers
        )


class StorageRecord(_Record):
    dtype: Literal["float32", "float16", "int8"]
    chunk_rows: int  # rows per storage chunk of the feature arrays
    unit_rows: int  # rows per unit of work (a multiple of chunk_rows); one done flag each
    input_encoding: Literal["uint8/255", "float32"]  # how the exact training inputs are stored
    metadata: list[FileRecord] = Field(default_factory=list)  # zarr.json of the group and every array
    # the crc32c of every chunk by position (store.POSITIONS_FILE); None in indexes finished before it existed
    positions: FileRecord | None = None


class AnnRecord(_Record):
    kind: str = "none"  # none | ivf:NLIST[:NPROBE] | hnsw:M[:EF] | ivfsq8:NLIST[:NPROBE] | ivfpq:NLIST:M[:NPROBE]
    files: list[FileRecord] = Field(default_factory=list)


class FidelityCheck(_Record):
    """One checkpoint's agreement of the stored features with exact gradients (medians over the queries)."""

    checkpoint: int
    recall_proponents: float  # recall@top of the exact top proponents
    recall_opponents: float
    relative_error: float  # ||s_stored - s_exact|| / ||s_exact|| over the pool
    passed: bool


class FidelityRecord(_Record):
    """The index job's fidelity check (``proponent.indexer.fidelity``): ``queries`` rows of the index
    scored against ``pool`` others, stored features against exact per-sample gradients."""

    queries: int
    pool: int
    top: int
    bar_proponents: float
    bar_opponents: float
    checkpoints: list[FidelityCheck]

    @property
    def passed(self) -> bool:
        return all(ch.passed for ch in self.checkpoints)

    def warning(self) -> str | None:
        """One line when a checkpoint is below the bar, else None."""
        low = [ch for ch in self.checkpoints if not ch.passed]
        if not low:
            return None
        worst = min(low, key=lambda ch: (ch.recall_proponents, ch.recall_opponents))
        return (
            f"fidelity below the bar at {len(low)} of {len(self.checkpoints)} checkpoints: the stored features' "
            f"top-{self.top} agree with exact gradients at a median recall of {worst.recall_proponents:.2f} "
            f"proponents / {worst.recall_opponents:.2f} opponents (checkpoint {worst.checkpoint}; bar "
            f"{self.bar_proponents:.2f} / {self.bar_opponents:.2f}); a wider layout (--proj-dim) or "
            "--projection none agrees better"
        )


class PreconditionCheckpoint(_Record):
    """One checkpoint's stored Gram preconditioner (:mod:`proponent.format.precond`)."""

    lam: float  # λ_c = α · tr(C_c) / D
    trace: float  # tr(C_c)
    rank: int  # eigenpairs kept
    nonzero: int  # nonzero eigenvalues of C_c
    truncated: bool  # nonzero > rank: the other directions are taken as eigenvalue 0
    fingerprint: str  # sha256 of the crc32c of the features' (and scales') chunks it was made from
    vectors: FileRecord
    values: FileRecord
    leverage: FileRecord


class PreconditionRecord(_Record):
    """TRAK's Gram preconditioner (Φ_cᵀΦ_c + λ_c I)⁻¹ per checkpoint, made from the stored features by
    ``proponent precondition``; queries use it with ``precondition=gram``."""

    kind: Literal["gram"] = "gram"
    alpha: float
    max_rank: int
    seconds: float
    checkpoints: list[PreconditionCheckpoint]


class CurvatureCheckpoint(_Record):
    """One checkpoint's stored K-FAC / EK-FAC preconditioner (:mod:`proponent.format.curvature`)."""

    lams: list[float]  # λ_l = α · mean(Λ_l) per layer, in the projection's layer order
    norm_error: float  # largest relative difference of Σ_l ||G_l(i)||² from the index's stored exact norms
    fingerprint: str  # sha256 of the crc32c of the features' (and scales') chunks of the index it was made for
    factors: FileRecord  # npz: qa_<l>, qs_<l>, eig_<l> per layer (float64)
    leverage: FileRecord  # [N] float64: g_iᵀ P g_i of every row's exact gradient


class CurvatureRecord(_Record):
    """K-FAC / EK-FAC (kronfluence's) per layer and checkpoint, made from the index's models, inputs and draws by
    ``proponent precondition --kind kfac|ekfac``; queries use it with ``precondition=kfac|ekfac``."""

    kind: Literal["kfac", "ekfac", "adam"]
    alpha: float
    layers: list[str]
    seconds: float
    checkpoints: list[CurvatureCheckpoint]


class WhitenCheckpoint(_Record):
    """One checkpoint's index-time whitening (:mod:`proponent.format.whiten`)."""

    lams_out: list[float]  # damping of the output-side factor per layer (K-FAC: λ_S = α · mean eig S)
    lams_in: list[float]  # damping of the input-side factor per layer (K-FAC: λ_A = α · mean eig A)
    # damping of a separate bias block's factor per layer (ConvTranspose2d; 0 where none); empty: no such block
    lams_bias: list[float] = Field(default_factory=list)
    factors: FileRecord  # npz: left_<l> [out, out], right_<l> [in, in], bias_<l> [bias, bias] (float64) per layer


class WhitenRecord(_Record):
    """``proponent index --whiten kfac|adam``: every layer's gradient G stored as ``L G Rᵀ`` (then sketched), so
    the plain inner product of stored features is a preconditioned one (:mod:`proponent.format.whiten`)."""

    kind: Literal["kfac", "adam"]
    alpha: float
    layers: list[str]
    checkpoints: list[WhitenCheckpoint] = Field(default_factory=list)


class Manifest(_Record):
    format: Literal["proponent-index"] = "proponent-index"
    version: int = MANIFEST_VERSION
    complete: bool = False
    n: int
    dataset: DatasetRecord
    model: ModelRecord
    objective: ObjectiveRecord
    projection: ProjectionRecord
    featurizer: str
    batch_size: int
    storage: StorageRecord
    checkpoints: list[CheckpointSpec]
    ann: AnnRecord = Field(default_factory=AnnRecord)
    library_versions: dict[str, str] = Field(default_factory=dict)
    # training metadata no checkpoint file or flag gave, taken as 1 (`--uniform-weights`); every answer says so
    assumed_metadata: list[str] = Field(default_factory=list)
    seconds: float | None = None  # written by indexes built before timings.json; never now (bytes stay reproducible)
    # the job's fidelity check (None: an index finished before the check existed); its time is in timings.json
    fidelity: FidelityRecord | None = None
    # a stored preconditioner (None: none made; indexes from before it existed)
    precondition: PreconditionRecord | None = None
    # stored K-FAC / EK-FAC preconditioners by kind (empty: none made)
    curvature: dict[str, CurvatureRecord] = Field(default_factory=dict)
    # index-time whitening of the stored gradients (None: the plain gradients)
    whiten: WhitenRecord | None = None
    checksum: str = ""

    @property
    def dim(self) -> int:
        return self.projection.dim

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.dataset.shape)

    def weights(self, convention: str) -> list[float]:
        return [c.weight(convention, self.n) for c in self.checkpoints]

    def job_key(self) -> dict[str, Any]:
        """The settings that determine the stored bytes; a resume or a shard must match them all."""
        return {
            "n": self.n,
            "dataset_fingerprint": self.dataset.fingerprint,
            "model": self.model.model_dump(),
            "checkpoints": [c.sha256 for c in self.checkpoints],
            "checkpoint metadata": [
                (c.lr, c.batch_size, c.steps_since_prev, c.step, c.epoch) for c in self.checkpoints
            ],
            "assumed metadata": self.assumed_metadata,
            "objective": self.objective.model_dump(),
            "projection": self.projection.model_dump(),
            "featurizer": self.featurizer,
            "dtype": self.storage.dtype,
            "chunk_rows": self.storage.chunk_rows,
            "unit_rows": self.storage.unit_rows,
            "ann": self.ann.kind,
            "batch_size": self.batch_size,
            "whiten": None if self.whiten is None else (self.whiten.kind, self.whiten.alpha),
        }


def _canonical(body: dict[str, Any]) -> bytes:
    """What the checksum covers: every field but the checksum, as sorted compact JSON."""
    return json.dumps(
        {k: v for k, v in body.items() if k != "checksum"}, sort_keys=True, separators=(",", ":")
    ).encode()


def _render(body: dict[str, Any]) -> bytes:
    """The only bytes a manifest file with this content may have (as :func:`write_manifest` writes them)."""
    return (json.dumps(body, indent=2, ensure_ascii=False) + "\n").encode()


def write_manifest(where: IndexDir, manifest: Manifest) -> Manifest:
    """Write ``manifest.json`` atomically, with its checksum; returns the manifest as written."""
    body = manifest.model_dump(mode="json")
    if body.get("precondition") is None:  # an index without one writes the bytes it wrote before the field existed
        body.pop("precondition", None)
    if not body.get("curvature"):
        body.pop("curvature", None)
    if body.get("whiten") is None:
        body.pop("whiten", None)
    body["checksum"] = sha256_bytes(_canonical(body))
    where.write_bytes(MANIFEST_FILE, _render(body))
    return manifest.model_copy(update={"checksum": body["checksum"]})


def rebuild_hint(where: IndexDir) -> str:
    return (
        f"rebuild it with `proponent index --run RUN_DIR --out NEW_DIR` (or the --data/--checkpoints it was "
        f"built from); {where} is left untouched"
    )


def read_manifest(where: IndexDir) -> Manifest:
    """The validated manifest of the index at ``where``; :class:`ManifestError` names any problem."""
    path = where.describe(MANIFEST_FILE)
    if not where.is_file(MANIFEST_FILE):
        raise ManifestError(f"{path}: manifest missing (not an index directory?)")
    raw = where.read_bytes(MANIFEST_FILE)
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: damaged (not valid JSON: {e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
        raise ManifestError(f"{path}: not a proponent index manifest")
    version = obj.get("version")
    if version != MANIFEST_VERSION:
        if isinstance(version, int) and version < MANIFEST_VERSION:
            raise ManifestError(
                f"{path}: index format version {version} (proponent 0.1: float32 features stored twice, 8-bit "
                f"inputs, no checksums); this proponent reads version {MANIFEST_VERSION}: {rebuild_hint(where)}"
            )
        raise ManifestError(f"{path}: index format version {version!r}; this proponent reads {MANIFEST_VERSION}")
    # The checksum covers the file's own content (so fields added to the format later, with defaults, do
    # not invalidate older manifests), and the bytes must be exactly as written (a flipped space too).
    if obj.get("checksum") != sha256_bytes(_canonical(obj)):
        raise ManifestError(f"{path}: damaged (its checksum does not match its contents)")
    if raw != _render(obj):
        raise ManifestError(f"{path}: damaged (its bytes differ from the manifest as written)")
    try:
        return Manifest.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ManifestError(f"{path}: invalid ({loc}: {first['msg']})") from None
