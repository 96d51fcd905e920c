"""Synthetic indexes (the benchmarks' large-N stand-in) are real indexes: verified, served, queried."""

from __future__ import annotations

import numpy as np
import pytest

from proponent.format.integrity import verify_index
from proponent.indexer.synthetic import synthetic_index
from proponent.query.index import open_index


@pytest.mark.parametrize("dim", [962, 7996])
def test_synthetic_index_has_the_default_layout_at_the_width_asked(tmp_path, dim):
    out = synthetic_index(tmp_path / "syn", n=300, checkpoints=2, dim=dim, show_progress=False)
    assert verify_index(out, deep=True) == []
    idx = open_index(out, device="cpu")
    assert idx.manifest.projection.kind == "tensor"
    assert 0.97 * dim <= idx.dim <= dim  # FFT-friendly per-layer sizes round down a little
    assert idx.manifest.storage.dtype == "int8"
    x = np.random.default_rng(0).random(idx.shape, dtype=np.float32)
    r = idx.influence(x, k=5, direction="both")
    assert r.exact and len(r.proponents) == 5 and len(r.opponents) == 5
    # the scan's answer is the brute-force top-k over the stored features
    scores = idx.scores(x)
    assert sorted(r.ids("proponents")) == sorted(np.argsort(-scores)[:5].tolist())


def test_synthetic_index_refuses_a_width_beyond_the_model(tmp_path):
    with pytest.raises(ValueError, match="exceeds the synthetic model"):
        synthetic_index(tmp_path / "syn", n=10, checkpoints=1, dim=10**6, show_progress=False)
