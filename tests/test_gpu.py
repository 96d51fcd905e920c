"""GPU paths (skipped without CUDA): query featurization and the fused scan on the GPU give the
CPU's answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from proponent.indexer.data import load_dataset
from proponent.indexer.job import IndexOptions, build_index, checkpoints_from_run
from proponent.indexer.training import TrainConfig, train
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
    assert gpu.features.describe()["device"].startswith("cuda"), "features should be held on the GPU for the scan"
    assert gpu.features.kernel_kind() == cpu.features.kernel_kind() == "int8"  # int8 codes held on the GPU
    assert gpu.features.resident[0] is not None and gpu.features.resident[0].device.type == "cuda"
    from proponent.query.scan import scan
    from proponent.query.scoring import scored_query

    cks = list(range(len(gpu.checkpoints)))
    for row in (0, 17, 123):
        x = data.x[row]
        qg = gpu.runtime.featurize(x[None], seed=5, checkpoints=cks)
        qc = cpu.runtime.featurize(x[None], seed=5, checkpoints=cks)
        for c in cks:
            np.testing.assert_allclose(qg.mean[c], qc.mean[c], rtol=1e-4, atol=1e-6)
        vec = {c: qc.mean[c][0] for c in cks}  # same query features: the searches must agree exactly
        sqn = {c: float(qc.sq_norm[c][0]) for c in cks}
        for scoring in ("raw", "cosine", "relatif"):
            a = scan(
                gpu.features,
                scored_query(gpu.features, gpu.weights(), cks, vec, sqn, scoring),
                10,
                ("proponents", "opponents"),
            )
            b = scan(
                cpu.features,
                scored_query(cpu.features, cpu.weights(), cks, vec, sqn, scoring),
                10,
                ("proponents", "opponents"),
            )
            for d in a:
                np.testing.assert_array_equal(a[d].rows, b[d].rows)
                np.testing.assert_allclose(a[d].scores, b[d].scores, rtol=1e-12)
                assert a[d].exact and a[d].strategy == "scan/memory/int8"
