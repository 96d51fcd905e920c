"""precondition=gram: TRAK's (ΦᵀΦ + λI)⁻¹ over the stored features, applied to the query.

Held to an explicit float64 inverse over the stored features (``tests.helpers.stored_matrix``), on
exact gradients (``projection=none``) and on the default sketch layout (int8 rows with a scale): the
scores of every scoring, the exact top-k, the leverage self-influence; a truncated rank against the
truncated formula; a damaged preconditioner and one made from other features refused by name; the
REST API, the client and the CLI giving one answer.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from proponent.cli import main as cli_main
from proponent.client import InfluenceClient
from proponent.format.fsio import IndexDir
from proponent.format.integrity import verify_index
from proponent.format.manifest import read_manifest, write_manifest
from proponent.indexer.data import load_dataset
from proponent.indexer.training import TrainConfig, train
from proponent.model.architectures import ModelConfig
from proponent.model.projection import ProjectionSpec
from proponent.query.index import open_index
from proponent.query.selfinfluence import SelfInfluenceJob, SelfInfluenceParams
from tests.conftest import svc_run_server
from tests.helpers import build_small_index, query_vectors, stored_matrix, top, weights

pytestmark = pytest.mark.timeout(600)
DATA = "digits,limit=150"
ALPHA = 1000.0


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    data = load_dataset(DATA)
    cfg = ModelConfig(kind="mlp", input_shape=data.shape, hidden=(8,), latent_dim=2)
    out = tmp_path_factory.mktemp("pre_run") / "run"
    return train(data, cfg, out, TrainConfig(epochs=3, batch_size=32, checkpoints=2, seed=3), show_progress=False)


def _build(run: Path, out: Path, **kw) -> Path:
    return build_small_index(run, out, **{"featurizer": "dense", **kw})


def _precondition(index: Path, *extra: str) -> None:
    assert cli_main(["precondition", "--index", str(index), *extra]) == 0


@pytest.fixture(scope="module")
def exact_index(run, tmp_path_factory) -> Path:
    exact = ProjectionSpec(kind="none")
    out = _build(run, tmp_path_factory.mktemp("pre_exact") / "idx", projection=exact, dtype="float32")
    _precondition(out)
    return out


@pytest.fixture(scope="module")
def sketch_index(run, tmp_path_factory) -> Path:
    # a Kronecker sketch (this tiny model is under the default layout's width: it would store exact gradients)
    out = _build(run, tmp_path_factory.mktemp("pre_sketch") / "idx", projection=ProjectionSpec(kind="kron", k=4))
    _precondition(out)
    return out


def _explicit(idx, c: int, rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(P, Φ)`` of checkpoint c from the stored features, by an explicit float64 inverse (or, with ``rank``,
    from the top ``rank`` eigenpairs and 1/λ elsewhere)."""
    phi = stored_matrix(idx, c)
    gram = phi.T @ phi
    d = gram.shape[0]
    lam = ALPHA * np.trace(gram) / d
    if rank is None:
        return np.linalg.inv(gram + lam * np.eye(d)), phi
    eig, vec = np.linalg.eigh(gram)
    v, e = vec[:, ::-1][:, :rank], eig[::-1][:rank]
    return (v / (e + lam)) @ v.T + (np.eye(d) - v @ v.T) / lam, phi


def _reference(idx, vec, scoring: str, rank: int | None = None) -> np.ndarray:
    w = weights(idx, "lr")
    total = np.zeros(idx.n)
    lev_sum = np.zeros(idx.n)
    for c in vec:
        p, phi = _explicit(idx, c, rank)
        q = np.asarray(vec[c], np.float64)
        raw = w[c] * (phi @ (p @ q))
        lev = np.einsum("ij,jk,ik->i", phi, p, phi)
        if scoring == "cosine":
            raw = raw / np.sqrt(q @ p @ q) / np.sqrt(lev)
        total += raw
        lev_sum += w[c] * lev
    return total / np.sqrt(lev_sum) if scoring == "relatif" else total


