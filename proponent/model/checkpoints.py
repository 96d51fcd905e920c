"""Checkpoint files and the training metadata that TracIn's weights need.

A proponent checkpoint is ``torch.save`` of a dict of plain values and tensors
(loadable with ``weights_only=True``)::

    {"format": "proponent-checkpoint-1", "model_config": {...}, "state_dict": {...},
     "lr": float, "batch_size": int, "step": int, "steps_since_prev": int, "epoch": float}

A checkpoint trained elsewhere is a state dict, possibly nested inside a dict (``key``: a dotted
path such as ``model_states.net``), plus the model (a :class:`ModelConfig` JSON or the user's
model code); its learning rate, batch size and steps are given by the user. Checkpoints are
always read with ``weights_only=True``: tensors and plain containers only, never code.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from proponent.format.fsio import atomic_write_bytes
from proponent.format.manifest import CheckpointSpec
from proponent.model.architectures import ModelConfig, build_model

FORMAT = "proponent-checkpoint-1"

__all__ = [
    "CheckpointError",
    "CheckpointSpec",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "state_dict_at",
]


class CheckpointError(ValueError):
    pass


def save_checkpoint(path: str | Path, model: nn.Module, config: ModelConfig, **meta: Any) -> None:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "model_config": config.to_dict(), "state_dict": model.state_dict(), **meta}, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_checkpoint(source: str | Path | bytes, name: str | None = None) -> Any:
    """``torch.load`` of a checkpoint file (or its bytes) with ``weights_only=True``."""
    where = name or (str(source) if not isinstance(source, bytes) else "checkpoint")
    if not isinstance(source, bytes):
        path = Path(source)
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint file not found")
        source = path.read_bytes()
    try:
        return torch.load(io.BytesIO(source), map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{where}: cannot read checkpoint with weights_only=True ({type(e).__name__}: {first[:300]})"
        ) from None


def state_dict_at(raw: Any, key: str | None, where: str) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint: at the dotted ``key`` path, or the whole object."""
    obj = raw
    if key:
        for part in key.split("."):
            if not isinstance(obj, dict) or part not in obj:
                have = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
                raise CheckpointError(f"{where}: no {part!r} at checkpoint key {key!r} (found {have})")
            obj = obj[part]
    elif isinstance(obj, dict) and obj.get("format") == FORMAT:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        hint = "" if key else " (give --checkpoint-key PATH when the state dict is nested, e.g. model_states.net)"
        raise CheckpointError(f"{where}: not a state dict of tensors{hint}")
    return obj


def load_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> nn.Module:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"{where}: state dict does not fit the model ({first})") from None
    return model.eval()


def load_checkpoint(
    path: str | Path | bytes, config: ModelConfig | None = None, *, name: str | None = None
) -> tuple[nn.Module, ModelConfig, dict[str, Any]]:
    """A built-in model (eval mode, CPU), its config and the checkpoint's metadata."""
    where = name or str(path if not isinstance(path, bytes) else "checkpoint")
    raw = read_checkpoint(path, where)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        cfg = ModelConfig.from_dict(raw["model_config"])
        if config is not None and config.to_dict() != cfg.to_dict():
            raise CheckpointError(f"{where}: model config differs from the one given")
        meta = {k: v for k, v in raw.items() if k not in ("state_dict", "model_config", "format")}
    elif isinstance(raw, dict):
        if config is None:
            raise CheckpointError(f"{where}: a bare state dict needs a model config (--model-config)")
        cfg, meta = config, {}
    else:
        raise CheckpointError(f"{where}: neither a proponent checkpoint nor a state dict")
    model = load_state(build_model(cfg), state_dict_at(raw, None, where), where)
    return model, cfg, meta


# Training metadata a checkpoint file may hold, under these common key names (top level of the
# loaded dict; the learning rate also from an optimizer state's first param group). The first
# name found wins; README "Your own model" lists them.
META_KEYS: dict[str, tuple[str, ...]] = {
    "lr": ("lr", "learning_rate"),
    "step": ("step", "iteration", "global_step", "iter"),
    "epoch": ("epoch",),
    "batch_size": ("batch_size",),
}
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optimizer_state", "optim", "optim_states")


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.dtype.is_complex:
        v = v.item()
    if isinstance(v, (int, float)) and v == v:
        return float(v)
    return None


