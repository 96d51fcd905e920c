"""Shared by the indexer tests: a tiny trained run and a dense-featurizer index builder."""

from __future__ import annotations

from pathlib import Path

import pytest

from proponent.indexer.data import load_dataset
from proponent.indexer.job import IndexOptions, build_index, checkpoints_from_run
from proponent.indexer.training import TrainConfig, train
from proponent.model.architectures import ModelConfig

DATA = "digits,limit=150"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = load_dataset(DATA)
    cfg = ModelConfig(kind="mlp", input_shape=data.shape, hidden=(24,), latent_dim=4)
    out = tmp_path_factory.mktemp("run") / "run"
    return train(data, cfg, out, TrainConfig(epochs=3, batch_size=32, checkpoints=2, seed=1), show_progress=False)


def build(run: Path, out: Path, **kw: object) -> Path:
    specs, run_json = checkpoints_from_run(run)
    opts = IndexOptions(**{"m": 3, "featurizer": "dense", "device": "cpu", **kw})  # type: ignore[arg-type]
    return Path(build_index(run_json["data"]["spec"], specs, out, opts, show_progress=False))
