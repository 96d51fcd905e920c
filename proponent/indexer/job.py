"""The offline index job: checkpoints + data -> a Zarr feature store, optional FAISS indexes, a manifest.

Phases (each a function, so that other engines -- Ray -- run the same code):

1. :func:`read_checkpoints` -- read every checkpoint once: content hash, state-dict check against
   the first, the first one's model kept for planning;
2. :func:`plan` -- the manifest: feature layout (the projection, built once), storage chunking,
   featurization batch; reconciled with an existing index (resume, or a clear refusal);
   :func:`preflight` -- the disk it needs against the free space;
3. :func:`stage` -- checkpoint copies (named by content hash), the manifest, the store's skeleton
   with the exact training inputs (built so that it appears whole: locally beside its name and
   renamed into place, on object storage in place and committed by a marker written last);
4. :func:`featurize_unit` -- the unit of work: one row block of one checkpoint, written with its
   done flag last; :func:`featurize_pending` runs the pending ones in this process;
5. :func:`finish` -- ANN indexes (when asked for), hashes of the store's metadata, ``complete``.

The job is resumable: every unit's features depend only on (seed, checkpoint, sample ids), so a
killed job run again with the same arguments redoes only unfinished units and writes the same
bytes as an uninterrupted run; shards (``--shard I/N``) and Ray workers write disjoint units.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import zarr
from torch import nn

from proponent.format import ann
from proponent.format import whiten as wfmt
from proponent.format.fsio import IndexDir, StorageError, index_dir, read_json, sha256_bytes
from proponent.format.integrity import verify_index
from proponent.format.manifest import (
    MANIFEST_FILE,
    AnnRecord,
    CheckpointSpec,
    DatasetRecord,
    FidelityRecord,
    FileRecord,
    Manifest,
    ManifestError,
    ModelRecord,
    ObjectiveRecord,
    ProjectionRecord,
    StorageRecord,
    WhitenRecord,
    read_manifest,
    write_manifest,
)
from proponent.format.store import (
    POSITIONS_FILE,
    STORE_DIR,
    FeatureStore,
    chunk_rows_for,
    ckpt_group,
    input_encoding,
    unit_rows_for,
)
from proponent.indexer import fidelity
from proponent.indexer.data import Dataset, load_dataset
from proponent.indexer.training import training_objective as builtin_objective
from proponent.model.architectures import ModelConfig
from proponent.model.checkpoints import CheckpointError, read_checkpoint, state_dict_at
from proponent.model.featurizers import make_featurizer
from proponent.model.featurizers.kronecker import KroneckerFeaturizer, auto_batch_size
from proponent.model.objectives import NOISE_INDEX, Objective, draw_noise
from proponent.model.plugin import load_plugin
from proponent.model.projection import (
    ProjectionSpec,
    Projector,
    build_projector,
    discover_layers,
    select_layers,
    spec_from_record,
)
from proponent.model.runtime import encode, model_from_checkpoint, objective_from_record, resolve_device
from proponent.model.sketch import allocate_tensor
from proponent.progress import progress

TIMINGS_FILE = "timings.json"  # how long the job took (informational; not covered by the manifest)
DEFAULT_DTYPE = "int8"  # measured: int8 with a per-row scale costs no recall (benchmarks/projection_fidelity.py)


class IndexJobError(RuntimeError):
    pass


@dataclass
class IndexOptions:
    m: int = 16
    seed: int = 0
    projection: ProjectionSpec = field(default_factory=ProjectionSpec)
    layers: str = "all"
    featurizer: str = "kron"
    dtype: str = DEFAULT_DTYPE
    index_kind: str = "none"  # ANN kind (ann.KINDS); none = the exact scan only
    batch_size: int | None = None
    device: str = "auto"
    chunk_rows: int | None = None
    unit_rows: int | None = None
    shard: tuple[int, int] | None = None  # (i, n): featurize only units u with u % n == i
    # weight-relevant metadata (lr / batch_size / steps) that was not known and is taken as 1 (--uniform-weights)
    assumed_metadata: tuple[str, ...] = ()
    whiten: str = "none"  # none | kfac | adam: store L G Rᵀ per layer (proponent.format.whiten)
    whiten_alpha: float = wfmt.DEFAULT_ALPHA


def checkpoints_from_run(run_dir: str | Path) -> tuple[list[CheckpointSpec], dict[str, Any]]:
    run_dir = Path(run_dir)
    run = read_json(run_dir / "run.json")
    specs = []
    for d in run["checkpoints"]:
        s = CheckpointSpec.from_dict(d)
        s.path = str(run_dir / s.path)
        specs.append(s)
    return specs, run


def checkpoints_from_runs(run_dirs: list[str | Path]) -> tuple[list[CheckpointSpec], dict[str, Any]]:
    """The checkpoints of several training runs of one model on one dataset (an ensemble), in run order.

    TracIn sums over checkpoints, so an index over the concatenated checkpoints scores every row with
    the sum of the runs' TracIn scores (R x their mean). The runs must share the model configuration and
    the training data; returns the specs and the first run's ``run.json``.
    """
    if not run_dirs:
        raise ValueError("give at least one run directory")
    specs: list[CheckpointSpec] = []
    first: dict[str, Any] | None = None
    for d in run_dirs:
        s, run = checkpoints_from_run(d)
        if first is None:
            first = run
        else:
            if run.get("model_config") != first.get("model_config"):
                raise ValueError(
                    f"run {d}: its model configuration differs from {run_dirs[0]}'s; an ensemble needs one model"
                )
            if run["data"]["fingerprint"] != first["data"]["fingerprint"]:
                raise ValueError(f"run {d}: trained on other data than {run_dirs[0]} (data fingerprints differ)")
        specs.extend(s)
    assert first is not None
    return specs, first


def library_versions() -> dict[str, str]:
    return {"torch": torch.__version__, "numpy": np.__version__, "zarr": zarr.__version__, "faiss": faiss.__version__}


# ---------------------------------------------------------------------------------- 1. checkpoints
@dataclass
class CheckpointSet:
    record: ModelRecord
    specs: list[CheckpointSpec]  # paths relative to the index: checkpoints/<sha256[:16]>.pt
    sources: list[str]  # where each was read from
    model0: nn.Module
    model_last: nn.Module  # the last checkpoint's (the same object as model0 for one checkpoint)


def builtin_record(config: ModelConfig, checkpoint_key: str | None = None) -> ModelRecord:
    return ModelRecord(
        kind="builtin",
        config=config.to_dict(),
        checkpoint_key=checkpoint_key,
        latent_dim=0 if config.kind == "classifier" else config.latent_dim,
        supervised=config.kind == "classifier",
    )


def read_checkpoints(
    specs: list[CheckpointSpec],
    model_config: ModelConfig | None = None,
    record: ModelRecord | None = None,
) -> CheckpointSet:
    """Hash every checkpoint and check its state dict against the first's; build the first's model."""
    if not specs:
        raise IndexJobError("no checkpoints given")
    out: list[CheckpointSpec] = []
    shapes0: dict[str, tuple[int, ...]] | None = None
    model0: nn.Module | None = None
    for spec in specs:
        data = Path(spec.path).read_bytes() if Path(spec.path).is_file() else None
        if data is None:
            raise CheckpointError(f"{spec.path}: checkpoint file not found")
        sha = sha256_bytes(data)
        if spec.sha256 and spec.sha256 != sha:
            raise CheckpointError(f"{spec.path}: sha256 {sha[:12]}… differs from the recorded {spec.sha256[:12]}…")
        raw = read_checkpoint(data, spec.path)
        if record is None:  # a built-in model: its config travels in proponent checkpoints
            if isinstance(raw, dict) and "model_config" in raw:
                cfg = ModelConfig.from_dict(raw["model_config"])
                if model_config is not None and cfg.to_dict() != model_config.to_dict():
                    raise CheckpointError(f"{spec.path}: model config differs from the one given")
            elif model_config is not None:
                cfg = model_config
            else:
                raise CheckpointError(f"{spec.path}: a bare state dict needs a model config (--model-config)")
            record = builtin_record(cfg)
        state = state_dict_at(raw, record.checkpoint_key, spec.path)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        if shapes0 is None:
            shapes0 = shapes
            model0 = model_from_checkpoint(record, data, spec.path)
        elif shapes != shapes0:
            raise CheckpointError(f"{spec.path}: its state dict differs from the first checkpoint's (keys or shapes)")
        out.append(
            spec.model_copy(update={"path": f"checkpoints/{sha[:16]}.pt", "sha256": sha, "name": Path(spec.path).name})
        )
    assert record is not None and model0 is not None
    model_last = model0
    if len(specs) > 1:
        model_last = model_from_checkpoint(record, Path(specs[-1].path).read_bytes(), specs[-1].path)
    return CheckpointSet(record, out, [s.path for s in specs], model0, model_last)


CALIBRATION_ROWS = 256


def calibrate_layer_dims(
    models: list[nn.Module],
    objective: Objective,
    data: Dataset,
    spec: ProjectionSpec,
    selection: str,
    device: torch.device,
    seed: int = 0,
    rows: int = CALIBRATION_ROWS,
    whitening: list[list[wfmt.Factors]] | None = None,
) -> tuple[int, ...]:
    """Per-layer tensor-sketch dimensions for ``spec.dim``: in proportion to each layer's share of the
    squared gradient norm (exact, from the featurizer's Gram identities), averaged over ``models``
    (the first and last checkpoints) on the first ``rows`` training samples; FFT-friendly sizes.

    ``whitening[i]``: ``models[i]``'s whitening factors (a whitened index): the shares are those of the
    whitened gradients ``L G Rᵀ`` that the sketch sees (K-FAC whitening moved the digits MLP's last layer
    from 93 % of the energy to 26 %, and the unwhitened allocation fell below the fidelity bar)."""
    layers = select_layers(discover_layers(models[0]), selection)
    n = min(rows, len(data.x))
    x = torch.from_numpy(data.x[:n])
    y = torch.from_numpy(np.clip(data.labels[:n], 0, None) if data.labels is not None else np.zeros(n, np.int64))
    share = np.zeros(len(layers))
    for c, model in enumerate(models):
        model = model.to(device)
        for p in model.parameters():
            p.requires_grad_(True)
        unit = Projector(layers, ProjectionSpec(kind="kron", k=1), device)
        if whitening is not None:
            unit.set_whitening(whitening[c])
        feat = KroneckerFeaturizer(model, objective, unit)
        energy = np.zeros(len(layers))
        for b0 in range(0, n, 64):
            b1 = min(n, b0 + 64)
            eps = draw_noise(NOISE_INDEX, seed, c, data.ids[b0:b1], objective.m, objective.noise_shape(model))
            feat.featurize(x[b0:b1], y[b0:b1], eps)
            energy += [float(feat.layer_sq[li.name].sum()) for li in layers]
        model.cpu()
        share += energy / max(energy.sum(), 1e-300)
    exact = [li.in_dim * li.out_dim for li in layers]
    return tuple(int(d) for d in allocate_tensor(list(share / len(models)), spec.dim, exact))


# ---------------------------------------------------------------------------------- 2. plan
def training_objective(record: ModelRecord, m: int) -> Objective:
    if record.kind == "plugin":
        assert record.plugin is not None
        return load_plugin(record.plugin).objective(m)

    assert record.config is not None
    return builtin_objective(ModelConfig.from_dict(record.config), m)


def _source_dict(s: Any) -> dict[str, Any]:
    d = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
    d["options"] = dict(d.get("options") or {})
    return json.loads(json.dumps(d, default=list))


def _default_batch(feat: Any, device: torch.device, shape: tuple[int, ...]) -> int:
    if feat.method == "kron":
        try:
            return int(auto_batch_size(feat.model, feat.objective, feat.projector, device, sample_shape=shape))
        except (RuntimeError, ValueError):
            return 256
    return 64


def plan(
    data: Dataset,
    cks: CheckpointSet,
    opts: IndexOptions,
    projector: Projector,
    objective: Objective,
    batch_size: int,
) -> Manifest:
    n = len(data.x)
    itemsize = np.dtype(opts.dtype).itemsize
    env_rows = os.environ.get("PROPONENT_CHUNK_ROWS")  # small units for tests and tiny data
    chunk_rows = opts.chunk_rows or (int(env_rows) if env_rows else None) or chunk_rows_for(projector.dim, itemsize)
    unit_rows = opts.unit_rows or (int(env_rows) if env_rows else None) or unit_rows_for(chunk_rows)
    unit_rows = chunk_rows * max(1, math.ceil(unit_rows / chunk_rows))

    return Manifest(
        n=n,
        dataset=DatasetRecord(
            spec="+".join(s.spec for s in data.sources),
            fingerprint=data.fingerprint,
            shape=list(data.shape),
            sources=[_source_dict(s) for s in data.sources],
            has_labels=data.labels is not None,
            num_classes=int(data.labels.max()) + 1 if data.labels is not None and len(data.labels) else None,
        ),
        model=cks.record,
        objective=ObjectiveRecord(**{**objective.spec(), "seed": opts.seed}),
        projection=ProjectionRecord(**projector.manifest(opts.layers)),
        featurizer=opts.featurizer,
        batch_size=max(1, min(int(batch_size), unit_rows)),
        storage=StorageRecord(
            dtype=opts.dtype,  # type: ignore[arg-type]
            chunk_rows=chunk_rows,
            unit_rows=unit_rows,
            input_encoding=input_encoding(data.x),  # type: ignore[arg-type]
        ),
        checkpoints=cks.specs,
        ann=AnnRecord(kind=ann.normalize_kind(opts.index_kind)),
        library_versions=library_versions(),
        assumed_metadata=sorted(opts.assumed_metadata),
        whiten=None
        if opts.whiten == "none"
        else WhitenRecord(
            kind=opts.whiten,  # type: ignore[arg-type]
            alpha=float(opts.whiten_alpha),
            layers=[b.info.name for b in projector.blocks],
        ),
    )


def estimate_bytes(man: Manifest, data: Dataset, checkpoint_bytes: int) -> dict[str, int]:
    """Disk the index will take: store, checkpoint copies, ANN files (bytes)."""
    n, d, c = man.n, man.dim, len(man.checkpoints)
    item = np.dtype(man.storage.dtype).itemsize
    per_row = 4 + 8 + 4 + 4 + (4 if man.storage.dtype == "int8" else 0)  # feat_norm, sq_norm, loss, crc slack, scale
    inputs = int(data.x[0].size if n else 0) * (1 if man.storage.input_encoding == "uint8/255" else 4)
    store = n * c * (d * item + per_row) + n * (inputs + 8 * 3 + 4 + 1 + 8 * man.model.latent_dim)
    name, nums = ann.parse_kind(man.ann.kind)
    ann_bytes = 0
    if name in ("ivf", "hnsw"):
        ann_bytes = n * c * d * 4 + (n * c * nums[0] * 8 if name == "hnsw" else 0)
    elif name == "ivfsq8":
        ann_bytes = n * c * (d + 8)
    elif name == "ivfpq":
        ann_bytes = n * c * (nums[1] + 8)
    return {"store": int(store * 1.02), "checkpoints": checkpoint_bytes, "ann": ann_bytes}


def preflight(where: IndexDir, need: dict[str, int], already: int = 0) -> None:
    free = where.free_bytes()
    total = sum(need.values()) - already
    if free is not None and total > free:
        parts = ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in need.items() if v)
        raise IndexJobError(
            f"{where}: the index needs about {total / 1e9:.2f} GB ({parts}) but only {free / 1e9:.2f} GB are free; "
            "free space, choose another --out, or a smaller layout (--dtype int8, a smaller --sketch-dim)"
        )


# ---------------------------------------------------------------------------------- 3. stage
def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_differences(old: Manifest, new: Manifest) -> str:
    """``key: old -> new`` for every setting of :meth:`Manifest.job_key` that differs (values shortened)."""
    a, b = old.job_key(), new.job_key()
    out: list[str] = []
    for k, v in b.items():
        if a.get(k) == v:
            continue
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            sub = [s for s in sorted(set(v) | set(a[k])) if a[k].get(s) != v.get(s)]
            out.extend(f"{k}.{s}: {_short(a[k].get(s))} -> {_short(v.get(s))}" for s in sub)
        elif isinstance(v, list) and isinstance(a.get(k), list) and len(v) == len(a[k]):
            out.extend(f"{k}[{i}]: {_short(x)} -> {_short(y)}" for i, (x, y) in enumerate(zip(a[k], v)) if x != y)
        else:
            out.append(f"{k}: {_short(a.get(k))} -> {_short(v)}")
    return "; ".join(out[:6]) + (f"; and {len(out) - 6} more" if len(out) > 6 else "")


def reconcile(where: IndexDir, man: Manifest, overwrite: bool, shard: tuple[int, int] | None) -> str:
    """``new``, ``resume`` or ``complete``, after checking what ``where`` holds."""
    if where.is_file(MANIFEST_FILE):
        try:
            old = read_manifest(where)
        except ManifestError as e:
            if overwrite:
                where.remove("")
                return "new"
            raise IndexJobError(f"{e}; use another --out or --overwrite") from None
        if overwrite:
            where.remove("")
            return "new"
        if old.job_key() != man.job_key():
            raise IndexJobError(
                f"{where} holds an index built with other settings ({describe_differences(old, man)}); "
                "use another --out, or --overwrite to rebuild it"
            )
        if old.complete:
            return "complete"
        return "resume" if where.is_committed(STORE_DIR) else "new"
    if shard is not None and where.exists(STORE_DIR):
        raise IndexJobError(f"{where}: store exists without a manifest; refusing to shard into it")
    if not where.is_empty():
        if not overwrite:
            raise IndexJobError(f"{where} exists and is not an index; use another --out or --overwrite")
        where.remove("")
    return "new"


def stage(
    where: IndexDir, man: Manifest, data: Dataset, cks: CheckpointSet, state: str, files: dict[str, bytes] | None = None
) -> Manifest:
    """Checkpoint copies, ``files`` (the whitening factors a new index's manifest names), the manifest
    (incomplete), and the store skeleton with the training inputs."""
    where.makedirs()
    for src, ck in zip(cks.sources, cks.specs, strict=True):
        if not where.is_file(ck.path) or where.sha256(ck.path) != ck.sha256:
            where.write_bytes(ck.path, Path(src).read_bytes())
    if state == "resume":
        return read_manifest(where)
    for rel, data_bytes in (files or {}).items():  # before the manifest that names them
        where.write_bytes(rel, data_bytes)
    man = write_manifest(where, man)
    # Built so that it appears whole (beside its name and renamed into place; on object storage in place,
    # committed by a marker written last): a kill during creation leaves no half-made store that a resume trusts.
    building = where.stage_dir(STORE_DIR)
    FeatureStore.create(
        where,
        building,
        dim=man.dim,
        n_checkpoints=len(man.checkpoints),
        dtype=man.storage.dtype,
        latent_dim=man.model.latent_dim,
        inputs=data.x,
        ids=data.ids,
        labels=data.labels,
        origin=data.origin,
        source_row=data.source_row,
        injected=data.injected,
        chunk_rows=man.storage.chunk_rows,
        unit_rows=man.storage.unit_rows,
    )
    where.commit_dir(building, STORE_DIR)
    return man


# ---------------------------------------------------------------------------------- 4. featurize
class UnitWorker:
    """Featurizes units of one index: loads each checkpoint's model once, reuses one projector."""

    def __init__(self, where: IndexDir, device: str = "auto"):
        self.where = where
        self.man = read_manifest(where)
        self.store = FeatureStore.open(where, mode="r+")
        self.device = resolve_device(device)
        self.objective = objective_from_record(self.man.objective, self.man.model)
        self._model: tuple[int, nn.Module] | None = None
        self._projector: Projector | None = None
        self._whitened: int | None = None  # the checkpoint whose whitening the projector holds

    def whitened_projector(self, c: int) -> Projector:
        """The projector, with checkpoint ``c``'s whitening when the index is whitened (checked files)."""
        proj = self.projector(self.model(c))
        if self.man.whiten is not None and self._whitened != c:
            mats = wfmt.load(self.where, self.man, c)
            assert mats is not None
            proj.set_whitening(mats)
            self._whitened = c
        return proj

    def model(self, c: int) -> nn.Module:
        if self._model is None or self._model[0] != c:
            ck = self.man.checkpoints[c]
            m = model_from_checkpoint(self.man.model, self.where.read_bytes(ck.path), self.where.describe(ck.path))
            m = m.to(self.device)
            for p in m.parameters():
                p.requires_grad_(True)
            self._model = (c, m)
        return self._model[1]

    def projector(self, model: nn.Module) -> Projector:
        if self._projector is None:
            proj = self.man.projection
            self._projector = build_projector(model, proj.selection, spec_from_record(proj), self.device)
        return self._projector

    def run(self, c: int, u: int, on_rows: Callable[[int], None] | None = None) -> None:
        """Featurize unit ``u`` of checkpoint ``c`` and write it (done flag last)."""
        man, store = self.man, self.store
        model = self.model(c)
        feat = make_featurizer(man.featurizer, model, self.objective, self.whitened_projector(c))
        noise_shape = self.objective.noise_shape(model)
        lo, hi = store.unit_range(u)
        ids = store.array("ids")[lo:hi]
        labels = np.clip(store.array("labels")[lo:hi], 0, None)
        x_unit = store.inputs(slice(lo, hi))
        last = c == len(man.checkpoints) - 1
        parts: dict[str, list[np.ndarray]] = {"f": [], "s": [], "l": [], "mu": [], "lv": []}
        for b0 in range(0, hi - lo, man.batch_size):
            b1 = min(hi - lo, b0 + man.batch_size)
            xb = torch.from_numpy(x_unit[b0:b1])
            yb = torch.from_numpy(labels[b0:b1])
            eps = draw_noise(NOISE_INDEX, man.objective.seed, c, ids[b0:b1], man.objective.m, noise_shape)
            fb = feat.features(xb, yb, eps)
            parts["f"].append(fb.features.cpu().numpy())
            parts["s"].append(fb.sq_norm.cpu().numpy())
            parts["l"].append(fb.loss.cpu().numpy())
            if last and store.latent_dim:
                with torch.no_grad():
                    mu, lv = encode(model, xb.to(self.device))
                parts["mu"].append(mu.cpu().numpy())
                parts["lv"].append(lv.cpu().numpy())
            if on_rows:
                on_rows(b1 - b0)
        latent = (np.concatenate(parts["mu"]), np.concatenate(parts["lv"])) if parts["mu"] else None
        try:
            store.write_unit(
                c, u, np.concatenate(parts["f"]), np.concatenate(parts["s"]), np.concatenate(parts["l"]), latent
            )
        except OSError as e:
            raise StorageError(
                e.errno or 0, f"{self.where}: writing unit {u} of checkpoint {c} failed ({e}); run again to resume"
            ) from None


def pending_units(where: IndexDir, shard: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """``(checkpoint, unit)`` pairs still to do (this shard's share), checkpoint-major."""
    store = FeatureStore.open(where)
    out = []
    for c in range(store.n_checkpoints):
        for u in store.pending_units(c):
            if shard is None or u % shard[1] == shard[0]:
                out.append((c, u))
    return out


def featurize_pending(
    where: IndexDir, units: Iterable[tuple[int, int]], device: str, show_progress: bool = True
) -> None:
    units = list(units)
    worker = UnitWorker(where, device)
    total = sum(min(worker.store.unit_range(u)[1], worker.store.n) - worker.store.unit_range(u)[0] for _, u in units)
    bar = progress(total=total, desc="index", unit="sample", enabled=show_progress)
    for c, u in units:
        worker.run(c, u, bar.update)
    bar.close()


# ---------------------------------------------------------------------------------- 5. finish
def measure_fidelity(where: IndexDir, device: str = "auto") -> tuple[FidelityRecord | str, list[float]]:
    """The fidelity check of a complete store (:mod:`proponent.indexer.fidelity`), every checkpoint, and the
    seconds it took at each (for timings.json: run-time figures stay out of the manifest); instead of the
    record, the reason when the exact gradients do not fit in the check's memory budget."""
    worker = UnitWorker(where, device)
    man, store = worker.man, FeatureStore.open(where)
    want, _ = fidelity.choose_rows(man.n, man.objective.seed)
    dim = fidelity.exact_dim(worker.model(0), man.projection.selection)
    sized = fidelity.plan(dim, len(want), fidelity.memory_budget())
    if isinstance(sized, str):
        return sized, []
    n_queries, chunk = sized
    queries, pool = fidelity.choose_rows(man.n, man.objective.seed, queries=n_queries)
    checks, seconds = [], []
    for c in range(len(man.checkpoints)):
        t0 = time.perf_counter()
        model = worker.model(c)
        checks.append(
            fidelity.check_checkpoint(man, store, c, model, worker.objective, worker.device, queries, pool, chunk)
        )
        seconds.append(round(time.perf_counter() - t0, 3))
    return fidelity.fidelity_record(checks, len(queries), len(pool)), seconds


def finish(where: IndexDir, t0: float | None = None, device: str = "auto", check_fidelity: bool = True) -> Manifest:
    """Build the ANN indexes (if any), measure the features' fidelity (``check_fidelity``), record the
    store's metadata hashes, mark the index complete."""
    man = read_manifest(where)
    store = FeatureStore.open(where)
    if not store.is_complete():
        raise IndexJobError(f"{where}: units are still pending; run the index job (or its shards) to the end")
    measured, fid_seconds = measure_fidelity(where, device) if check_fidelity else (None, [])
    fid = None if isinstance(measured, str) else measured
    files = []
    if man.ann.kind != "none":
        need = ann.train_rows_needed(man.ann.kind)
        for c in range(len(man.checkpoints)):
            rel = f"faiss/{ckpt_group(c)}.index"
            if not where.is_file(rel):
                rng = np.random.default_rng(man.objective.seed)
                rows = np.sort(rng.choice(man.n, size=min(man.n, max(need, 1), 50_000), replace=False))
                sample = store.feature_rows(c, rows).astype(np.float32)
                index = ann.build_index(man.ann.kind, man.dim, (ch for _, ch in store.iter_feature_chunks(c)), sample)
                ann.write(index, where, rel)
            files.append(FileRecord(path=rel, sha256=where.sha256(rel)))
    meta = [FileRecord(path=rel, sha256=where.sha256(rel)) for rel in store.metadata_files()]
    positions = store.position_map()
    where.write_bytes(POSITIONS_FILE, positions)
    man = man.model_copy(
        update={
            "ann": AnnRecord(kind=man.ann.kind, files=files),
            "storage": man.storage.model_copy(
                update={"metadata": meta, "positions": FileRecord(path=POSITIONS_FILE, sha256=sha256_bytes(positions))}
            ),
            "complete": True,
            "fidelity": fid,
        }
    )
    man = write_manifest(where, man)
    if t0 is not None:  # run-time figures stay out of the checksummed manifest: identical runs, identical bytes
        timings: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 3), "fidelity_seconds": fid_seconds}
        if isinstance(measured, str):
            timings["fidelity_skipped"] = measured
        where.write_bytes(TIMINGS_FILE, (json.dumps(timings) + "\n").encode())
    return man


# ---------------------------------------------------------------------------------- the job
def build_index(
    data: Dataset | str,
    checkpoints: list[CheckpointSpec],
    out: str | Path | IndexDir,
    options: IndexOptions | None = None,
    model_config: ModelConfig | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    model_record: ModelRecord | None = None,
    engine: Callable[[IndexDir, list[tuple[int, int]]], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Path | str:
    """Featurize ``data`` at every checkpoint into the index at ``out`` (see the module docstring).

    ``out`` is a local directory or an object-store URL (``s3://bucket/prefix``); the index's
    location is returned (a Path, or the URL). ``engine(where, units)`` runs the pending units
    elsewhere (e.g. on Ray: :func:`proponent.indexer.ray_engine.ray_engine`); by default here.
    """
    opts = options or IndexOptions()
    where = index_dir(out)
    if isinstance(data, str):
        data = load_dataset(data)
    if opts.m < 1:
        raise IndexJobError(f"m must be >= 1, got {opts.m}")
    if opts.shard is not None:
        si, sn = opts.shard
        if not (sn >= 1 and 0 <= si < sn):
            raise IndexJobError(f"shard must be i/n with 0 <= i < n, got {si}/{sn}")
    ann.parse_kind(opts.index_kind)
    if opts.whiten not in ("none", *wfmt.KINDS):
        raise IndexJobError(f"unknown whitening {opts.whiten!r}; choose from none, {', '.join(wfmt.KINDS)}")
    t0 = time.perf_counter()
    cks = read_checkpoints(checkpoints, model_config, model_record)
    model0 = cks.model0
    if cks.record.kind == "builtin":
        assert cks.record.config is not None
        if tuple(cks.record.config["input_shape"]) != tuple(data.shape):
            raise IndexJobError(
                f"model input shape {tuple(cks.record.config['input_shape'])} does not match data shape {data.shape}"
            )
    if cks.record.supervised and data.labels is None:
        raise IndexJobError("the model is a classifier: its index needs labelled data")
    objective = training_objective(cks.record, opts.m)
    check_model_on(model0, objective, data, cks.record)
    device = resolve_device(opts.device)
    proj_spec = opts.projection
    made = None  # whitening factors computed for the calibration (a new whitened index), reused by the job
    if proj_spec.kind == "tensor" and proj_spec.layer_dims is None:
        previous = None
        if where.is_file(MANIFEST_FILE) and not overwrite:
            try:
                previous = read_manifest(where).projection  # a resume reuses the calibrated dimensions
            except ManifestError:
                previous = None

        old = spec_from_record(previous) if previous is not None and previous.kind == "tensor" else None
        if (
            old is not None
            and previous is not None
            and (old.dim, old.seed, previous.selection)
            == (
                proj_spec.dim,
                proj_spec.seed,
                opts.layers,
            )
        ):
            proj_spec = dataclasses.replace(proj_spec, layer_dims=old.layer_dims)
        else:
            ends = [0, len(cks.sources) - 1] if cks.model_last is not model0 else [0]
            white = None
            if opts.whiten != "none":  # the factors first: the dimensions follow the whitened gradients' energy
                layers = select_layers(discover_layers(model0), opts.layers)
                made = whitening_factors(opts.whiten, opts.whiten_alpha, cks, objective, data, layers, opts.seed, log)
                white = [wfmt.decode(made[c][0], layers) for c in ends]
            dims = calibrate_layer_dims(
                [model0, cks.model_last] if len(ends) > 1 else [model0],
                objective,
                data,
                proj_spec,
                opts.layers,
                device,
                opts.seed,
                whitening=white,
            )
            proj_spec = dataclasses.replace(proj_spec, layer_dims=dims)
        opts = dataclasses.replace(opts, projection=proj_spec)
    projector = build_projector(model0, opts.layers, opts.projection)
    batch = opts.batch_size
    if batch is None and where.is_file(MANIFEST_FILE) and not overwrite:
        try:
            batch = read_manifest(where).batch_size  # resume with the batch the index was started with
        except ManifestError:
            batch = None
    if batch is None:
        m_dev = model0.to(device)
        feat = make_featurizer(
            opts.featurizer, m_dev, objective, build_projector(m_dev, opts.layers, opts.projection, device)
        )
        batch = _default_batch(feat, device, tuple(data.shape))
        model0.cpu()
    man = plan(data, cks, opts, projector, objective, batch)
    if log:
        log(describe_layout(man, model0, objective, projector, data))
    state = reconcile(where, man, overwrite, opts.shard)
    if state == "complete":
        return where.location
    whiten_files: dict[str, bytes] = {}
    if state == "new" and man.whiten is not None:
        man, whiten_files = whitening(man, cks, objective, data, [b.info for b in projector.blocks], log, made)
    ck_bytes = sum(Path(p).stat().st_size for p in cks.sources)
    known_free = where.free_bytes() is not None  # object storage: unknown, the preflight skips
    already = sum(where.file_sizes(STORE_DIR).values()) if state != "new" and known_free else 0
    preflight(where, estimate_bytes(man, data, ck_bytes if state == "new" else 0), already)
    stage(where, man, data, cks, state, whiten_files)
    units = pending_units(where, opts.shard)
    if units:
        if engine is not None:
            engine(where, units)
        else:
            featurize_pending(where, units, opts.device, show_progress)
    if not FeatureStore.open(where).is_complete():
        return where.location  # a shard finished its part; the run that finds every unit done finishes
    man = finish(where, t0, opts.device)
    if log:
        timings = json.loads(where.read_bytes(TIMINGS_FILE)) if where.is_file(TIMINGS_FILE) else {}
        log(describe_fidelity(man, timings.get("fidelity_seconds"), timings.get("fidelity_skipped")))
        problems = verify_index(where)
        log("verified: OK" if not problems else "verify: " + "; ".join(problems))
    return where.location


def whitening_factors(
    kind: str,
    alpha: float,
    cks: CheckpointSet,
    objective: Objective,
    data: Dataset,
    layers: list,
    seed: int,
    log: Callable[[str], None] | None = None,
) -> list[tuple[bytes, list[float], list[float], list[float]]]:
    """Every checkpoint's whitening factors file and dampings (:func:`proponent.indexer.whiten.compute`)."""
    from proponent.indexer import whiten as wjob  # lazy: only whitened indexes make factors

    raws = [(Path(src).read_bytes(), f"checkpoint {c} ({src})") for c, src in enumerate(cks.sources)]
    models = [model_from_checkpoint(cks.record, raw, name) for raw, name in raws]
    try:
        return wjob.compute(kind, alpha, models, raws, objective, layers, data, seed, log)
    except wfmt.WhitenError as e:
        raise IndexJobError(str(e)) from None


def whitening(
    man: Manifest,
    cks: CheckpointSet,
    objective: Objective,
    data: Dataset,
    layers: list,
    log: Callable[[str], None] | None = None,
    made: list[tuple[bytes, list[float], list[float], list[float]]] | None = None,
) -> tuple[Manifest, dict[str, bytes]]:
    """The whitening factors of every checkpoint (:mod:`proponent.indexer.whiten`; ``made``: already computed,
    for the calibration): the manifest naming them and the files' bytes (written by :func:`stage`, before the
    manifest)."""
    assert man.whiten is not None
    if made is None:
        made = whitening_factors(
            man.whiten.kind, man.whiten.alpha, cks, objective, data, layers, man.objective.seed, log
        )
    records = [wfmt.record(c, raw, lo, li, lb) for c, (raw, lo, li, lb) in enumerate(made)]
    files = {rec.factors.path: raw for rec, (raw, *_) in zip(records, made, strict=True)}
    return man.model_copy(update={"whiten": man.whiten.model_copy(update={"checkpoints": records})}), files


def _probe(model: nn.Module, objective: Objective, data: Dataset, n: int = 2):
    x = torch.from_numpy(data.x[:n])
    y = torch.from_numpy(np.clip(data.labels[:n], 0, None) if data.labels is not None else np.zeros(len(x), np.int64))
    eps = draw_noise(NOISE_INDEX, 0, 0, np.arange(len(x)), objective.m, objective.noise_shape(model))
    return x, y, eps


def check_model_on(model: nn.Module, objective: Objective, data: Dataset, record: ModelRecord) -> None:
    """The training objective computes one finite loss per sample on two of the data's inputs."""
    what = "the model" if record.kind == "builtin" else f"model code {record.plugin.code if record.plugin else ''}"
    try:
        with torch.no_grad():
            loss = objective.loss(model, *_probe(model, objective, data))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IndexJobError(
            f"{what} fails on inputs of shape {list(data.shape)}: {type(e).__name__}: {first}"
        ) from None
    if tuple(loss.shape) != (min(2, len(data.x)),) or not bool(torch.isfinite(loss).all()):
        raise IndexJobError(f"{what}: the loss must be one finite value per sample, got shape {tuple(loss.shape)}")


def describe_layout(man: Manifest, model0: nn.Module, objective: Objective, projector: Projector, data: Dataset) -> str:
    """What the index will hold, and which layers take the fast (Kronecker) path (from a probe pass)."""
    lines = [
        f"layout: D={man.dim} {man.storage.dtype} ({man.dim * np.dtype(man.storage.dtype).itemsize / 1024:.1f} KiB per "
        f"sample per checkpoint), {len(man.checkpoints)} checkpoints, N={man.n}, m={man.objective.m}, "
        f"batch {man.batch_size}"
    ]
    feat = make_featurizer(man.featurizer, model0, objective, projector)
    routes = getattr(feat, "layer_routes", None)
    if callable(routes):
        feat.featurize(*_probe(model0, objective, data))
        for name, route in routes():
            lines.append(f"  layer {name}: {route}")
    return "\n".join(lines)


def describe_fidelity(man: Manifest, seconds: list[float] | None = None, skipped: str | None = None) -> str:
    """The fidelity check's lines for the job's log (with each checkpoint's ``seconds`` if given), with the
    warning when below the bar; ``skipped``: why it was not measured."""
    fid = man.fidelity
    if fid is None:
        return "fidelity: not measured" + (f" ({skipped})" if skipped else "")
    lines = [
        f"fidelity ({fid.queries} queries x {fid.pool} rows, stored features against exact gradients; bar "
        f"recall@{fid.top} {fid.bar_proponents:.2f} / {fid.bar_opponents:.2f}):"
    ]
    for i, ch in enumerate(fid.checkpoints):
        took = f" ({seconds[i]:.1f} s)" if seconds and i < len(seconds) else ""
        lines.append(
            f"  checkpoint {ch.checkpoint}: recall@{fid.top} proponents {ch.recall_proponents:.2f}, opponents "
            f"{ch.recall_opponents:.2f}, relative score error {ch.relative_error:.3f}{took}"
            + ("" if ch.passed else "  BELOW THE BAR")
        )
    warn = fid.warning()
    if warn:
        lines.append("WARNING: " + warn)
    return "\n".join(lines)
