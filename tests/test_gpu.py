"""GPU paths (skipped without CUDA): query featurization and the fused scan on the GPU give the
CPU's answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from proponent.build.data import load_dataset
from proponent.build.job import IndexOptions, build_index, checkpoints_from_run
from proponent.build.training import TrainConfig, train
from proponent.model.architectures import ModelConfig
from proponent.model.projection import ProjectionSpec
from proponent.query.index import open_index

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_gpu_index_answers_like_cpu(tmp_path: Path) -> None:
    data = load_dataset("digits,limit=300")
    cfg = ModelConfig(kind="mlp", input_shape=data.shape, hidden=(32,), latent_dim=4)
    run = train(data, cfg, tmp_path / "run", TrainConfig(epochs=3, checkpoints=2), show_progress=False)
    specs, _ = checkpoints_from_run(run)
    opts = IndexOptions(m=4, projection=ProjectionSpec(kind="kron", k=8), device="cuda")
    out = build_index(data, specs, tmp_path / "idx", opts, show_progress=False)
    gpu, cpu = open_index(out, device="cuda"), open_index(out, device="cpu")
    assert gpu._gpu_features, "features should be held on the GPU for the scan"
    for row in (0, 17, 123):
        x = data.x[row]
        qg = gpu.featurize(x[None], seed=5)
        qc = cpu.featurize(x[None], seed=5)
        for c in qg:
            np.testing.assert_allclose(qg[c], qc[c], rtol=1e-4, atol=1e-6)
        q = {c: v[0] for c, v in qc.items()}  # same query features: the searches must agree exactly
        for direction in ("proponents", "opponents"):
            a = gpu.top(q, k=10, direction=direction)
            b = cpu.top(q, k=10, direction=direction)
            np.testing.assert_array_equal(a.rows, b.rows)
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-12)
            assert a.exact and a.search is not None and a.search.strategy == "scan"
