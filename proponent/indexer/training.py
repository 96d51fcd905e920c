"""Train a β-VAE (or classifier) and save TracIn checkpoints.

A run directory holds ``run.json`` (data, model, optimiser, checkpoint list) and
``checkpoints/ckpt_XXX.pt``. Every checkpoint records its learning rate, batch
size and optimiser steps since the previous checkpoint (docs/design.md §3).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proponent.format.fsio import atomic_write_json, sha256_file
from proponent.indexer.data import Dataset
from proponent.model.architectures import ModelConfig, build_model
from proponent.model.checkpoints import CheckpointSpec, save_checkpoint
from proponent.model.objectives import ELBO, NOISE_TRAIN, CrossEntropy, Objective
from proponent.progress import progress


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | sgd
    momentum: float = 0.0
    checkpoints: int = 5  # evenly spaced over training (ignored if checkpoint_every_* set)
    checkpoint_every_steps: int | None = None
    checkpoint_every_epochs: int | None = None
    m: int = 1  # draws per sample while training
    seed: int = 0
    device: str = "cpu"
    # "stream": the draws come from one generator in step order; "keyed": sample i's draws at step t depend only
    # on (seed, t, i), so runs on subsets of the same data are paired: with full batches (batch_size >= N) and
    # the same seed (same initial weights), two runs differ only by the samples left out (retraining benchmarks)
    noise: str = "stream"


def keyed_draws(seed: int, step: int, ids: np.ndarray, id_space: int, m: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal draws ``[len(ids), m, *shape]`` of training step ``step``: one table of ``id_space``
    rows from a generator keyed by ``(seed, step)``, row ``i`` for sample id ``i`` (one generator per step, not
    per sample: ``id_space · m · prod(shape)`` draws a step)."""
    ss = np.random.SeedSequence([NOISE_TRAIN, seed, step])
    table = np.random.Generator(np.random.Philox(ss)).standard_normal(
        (id_space, m * math.prod(shape)), dtype=np.float32
    )
    return torch.from_numpy(table[np.asarray(ids, np.int64)].reshape(len(ids), m, *shape))


def training_objective(cfg: ModelConfig, m: int) -> Objective:
    if cfg.kind == "classifier":
        return CrossEntropy()
    return ELBO(beta=cfg.beta, likelihood=cfg.likelihood, m=m)


def _checkpoint_steps(tc: TrainConfig, steps_per_epoch: int) -> list[int]:
    total = tc.epochs * steps_per_epoch
    if tc.checkpoint_every_steps:
        steps = list(range(tc.checkpoint_every_steps, total + 1, tc.checkpoint_every_steps))
    elif tc.checkpoint_every_epochs:
        steps = [
            e * steps_per_epoch for e in range(tc.checkpoint_every_epochs, tc.epochs + 1, tc.checkpoint_every_epochs)
        ]
    else:
        n = max(1, min(tc.checkpoints, total))
        steps = sorted({math.ceil(total * (i + 1) / n) for i in range(n)})
    if not steps or steps[-1] != total:
        steps.append(total)
    return steps


def train(
    data: Dataset, model_config: ModelConfig, out: str | Path, tc: TrainConfig, show_progress: bool = True
) -> Path:
    """Train on ``data`` and write the run directory ``out``; returns its path."""
    out = Path(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    if model_config.kind == "classifier" and data.labels is None:
        raise ValueError("a classifier needs labelled data")
    if tuple(model_config.input_shape) != tuple(data.shape):
        raise ValueError(f"model input shape {model_config.input_shape} does not match data shape {data.shape}")
    if tc.optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be adam or sgd, got {tc.optimizer!r}")
    if tc.noise not in ("stream", "keyed"):
        raise ValueError(f"noise must be stream or keyed, got {tc.noise!r}")
    torch.manual_seed(tc.seed)
    device = torch.device(tc.device)
    model = build_model(model_config).to(device)
    objective = training_objective(model_config, tc.m)
    noise_shape = objective.noise_shape(model)
    opt: torch.optim.Optimizer
    if tc.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=tc.lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum)
    x_all = torch.from_numpy(data.x).to(device)
    y_all = torch.from_numpy(data.labels if data.labels is not None else np.zeros(len(data.x), np.int64)).to(device)
    n = len(x_all)
    steps_per_epoch = math.ceil(n / tc.batch_size)
    ckpt_steps = _checkpoint_steps(tc, steps_per_epoch)
    gen = torch.Generator(device="cpu").manual_seed(tc.seed)
    id_space = sum(src.n for src in data.sources)  # the same for every subset of the same data
    step, prev_step = 0, 0
    specs: list[CheckpointSpec] = []
    t0 = time.perf_counter()
    bar = progress(total=tc.epochs * steps_per_epoch, desc="train", unit="step", enabled=show_progress)
    last_loss = float("nan")
    for _ in range(tc.epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        for b in range(steps_per_epoch):
            idx = perm[b * tc.batch_size : (b + 1) * tc.batch_size]
            if tc.noise == "keyed":
                ids = data.ids[idx.cpu().numpy()]
                eps = keyed_draws(tc.seed, step, ids, id_space, objective.m, noise_shape).to(device)
            else:
                eps = torch.randn(len(idx), objective.m, *noise_shape, generator=gen).to(device)
            loss = objective.loss(model, x_all[idx], y_all[idx], eps).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            last_loss = float(loss.detach())
            bar.update(1)
            if step in ckpt_steps:
                path = out / "checkpoints" / f"ckpt_{len(specs):03d}.pt"
                meta: dict[str, Any] = {
                    "lr": float(opt.param_groups[0]["lr"]),
                    "batch_size": tc.batch_size,
                    "step": step,
                    "steps_since_prev": step - prev_step,
                    "epoch": step / steps_per_epoch,
                }
                # the optimizer's state too (Adam's moments: resuming, and the optimizer-aware
                # preconditioners of TrackStar-style attribution read its second moments)
                save_checkpoint(path, model, model_config, optimizer=opt.state_dict(), **meta)
                specs.append(CheckpointSpec(path=str(path.relative_to(out)), sha256=sha256_file(path), **meta))
                prev_step = step
        bar.set_postfix(loss=f"{last_loss:.3f}")
    bar.close()
    run: dict[str, Any] = {
        "format": "proponent-run-1",
        "data": {
            "spec": "+".join(s.spec for s in data.sources),
            "fingerprint": data.fingerprint,
            "n": n,
            "shape": list(data.shape),
        },
        "model_config": model_config.to_dict(),
        "train": asdict(tc),
        "final_loss": last_loss,
        "seconds": time.perf_counter() - t0,
        "checkpoints": [s.to_dict() for s in specs],
    }
    atomic_write_json(out / "run.json", run)
    return out
