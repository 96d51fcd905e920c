"""End-to-end tests of the influence server: a real uvicorn server, the real client, a real index."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from proponent.api.schemas import DEFAULT_SCORING
from proponent.client import InfluenceClient, Overloaded, Unauthorized
from tests.conftest import SVC_DATA, svc_run_server  # noqa: F401
from tests.helpers import query_vectors, reference_scores, top

pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------------------------- helpers
def reference(index, x, k, direction, *, scoring=DEFAULT_SCORING, convention="lr", checkpoints=None, seed=0, **kw):
    """Ids and scores of a query by the reference computation (tests/helpers.py)."""
    vec, sqn = query_vectors(index, x, seed=seed, checkpoints=checkpoints, **kw)
    total = reference_scores(index, vec, sqn, scoring=scoring, convention=convention, checkpoints=checkpoints)
    return top(index, total, k, direction)


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def err(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["status"] == r.status_code
    assert body["error"]["request_id"] == r.headers["x-request-id"]
    return body["error"]


# ---------------------------------------------------------------------------------- basics
def test_health_ready_metrics_openapi(svc_server):
    with httpx.Client(base_url=svc_server.url) as h:
        assert h.get("/healthz").json()["status"] == "ok"
        assert h.get("/readyz").status_code == 200
        r = h.get("/healthz", headers={"X-Request-ID": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        assert len(h.get("/healthz").headers["x-request-id"]) == 32
        h.post("/v1/influence/samples/0", json={"k": 3})
        m = h.get("/metrics").text
        assert "proponent_requests_total" in m and "proponent_search_candidates_bucket" in m
        assert 'route="/v1/influence/samples/{sample_id}"' in m
        assert "proponent_query_queue_depth" in m and "proponent_jobs" in m
        spec = h.get("/openapi.json").json()
        for path in (
            "/v1/influence",
            "/v1/influence/samples/{sample_id}",
            "/v1/samples/{sample_id}",
            "/v1/jobs/self-influence",
            "/v1/jobs/{job_id}/result",
            "/v1/factors",
            "/v1/index",
            "/healthz",
            "/metrics",
        ):
            assert path in spec["paths"], path
        post = spec["paths"]["/v1/influence"]["post"]
        assert {"multipart/form-data", "application/json"} <= set(post["requestBody"]["content"])
        assert "InfluenceResponse" in json.dumps(post["responses"]["200"]) and "ErrorBody" in json.dumps(
            post["responses"]["422"]
        )
        assert h.get("/docs").status_code == 200


def test_index_info(svc_client, svc_server):
    info = svc_client.index_info()
    idx = svc_server.index
    assert info.n == idx.n == 300 and info.dim == idx.dim and info.shape == [1, 8, 8]
    assert len(info.checkpoints) == 5 and info.exact and info.featurizer == "dense"
    assert info.serving["mode"] == "memory" and info.storage["dtype"] == idx.manifest.storage.dtype
    assert info.scorings == ["raw", "cosine", "relatif"] and info.default_scoring in info.scorings
    assert info.dataset_spec == SVC_DATA and info.has_labels and "elbo" in info.query_objectives
    c = info.checkpoints[2]
    assert c.weight_visits == pytest.approx(c.lr * c.batch_size * c.steps_since_prev / info.n)
    # the index job's fidelity check, as recorded in the manifest, with its warning (if any)
    fid = idx.manifest.fidelity
    assert fid is not None and info.fidelity is not None and len(info.fidelity["checkpoints"]) == 5
    assert info.fidelity["checkpoints"][2]["recall_proponents"] == fid.checkpoints[2].recall_proponents
    assert info.fidelity["warning"] == fid.warning()


def test_sample_and_image(svc_client, svc_server):
    s = svc_client.sample(7)
    idx = svc_server.index
    assert s.id == 7 and s.label == int(idx.meta.labels[7]) and s.source == SVC_DATA and s.source_row == 7
    assert s.self_influence == pytest.approx(float(idx.self_influence("lr")[7]))
    assert len(s.latent_mu) == 16
    png = svc_client.sample_image(7, scale=4)
    img = Image.open(io.BytesIO(png))
    assert img.size == (32, 32)
    back = np.asarray(img)[::4, ::4] / 255.0
    np.testing.assert_allclose(back, idx.input(7)[0], atol=0.5 / 255)


# ---------------------------------------------------------------------------------- correctness
def _most_self_dominant_row(index, scoring: str = DEFAULT_SCORING) -> int:
    """The row whose stored features score themselves highest relative to every other row (under ``scoring``)."""
    from tests.helpers import stored_matrix

    s = np.zeros((index.n, index.n))
    sq = [index.store.sq_norm(c) for c in range(len(index.checkpoints))]
    self_inf = sum(w * sq[c] for c, w in enumerate(index.weights("lr")))
    for c, w in enumerate(index.weights("lr")):
        f = stored_matrix(index, c)
        term = w * f @ f.T
        if scoring == "cosine":
            term /= np.sqrt(np.outer(sq[c], sq[c]))
        s += term
    if scoring == "relatif":
        s /= np.sqrt(self_inf)[None, :]
    diag = np.diag(s).copy()
    np.fill_diagonal(s, -np.inf)
    return int(np.argmax((diag - s.max(axis=1)) / np.abs(diag)))


def test_own_image_is_first_proponent(svc_client, svc_server):
    idx = svc_server.index
    row = _most_self_dominant_row(idx)
    sid = int(idx.meta.ids[row])
    by_id = svc_client.influence(sample_id=sid, k=5)
    assert by_id.proponents[0].id == sid and by_id.query.sample_id == sid
    by_image = svc_client.influence(idx.input(row), k=5)  # an upload of the exact stored input
    assert [h.id for h in by_image.proponents] == [h.id for h in by_id.proponents]
    assert [h.score for h in by_image.proponents] == [h.score for h in by_id.proponents]
    assert by_image.exact and by_image.timings.featurize_ms > 0
    stored = svc_client.influence(sample_id=sid, k=5, features="stored")
    assert stored.proponents[0].id == sid and stored.query.features == "stored"


@pytest.mark.parametrize("convention", ["lr", "visits"])
@pytest.mark.parametrize("checkpoints", [None, [0, 2, 4], [3]])
@pytest.mark.parametrize("k", [1, 5, 50])
def test_stored_sample_query_equals_brute_force(svc_client, svc_server, k, checkpoints, convention):
    idx = svc_server.index
    sid = 11
    r = svc_client.influence(sample_id=sid, k=k, direction="both", checkpoints=checkpoints, convention=convention)
    cks = checkpoints or [0, 1, 2, 3, 4]
    assert r.query.checkpoints == cks and r.query.convention == convention
    for direction in ("proponents", "opponents"):
        hits = getattr(r, direction)
        ids, scores = reference(
            idx, idx.input(idx.row_of(sid)), k, direction, convention=convention, checkpoints=checkpoints
        )
        assert [h.id for h in hits] == ids
        np.testing.assert_allclose([h.score for h in hits], scores, rtol=1e-9)
        for h in hits:
            assert len(h.contributions) == len(cks)
            assert sum(h.contributions) == pytest.approx(h.score, rel=1e-9, abs=1e-12)
        assert r.search[direction].candidates >= k and r.search[direction].strategy.startswith("scan/memory")
    assert r.exact


@pytest.mark.parametrize("scoring", ["raw", "cosine", "relatif"])
def test_scorings_equal_brute_force(svc_client, svc_server, scoring):
    idx = svc_server.index
    x = idx.input(40)
    r = svc_client.influence(x, k=10, direction="both", scoring=scoring, checkpoints=[1, 2, 4])
    assert r.query.scoring == scoring and r.exact
    for direction in ("proponents", "opponents"):
        ids, scores = reference(idx, x, 10, direction, scoring=scoring, checkpoints=[1, 2, 4])
        assert [h.id for h in getattr(r, direction)] == ids
        np.testing.assert_allclose([h.score for h in getattr(r, direction)], scores, rtol=1e-9)


def test_uncertainty_per_hit(svc_client, svc_server):
    """Standard errors from the query's m draws (paper Theorem 1), and the unresolved adjacent pairs."""
    idx = svc_server.index
    r = svc_client.influence(sample_id=5, k=8, direction="both", scoring="raw")
    m = idx.manifest.objective.m
    assert r.query.m == m == 4
    for d in ("proponents", "opponents"):
        hits = getattr(r, d)
        assert all(h.stderr is not None and h.stderr >= 0 for h in hits)
        assert hits[-1].separated_from_next is None
        pairs = [[h.rank, h.rank + 1] for h in hits[:-1] if not h.separated_from_next]
        assert r.unresolved[d] == pairs
    # the per-draw scores average to the score: recompute the standard error from per-draw features
    x = idx.input(idx.row_of(5))
    qf = idx.runtime.featurize(x[None], seed=0, checkpoints=[0, 1, 2, 3, 4], per_draw=True)
    from tests.helpers import stored_matrix, weights

    w = weights(idx, "lr")
    rows = [idx.row_of(h.id) for h in r.proponents]
    per_draw = sum(
        (qf.per_draw[c][0].astype(np.float64) * w[c]) @ stored_matrix(idx, c)[rows].T for c in range(5)
    )  # [m, k]
    np.testing.assert_allclose(per_draw.mean(axis=0), [h.score for h in r.proponents], rtol=1e-4)
    np.testing.assert_allclose(per_draw.std(axis=0, ddof=1) / np.sqrt(m), [h.stderr for h in r.proponents], rtol=1e-6)
    off = svc_client.influence(sample_id=5, k=3, uncertainty=False)
    assert all(h.stderr is None for h in off.proponents) and off.unresolved["proponents"] == []


