"""An opened index: its metadata, its models, its served features, and the questions it answers.

:func:`open_index` reads and verifies the manifest and the index's files, then composes

* :class:`IndexMeta` -- the manifest and the per-row metadata (ids, labels, sources, latents,
  losses, exact norms), sample lookups, checkpoint weights, what an answer approximates;
* :class:`~proponent.model.runtime.ModelRuntime` -- the checkpoint models and projections that
  featurize queries exactly as the index job featurized the training set;
* :class:`~proponent.query.features.ServedFeatures` -- the features held (or streamed) within
  the memory budget, which the exact scan reads;

and :class:`InfluenceIndex` answers with :func:`proponent.query.usecase.answer`, the one query
path that the REST API, the CLI and the report use too.

An index on object storage (``s3://...``) is opened the same way. Memory modes read every feature
chunk at start-up; stream and quantized modes read chunks per query, through a local on-disk
:class:`~proponent.format.store.ChunkCache` (``cache_dir``, default ``$PROPONENT_CACHE_DIR`` or
``~/.cache/proponent``), so repeated queries do not download them again.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proponent import _moved
from proponent.api.schemas import InfluenceParams, InfluenceResponse
from proponent.format import ann, curvature, precond, whiten
from proponent.format.fsio import IndexDir, index_dir
from proponent.format.integrity import open_store, verify_contents, verify_index
from proponent.format.manifest import CheckpointSpec, Manifest, ManifestError, read_manifest
from proponent.format.store import ChunkCache, FeatureStore, StoreError
from proponent.model.runtime import ModelRuntime
from proponent.query.features import ServedFeatures, parse_size
from proponent.query.searcher import LocalSearcher, Searcher
from proponent.query.usecase import all_scores, answer, answer_batch

__all__ = ["IndexOpenError", "IndexMeta", "InfluenceIndex", "open_index", "verify_index"]


class IndexOpenError(RuntimeError):
    """The index cannot be served: names what is wrong."""


class IndexMeta:
    """The manifest and per-row metadata of an index (everything but features and models)."""

    def __init__(self, where: IndexDir, manifest: Manifest, store: FeatureStore):
        self.where = where
        self.manifest = manifest
        self.store = store
        self.n = manifest.n
        self.checkpoints: list[CheckpointSpec] = manifest.checkpoints
        self.ids = store.array("ids")
        self.labels = store.array("labels")
        self.origin = store.array("origin")
        self.source_row = store.array("source_row")
        self.injected = store.array("injected").astype(bool)
        self.source_specs = [s["spec"] for s in manifest.dataset.sources]
        self._row_of_id = {int(i): r for r, i in enumerate(self.ids)}
        # encoder posteriors at the final checkpoint, [N, L] (None without a latent space): pre-filter, factors
        self.latent_mu = store.array("latent_mu").astype(np.float32) if store.latent_dim else None
        self.latent_logvar = store.array("latent_logvar").astype(np.float32) if store.latent_dim else None
        self.loss = [store.loss(c) for c in range(len(self.checkpoints))]  # per checkpoint, [N]

    @property
    def has_labels(self) -> bool:
        return bool(self.manifest.dataset.has_labels) and bool((self.labels >= 0).any())

    def losses(self, c: int | None = None) -> np.ndarray:
        return self.loss[len(self.checkpoints) - 1 if c is None else c]

    def row_of(self, sample_id: int) -> int:
        try:
            return self._row_of_id[int(sample_id)]
        except KeyError:
            raise KeyError(
                f"sample id {sample_id} is not in the index (ids {int(self.ids.min())}..{int(self.ids.max())})"
            ) from None

    def label_of(self, row: int) -> int | None:
        v = int(self.labels[row])
        return v if v >= 0 else None

    def hit_meta(self, row: int) -> dict[str, Any]:
        return {
            "id": int(self.ids[row]),
            "label": self.label_of(row),
            "source": self.source_specs[int(self.origin[row])],
            "source_row": int(self.source_row[row]),
            "injected": bool(self.injected[row]),
        }

    def weights(self, convention: str = "lr") -> np.ndarray:
        return np.array(self.manifest.weights(convention), dtype=np.float64)

    def resolve_checkpoints(self, checkpoints: list[int] | None) -> list[int]:
        if checkpoints is None:
            return list(range(len(self.checkpoints)))
        bad = [c for c in checkpoints if not 0 <= c < len(self.checkpoints)]
        if bad:
            raise ValueError(f"unknown checkpoint(s) {bad}; the index has checkpoints 0..{len(self.checkpoints) - 1}")
        if not checkpoints:
            raise ValueError("checkpoint subset is empty")
        return sorted(set(checkpoints))

    def approximations(
        self,
        checkpoints: list[int],
        *,
        prefilter: int | None = None,
        ann_used: bool = False,
        precondition: str = "none",
    ) -> list[str]:
        """What separates an answer from exact VAE-TracIn over all parameters and checkpoints."""
        man = self.manifest
        proj = man.projection
        out = []
        if precondition == "gram" and man.precondition is not None:
            out.extend(precond.describe(man.precondition, checkpoints))
        if precondition in man.curvature:
            out.extend(curvature.describe(man, precondition, checkpoints))
        whitened = whiten.describe(man)
        if whitened:
            out.append(whitened)
        before = len(out)
        if proj.kind == "tensor" and any(l.tensor or l.projected_in for l in proj.layers):
            out.append(f"random projection: a tensor sketch per layer (D={proj.stage1_dim})")
        elif any(l.projected_in or l.projected_out for l in proj.layers):
            out.append(f"random projection: kron k={proj.k} per side (D={proj.stage1_dim})")
        if proj.sketch is not None:
            out.append(f"random sketch: {proj.sketch.kind} {proj.sketch.in_dim} -> {proj.sketch.out_dim}")
        if len(out) > before:  # the projection's lines
            out[-1] += ", an unbiased estimate of gradient inner products"
        if proj.selection != "all":
            out.append(f"layer subset: {proj.selection}")
        if man.storage.dtype != "float32":
            extra = " with a per-row scale" if man.storage.dtype == "int8" else ""
            out.append(f"features stored as {man.storage.dtype}{extra}")
        if man.assumed_metadata:
            out.append(
                f"checkpoint weights: {', '.join(man.assumed_metadata)} not recorded, taken as 1 (--uniform-weights)"
            )
        if len(checkpoints) < len(self.checkpoints):
            out.append(f"checkpoint subset: {checkpoints} of {len(self.checkpoints)}")
        if ann_used:
            out.append(f"approximate nearest-neighbour index: {man.ann.kind}")
        if prefilter:
            out.append(f"latent pre-filter: only the {prefilter} training samples nearest in latent space")
        warning = man.fidelity.warning() if man.fidelity is not None else None
        if warning:
            out.append(warning)
        return out


class InfluenceIndex:
    """An index opened for answering (see the module docstring)."""

    def __init__(
        self,
        location: str | Path | IndexDir,
        *,
        device: str = "auto",
        memory_budget: int | str | None = None,
        feature_mode: str = "auto",
        verify: bool = True,
        use_gpu_faiss: bool = True,
        load_ann: bool = True,
        cache_dir: str | Path | None = None,
        cache_bytes: int | str | None = None,
        rows: tuple[int, int] | None = None,
    ):
        self.where = index_dir(location)
        try:
            manifest = read_manifest(self.where)
        except ManifestError as e:
            raise IndexOpenError(str(e)) from None
        if verify:
            problems = verify_contents(self.where, manifest)
            if problems:
                raise IndexOpenError(f"{self.where}: index cannot be served: " + "; ".join(problems))
        try:
            store = open_store(self.where, manifest)
            self.meta = IndexMeta(self.where, manifest, store)
        except StoreError as e:
            raise IndexOpenError(str(e)) from None
        self.runtime = ModelRuntime(self.where, manifest, device)
        try:
            self.features = ServedFeatures(
                store,
                len(manifest.checkpoints),
                mode=feature_mode,
                budget_bytes=parse_size(memory_budget),
                device=self.runtime.device,
                rows=rows,
            )
        except StoreError as e:
            raise IndexOpenError(str(e)) from None
        if not self.where.is_local and self.features.mode in ("stream", "quantized"):
            # chunks are read per query (stream: all of them; quantized: the rescored rows'): keep them on disk
            store.cache = chunk_cache_for(self.where, manifest, cache_dir, cache_bytes)
        if self.features.mode != "stream":
            # every other byte of the store has been read (and checksum-checked) by now; the inputs are read
            # one sample at a time later, so check their chunks here too (checksums only)
            for idx in store.chunk_indices("inputs"):
                problem = store.chunk_problem("inputs", idx)
                if problem:
                    raise IndexOpenError(f"{self.where}: index cannot be served: {problem}")
        self.ann_indexes: list[Any] = []
        if manifest.ann.kind != "none" and load_ann:
            cpu = [ann.read(self.where, f.path) for f in manifest.ann.files]
            self.ann_indexes = [ann.to_gpu(i) if use_gpu_faiss else i for i in cpu]
        self.faiss_on_gpu = bool(self.ann_indexes) and use_gpu_faiss and ann.gpu_available()
        # where the rows are searched: here, or (sharded serving) replaced by a searcher that fans out
        offset = 0 if rows is None else rows[0]
        self.searcher: Searcher = LocalSearcher(self.features, self.ann_indexes, manifest.ann.kind, offset=offset)
        self._preconditioner: list[precond.CheckpointPreconditioner] | None = None
        self._curvature: dict[str, list[curvature.CheckpointCurvature]] = {}
        self._model64: dict[int, Any] = {}
        self.features.leverage_source = self.leverage

    def leverage(self, c: int, precondition: str) -> np.ndarray:
        """Every index row's leverage ``g_iᵀ P_c g_i`` at checkpoint c under a stored preconditioner (gram: of the
        stored features; kfac / ekfac: of the exact gradients); refused by name when there is none."""
        if precondition == "gram":
            return self.preconditioner()[c].leverage
        return self.curvature(precondition)[c].leverage

    def curvature(self, kind: str) -> list[curvature.CheckpointCurvature]:
        """The stored K-FAC / EK-FAC preconditioner (``kind``) of every checkpoint (read and checked on first use);
        :class:`~proponent.format.precond.PreconditionError` when there is none or it does not match."""
        if kind not in self._curvature:
            self._curvature[kind] = curvature.load(self.where, self.manifest, self.store, kind)
        return self._curvature[kind]

    def model64(self, c: int) -> Any:
        """A float64 copy of checkpoint c's model (exact per-layer gradients of K-FAC / EK-FAC queries)."""
        if c not in self._model64:
            from proponent.model.curvature import double_model  # lazy: only for K-FAC queries

            self._model64[c] = double_model(self.runtime.model(c))
        return self._model64[c]

    def preconditioner(self) -> list[precond.CheckpointPreconditioner]:
        """The stored Gram preconditioner of every checkpoint (read and checked on first use);
        :class:`~proponent.format.precond.PreconditionError` when there is none or it does not match."""
        if self._preconditioner is None:
            self._preconditioner = precond.load(self.where, self.manifest, self.store)
        return self._preconditioner

    @property
    def has_ann(self) -> bool:
        """Whether ANN search is available (the index has FAISS files and they were loaded)."""
        return bool(self.ann_indexes)

    # ------------------------------------------------------------------ shortcuts
    @property
    def manifest(self) -> Manifest:
        return self.meta.manifest

    @property
    def store(self) -> FeatureStore:
        return self.meta.store

    @property
    def n(self) -> int:
        return self.meta.n

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def shape(self) -> tuple[int, ...]:
        return self.manifest.shape

    @property
    def checkpoints(self) -> list[CheckpointSpec]:
        return self.meta.checkpoints

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def path(self) -> Path:
        return self.where.local_path()

    def row_of(self, sample_id: int) -> int:
        return self.meta.row_of(sample_id)

    def weights(self, convention: str = "lr") -> np.ndarray:
        return self.meta.weights(convention)

    def input(self, row: int) -> np.ndarray:
        """The exact training input of a row, as the index featurized it (float32, ``shape``)."""
        return self.store.inputs(np.array([row]))[0]

    def losses(self, c: int | None = None) -> np.ndarray:
        return self.meta.losses(c)

    # ------------------------------------------------------------------ answers
    def query(self, params: InfluenceParams | None = None, *, x: Any = None, sample_id: int | None = None, **kw: Any):
        """Answer one query (the REST API's request parameters, as keywords or an ``InfluenceParams``)."""
        p = params if params is not None else InfluenceParams(**kw)
        return answer(self, p, x=None if x is None else np.asarray(x, np.float32), sample_id=sample_id)

    def influence(self, x: Any = None, *, sample_id: int | None = None, **kw: Any) -> InfluenceResponse:
        """Proponents / opponents of an input ``x [*shape]`` or a stored sample (keywords as the API)."""
        return self.query(x=x, sample_id=sample_id, **kw)

    def influence_batch(
        self, xs: Any = None, *, sample_ids: list[int] | None = None, **kw: Any
    ) -> list[InfluenceResponse]:
        """Many queries with the same parameters (inputs ``xs [B, *shape]`` or ``sample_ids``): one pass over rows."""
        arrays = None if xs is None else [np.asarray(x, np.float32) for x in xs]
        return answer_batch(self, InfluenceParams(**kw), xs=arrays, sample_ids=sample_ids)

    def proponents(self, x: Any = None, **kw: Any) -> InfluenceResponse:
        return self.influence(x, direction="proponents", **kw)

    def opponents(self, x: Any = None, **kw: Any) -> InfluenceResponse:
        return self.influence(x, direction="opponents", **kw)

    def scores(self, x: Any = None, *, sample_id: int | None = None, **kw: Any) -> np.ndarray:
        """Every training row's exact score ``[N]`` for one query (brute force; analyses and tests)."""
        return all_scores(self, InfluenceParams(**kw), x=x, sample_id=sample_id)

    def self_influence(
        self, convention: str = "lr", checkpoints: list[int] | None = None, precondition: str = "none"
    ) -> np.ndarray:
        """Σ_c w_c ||g_c(x_i)||² from the exact (unprojected) norms, ``[N]`` (raw: see query.scoring); with
        ``precondition="gram"`` the leverage Σ_c w_c f_c(i)ᵀ P_c f_c(i) of the stored features (kfac / ekfac: of the
        exact gradients under the stored K-FAC / EK-FAC preconditioner)."""
        w = self.weights(convention)
        cks = self.meta.resolve_checkpoints(checkpoints)
        if precondition != "none":
            return np.sum([w[c] * self.leverage(c, precondition) for c in cks], axis=0)
        return np.sum([w[c] * self.features.sq_norm[c] for c in cks], axis=0)


