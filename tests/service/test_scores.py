"""Full score vectors (issue 19): GET/POST /v1/scores[/samples/{id}] as .npy, `proponent scores --out`,
`client.scores(...)` -- the same query path as influence, every row scored."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest

from proponent.api.schemas import DEFAULT_SCORING
from proponent.cli import main
from proponent.client import AsyncInfluenceClient
from proponent.client.errors import ProponentError
from proponent.query.index import open_index


def test_scores_of_a_stored_sample_every_way(svc_server, svc_client, svc_index_dir, tmp_path, capsys) -> None:
    idx = open_index(svc_index_dir, device="cpu")
    offline = idx.scores(sample_id=7, scoring=DEFAULT_SCORING)
    got = svc_client.scores(sample_id=7)
    assert got.dtype.names == ("id", "score") and len(got) == idx.n == 300
    assert got["id"].tolist() == idx.meta.ids.tolist()
    np.testing.assert_allclose(got["score"], offline, rtol=1e-9, atol=0)
    # the top of the vector is the influence answer (same featurization, same exact scores)
    ans = svc_client.influence(sample_id=7, k=5, direction="both")
    order = np.argsort(-got["score"], kind="stable")
    assert got["id"][order[:5]].tolist() == ans.ids("proponents")
    np.testing.assert_allclose(got["score"][order[:5]], ans.scores("proponents"), rtol=1e-6)
    assert got["id"][order[::-1][:5]].tolist() == ans.ids("opponents")
    # GET with the parameters in the query string; other scoring and convention
    with httpx.Client(base_url=svc_server.url, timeout=120) as h:
        r = h.get("/v1/scores/samples/7", params={"scoring": "raw", "convention": "visits", "checkpoints": "0,2"})
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"
        assert json.loads(r.headers["x-proponent-approximations"]) == idx.meta.approximations([0, 2])
        raw = np.load(io.BytesIO(r.content), allow_pickle=False)
        want = idx.scores(sample_id=7, scoring="raw", convention="visits", checkpoints=[0, 2])
        np.testing.assert_allclose(raw["score"], want, rtol=1e-9)
        bad = h.post("/v1/scores/samples/7", json={"k": 5})
        assert bad.status_code == 422 and "k: not a parameter of a score vector" in bad.json()["error"]["message"]
        assert h.get("/v1/scores/samples/99999").status_code == 404
    # the CLI writes the same .npy
    out = tmp_path / "s.npy"
    assert main(["scores", "--index", str(svc_index_dir), "--sample-id", "7", "--out", str(out)]) == 0
    assert "scored 300 training samples" in capsys.readouterr().out
    cli = np.load(out, allow_pickle=False)
    assert cli["id"].tolist() == got["id"].tolist()
    np.testing.assert_allclose(cli["score"], got["score"], rtol=1e-9)


def test_scores_of_an_upload(svc_client, svc_server, svc_index_dir) -> None:
    idx = open_index(svc_index_dir, device="cpu")
    x = idx.input(idx.row_of(11))
    got = svc_client.scores(x, scoring="raw", seed=3)
    np.testing.assert_allclose(got["score"], idx.scores(x, scoring="raw", seed=3), rtol=1e-9)

    async def run() -> np.ndarray:
        async with AsyncInfluenceClient(svc_server.url, timeout=120) as c:
            return await c.scores(x, scoring="raw", seed=3)

    import asyncio

    np.testing.assert_array_equal(asyncio.run(run()), got)
    with pytest.raises(ProponentError, match=r"expected shape \(1, 8, 8\), got \(1, 3, 3\)"):
        svc_client.scores(np.zeros((1, 3, 3), np.float32))
