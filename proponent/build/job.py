"""The offline index job: checkpoints + data -> Zarr features + FAISS indexes + manifest.

The job is resumable: its unit of work is one row chunk of one checkpoint, and
every chunk's features depend only on (seed, checkpoint, sample ids), so a
killed job run again with the same arguments redoes only unfinished chunks and
writes the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proponent.format import ann
from proponent.model.checkpoints import CheckpointError, CheckpointSpec, load_checkpoint
from proponent.build.data import Dataset, load_dataset
from proponent.model.featurizers import make_featurizer
from proponent.format.fsio import atomic_write_bytes, atomic_write_json, read_json, sha256_file
from proponent.model.architectures import ModelConfig
from proponent.model.objectives import NOISE_INDEX, draw_noise
from proponent.progress import progress
from proponent.model.projection import ProjectionSpec, build_projector
from proponent.build.training import training_objective

MANIFEST_VERSION = 1


class IndexJobError(RuntimeError):
    pass


@dataclass
class IndexOptions:
    m: int = 16
    seed: int = 0
    projection: ProjectionSpec = field(default_factory=ProjectionSpec)
    layers: str = "all"
    featurizer: str = "kron"
    dtype: str = "float32"
    index_kind: str = "flat"
    batch_size: int | None = None
    device: str = "auto"
    chunk_rows: int | None = None
    shard: tuple[int, int] | None = None  # (i, n): featurize only row chunks k with k % n == i


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def checkpoints_from_run(run_dir: str | Path) -> tuple[list[CheckpointSpec], dict[str, Any]]:
    run_dir = Path(run_dir)
    run = read_json(run_dir / "run.json")
    specs = []
    for d in run["checkpoints"]:
        s = CheckpointSpec.from_dict(d)
        s.path = str(run_dir / s.path)
        specs.append(s)
    return specs, run


def library_versions() -> dict[str, str]:
    import faiss
    import zarr

    return {"torch": torch.__version__, "numpy": np.__version__, "zarr": zarr.__version__, "faiss": faiss.__version__}


def _job_key(manifest: dict[str, Any]) -> dict[str, Any]:
    """The settings that determine the stored bytes; a resume must match them all."""
    return {
        "n": manifest["n"],
        "dataset_fingerprint": manifest["dataset"]["fingerprint"],
        "checkpoints": [c["sha256"] for c in manifest["checkpoints"]],
        "objective": manifest["objective"],
        "projection": manifest["projection"],
        "featurizer": manifest["featurizer"],
        "dtype": manifest["dtype"],
        "index_kind": manifest["index"]["kind"],
        "chunk_rows": manifest["chunk_rows"],
        "batch_size": manifest["batch_size"],
    }


def build_index(
    data: Dataset | str,
    checkpoints: list[CheckpointSpec],
    out: str | Path,
    options: IndexOptions | None = None,
    model_config: ModelConfig | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> Path:
    """Featurize ``data`` at every checkpoint into the index directory ``out``."""
    opts = options or IndexOptions()
    out = Path(out)
    if isinstance(data, str):
        data = load_dataset(data)
    if not checkpoints:
        raise IndexJobError("no checkpoints given")
    if opts.m < 1:
        raise IndexJobError(f"m must be >= 1, got {opts.m}")
    device = resolve_device(opts.device)
    if opts.shard is not None:
        si, sn = opts.shard
        if not (sn >= 1 and 0 <= si < sn):
            raise IndexJobError(f"shard must be i/n with 0 <= i < n, got {si}/{sn}")

    # Checkpoints are copied into the index, named by content hash, so the index is self-contained.
    models_cfg: ModelConfig | None = None
    ckpts: list[CheckpointSpec] = []
    for spec in checkpoints:
        _, cfg, _ = load_checkpoint(spec.path, model_config)
        if models_cfg is None:
            models_cfg = cfg
        elif cfg.to_dict() != models_cfg.to_dict():
            raise CheckpointError(f"{spec.path}: model config differs from the first checkpoint's")
        sha = sha256_file(spec.path)
        if spec.sha256 and spec.sha256 != sha:
            raise CheckpointError(f"{spec.path}: sha256 {sha[:12]}… differs from the recorded {spec.sha256[:12]}…")
        rel = f"checkpoints/{sha[:16]}.pt"
        ckpts.append(CheckpointSpec(rel, spec.lr, spec.batch_size, spec.steps_since_prev, spec.step, spec.epoch, sha))
    assert models_cfg is not None
    if tuple(models_cfg.input_shape) != tuple(data.shape):
        raise IndexJobError(f"model input shape {tuple(models_cfg.input_shape)} does not match data shape {data.shape}")

    model0, _, _ = load_checkpoint(checkpoints[0].path, model_config)
    objective = training_objective(models_cfg, opts.m)
    projector = build_projector(model0, opts.layers, opts.projection)
    n = len(data.x)
    from proponent.format.store import FeatureStore, chunk_rows_for

    env_rows = os.environ.get("PROPONENT_CHUNK_ROWS")  # small chunks for tests and tiny data
    chunk_rows = (
        opts.chunk_rows
        or (int(env_rows) if env_rows else None)
        or chunk_rows_for(projector.dim, np.dtype(opts.dtype).itemsize)
    )
    ann.parse_kind(opts.index_kind)
    # The featurization batch is fixed per index and recorded: float32 BLAS results depend on
    # the batch shape, so a resume or a shard must reuse it to write the same bytes.
    mpath = out / "manifest.json"
    batch = opts.batch_size
    if batch is None and mpath.exists() and not overwrite:
        batch = read_json(mpath).get("batch_size")  # resume with the batch the index was started with
    if batch is None:
        proj_dev = build_projector(model0.to(device), opts.layers, opts.projection, device)
        batch = _default_batch(make_featurizer(opts.featurizer, model0, objective, proj_dev), device)
        model0.cpu()
    batch = max(1, min(int(batch), chunk_rows))
    manifest: dict[str, Any] = {
        "format": "proponent-index",
        "version": MANIFEST_VERSION,
        "complete": False,
        "n": n,
        "dataset": {
            "spec": "+".join(s.spec for s in data.sources),
            "fingerprint": data.fingerprint,
            "shape": list(data.shape),
            "sources": [_source_dict(s) for s in data.sources],
            "has_labels": data.labels is not None,
        },
        "model_config": models_cfg.to_dict(),
        "objective": {**objective.spec(), "seed": opts.seed},
        "projection": projector.manifest(),
        "layers": opts.layers,
        "featurizer": opts.featurizer,
        "dtype": np.dtype(opts.dtype).name,
        "chunk_rows": chunk_rows,
        "batch_size": batch,
        "checkpoints": [c.to_dict() for c in ckpts],
        "index": {"kind": opts.index_kind, "exact": ann.is_exact(opts.index_kind), "files": []},
        "library_versions": library_versions(),
    }
    store_path = out / "store.zarr"
    resume = False
    if mpath.exists():
        old = read_json(mpath)
        if overwrite:
            shutil.rmtree(out)
        elif _job_key(old) != _job_key(manifest):
            diff = [k for k, v in _job_key(manifest).items() if _job_key(old).get(k) != v]
            raise IndexJobError(
                f"{out} holds an index built with other settings ({', '.join(diff)} differ); "
                "use another --out or --overwrite"
            )
        elif old.get("complete"):
            return out
        else:
            resume = store_path.exists()
    elif opts.shard is not None and store_path.exists():
        raise IndexJobError(f"{out}: store exists without a manifest; refusing to shard into it")
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise IndexJobError(f"{out} exists and is not an index; use another --out or --overwrite")
    elif overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    for src, ck in zip(checkpoints, ckpts):
        dst = out / ck.path
        if not dst.exists() or sha256_file(dst) != ck.sha256:
            atomic_write_bytes(dst, Path(src.path).read_bytes())
    if not resume:
        atomic_write_json(mpath, manifest)

    if resume:
        store = FeatureStore.open(store_path, mode="r+")
    else:
        # Created beside its final name and renamed into place: a kill during creation leaves
        # no half-made store that a resume would trust.
        partial = out / "store.zarr.partial"
        if partial.exists():
            shutil.rmtree(partial)
        FeatureStore.create(
            partial,
            n=n,
            dim=projector.dim,
            n_checkpoints=len(ckpts),
            dtype=opts.dtype,
            latent_dim=models_cfg.latent_dim if models_cfg.kind != "classifier" else 0,
            ids=data.ids,
            labels=data.labels,
            origin=data.origin,
            source_row=data.source_row,
            injected=data.injected,
            images=data.x,
            chunk_rows=chunk_rows,
        )
        os.replace(partial, store_path)
        store = FeatureStore.open(store_path, mode="r+")

    x_all = torch.from_numpy(data.x)
    y_all = torch.from_numpy(data.labels if data.labels is not None else np.zeros(n, np.int64))
    y_all = y_all.clamp_min(0)
    t0 = time.perf_counter()

    def todo(c: int) -> list[int]:
        pend = store.pending_chunks(c)
        return pend if opts.shard is None else [k for k in pend if k % opts.shard[1] == opts.shard[0]]

    total_rows = sum(len(todo(c)) for c in range(len(ckpts))) * chunk_rows
    bar = progress(total=min(total_rows, n * len(ckpts)), desc="index", unit="sample", enabled=show_progress)
    for c, ck_spec in enumerate(ckpts):
        pending = todo(c)
        if not pending:
            continue
        model, _, _ = load_checkpoint(out / ck_spec.path, model_config)
        model = model.to(device)
        for p in model.parameters():
            p.requires_grad_(True)
        proj = build_projector(model, opts.layers, opts.projection, device)
        feat = make_featurizer(opts.featurizer, model, objective, proj)
        noise_shape = objective.noise_shape(model)
        last = c == len(ckpts) - 1
        for k in pending:
            lo, hi = store.chunk_range(k)
            parts_f, parts_s, parts_l, parts_mu, parts_lv = [], [], [], [], []
            for b0 in range(lo, hi, batch):
                b1 = min(hi, b0 + batch)
                eps = draw_noise(NOISE_INDEX, opts.seed, c, data.ids[b0:b1], opts.m, noise_shape)
                fb = feat.featurize(x_all[b0:b1], y_all[b0:b1], eps)
                parts_f.append(fb.features.cpu().numpy())
                parts_s.append(fb.sq_norm.cpu().numpy())
                parts_l.append(fb.loss.cpu().numpy())
                if last and store.latent_dim:
                    with torch.no_grad():
                        mu, lv = model.encode(x_all[b0:b1].to(device))  # type: ignore[operator]
                    parts_mu.append(mu.cpu().numpy())
                    parts_lv.append(lv.cpu().numpy())
                bar.update(b1 - b0)
            latent = (np.concatenate(parts_mu), np.concatenate(parts_lv)) if parts_mu else None
            store.write_chunk(c, k, np.concatenate(parts_f), np.concatenate(parts_s), np.concatenate(parts_l), latent)
    bar.close()
    if not store.is_complete():
        # A shard finished its part; the run that finds every chunk done builds the FAISS indexes.
        return out

    files = []
    for c in range(len(ckpts)):
        fpath = out / "faiss" / f"ckpt_{c:03d}.index"
        if not fpath.exists():
            train_sample = None
            if not ann.is_exact(opts.index_kind):
                rng = np.random.default_rng(opts.seed)
                rows = np.sort(rng.choice(n, size=min(n, 50_000), replace=False))
                train_sample = store.features(c)[rows]
            index = ann.build_index(
                opts.index_kind, store.dim, (ch for _, ch in store.iter_feature_chunks(c)), train_sample
            )
            ann.write_atomic(index, fpath)
        files.append({"path": f"faiss/ckpt_{c:03d}.index", "sha256": sha256_file(fpath)})
    manifest["index"]["files"] = files
    manifest["complete"] = True
    manifest["seconds"] = time.perf_counter() - t0
    atomic_write_json(mpath, manifest)
    return out


def _source_dict(s: Any) -> dict[str, Any]:
    import dataclasses
    import json

    d = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
    d["options"] = dict(d.get("options") or {})
    return json.loads(json.dumps(d, default=list))


def _default_batch(feat: Any, device: torch.device) -> int:
    if feat.method == "kron":
        try:
            from proponent.model.featurizers.kronecker import auto_batch_size

            return int(auto_batch_size(feat.model, feat.objective, feat.projector, device))
        except Exception:
            return 256
    return 64


def set_threads(n: int | None = None) -> None:
    """Pin torch and FAISS (OpenMP) thread counts explicitly; they share the process."""
    n = n or int(os.environ.get("PROPONENT_THREADS", 0)) or (os.cpu_count() or 1)
    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except Exception:
        pass