@pytest.mark.parametrize(
    ("direction", "k", "checkpoints", "convention"), [("both", 5, None, "lr"), ("opponents", 50, [1, 4], "visits")]
)
def test_uploaded_query_equals_brute_force(svc_client, svc_server, direction, k, checkpoints, convention):
    idx = svc_server.index
    rng = np.random.default_rng(3)
    x = np.clip(idx.input(20) + 0.1 * rng.standard_normal(idx.shape), 0, 1).astype(np.float32)
    seed = 42
    with httpx.Client(base_url=svc_server.url, timeout=120) as h:  # JSON body variant
        body = {
            "x": x.tolist(),
            "k": k,
            "direction": direction,
            "checkpoints": checkpoints,
            "convention": convention,
            "seed": seed,
        }
        raw = h.post("/v1/influence", json=body)
    assert raw.status_code == 200, raw.text
    r = raw.json()
    assert r["query"]["seed"] == seed
    dirs = ["proponents", "opponents"] if direction == "both" else [direction]
    for d in dirs:
        ids, scores = reference(idx, x, k, d, convention=convention, checkpoints=checkpoints, seed=seed)
        assert [hit["id"] for hit in r[d]] == ids
        np.testing.assert_allclose([hit["score"] for hit in r[d]], scores, rtol=1e-9)


