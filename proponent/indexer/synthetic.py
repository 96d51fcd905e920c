"""Synthetic indexes for benchmarks: the real index format, features drawn at random.

:func:`synthetic_index` writes a complete index (manifest, checkpoint copies, Zarr store, optional
ANN files) through the index job's own phases -- :func:`~proponent.indexer.job.plan`,
:func:`~proponent.indexer.job.stage`, :meth:`FeatureStore.write_unit` and
:func:`~proponent.indexer.job.finish` -- so ``verify`` and ``serve`` accept it, but the features of the N
training rows are random (correlated across checkpoints, like real TracIn features, where
independent random features would be the certificate's worst case). The model is a randomly
initialised MLP VAE whose feature layout has the requested dimension, so uploaded queries are
featurized for real. Used by ``benchmarks/query_latency.py``, ``benchmarks/scale.py`` and
``benchmarks/scale_out.py`` to measure storage, serving memory and latency at sizes (up to
10⁶ rows and beyond) where featurizing real data would take too long.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from proponent.format.fsio import IndexDir, index_dir
from proponent.format.manifest import CheckpointSpec, read_manifest
from proponent.format.store import FeatureStore
from proponent.indexer.data import Dataset, SourceInfo
from proponent.indexer.job import IndexOptions, finish, plan, read_checkpoints, reconcile, stage, training_objective
from proponent.model.architectures import ModelConfig, build_model
from proponent.model.checkpoints import save_checkpoint
from proponent.model.projection import ProjectionSpec, build_projector, discover_layers, uncalibrated_layer_dims
from proponent.progress import progress


def _projection_for(model: torch.nn.Module, dim: int) -> ProjectionSpec:
    """The default layout's kind (a tensor sketch per layer) at about ``dim`` dimensions, split over the
    layers by parameter count (capped at each layer's exact size; FFT-friendly sizes, so the total may be
    a little below ``dim``). The rows are random, so only the width matters, and the scale figures are
    quoted at a given width; uploaded queries are featurized through the same layout for real."""
    layers = discover_layers(model)
    exact = sum(info.in_dim * info.out_dim for info in layers)
    if dim > exact:
        raise ValueError(f"synthetic index: dim={dim} exceeds the synthetic model's {exact} gradient dimensions")
    return ProjectionSpec(kind="tensor", dim=dim, layer_dims=uncalibrated_layer_dims(layers, dim))


def synthetic_index(
    out: str | Path | IndexDir,
    *,
    n: int,
    checkpoints: int = 5,
    dim: int = 4096,
    dtype: str = "int8",
    index_kind: str = "none",
    seed: int = 0,
    show_progress: bool = True,
) -> Path | str:
    """Write (or reuse, when complete with the same settings) a synthetic index of ``n`` rows."""
    where = index_dir(out)
    cfg = ModelConfig(kind="mlp", input_shape=(1, 8, 8), hidden=(64, 32), latent_dim=8)
    torch.manual_seed(seed)
    model = build_model(cfg)
    proj_spec = _projection_for(model, dim)
    parent = where.local_path().parent if where.is_local else Path(tempfile.gettempdir())
    tmp = parent / f".{str(where.location).rstrip('/').rsplit('/', 1)[-1]}.ckpts"
    tmp.mkdir(parents=True, exist_ok=True)
    specs = []
    for c in range(checkpoints):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        path = tmp / f"ckpt{c}.pt"
        meta = {"lr": 1e-3, "batch_size": 64, "step": (c + 1) * 100, "steps_since_prev": 100, "epoch": c + 1.0}
        save_checkpoint(path, model, cfg, **meta)
        specs.append(CheckpointSpec(path=str(path), **meta))  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    inputs = (rng.integers(0, 256, (n, 1, 8, 8)) / 255).astype(np.float32)
    labels = rng.integers(0, 10, n)
    fingerprint = f"synthetic-{seed}-{n}"
    src = SourceInfo(f"synthetic:n={n}", "synthetic", None, fingerprint, n, n, 0, None, False)
    data = Dataset(inputs, labels, np.arange(n), np.zeros(n, np.int32), np.arange(n), [src], fingerprint)
    opts = IndexOptions(m=4, projection=proj_spec, dtype=dtype, index_kind=index_kind, device="cpu")
    cks = read_checkpoints(specs)
    objective = training_objective(cks.record, opts.m)
    projector = build_projector(cks.model0, "all", proj_spec)
    man = plan(data, cks, opts, projector, objective, batch_size=256)
    state = reconcile(where, man, overwrite=False, shard=None)
    if state == "complete":
        return where.location
    stage(where, man, data, cks, state)
    store = FeatureStore.open(where, mode="r+")
    d = store.dim
    t0 = time.perf_counter()
    bar = progress(total=n * checkpoints, desc="synthetic", unit="row", enabled=show_progress)
    for u in range(store.n_units):
        lo, hi = store.unit_range(u)
        base = np.random.default_rng([seed, u]).standard_normal((hi - lo, d), dtype=np.float32)
        lat = np.random.default_rng([seed, u, 1]).standard_normal((hi - lo, 2 * cfg.latent_dim), dtype=np.float32)
        for c in range(checkpoints):
            if store.done_mask(c)[u]:
                continue
            noise = np.random.default_rng([seed, u, c, 2]).standard_normal((hi - lo, d), dtype=np.float32)
            f = (base + 0.3 * noise) / np.float32(np.sqrt(d))
            sq = (f.astype(np.float64) ** 2).sum(axis=1) * 1.7  # "exact" norms exceed projected ones
            last = c == checkpoints - 1
            latent = (lat[:, : cfg.latent_dim], lat[:, cfg.latent_dim :]) if last else None
            store.write_unit(c, u, f, sq, np.abs(noise[:, 0]), latent)
            bar.update(hi - lo)
    bar.close()
    finish(where, t0, check_fidelity=False)  # random features: nothing to compare with gradients
    assert read_manifest(where).complete
    return where.location