def default_cache_dir() -> Path:
    return Path(os.environ.get("PROPONENT_CACHE_DIR") or Path.home() / ".cache" / "proponent")


def chunk_cache_for(
    where: IndexDir, manifest: Manifest, cache_dir: str | Path | None, cache_bytes: int | str | None
) -> ChunkCache:
    """The chunk cache of a remote index: one directory per index URL and manifest (a rebuild starts afresh)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    url_key = hashlib.sha256(where.url.encode()).hexdigest()[:16]
    size = parse_size(cache_bytes) if cache_bytes is not None else None
    return ChunkCache(root / "chunks" / url_key / manifest.checksum[:16], **({"max_bytes": size} if size else {}))


def open_index(
    path: str | Path | IndexDir,
    device: str = "auto",
    use_gpu_faiss: bool = True,
    *,
    memory_budget: int | str | None = None,
    feature_mode: str = "auto",
    load_ann: bool = True,
    cache_dir: str | Path | None = None,
    cache_bytes: int | str | None = None,
    rows: tuple[int, int] | None = None,
) -> InfluenceIndex:
    """Open the index at ``path`` for answering; ``rows=(lo, hi)`` serves only those rows' features (a shard:
    answers carry the index's row numbers)."""
    return InfluenceIndex(
        path,
        device=device,
        use_gpu_faiss=use_gpu_faiss,
        memory_budget=memory_budget,
        feature_mode=feature_mode,
        load_ann=load_ann,
        cache_dir=cache_dir,
        cache_bytes=cache_bytes,
        rows=rows,
    )


_RENAMED = {"IndexError_": "IndexOpenError"}  # old name -> new name, kept for one release


def __getattr__(name: str) -> object:
    return _moved.renamed(__name__, name, _RENAMED, globals())
