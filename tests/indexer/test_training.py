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