def checkpoint_metadata(raw: Any) -> dict[str, tuple[float, str]]:
    """``{field: (value, key it came from)}`` for the training metadata ``raw`` (a loaded checkpoint)
    holds under :data:`META_KEYS` (and an optimizer state's ``param_groups[0]['lr']``)."""
    if not isinstance(raw, dict):
        return {}
    out: dict[str, tuple[float, str]] = {}
    for field, names in META_KEYS.items():
        for name in names:
            v = _number(raw.get(name))
            if v is not None:
                out[field] = (v, name)
                break
    if "lr" not in out:
        for name in OPTIMIZER_KEYS:
            found = _optimizer_lr(raw.get(name), name)
            if found is not None:
                out["lr"] = found
                break
    return out


def _optimizer_state(opt: Any) -> dict[str, Any] | None:
    """An optimizer state dict (``state`` and ``param_groups``) at ``opt`` or one level inside it (the authors'
    checkpoints nest theirs as ``optim_states.optim``)."""
    if not isinstance(opt, dict):
        return None
    if "state" in opt and "param_groups" in opt:
        return opt
    return next((v for v in opt.values() if isinstance(v, dict) and "state" in v and "param_groups" in v), None)


def _optimizer_lr(opt: Any, name: str) -> tuple[float, str] | None:
    """``param_groups[0]['lr']`` of an optimizer state dict at ``opt`` or one level inside it."""
    if not isinstance(opt, dict):
        return None
    groups = opt.get("param_groups")
    if isinstance(groups, list) and groups and isinstance(groups[0], dict):
        v = _number(groups[0].get("lr"))
        return None if v is None else (v, f"{name}.param_groups[0].lr")
    for sub, inner in opt.items():
        if isinstance(inner, dict) and "param_groups" in inner:
            return _optimizer_lr(inner, f"{name}.{sub}")
    return None


def adam_second_moments(raw: Any, model: nn.Module, where: str = "checkpoint") -> dict[str, torch.Tensor] | None:
    """Adam's bias-corrected second moments ``v̂ = exp_avg_sq / (1 - β₂^step)`` per named parameter, from the
    optimizer state a loaded checkpoint ``raw`` holds under :data:`OPTIMIZER_KEYS`; None when it holds none.

    The state's parameters are matched to ``model.named_parameters()`` in order (an optimizer built from
    ``model.parameters()``, as proponent's training and most training loops do); a state whose count or
    shapes do not match is refused naming the first mismatch, never guessed."""
    if not isinstance(raw, dict):
        return None
    opt = next((o for k in OPTIMIZER_KEYS if (o := _optimizer_state(raw.get(k))) is not None), None)
    if opt is None:
        return None
    order = [i for g in opt["param_groups"] for i in g.get("params", [])]
    betas = opt["param_groups"][0].get("betas")
    named = list(model.named_parameters())
    if len(order) != len(named):
        raise CheckpointError(f"{where}: the optimizer state has {len(order)} parameters, the model {len(named)}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise CheckpointError(f"{where}: the optimizer state has no Adam betas (not an Adam state)")
    out: dict[str, torch.Tensor] = {}
    for i, (name, p) in zip(order, named):
        st = opt["state"].get(i)
        if not isinstance(st, dict) or "exp_avg_sq" not in st:
            raise CheckpointError(f"{where}: the optimizer state of {name} has no exp_avg_sq (not an Adam state)")
        v = st["exp_avg_sq"]
        if tuple(v.shape) != tuple(p.shape):
            raise CheckpointError(
                f"{where}: the optimizer state's exp_avg_sq for {name} has shape {list(v.shape)}, the parameter "
                f"{list(p.shape)}"
            )
        step = float(st.get("step", 0))
        if step <= 0:
            raise CheckpointError(f"{where}: the optimizer state of {name} has taken no step")
        out[name] = v.double() / (1.0 - float(betas[1]) ** step)
    return out