def test_latent_prefilter_is_exact_over_its_candidates_and_flagged(svc_client, svc_server):
    idx = svc_server.index
    row = 11
    mu = idx.store.array("latent_mu")
    near = np.argsort(((mu - mu[row]) ** 2).sum(axis=1), kind="stable")[:40]
    r = svc_client.influence(sample_id=int(idx.meta.ids[row]), k=5, direction="both", prefilter=40)
    assert r.exact is False and any("latent pre-filter" in a for a in r.approximations)
    assert r.search["proponents"].strategy == "prefilter"
    vec, sqn = query_vectors(idx, idx.input(row))
    total = reference_scores(idx, vec, sqn, scoring=DEFAULT_SCORING)
    for direction, hits in (("proponents", r.proponents), ("opponents", r.opponents)):
        assert {idx.row_of(h.id) for h in hits} <= set(near.tolist())
        sign = 1 if direction == "proponents" else -1
        want = near[np.lexsort((near, -sign * total[near]))[:5]]
        assert [idx.row_of(h.id) for h in hits] == want.tolist()
        np.testing.assert_allclose([h.score for h in hits], total[want], rtol=1e-9)
    # a pre-filter as large as the index gives the exact answer (still flagged as pre-filtered)
    full = svc_client.influence(sample_id=int(idx.meta.ids[row]), k=5, prefilter=idx.n)
    exact = svc_client.influence(sample_id=int(idx.meta.ids[row]), k=5)
    assert [h.id for h in full.proponents] == [h.id for h in exact.proponents] and exact.exact
    # uploads are pre-filtered around their own encoder mean
    up = svc_client.influence(idx.input(row), k=3, prefilter=25)
    assert up.exact is False and len(up.proponents) == 3


