"""The index job's fidelity check: stored features against exact gradients, recorded and warned about."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from proponent.api.schemas import InfluenceParams
from proponent.format.fsio import IndexDir
from proponent.format.manifest import read_manifest
from proponent.format.store import FeatureStore
from proponent.indexer import fidelity
from proponent.indexer.job import IndexOptions, build_index, checkpoints_from_run, describe_fidelity
from proponent.model.featurizers.dense import DenseFeaturizer
from proponent.model.objectives import NOISE_INDEX, draw_noise
from proponent.model.projection import ProjectionSpec, Projector, discover_layers
from proponent.model.runtime import model_from_checkpoint, objective_from_record
from proponent.query.index import open_index
from proponent.query.usecase import answer
from tests.indexer.conftest import build as _build


def test_metrics() -> None:
    e = np.arange(30, dtype=np.float64)[None, :] - 15.0
    same = fidelity.score_agreement(e, e.copy())
    assert same == {"recall_proponents": 1.0, "recall_opponents": 1.0, "relative_error": 0.0}
    flipped = fidelity.score_agreement(e, -e)
    assert flipped["recall_proponents"] == 0.0 and flipped["recall_opponents"] == 0.0
    assert flipped["relative_error"] == pytest.approx(2.0)
    # the top 10 of 30 with the 10th and 11th swapped: 9 of 10 found
    a = e.copy()
    a[0, [19, 20]] = a[0, [20, 19]]
    assert fidelity.recall_at(e[0], a[0], 10, largest=True) == 0.9
    q, p = fidelity.choose_rows(160, seed=3)
    assert (q, p) is not None and len(q) == 32 and len(p) == 128 and not set(q) & set(p)
    q2, p2 = fidelity.choose_rows(160, seed=3)
    assert np.array_equal(q, q2) and np.array_equal(p, p2)
    q3, p3 = fidelity.choose_rows(10, seed=0)
    assert len(q3) == 2 and len(p3) == 8


def test_exact_layout_passes(tiny_run: Path, tmp_path: Path) -> None:
    """``--projection none`` at float32: the stored features are the exact gradients, recall 1, no error."""
    out = _build(tiny_run, tmp_path / "exact", projection=ProjectionSpec(kind="none"), dtype="float32")
    fid = read_manifest(IndexDir(out)).fidelity
    assert fid is not None and fid.passed and fid.warning() is None and len(fid.checkpoints) == 2
    for ch in fid.checkpoints:
        assert ch.recall_proponents == ch.recall_opponents == 1.0 and ch.relative_error < 1e-5
    res = answer(open_index(out, device="cpu"), InfluenceParams(k=3), sample_id=5)
    assert not any("fidelity" in a for a in res.approximations)


def test_narrow_sketch_warns_and_matches_torch_func(tiny_run: Path, tmp_path: Path) -> None:
    """A 12-dimensional tensor sketch falls below the bar: the manifest, the job's log lines and the answers'
    approximations say so; the recorded figures equal those recomputed with torch.func gradients."""
    logs: list[str] = []
    specs, run_json = checkpoints_from_run(tiny_run)
    proj = ProjectionSpec(kind="tensor", dim=12)
    opts = IndexOptions(m=3, device="cpu", projection=proj, dtype="int8", featurizer="dense")
    out = Path(
        build_index(run_json["data"]["spec"], specs, tmp_path / "narrow", opts, show_progress=False, log=logs.append)
    )
    man = read_manifest(IndexDir(out))
    fid = man.fidelity
    assert fid is not None and not fid.passed
    warning = fid.warning()
    assert warning is not None and warning.startswith("fidelity below the bar")
    logged = "\n".join(logs)
    assert "WARNING: " + warning in logged
    for line in describe_fidelity(man).splitlines():  # the same lines, each checkpoint's with its seconds
        assert line.split(" BELOW")[0] in logged
    assert "BELOW THE BAR" in logged
    res = answer(open_index(out, device="cpu"), InfluenceParams(k=3), sample_id=5)
    assert warning in res.approximations
    # independent recomputation: torch.func per-sample gradients of the same rows, the stored features
    store = FeatureStore.open(IndexDir(out))
    q, p = fidelity.choose_rows(man.n, man.objective.seed)
    obj = objective_from_record(man.objective, man.model)
    ids, labels = store.array("ids"), store.array("labels")
    for c, ck in enumerate(man.checkpoints):
        model = model_from_checkpoint(man.model, IndexDir(out).read_bytes(ck.path), ck.path)
        dense = DenseFeaturizer(model, obj, Projector(discover_layers(model), ProjectionSpec(kind="none")))

        def grads(rows: np.ndarray, c: int = c, model: torch.nn.Module = model, dense=dense) -> torch.Tensor:
            eps = draw_noise(NOISE_INDEX, man.objective.seed, c, ids[rows], 3, obj.noise_shape(model))
            x, y = torch.from_numpy(store.inputs(rows)), torch.from_numpy(np.clip(labels[rows], 0, None))
            return dense.featurize(x, y, eps).features.double()

        exact = (grads(q) @ grads(p).T).numpy()
        want = fidelity.score_agreement(exact, store.feature_rows(c, q) @ store.feature_rows(c, p).T)
        got = fid.checkpoints[c]
        assert (got.recall_proponents, got.recall_opponents) == (want["recall_proponents"], want["recall_opponents"])
        assert got.relative_error == pytest.approx(want["relative_error"], rel=1e-4)


def test_deterministic_across_runs(tiny_run: Path, tmp_path: Path) -> None:
    a = read_manifest(IndexDir(_build(tiny_run, tmp_path / "a"))).fidelity
    b = read_manifest(IndexDir(_build(tiny_run, tmp_path / "b"))).fidelity
    assert a is not None and b is not None
    assert a == b and a.model_dump() == b.model_dump()


def test_memory_budget_and_plan() -> None:
    assert fidelity.memory_budget("") == fidelity.DEFAULT_MEMORY
    assert fidelity.memory_budget("512M") == 512 << 20
    assert fidelity.memory_budget("1.5GiB") == int(1.5 * (1 << 30))
    assert fidelity.memory_budget("4096") == 4096
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(ValueError, match=fidelity.MEMORY_ENV):
            fidelity.memory_budget(bad)
    assert fidelity.plan(10_000, 32, 2 << 30) == (32, 32)  # a small model: the full check
    q, chunk = fidelity.plan(10_000_000, 32, 2 << 30)  # 10M entries: the chunk shrinks first
    assert q == 32 and 1 <= chunk < 32
    assert fidelity._needed(10_000_000, q, chunk) <= 2 << 30
    q, chunk = fidelity.plan(40_000_000, 32, 2 << 30)  # then the queries
    assert fidelity.MIN_QUERIES <= q < 32 and chunk == 1
    reason = fidelity.plan(10**9, 32, 2 << 30)  # nothing fits: a reason, not a silent pass
    assert isinstance(reason, str) and reason.startswith("skipped:") and fidelity.MEMORY_ENV in reason


def test_dot64_blocks_equal_one_product() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 70_000, generator=g), torch.randn(5, 70_000, generator=g)  # two column blocks
    np.testing.assert_allclose(fidelity._dot64(a, b), (a.double() @ b.double().T).numpy(), rtol=1e-12)


def test_small_budget_checks_fewer_queries_same_figures(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A budget that fits 4 queries one pool row at a time: the check runs with 4 queries and records what the
    unbounded computation (chunks of 32) gives on the same rows."""
    specs, _ = checkpoints_from_run(tiny_run)
    probe = _build(tiny_run, tmp_path / "probe")
    man0 = read_manifest(IndexDir(probe))
    model0 = model_from_checkpoint(man0.model, IndexDir(probe).read_bytes(man0.checkpoints[0].path), "c0")
    dim = fidelity.exact_dim(model0, man0.projection.selection)
    monkeypatch.setenv(fidelity.MEMORY_ENV, str(fidelity._needed(dim, 4, 2)))
    out = _build(tiny_run, tmp_path / "small")
    man = read_manifest(IndexDir(out))
    fid = man.fidelity
    assert fid is not None and fid.queries == 4
    store = FeatureStore.open(IndexDir(out))
    q, p = fidelity.choose_rows(man.n, man.objective.seed, queries=4)
    obj = objective_from_record(man.objective, man.model)
    for c, ck in enumerate(man.checkpoints):
        model = model_from_checkpoint(man.model, IndexDir(out).read_bytes(ck.path), ck.path)
        want = fidelity.check_checkpoint(man, store, c, model, obj, torch.device("cpu"), q, p, chunk=32)
        got = fid.checkpoints[c]
        assert (got.recall_proponents, got.recall_opponents, got.passed) == (
            want.recall_proponents,
            want.recall_opponents,
            want.passed,
        )
        assert got.relative_error == pytest.approx(want.relative_error, rel=1e-4)  # float32 batch shapes


def test_no_budget_skips_and_says_so(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fidelity.MEMORY_ENV, "1K")
    logs: list[str] = []
    specs, run_json = checkpoints_from_run(tiny_run)
    opts = IndexOptions(m=3, device="cpu", featurizer="dense")
    out = Path(build_index(run_json["data"]["spec"], specs, tmp_path / "x", opts, show_progress=False, log=logs.append))
    assert read_manifest(IndexDir(out)).fidelity is None
    timings = json.loads((out / "timings.json").read_text())
    assert timings["fidelity_skipped"].startswith("skipped:")
    assert any(line.startswith("fidelity: not measured (skipped:") for line in logs)
    res = answer(open_index(out, device="cpu"), InfluenceParams(k=3), sample_id=5)  # the index still serves
    assert len(res.proponents) == 3
