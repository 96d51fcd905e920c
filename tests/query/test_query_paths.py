"""One query path: the CLI (--json), the Python API and the REST API give identical answers.

For a VAE index and a classifier index, stored-sample and uploaded queries, several parameter
sets: the same hits in the same order with the same scores (to the last bit), because all three
call proponent.query.usecase.answer. Classifier queries need a label: a stored sample uses its
stored label, an upload without one is refused with a message that says so.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from proponent.cli import main as cli_main
from proponent.query.index import open_index
from tests.conftest import svc_run_server

pytestmark = pytest.mark.timeout(600)

CASES = [
    {"k": 5, "direction": "both"},
    {"k": 3, "direction": "opponents", "scoring": "cosine", "checkpoints": [1, 3], "convention": "visits"},
    {"k": 4, "scoring": "relatif", "seed": 7},
    {"k": 4, "objective": "reconstruction"},
]


def _cli_args(params: dict) -> list[str]:
    out = []
    for key, v in params.items():
        flag = "--" + key.replace("_", "-")
        out += [flag, ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return out


def _hits(body: dict) -> dict:
    return {
        d: [(h["id"], h["score"], h["stderr"]) for h in body[d]] for d in ("proponents", "opponents") if body.get(d)
    }


def _cli_json(capsys, index: Path, *args: str) -> dict:
    assert cli_main(["influence", "--index", str(index), *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _npy(x: np.ndarray, path: Path) -> Path:
    np.save(path, x)
    return path


@pytest.fixture(scope="module")
def vae_server(svc_index_dir, tmp_path_factory):
    with svc_run_server(index=svc_index_dir, state_dir=tmp_path_factory.mktemp("paths_state")) as s:
        yield s


@pytest.mark.parametrize("params", CASES)
def test_cli_python_and_rest_answer_identically(vae_server, svc_index_dir, tmp_path, capsys, params):
    idx = open_index(svc_index_dir, device="cpu")
    sid = 17
    x = idx.input(idx.row_of(41))
    # stored sample
    rest = httpx.post(f"{vae_server.url}/v1/influence/samples/{sid}", json=params, timeout=120).json()
    py = idx.influence(sample_id=sid, **params).model_dump(mode="json")
    cli = _cli_json(capsys, svc_index_dir, "--sample-id", str(sid), *_cli_args({"direction": "proponents", **params}))
    assert _hits(rest) == _hits(py) == _hits(cli)
    assert rest["exact"] == py["exact"] == cli["exact"] and rest["approximations"] == py["approximations"]
    # upload (an .npy of an exact input): REST multipart, Python array, CLI file
    path = _npy(x, tmp_path / "q.npy")
    form = {k: (json.dumps(v) if isinstance(v, list) else str(v)) for k, v in params.items()}
    rest_up = httpx.post(
        f"{vae_server.url}/v1/influence", files={"file": ("q.npy", path.read_bytes())}, data=form, timeout=120
    ).json()
    py_up = idx.influence(x, **params).model_dump(mode="json")
    cli_up = _cli_json(capsys, svc_index_dir, "--image", str(path), *_cli_args({"direction": "proponents", **params}))
    assert _hits(rest_up) == _hits(py_up) == _hits(cli_up)
    # a stored sample is answered as an upload of its exact stored input
    as_upload = idx.influence(idx.input(idx.row_of(sid)), **params).model_dump(mode="json")
    assert _hits(as_upload) == _hits(py)


@pytest.fixture(scope="module")
def classifier_index(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clf")
    cmd = [sys.executable, "-m", "proponent"]
    subprocess.run(
        [*cmd, "train", "--data", "digits,limit=240", "--model", "classifier", "--hidden", "32", "--epochs", "4"]
        + ["--out", str(root / "run"), "--quiet"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [*cmd, "index", "--run", str(root / "run"), "--out", str(root / "idx"), "--quiet"],
        check=True,
        capture_output=True,
    )
    return root / "idx"


def test_classifier_labels(classifier_index, tmp_path, capsys):
    idx = open_index(classifier_index, device="cpu")
    assert idx.manifest.model.supervised and idx.manifest.objective.name == "cross_entropy"
    row = 12
    sid, label = int(idx.meta.ids[row]), int(idx.meta.labels[row])
    implicit = idx.influence(sample_id=sid, k=6)  # its stored label
    explicit = idx.influence(sample_id=sid, k=6, label=label)
    assert implicit.ids() == explicit.ids() and implicit.scores() == explicit.scores()
    other = idx.influence(sample_id=sid, k=6, label=(label + 1) % 10)
    assert other.scores() != explicit.scores()
    up = idx.influence(idx.input(row), k=6, label=label)
    assert up.ids() == explicit.ids()
    with pytest.raises(ValueError, match="classifier: a query needs its label"):
        idx.influence(idx.input(row), k=6)
    # the same through the CLI and the REST API
    path = _npy(idx.input(row), tmp_path / "q.npy")
    assert cli_main(["influence", "--index", str(classifier_index), "--image", str(path)]) == 2
    assert "needs its label" in capsys.readouterr().err
    cli = _cli_json(capsys, classifier_index, "--sample-id", str(sid), "--k", "6", "--direction", "proponents")
    assert [h["id"] for h in cli["proponents"]] == implicit.ids()
    with svc_run_server(index=classifier_index, state_dir=tmp_path / "s") as s:
        with httpx.Client(base_url=s.url, timeout=120) as h:
            r = h.post("/v1/influence", files={"file": ("q.npy", path.read_bytes())})
            assert r.status_code == 422 and "needs its label" in r.json()["error"]["message"]
            r = h.post(
                "/v1/influence", files={"file": ("q.npy", path.read_bytes())}, data={"label": str(label), "k": "6"}
            )
            assert [hit["id"] for hit in r.json()["proponents"]] == explicit.ids()
            r = h.post(f"/v1/influence/samples/{sid}", json={"k": 6})
            assert [hit["id"] for hit in r.json()["proponents"]] == implicit.ids()


def _same_answers(batch: list[dict], single: list[dict]) -> bool:
    """The same hits in the same order, scores and standard errors equal up to the float32 rounding of a
    batched featurization (one forward/backward for the batch is not batch-shape invariant)."""
    assert len(batch) == len(single)
    for a, b in zip(batch, single, strict=True):
        assert a.keys() == b.keys()
        for d in a:
            assert [h[0] for h in a[d]] == [h[0] for h in b[d]]
            np.testing.assert_allclose(np.array([h[1:] for h in a[d]]), np.array([h[1:] for h in b[d]]), rtol=1e-5)
    return True


def test_batch_answers_equal_single_answers(vae_server, svc_index_dir, tmp_path, capsys):
    """POST /v1/influence/batch, the clients (sync and async), the Python API and the CLI's batch form answer
    each query as its single query (same hits, scores equal up to the float32 rounding of the batch's one
    featurization), from one forward/backward and one pass over the rows."""
    import asyncio

    from proponent.client import AsyncInfluenceClient, InfluenceClient

    idx = open_index(svc_index_dir, device="cpu")
    sids = [17, 3, 41]
    params = {"k": 4, "direction": "both", "scoring": "cosine"}
    single = [_hits(idx.influence(sample_id=s, **params).model_dump(mode="json")) for s in sids]
    rest = httpx.post(f"{vae_server.url}/v1/influence/batch", json={"sample_ids": sids, **params}, timeout=120)
    assert rest.status_code == 200, rest.text
    body = rest.json()
    assert _same_answers([_hits(r) for r in body["results"]], single)
    assert body["results"][0]["search"]["proponents"]["strategy"].endswith("/batch[3]")
    assert body["timings"]["queries_per_s"] > 0
    assert _same_answers(
        [_hits(r.model_dump(mode="json")) for r in idx.influence_batch(sample_ids=sids, **params)], single
    )
    cli = _cli_json(capsys, svc_index_dir, "--sample-ids", "17,3,41", *_cli_args(params))
    assert _same_answers([_hits(r) for r in cli["results"]], single)
    # uploads: an array [B, *shape] (one .npy body), a list of arrays, and files on the CLI
    xs = np.stack([idx.input(idx.row_of(s)) for s in (5, 60)])
    single_x = [_hits(idx.influence(x, **params).model_dump(mode="json")) for x in xs]
    with InfluenceClient(vae_server.url) as c:
        got = c.influence_batch(xs, **params)
    assert _same_answers([_hits(r.model_dump(mode="json")) for r in got.results], single_x)

    async def run_async():
        async with AsyncInfluenceClient(vae_server.url) as c:
            return await c.influence_batch(list(xs), **params), await c.influence_batch(sample_ids=sids, **params)

    got_x, got_ids = asyncio.run(run_async())
    assert _same_answers([_hits(r.model_dump(mode="json")) for r in got_x.results], single_x)
    assert _same_answers([_hits(r.model_dump(mode="json")) for r in got_ids.results], single)
    files = [str(_npy(x, tmp_path / f"q{i}.npy")) for i, x in enumerate(xs)]
    cli_x = _cli_json(capsys, svc_index_dir, "--images", *files, *_cli_args(params))
    assert _same_answers([_hits(r) for r in cli_x["results"]], single_x)
    # bad batches: one line naming the problem
    url = f"{vae_server.url}/v1/influence/batch"
    for req, status, words in [
        ({"json": {"sample_ids": []}}, 422, "at least one query"),
        ({"json": {"sample_ids": [1], "xs": [xs[0].tolist()]}}, 422, 'either "xs"'),
        ({"json": {"sample_ids": [10**9]}}, 404, "10000000"),
        ({"json": {"sample_ids": ["a"]}}, 422, "list of integers"),
        ({"content": b"not npy", "headers": {"content-type": "application/octet-stream"}}, 415, ".npy"),
        ({"content": b"x", "headers": {"content-type": "text/plain"}}, 415, "unsupported content type"),
    ]:
        r = httpx.post(url, timeout=60, **req)
        assert r.status_code == status and words in r.json()["error"]["message"], (req, r.status_code, r.text)
    buf = tmp_path / "bad.npy"
    np.save(buf, np.zeros((2, 3), np.float32))
    r = httpx.post(url, content=buf.read_bytes(), headers={"content-type": "application/octet-stream"}, timeout=60)
    assert r.status_code == 422 and "expected [B, " in r.text