def test_cross_loss_objective(svc_client, svc_server):
    r = svc_client.influence(sample_id=3, k=5, objective="kl", checkpoints=[4])
    assert r.query.objective == "kl" and len(r.proponents) == 5
    idx = svc_server.index
    from proponent.query.crossloss import make_query_objective

    obj = make_query_objective(idx, "kl")
    ids, _ = reference(idx, idx.input(idx.row_of(3)), 5, "proponents", checkpoints=[4], objective=obj)
    assert [h.id for h in r.proponents] == ids


# ---------------------------------------------------------------------------------- bad requests
def test_bad_requests(svc_server):
    idx = svc_server.index
    good = png_bytes(idx.input(0)[0])
    with httpx.Client(base_url=svc_server.url, timeout=60) as h:

        def up(data: bytes, **form):
            return h.post("/v1/influence", files={"file": ("q", data, "image/png")}, data=form)

        e = err(up(b"this is certainly not an image"))
        assert e["code"] == "unsupported_media_type" and "neither an image" in e["message"]
        r = up(good[:40] + b"\x00" * 30)  # PNG magic, corrupt body
        assert r.status_code == 422 and "decode" in err(r)["message"]
        r = up(png_bytes(np.zeros((10, 10))))
        assert r.status_code == 422 and "expected shape (1, 8, 8), got (1, 10, 10)" in err(r)["message"]
        r = up(npy_bytes(np.zeros((3, 3), np.float32)))
        assert r.status_code == 422 and "got (1, 3, 3)" in err(r)["message"]
        r = h.post("/v1/influence", json={"x": [[0.0] * 3] * 3})
        assert r.status_code == 422 and "expected the index's input shape [1, 8, 8]" in err(r)["message"]
        r = h.post("/v1/influence", json={"x": [[0.0, 1.0], [1.0]]})
        assert r.status_code == 422
        r = h.post("/v1/influence", json={"k": 3})
        assert r.status_code == 422 and '"x"' in err(r)["message"]
        r = h.post("/v1/influence", content=b"hello", headers={"content-type": "text/plain"})
        assert r.status_code == 415 and "text/plain" in err(r)["message"]
        r = h.post("/v1/influence/samples/3", content=b"k=3", headers={"content-type": "text/plain"})
        assert r.status_code == 415
        # unknown sample, bad ids
        for path in ("/v1/samples/999999", "/v1/samples/999999/image.png"):
            r = h.get(path)
            assert r.status_code == 404 and "999999" in err(r)["message"]
        r = h.post("/v1/influence/samples/999999", json={})
        assert r.status_code == 404 and "not in the index" in err(r)["message"]
        for bad in ("-1", "abc", "1.5"):
            assert h.get(f"/v1/samples/{bad}").status_code == 422
            assert h.post(f"/v1/influence/samples/{bad}").status_code == 422
        assert h.get("/v1/samples/1/image.png?scale=17").status_code == 422
        # parameters
        for k in (0, 1001, -3):
            r = h.post("/v1/influence/samples/1", json={"k": k})
            assert r.status_code == 422 and "k" in err(r)["message"]
        r = up(good, k="abc")
        assert r.status_code == 422 and "k" in err(r)["message"]
        r = h.post("/v1/influence/samples/1", json={"checkpoints": [0, 7]})
        assert r.status_code == 422 and "unknown checkpoint(s) [7]" in err(r)["message"]
        r = up(good, checkpoints="0,9")
        assert r.status_code == 422 and "[9]" in err(r)["message"]
        r = h.post("/v1/influence/samples/1", json={"direction": "sideways"})
        assert r.status_code == 422 and "direction" in err(r)["message"]
        r = h.post("/v1/influence/samples/1", json={"objective": "nonsense"})
        assert r.status_code == 422 and "unknown objective" in err(r)["message"]
        r = h.post("/v1/influence/samples/1", json={"objective": "elbo_beta"})
        assert r.status_code == 422 and "beta" in err(r)["message"]
        r = h.post("/v1/influence/samples/1", json={"convention": "both"})
        assert r.status_code == 422
        r = h.post("/v1/influence/samples/1", json={"surprise": 1})
        assert r.status_code == 422 and "surprise" in err(r)["message"]
        r = h.post("/v1/influence/samples/1", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422
        # unknown route, wrong method: same error shape
        assert err(h.get("/v1/nope"))["status"] == 404
        assert err(h.get("/v1/influence"))["status"] == 405


def test_oversize_and_pixel_bomb(svc_server):
    limit = svc_server.state.settings.max_upload_bytes
    big = b"\x89PNG\r\n\x1a\n" + b"\x00" * (limit + 10)
    with httpx.Client(base_url=svc_server.url, timeout=60) as h:
        r = h.post("/v1/influence", files={"file": ("q.png", big, "image/png")})
        assert r.status_code == 413 and "limit" in err(r)["message"]

        def stream():  # no Content-Length: counted while reading
            for _ in range(40):
                yield b"\x00" * 16384

        try:
            r = h.post("/v1/influence", content=stream(), headers={"content-type": "application/octet-stream"})
            assert r.status_code == 413 and "limit" in err(r)["message"]
        except httpx.TransportError:
            pass  # the server may close the connection once it has answered 413
        # a pixel bomb: tiny file, 2000x2000 pixels > max_image_pixels (1,000,000 in this server)
        buf = io.BytesIO()
        Image.new("L", (2000, 2000)).save(buf, format="PNG")
        assert len(buf.getvalue()) < limit
        r = h.post("/v1/influence", files={"file": ("bomb.png", buf.getvalue(), "image/png")})
        assert r.status_code == 413 and "pixels" in err(r)["message"]
        assert h.get("/healthz").status_code == 200


def test_api_keys(svc_index_dir, tmp_path):
    with svc_run_server(index=svc_index_dir, state_dir=tmp_path, api_keys=["k1-secret", "k2-secret"]) as s:
        with httpx.Client(base_url=s.url) as h:
            r = h.get("/v1/index")
            assert r.status_code == 401 and "missing API key" in err(r)["message"]
            r = h.get("/v1/index", headers={"X-API-Key": "wrong"})
            assert r.status_code == 401 and "invalid" in err(r)["message"]
            assert h.get("/v1/index", headers={"X-API-Key": "k2-secret"}).status_code == 200
            assert h.get("/v1/samples/1", headers={"Authorization": "Bearer k1-secret"}).status_code == 200
            assert h.get("/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
            assert h.get("/healthz").status_code == 200 and h.get("/metrics").status_code == 200
        with pytest.raises(Unauthorized):
            InfluenceClient(s.url).index_info()
        assert InfluenceClient(s.url, api_key="k1-secret").sample(2).id == 2


def test_queue_overflow_503(svc_index_dir, tmp_path):
    with svc_run_server(index=svc_index_dir, state_dir=tmp_path, queue_size=1, query_workers=1) as s:
        results: list[httpx.Response] = []
        lock = threading.Lock()

        def query():  # featurizes (objective != elbo), which needs the index's model lock
            r = httpx.post(s.url + "/v1/influence/samples/4", json={"objective": "reconstruction", "k": 3}, timeout=120)
            with lock:
                results.append(r)

        def waiting() -> int:
            return s.state.engine.depth

        # Hold the model lock: the one worker blocks inside its first query, the next query fills the queue.
        with s.index.runtime.featurize_lock:
            first = threading.Thread(target=query)
            first.start()
            deadline = time.monotonic() + 30
            while s.state.engine.active < 1:  # the worker has taken the first query and blocks on the lock
                assert time.monotonic() < deadline
                time.sleep(0.01)
            second = threading.Thread(target=query)
            second.start()
            while waiting() < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            burst = [threading.Thread(target=query) for _ in range(4)]
            for t in burst:
                t.start()
            for t in burst:
                t.join()
            with pytest.raises(Overloaded) as ei:  # the client with retries=0 surfaces it, with retry_after
                InfluenceClient(s.url, retries=0).influence(sample_id=4, objective="reconstruction", k=3)
            assert ei.value.retry_after == 1.0 and ei.value.code == "overloaded"
        first.join()
        second.join()
        statuses = sorted(r.status_code for r in results)
        assert statuses == [200, 200, 503, 503, 503, 503], statuses
        for r in results:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1" and "queue is full" in err(r)["message"]
        assert "proponent_queries_rejected_total 5.0" in httpx.get(s.url + "/metrics").text
        # still answers correctly afterwards
        r = InfluenceClient(s.url, retries=0).influence(sample_id=4, k=3)
        ids, _ = reference(s.index, s.index.input(s.index.row_of(4)), 3, "proponents")
        assert [h.id for h in r.proponents] == ids


def test_job_id_validation(svc_server):
    with httpx.Client(base_url=svc_server.url) as h:
        for bad in ("..%2F..%2Fetc%2Fpasswd", "../../etc/passwd", "%2e%2e", "abc", "0" * 31 + "g", "0" * 33):
            r = h.get(f"/v1/jobs/{bad}")
            assert r.status_code in (404, 422), (bad, r.status_code)
            assert "error" in r.json()
            r = h.get(f"/v1/jobs/{bad}/result")
            assert r.status_code in (404, 422)
        r = h.get("/v1/jobs/" + "0" * 32)
        assert r.status_code == 404 and "not found" in err(r)["message"]
        r = h.post("/v1/jobs/self-influence", json={"checkpoints": [11]})  # a body is optional (see below)
        assert r.status_code == 422 and "[11]" in err(r)["message"]
        assert h.post("/v1/jobs/self-influence", json={"m": 0}).status_code == 422
        assert h.post("/v1/jobs/self-influence", json={"convention": "x"}).status_code == 422


# ---------------------------------------------------------------------------------- jobs
JOB = {"convention": "visits", "checkpoints": [0, 2, 4], "m": 2, "seed": 5}


@pytest.fixture(scope="module")
def svc_offline_self_influence(svc_index_dir, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("si") / "x.csv"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "proponent",
            "self-influence",
            "--index",
            str(svc_index_dir),
            "--out",
            str(out),
            "--convention",
            "visits",
            "--checkpoints",
            "0,2,4",
            "--m",
            "2",
            "--seed",
            "5",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return list(csv.DictReader(out.open()))


def _same_ranking(rows_a, rows_b):
    assert [int(r["id"]) for r in rows_a] == [int(r["id"]) for r in rows_b]
    np.testing.assert_allclose(
        [float(r["self_influence"]) for r in rows_a], [float(r["self_influence"]) for r in rows_b], rtol=1e-12
    )


def test_self_influence_job_equals_cli(svc_client, svc_server, svc_offline_self_influence):
    job = svc_client.start_self_influence(**JOB)
    assert job.state in ("queued", "running") and len(job.id) == 32
    job.wait(timeout=240)
    chunks = len(JOB["checkpoints"]) * svc_server.index.store.layout.n_chunks
    assert job.info.progress.done == job.info.progress.total == chunks
    rows = job.result()
    _same_ranking([r.model_dump() for r in rows], svc_offline_self_influence)
    assert [r.rank for r in rows] == list(range(1, 301))
    text = job.result(format="csv")
    _same_ranking(list(csv.DictReader(io.StringIO(text))), svc_offline_self_influence)
    assert job.id in [j.id for j in svc_client.jobs()]
    with httpx.Client(base_url=svc_client.base_url) as h:
        r = h.get(f"/v1/jobs/{job.id}/result", params={"offset": 290, "limit": 50})
        page = r.json()
        assert page["total"] == 300 and len(page["items"]) == 10 and page["items"][0]["rank"] == 291


def test_unbiased_self_influence_job_equals_offline(svc_client, svc_server, tmp_path):
    from proponent.query.selfinfluence import SelfInfluenceJob, SelfInfluenceParams

    job = svc_client.start_self_influence(m=1, seed=4, checkpoints=[4], estimator="unbiased")
    job.wait(timeout=240)
    assert job.info.params["estimator"] == "unbiased"
    rows = job.result()
    want = SelfInfluenceJob(
        svc_server.index, SelfInfluenceParams(checkpoints=[4], m=1, seed=4, estimator="unbiased"), tmp_path / "s"
    ).run()
    got = {r.id: r.self_influence for r in rows}
    np.testing.assert_allclose([got[int(i)] for i in svc_server.index.meta.ids], want, rtol=1e-9)


def test_self_influence_job_without_body_uses_defaults(svc_server):
    with httpx.Client(base_url=svc_server.url, timeout=60) as h:
        r = h.post("/v1/jobs/self-influence")
        assert r.status_code == 202, r.text
        info = r.json()
        assert info["params"] == {
            "convention": "lr",
            "checkpoints": [0, 1, 2, 3, 4],
            "m": None,
            "seed": 0,
            "estimator": "norm",
            "precondition": "none",
        }
        job = InfluenceClient(svc_server.url).job(info["id"]).wait(timeout=120)
        rows = job.result()
        want = svc_server.index.self_influence("lr")
        got = {r.id: r.self_influence for r in rows}
        np.testing.assert_allclose([got[int(i)] for i in svc_server.index.meta.ids], want, rtol=1e-12)


def test_job_survives_sigkill_restart(svc_index_dir, tmp_path, svc_process_factory, svc_offline_self_influence):
    state = tmp_path / "state"
    srv = svc_process_factory(svc_index_dir, state).start()
    c = InfluenceClient(srv.url, retries=0)
    job = c.start_self_influence(**JOB)
    deadline = time.monotonic() + 120
    while True:
        job.refresh()
        if 0 < job.info.progress.done < job.info.progress.total:
            break
        assert job.state in ("queued", "running") and time.monotonic() < deadline, job.info
        time.sleep(0.02)
    srv.kill()  # SIGKILL mid-job
    persisted = json.loads((state / "jobs" / job.id / "job.json").read_text())
    assert persisted["state"] == "running" and persisted["progress"]["done"] > 0
    srv2 = svc_process_factory(svc_index_dir, state, port=srv.port).start()
    c2 = InfluenceClient(srv2.url, retries=3)
    job2 = c2.job(job.id).wait(timeout=240)
    assert job2.state == "succeeded"
    _same_ranking([r.model_dump() for r in job2.result()], svc_offline_self_influence)
    srv2.terminate()  # graceful: lifespan shutdown runs (uvicorn re-raises SIGTERM afterwards)
    assert srv2.proc.returncode in (0, -15)
    assert "stopped" in srv2.log.read_text()


# ---------------------------------------------------------------------------------- start-up
def _lifespan(index_dir: Path, state: Path):
    from proponent.service.app import create_app
    from proponent.service.settings import Settings

    app = create_app(Settings(index=index_dir, state_dir=state))

    async def go():
        async with app.router.lifespan_context(app):
            pass

    asyncio.run(go())


def test_startup_refuses_broken_index(svc_index_dir, tmp_path):
    bad = tmp_path / "idx"
    shutil.copytree(svc_index_dir, bad)
    (bad / "store.zarr" / "ckpt_001" / "features" / "c" / "0" / "0").unlink()
    with pytest.raises(Exception, match=r"ckpt_001/features/c/0/0: chunk missing"):
        _lifespan(bad, tmp_path / "s")
    shutil.rmtree(bad)
    shutil.copytree(svc_index_dir, bad)
    man = json.loads((bad / "manifest.json").read_text())
    ck = bad / man["checkpoints"][2]["path"]
    data = bytearray(ck.read_bytes())
    data[-1] ^= 0xFF
    ck.write_bytes(bytes(data))
    with pytest.raises(Exception, match=r"checkpoint 2: .*damaged \(sha256 differs"):
        _lifespan(bad, tmp_path / "s")
    with pytest.raises(Exception, match="no index configured"):
        from proponent.service.app import create_app
        from proponent.service.settings import Settings

        app = create_app(Settings(index=None, state_dir=tmp_path))

        async def go():
            async with app.router.lifespan_context(app):
                pass

        asyncio.run(go())


def test_raw_body_upload_with_query_string(svc_server, svc_client):
    idx = svc_server.index
    x = idx.input(30)
    with httpx.Client(base_url=svc_server.url, timeout=120) as h:
        r = h.post(
            "/v1/influence",
            params={"k": 4, "checkpoints": "1,3", "seed": 2},
            content=npy_bytes(x),
            headers={"content-type": "application/octet-stream"},
        )
    assert r.status_code == 200, r.text
    ref = svc_client.influence(x, k=4, checkpoints=[1, 3], seed=2)
    assert [h["id"] for h in r.json()["proponents"]] == [h.id for h in ref.proponents]
    assert r.json()["query"]["checkpoints"] == [1, 3]


def test_job_gradient_work_runs_on_the_engine_worker(svc_client, svc_server, tmp_path):
    """A recompute job's chunks run on the query engine's worker (the server's one torch thread,
    proponent.threads), between queries, and give the same scores as the job run directly."""
    import threading

    from proponent.query.selfinfluence import SelfInfluenceJob, SelfInfluenceParams

    jobs, engine = svc_server.state.jobs, svc_server.state.engine
    assert jobs.compute == engine.compute  # the app's wiring
    threads: list[str] = []

    def spy(fn):
        return engine.compute(lambda: (threads.append(threading.current_thread().name), fn())[1])

    jobs.compute = spy
    try:
        job = svc_client.start_self_influence(m=2, seed=5, checkpoints=[3])
        r = svc_client.proponents(sample_id=7, k=3)  # a query meanwhile: served between chunks
        assert r.proponents[0].id == 7
        job.wait(timeout=240)
    finally:
        jobs.compute = engine.compute
    assert threads == ["query-worker-0"] * svc_server.index.store.layout.n_chunks
    want = SelfInfluenceJob(svc_server.index, SelfInfluenceParams(checkpoints=[3], m=2, seed=5), tmp_path / "s").run()
    got = {r.id: r.self_influence for r in job.result()}
    np.testing.assert_allclose([got[int(i)] for i in svc_server.index.meta.ids], want, rtol=1e-9)