def _check_against_explicit(idx_path: Path, rank: int | None = None) -> None:
    idx = open_index(idx_path, device="cpu")
    x = idx.input(idx.row_of(7)) * 0.5 + idx.input(idx.row_of(9)) * 0.5
    vec, _ = query_vectors(idx, x, seed=11)
    for scoring in ("raw", "cosine", "relatif"):
        want = _reference(idx, vec, scoring, rank)
        got = idx.scores(x, seed=11, scoring=scoring, precondition="gram")
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9 * np.abs(want).max())
        res = idx.influence(x, seed=11, scoring=scoring, precondition="gram", k=6, direction="both")
        assert res.exact and res.query.precondition == "gram"
        assert any(a.startswith(f"Gram preconditioner (α={ALPHA:g}, λ_c=") for a in res.approximations)
        for d in ("proponents", "opponents"):
            ids, scores = top(idx, want, 6, d)
            hits = getattr(res, d)
            assert [h.id for h in hits] == ids, (scoring, d)
            np.testing.assert_allclose([h.score for h in hits], scores, rtol=1e-6)
    # the leverage self-influence: Σ_c w_c diag(Φ_c P_c Φ_cᵀ)
    w = weights(idx, "lr")
    want_lev = sum(
        w[c] * np.einsum("ij,jk,ik->i", phi, p, phi)
        for c in range(len(idx.checkpoints))
        for p, phi in [_explicit(idx, c, rank)]
    )
    np.testing.assert_allclose(idx.self_influence(precondition="gram"), want_lev, rtol=1e-6)


def test_exact_gradients_equal_an_explicit_inverse(exact_index, tmp_path) -> None:
    idx = open_index(exact_index, device="cpu")
    assert idx.manifest.projection.is_exact and idx.manifest.storage.dtype == "float32"
    assert idx.n < idx.dim  # the N-dimensional route of format.precond._eigenpairs
    rec = idx.manifest.precondition
    assert rec is not None and rec.alpha == ALPHA and not any(ck.truncated for ck in rec.checkpoints)
    assert all(ck.rank <= idx.n for ck in rec.checkpoints)  # a Gram of N rows has at most N nonzero eigenvalues
    _check_against_explicit(exact_index)
    # the same leverage from the resumable self-influence job (what the REST job runs)
    job = SelfInfluenceJob(idx, SelfInfluenceParams(precondition="gram"), tmp_path / "state").run()
    assert job is not None
    np.testing.assert_allclose(job, idx.self_influence(precondition="gram"), rtol=1e-12)
    # without the option nothing changes: no approximation listed
    plain = idx.influence(sample_id=int(idx.meta.ids[3]), k=3)
    assert plain.query.precondition == "none" and plain.approximations == []


def test_sketched_int8_rows_equal_an_explicit_inverse(sketch_index) -> None:
    idx = open_index(sketch_index, device="cpu")
    assert not idx.manifest.projection.is_exact and idx.manifest.storage.dtype == "int8"
    assert idx.dim < idx.n  # the D-dimensional route (the Gram accumulated over row chunks)
    _check_against_explicit(sketch_index)


def test_a_truncated_rank_is_the_stated_approximation(exact_index, tmp_path) -> None:
    copy = tmp_path / "idx"
    shutil.copytree(exact_index, copy)
    _precondition(copy, "--rank", "20")
    idx = open_index(copy, device="cpu")
    rec = idx.manifest.precondition
    assert rec is not None and all(ck.truncated and ck.rank == 20 for ck in rec.checkpoints)
    assert len(list((copy / "precond").iterdir())) == 1  # the replaced preconditioner's files are gone
    res = idx.influence(sample_id=int(idx.meta.ids[5]), precondition="gram", k=3)
    assert any("truncated to its top eigenpairs" in a for a in res.approximations)
    _check_against_explicit(copy, rank=20)


