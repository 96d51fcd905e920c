"""Training runs: keyed noise pairs runs on subsets of the same data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from proponent.indexer.data import load_dataset
from proponent.indexer.training import TrainConfig, train
from proponent.model.architectures import ModelConfig
from proponent.model.checkpoints import load_checkpoint


def _final_weights(run: Path, cfg: ModelConfig) -> np.ndarray:
    model, _, _ = load_checkpoint(run / "checkpoints" / "ckpt_000.pt", cfg)
    return np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])


@pytest.mark.parametrize("noise", ["keyed", "stream"])
def test_keyed_noise_follows_the_sample_not_its_position(tmp_path: Path, noise: str) -> None:
    """Full batches, the same seed: the same samples in another order train the same model when each sample's
    draws are keyed by its id (float rounding apart), and a different one when they come from one stream."""
    data = load_dataset("digits,limit=96")
    cfg = ModelConfig(kind="mlp", input_shape=data.shape, hidden=(16,), latent_dim=3)
    tc = TrainConfig(epochs=20, batch_size=len(data), checkpoints=1, seed=3, noise=noise)
    order = np.random.default_rng(0).permutation(len(data))
    a = _final_weights(train(data, cfg, tmp_path / "a", tc, show_progress=False), cfg)
    b = _final_weights(train(data.subset(order), cfg, tmp_path / "b", tc, show_progress=False), cfg)
    gap = float(np.abs(a - b).max())
    if noise == "keyed":
        assert gap < 1e-4
    else:
        assert gap > 1e-3


def test_unknown_noise_refused(tmp_path: Path) -> None:
    data = load_dataset("digits,limit=8")
    cfg = ModelConfig(kind="mlp", input_shape=data.shape, hidden=(4,), latent_dim=2)
    with pytest.raises(ValueError, match="noise must be stream or keyed"):
        train(data, cfg, tmp_path / "x", TrainConfig(noise="fixed"), show_progress=False)


def test_checkpoints_carry_adam_state(tmp_path: Path) -> None:
    """Every checkpoint holds the optimizer's state at its own step; its second moments come back per named
    parameter in the model's order, divided by Adam's bias correction 1 - β₂^step; an SGD state or an
    optimizer state of another model is refused."""
    import torch

    from proponent.model.checkpoints import CheckpointError, adam_second_moments, read_checkpoint

    data = load_dataset("digits,limit=32")
    cfg = ModelConfig(kind="mlp", input_shape=data.shape, hidden=(8,), latent_dim=2)
    tc = TrainConfig(epochs=3, batch_size=len(data), checkpoints=3, seed=1, noise="keyed")
    run = train(data, cfg, tmp_path / "r", tc, show_progress=False)
    path = run / "checkpoints" / "ckpt_001.pt"
    raw = read_checkpoint(path)
    model, _, meta = load_checkpoint(path, cfg)
    v = adam_second_moments(raw, model, str(path))
    assert v is not None and list(v) == [n for n, _ in model.named_parameters()]
    st = raw["optimizer"]["state"]
    for i, (name, p) in enumerate(model.named_parameters()):
        step = float(st[i]["step"])
        assert step == meta["step"] == 2
        want = st[i]["exp_avg_sq"].double() / (1 - 0.999**step)
        assert v[name].shape == p.shape and torch.allclose(v[name], want)
        assert float(v[name].min()) >= 0
    # an optimizer state for another model is refused, not matched by position
    other = ModelConfig(kind="mlp", input_shape=data.shape, hidden=(9,), latent_dim=2)
    from proponent.model.architectures import build_model

    with pytest.raises(CheckpointError, match="exp_avg_sq for .* has shape"):
        adam_second_moments(raw, build_model(other), "ck")
    sgd = train(data, cfg, tmp_path / "s", TrainConfig(epochs=1, batch_size=32, checkpoints=1, optimizer="sgd"), False)
    with pytest.raises(CheckpointError, match="not an Adam state"):
        adam_second_moments(read_checkpoint(sgd / "checkpoints" / "ckpt_000.pt"), model, "ck")
    assert adam_second_moments({"state_dict": {}}, model) is None
    # nested one level (the VAE-TracIn authors' optim_states.optim): found, and an SGD state is named as such
    nested = {"optim_states": {"optim": read_checkpoint(sgd / "checkpoints" / "ckpt_000.pt")["optimizer"]}}
    with pytest.raises(CheckpointError, match="not an Adam state"):
        adam_second_moments(nested, model, "ck")
    assert torch.equal(adam_second_moments({"optim_states": {"optim": raw["optimizer"]}}, model)[name], v[name])
