"""Checkpoint files and the training metadata that TracIn's weights need.

A proponent checkpoint is ``torch.save`` of a dict of plain values and tensors
(loadable with ``weights_only=True``)::

    {"format": "proponent-checkpoint-1", "model_config": {...}, "state_dict": {...},
     "lr": float, "batch_size": int, "step": int, "steps_since_prev": int, "epoch": float}

A checkpoint trained elsewhere is a bare state dict plus a model-config JSON; its
learning rate, batch size and steps are given by the user (else lr = 1, which
weighs checkpoints equally under the ``lr`` convention).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from proponent.format.fsio import atomic_write_bytes
from proponent.model.architectures import ModelConfig, build_model

FORMAT = "proponent-checkpoint-1"


class CheckpointError(ValueError):
    pass


@dataclass
class CheckpointSpec:
    path: str
    lr: float
    batch_size: int
    steps_since_prev: int
    step: int = 0
    epoch: float = 0.0
    sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointSpec:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def weight(self, convention: str, n_train: int) -> float:
        """TracIn checkpoint weight: ``lr`` (Pruthi et al.) or ``visits`` (VAE-TracIn code)."""
        if convention == "lr":
            return float(self.lr)
        if convention == "visits":
            return float(self.lr) * self.batch_size * self.steps_since_prev / n_train
        raise ValueError(f"weight convention must be 'lr' or 'visits', got {convention!r}")


def save_checkpoint(path: str | Path, model: nn.Module, config: ModelConfig, **meta: Any) -> None:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "model_config": config.to_dict(), "state_dict": model.state_dict(), **meta}, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_raw(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None


def load_checkpoint(
    path: str | Path, config: ModelConfig | None = None
) -> tuple[nn.Module, ModelConfig, dict[str, Any]]:
    """Model (eval mode, CPU), its config and the checkpoint's metadata."""
    raw = _load_raw(path)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        cfg = ModelConfig.from_dict(raw["model_config"])
        if config is not None and config.to_dict() != cfg.to_dict():
            raise CheckpointError(f"{path}: model config differs from the one given")
        state = raw["state_dict"]
        meta = {k: v for k, v in raw.items() if k not in ("state_dict", "model_config", "format")}
    elif isinstance(raw, dict) and all(isinstance(v, torch.Tensor) for v in raw.values()):
        if config is None:
            raise CheckpointError(f"{path}: a bare state dict needs a model config (--model-config)")
        cfg, state, meta = config, raw, {}
    else:
        raise CheckpointError(f"{path}: neither a proponent checkpoint nor a state dict")
    model = build_model(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"{path}: state dict does not fit the model config ({first})") from None
    model.eval()
    return model, cfg, meta