def test_a_damaged_or_foreign_preconditioner_is_refused_by_name(exact_index, sketch_index, tmp_path, capsys) -> None:
    # a flipped byte in a stored array
    copy = tmp_path / "damaged"
    shutil.copytree(exact_index, copy)
    rel = read_manifest(IndexDir(copy)).precondition.checkpoints[1].vectors.path
    data = bytearray((copy / rel).read_bytes())
    data[-3] ^= 0x01
    (copy / rel).write_bytes(bytes(data))
    idx = open_index(copy, device="cpu")
    sid = int(idx.meta.ids[2])
    with pytest.raises(ValueError, match=r"preconditioner .*ckpt_001/vectors\.npy: damaged \(sha256"):
        idx.influence(sample_id=sid, precondition="gram")
    assert idx.influence(sample_id=sid, k=2).proponents  # the index still serves plain queries
    # `proponent verify` names it (and passes the sound index, preconditioner included)
    assert cli_main(["verify", "--index", str(exact_index)]) == 0
    assert "ANN and preconditioner files are consistent" in capsys.readouterr().out
    assert cli_main(["verify", "--index", str(copy)]) == 1
    assert re.search(r"FAIL preconditioner .*ckpt_001/vectors\.npy: damaged \(sha256", capsys.readouterr().out)
    assert verify_index(copy) == []  # the server's check before serving: plain queries are unaffected
    # a preconditioner made from other features (another index's, copied in with its record)
    other = tmp_path / "foreign"
    shutil.copytree(exact_index, other)
    shutil.rmtree(other / "precond")
    shutil.copytree(sketch_index / "precond", other / "precond")
    where = IndexDir(other)
    man = read_manifest(where)
    write_manifest(where, man.model_copy(update={"precondition": read_manifest(IndexDir(sketch_index)).precondition}))
    idx = open_index(other, device="cpu")
    with pytest.raises(ValueError, match=r"preconditioner of checkpoint 0 .*made from other features"):
        idx.influence(sample_id=sid, precondition="gram")
    found = verify_index(other, preconditioner=True)
    assert len(found) >= 2 and all("made from other features" in p or "shape" in p for p in found), found
    assert any("checkpoint 1" in p for p in found)  # every checkpoint named, not only the first
    # a missing file
    (copy / rel).unlink()
    assert any(
        p.endswith("missing; remake it with `proponent precondition --index`")
        for p in verify_index(copy, preconditioner=True)
    )
    # none at all: the error names the command that makes one
    none = tmp_path / "none"
    shutil.copytree(exact_index, none)
    shutil.rmtree(none / "precond")
    write_manifest(IndexDir(none), read_manifest(IndexDir(none)).model_copy(update={"precondition": None}))
    idx = open_index(none, device="cpu")
    with pytest.raises(ValueError, match=r"no stored preconditioner; make one with `proponent precondition --index"):
        idx.influence(sample_id=sid, precondition="gram")


def _hits(body: dict) -> dict:
    return {d: [(h["id"], h["score"]) for h in body[d]] for d in ("proponents", "opponents") if body.get(d)}


def test_rest_client_and_cli_give_the_same_answer(exact_index, tmp_path, capsys) -> None:
    idx = open_index(exact_index, device="cpu")
    sid = int(idx.meta.ids[17])
    params = {"k": 4, "direction": "both", "scoring": "relatif", "precondition": "gram", "seed": 2}
    py = idx.influence(sample_id=sid, **params).model_dump(mode="json")
    flags = [a for k, v in params.items() for a in (f"--{k}", str(v))]
    assert cli_main(["influence", "--index", str(exact_index), "--sample-id", str(sid), *flags, "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    with svc_run_server(index=exact_index, state_dir=tmp_path / "state") as s:
        rest = httpx.post(f"{s.url}/v1/influence/samples/{sid}", json=params, timeout=120).json()
        with InfluenceClient(s.url, retries=0, timeout=120) as c:
            client = c.influence(sample_id=sid, **params).model_dump(mode="json")
            assert "gram" in c.index_info().preconditions
            job = c.start_self_influence(precondition="gram").wait(timeout=120)
            rows = job.result()
            got = {r.id: r.self_influence for r in rows}
            want = idx.self_influence(precondition="gram")
            np.testing.assert_allclose([got[int(i)] for i in idx.meta.ids], want, rtol=1e-12)
            assert job.info.params["precondition"] == "gram"
        r = httpx.post(f"{s.url}/v1/jobs/self-influence", json={"precondition": "gram", "m": 2}, timeout=60)
        assert r.status_code == 422 and "precondition=gram" in r.json()["error"]["message"]
    assert _hits(rest) == _hits(py) == _hits(cli) == _hits(client)
    assert rest["approximations"] == py["approximations"] == cli["approximations"] == client["approximations"]
    assert rest["query"]["precondition"] == "gram"
