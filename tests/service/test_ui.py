"""The influence explorer (``/``) driven in a real headless browser.

Playwright for Python drives Debian's Chromium (``/usr/bin/chromium``, or ``PROPONENT_CHROMIUM``; `make browsers`
installs it; nothing is downloaded) against a real uvicorn server over the small real index of ``conftest.py``.
Every assertion about what the page shows is checked against what the API answers for the same request.

The README's screenshots (docs/ui-*.png) come from ``make docs-shots`` (docs/shots.py), not from these tests.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import svc_run_server

sync_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.timeout(180)

# the browser as docs/shots.py (make docs-shots) drives it: Debian's Chromium, headless, a laptop-sized viewport
from docs.shots import CHROMIUM, CHROMIUM_ARGS, VIEWPORT  # noqa: E402  (after the importorskip of playwright)


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        msg = f"no Chromium at {CHROMIUM}: run `make browsers` (apt-get install chromium) or set PROPONENT_CHROMIUM"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    with sync_api.sync_playwright() as p:
        # launch() gives every browser a fresh temporary user-data-dir (a new profile), removed on close
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module", autouse=True)
def warm_server(svc_server: Any) -> None:
    """One upload query before the browser tests: the first featurization (model warm-up) is server start-up."""
    png = httpx.get(f"{svc_server.url}/v1/samples/0/image.png").content
    r = httpx.post(f"{svc_server.url}/v1/influence", files={"file": ("0.png", png, "image/png")}, timeout=120)
    assert r.status_code == 200


@pytest.fixture()
def page(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    ctx.set_default_timeout(15_000)
    pg = ctx.new_page()
    js_errors: list[str] = []
    pg.on("pageerror", lambda e: js_errors.append(str(e)))
    # the browser's console, printed (pytest shows it when a test fails)
    pg.on("console", lambda m: print(f"console.{m.type}: {m.text}"))
    yield pg
    ctx.close()
    assert not js_errors, f"JavaScript errors on the page: {js_errors}"


def open_page(page: Any, url: str, view: str = "query") -> None:
    page.goto(f"{url}/#{view}")
    page.wait_for_selector("body[data-ready='1']")


def assert_fits_laptop(page: Any) -> None:
    """Nothing wider than the 1280 px viewport (no horizontal scrolling)."""
    assert page.evaluate("document.scrollingElement.scrollWidth") <= VIEWPORT["width"]


def card_ids(page: Any, grid: str) -> list[int]:
    return [int(v) for v in page.locator(f"{grid} .hit").evaluate_all("els => els.map(e => e.dataset.id)")]


def images_loaded(page: Any, sel: str) -> list[int]:
    """naturalWidth of every image under ``sel``, once each has loaded; fails naming those that did not."""
    page.wait_for_function(
        "sel => [...document.querySelectorAll(sel)]"
        ".every(i => (i.complete && i.src) || i.classList.contains('broken'))",
        arg=sel,
        timeout=30_000,
    )
    broken = page.locator(sel).evaluate_all("els => els.filter(i => !i.naturalWidth).map(i => i.alt + ': ' + i.title)")
    assert not broken, f"images that did not load: {broken}"
    return page.locator(sel).evaluate_all("els => els.map(i => i.naturalWidth)")


def index_info(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v1/index").json()


def self_dominant_sample(url: str, candidates: int = 12) -> tuple[int, float]:
    """Among the first training samples, the one whose own score beats the runner-up's by the widest margin,
    asked of the server itself: (sample id, (s_self - s_2nd) / s_self)."""
    best = (-1, -np.inf)
    for sid in range(candidates):
        hits = httpx.post(f"{url}/v1/influence/samples/{sid}", json={"k": 2}, timeout=60).json()["proponents"]
        if hits[0]["id"] == sid:
            margin = (hits[0]["score"] - hits[1]["score"]) / hits[0]["score"]
            best = max(best, (sid, margin), key=lambda t: t[1])
    return best


def multipart_error(url: str, data: bytes, name: str, mime: str, **fields: str) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/influence", files={"file": (name, data, mime)}, data=fields, timeout=60)
    assert r.status_code >= 400
    return r.json()["error"]


# ---------------------------------------------------------------------------------- the routes
def test_static_files_are_package_data():
    """Every file of the page matches pyproject's package-data patterns, so a wheel installs it."""
    import fnmatch

    from proponent.service.app import STATIC_DIR

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads(Path(__file__).parents[2].joinpath("pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["proponent.service"]
    files = sorted(p.name for p in STATIC_DIR.iterdir())
    assert {"index.html", "app.js", "style.css"} <= set(files)
    assert all(any(fnmatch.fnmatch(f"static/{f}", pat) for pat in patterns) for f in files), (files, patterns)


def test_page_is_served_and_the_api_is_unchanged(svc_server):
    with httpx.Client(base_url=svc_server.url) as h:
        r = h.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert 'src="static/app.js"' in r.text and 'href="static/style.css"' in r.text
        assert h.head("/").status_code == 200
        for path, kind in [("/static/app.js", "javascript"), ("/static/style.css", "text/css")]:
            r = h.get(path)
            assert r.status_code == 200 and kind in r.headers["content-type"]
            assert r.headers["cache-control"] == "no-cache" and r.headers["etag"]
        r = h.get("/static/nope.js")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert h.get("/static/../pyproject.toml").status_code == 404
        spec = h.get("/openapi.json").json()
        assert "/" not in spec["paths"] and not any(p.startswith("/static") for p in spec["paths"])
        assert h.get("/docs").status_code == 200 and h.get("/healthz").json()["status"] == "ok"
        assert h.get("/v1/index").json()["n"] > 0
        assert 'route="/static/{path}"' in h.get("/metrics").text  # one metrics label for all static files


# ---------------------------------------------------------------------------------- query
def test_upload_is_its_own_first_proponent_then_click_through(page, svc_server):
    url = svc_server.url
    info = index_info(url)
    sid, margin = self_dominant_sample(url, candidates=24)
    # Why the upload must find itself: the sample's own score beats the runner-up's by > 5 %, and the upload is
    # its stored 8-bit image (the PNG at scale 1), within 1/510 per pixel of the training input (digits are
    # v/16), featurized with the same query draws as the stored-sample query; that rounding moves scores far
    # less than the margin.
    assert margin > 0.05
    png = httpx.get(f"{url}/v1/samples/{sid}/image.png").content
    assert Image.open(io.BytesIO(png)).size == tuple(info["shape"][1:][::-1])

    open_page(page, url)
    assert page.locator("#scoring-field").is_visible()  # /v1/index advertises the scorings
    page.fill("#q-k", "5")
    page.select_option("#q-direction", "both")
    page.set_input_files("#upload-file", files=[{"name": f"sample-{sid}.png", "mimeType": "image/png", "buffer": png}])
    with page.expect_response(lambda r: r.url.endswith("/v1/influence") and r.request.method == "POST") as resp:
        page.click("#q-run")
    answer = resp.value.json()
    assert resp.value.status == 200
    page.wait_for_selector("#proponents .hit")
    shown = card_ids(page, "#proponents")
    assert shown[0] == sid  # the upload's first proponent is the training sample it is
    assert shown == [h["id"] for h in answer["proponents"]]
    assert card_ids(page, "#opponents") == [h["id"] for h in answer["opponents"]]
    assert page.locator("#query-title").inner_text() == f"Upload: sample-{sid}.png"
    assert "Exact search" in page.locator("#exactness").inner_text()
    assert "random projection" in page.locator("#approximations").inner_text()
    assert all(w == 8 * 12 for w in images_loaded(page, "#proponents img, #opponents img"))  # fetched as blobs

    # per-checkpoint contributions on hover
    second = page.locator("#proponents .hit").nth(1)
    second.hover()
    tip = page.locator("#tooltip")
    tip.wait_for(state="visible")
    assert f"#{shown[1]}" in tip.inner_text()
    assert tip.locator("tr").count() == len(info["checkpoints"]) == len(answer["proponents"][1]["contributions"])
    assert_fits_laptop(page)

    # click a hit: it becomes a stored-sample query
    with page.expect_response(f"**/v1/influence/samples/{shown[1]}") as resp2:
        second.click()
    page.wait_for_selector(f"#query-title[data-sample-id='{shown[1]}']")
    expected = httpx.post(f"{url}/v1/influence/samples/{shown[1]}", json={"k": 5, "direction": "both"}).json()
    sent = resp2.value.request.post_data_json
    assert sent == {"k": 5, "direction": "both", "objective": "elbo", "scoring": info["default_scoring"]}
    assert card_ids(page, "#proponents") == [h["id"] for h in expected["proponents"]]
    assert card_ids(page, "#opponents") == [h["id"] for h in expected["opponents"]]
    assert page.locator("input[name=source][value=sample]").is_checked()
    assert page.input_value("#sample-id") == str(shown[1])
    assert page.locator("#trail button").count() == 2


def test_drawing_is_downsampled_to_the_input_shape(page, svc_server):
    open_page(page, svc_server.url)
    page.check("input[name=source][value=draw]", force=True)
    box = page.locator("#draw-canvas").bounding_box()
    assert box and box["width"] > 150  # a large canvas, downsampled to 8 x 8
    x0, y0, w = box["x"], box["y"], box["width"]
    cell = w / 8
    page.mouse.move(x0 + 1.5 * cell, y0 + 1.5 * cell)  # a vertical stroke down the middle of column 1
    page.mouse.down()
    page.mouse.move(x0 + 1.5 * cell, y0 + 4.5 * cell, steps=8)
    page.mouse.up()
    page.fill("#q-k", "3")
    with page.expect_request(lambda r: r.url.endswith("/v1/influence") and r.method == "POST") as req:
        page.click("#q-run")
    body = req.value.post_data_json
    x = np.asarray(body["x"])
    assert x.shape == (1, 8, 8) and x.min() >= 0 and x.max() <= 1
    assert x[0, 2:4, 1].min() > 0.3 and x[0, :, 4:].max() == 0 and x[0, 6:, :].max() == 0  # where it was drawn
    assert body["k"] == 3
    page.wait_for_selector("#proponents .hit")
    assert page.locator("#query-title").inner_text() == "Drawing"
    assert len(card_ids(page, "#proponents")) == 3


def test_bad_requests_show_the_servers_error(page, svc_server):
    url = svc_server.url
    open_page(page, url)
    err_box = page.locator("#query-error")
    # not an image: 415, the server's message and request id on the page
    junk = b"this is not an image"
    expected = multipart_error(url, junk, "notes.txt", "text/plain", k="10", direction="both", objective="elbo")
    page.set_input_files("#upload-file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": junk}])
    page.click("#q-run")
    err_box.wait_for(state="visible")
    text = err_box.inner_text()
    assert "Error 415 (unsupported_media_type)" in text and expected["message"] in text and "request id" in text
    assert page.locator("#query-summary").is_hidden()
    # an image of another size: 422 naming the index's input shape
    buf = io.BytesIO()
    Image.new("L", (16, 16), 128).save(buf, format="PNG")
    expected = multipart_error(url, buf.getvalue(), "big.png", "image/png", k="10", direction="both")
    page.set_input_files("#upload-file", files=[{"name": "big.png", "mimeType": "image/png", "buffer": buf.getvalue()}])
    page.click("#q-run")
    page.wait_for_function("() => document.querySelector('#query-error').innerText.includes('Error 422')")
    assert expected["message"] in err_box.inner_text() and "[1, 8, 8]" in expected["message"]
    # a bad parameter goes to the server as typed, and its validation message is shown
    page.check("input[name=source][value=sample]", force=True)
    page.fill("#sample-id", "1")
    page.fill("#q-k", "0")
    page.click("#q-run")
    page.wait_for_function("() => document.querySelector('#query-error').innerText.includes('k:')")
    expected = httpx.post(f"{url}/v1/influence/samples/1", json={"k": 0}).json()["error"]
    assert expected["message"] in err_box.inner_text()
    # a good query afterwards clears the error
    page.fill("#q-k", "2")
    page.click("#q-run")
    page.wait_for_selector("#proponents .hit")
    assert err_box.is_hidden()


def test_scoring_stderr_and_unresolved_pairs(page, svc_server):
    """The scoring control (from /v1/index), per-hit standard errors and the unresolved adjacent pairs, as the
    API answers them; the index view shows the storage and serving mode the server reports."""
    url = svc_server.url
    info = httpx.get(f"{url}/v1/index").json()
    open_page(page, url)
    assert page.locator("#scoring-field").is_visible()
    assert page.locator("#q-scoring option").all_inner_texts() == info["scorings"]
    assert page.input_value("#q-scoring") == info["default_scoring"]
    page.select_option("#q-scoring", "cosine")
    page.check("input[name=source][value=sample]", force=True)
    page.fill("#sample-id", "4")
    page.fill("#q-k", "6")
    page.select_option("#q-direction", "proponents")
    page.click("#q-run")
    page.wait_for_selector("#proponents .hit")
    want = httpx.post(
        f"{url}/v1/influence/samples/4", json={"k": 6, "direction": "proponents", "scoring": "cosine"}, timeout=60
    ).json()
    assert page.locator("#opponents-section").is_hidden()
    ids = card_ids(page, "#proponents")
    assert ids == [h["id"] for h in want["proponents"]]
    stderrs = [t.strip() for t in page.locator("#proponents .hit-stderr").all_inner_texts()]
    assert len(stderrs) == 6 and all(t.startswith("± ") for t in stderrs)
    ranks = page.locator("#proponents .hit.unresolved").evaluate_all("els => els.map(e => +e.dataset.rank)")
    assert sorted(set(ranks)) == sorted({r for pair in want["unresolved"]["proponents"] for r in pair})
    if want["unresolved"]["proponents"]:
        a, b = want["unresolved"]["proponents"][0]
        note = page.locator("#proponents-section .unresolved-list").inner_text()
        assert f"#{ids[a - 1]} and #{ids[b - 1]} (ranks {a} and {b})" in note
    summary = page.locator("#query-summary").inner_text()
    assert "scoring\ncosine" in summary and f"draws m\n{want['query']['m']}" in summary
    page.goto(f"{url}/#index")
    page.wait_for_selector("#checkpoint-table")
    text = page.locator("#index-info").inner_text()
    assert info["storage"]["dtype"] in text and info["serving"]["mode"] in text


# ---------------------------------------------------------------------------------- self-influence
def test_self_influence_job_ranked_grid_marks_and_csv(page, svc_server):
    url = svc_server.url
    open_page(page, url, "self-influence")
    polls: list[str] = []
    page.on("request", lambda r: polls.append(r.url) if "/v1/jobs/" in r.url and r.method == "GET" else None)
    page.click("#j-start")
    status = page.locator("#job-status")
    page.wait_for_selector("#job-status[data-state='succeeded']", timeout=60_000)
    job_id = status.get_attribute("data-job-id")
    assert job_id and "succeeded" in page.locator("#job-state").inner_text()
    assert f"{url}/v1/jobs/{job_id}" in polls  # the page watched the job's progress
    page.wait_for_selector("#rank-grid .hit")
    first = httpx.get(f"{url}/v1/jobs/{job_id}/result", params={"offset": 0, "limit": 48}).json()
    assert card_ids(page, "#rank-grid") == [r["id"] for r in first["items"]]
    assert page.locator("#rank-range").inner_text() == f"1–48 of {first['total']}"
    images_loaded(page, "#rank-grid img")

    # mark two samples on the first page and one on the second
    cards = page.locator("#rank-grid .hit")
    cards.nth(0).click()
    cards.nth(2).locator(".mark-box").check()  # the checkbox marks too, and shows the mark
    assert page.locator("#rank-grid .hit.marked").count() == 2
    assert cards.nth(0).locator(".mark-box").is_checked() and not cards.nth(1).locator(".mark-box").is_checked()
    assert_fits_laptop(page)
    page.click("#rank-next")
    page.wait_for_selector("#rank-grid[data-offset='48']")
    second = httpx.get(f"{url}/v1/jobs/{job_id}/result", params={"offset": 48, "limit": 48}).json()
    assert card_ids(page, "#rank-grid") == [r["id"] for r in second["items"]]
    assert page.locator("#rank-grid .hit").first.get_attribute("data-rank") == "49"
    page.locator("#rank-grid .hit").nth(1).click()
    assert page.locator("#mark-count").inner_text() == "3 marked"
    with page.expect_download() as dl:
        page.click("#mark-download")
    rows = list(csv.DictReader(io.StringIO(Path(dl.value.path()).read_text())))
    want = [first["items"][0], first["items"][2], second["items"][1]]
    assert [int(r["id"]) for r in rows] == [w["id"] for w in want]
    assert [int(r["rank"]) for r in rows] == [1, 3, 50]
    assert float(rows[0]["self_influence"]) == pytest.approx(want[0]["self_influence"])
    # going back keeps the marks
    page.click("#rank-prev")
    page.wait_for_selector("#rank-grid[data-offset='0']")
    assert page.locator("#rank-grid .hit.marked").count() == 2


# ---------------------------------------------------------------------------------- index
def test_index_view(page, svc_server):
    info = index_info(svc_server.url)
    open_page(page, svc_server.url, "index")
    assert page.locator("#index-n").inner_text() == f"{info['n']:,}"
    assert page.locator("#index-whiten").inner_text() == "no (plain gradients)"  # an unwhitened index
    assert page.locator("#checkpoint-table tbody tr").count() == len(info["checkpoints"])
    text = page.locator("#index-info").inner_text()
    for want in (str(info["shape"]), f"{info['dim']:,}", info["dataset_spec"], info["projection"]["kind"], "bernoulli"):
        assert want in text
    # the index job's fidelity check: one row per checkpoint, and the warning exactly when the API has one
    fid = info["fidelity"]
    assert page.locator("#fidelity tbody tr").count() == len(fid["checkpoints"])
    assert page.locator("#fidelity-warning").count() == (1 if fid["warning"] else 0)
    assert f"recall@{fid['top']} proponents" in page.locator("#fidelity").inner_text()
    assert_fits_laptop(page)


# ---------------------------------------------------------------------------------- API keys
def test_api_key_prompt_then_everything_works(page, svc_index_dir, tmp_path):
    with svc_run_server(index=svc_index_dir, state_dir=tmp_path, api_keys=["ui-secret"]) as s:
        with httpx.Client(base_url=s.url) as h:
            assert h.get("/").status_code == 200 and h.get("/static/app.js").status_code == 200  # open
            assert h.get("/v1/index").status_code == 401
        sent_keys: list[str | None] = []
        page.on("request", lambda r: sent_keys.append(r.headers.get("x-api-key")) if "/v1/" in r.url else None)
        page.goto(s.url + "/")
        dialog = page.locator("#key-dialog")
        dialog.wait_for(state="visible")
        assert "missing API key" in page.locator("#key-message").inner_text()
        page.fill("#key-input", "wrong-key")
        page.click("#key-ok")
        page.wait_for_function("() => document.querySelector('#key-message').innerText.includes('invalid API key')")
        assert dialog.is_visible()
        page.fill("#key-input", "ui-secret")
        page.click("#key-ok")
        page.wait_for_selector("body[data-ready='1']")
        assert page.evaluate("sessionStorage.getItem('proponent.apiKey')") == "ui-secret"
        assert page.locator("#forget-key").is_visible()
        # a query and its images (fetched with the key header)
        page.check("input[name=source][value=sample]", force=True)
        page.fill("#sample-id", "2")
        page.fill("#q-k", "3")
        page.click("#q-run")
        page.wait_for_selector("#proponents .hit")
        assert all(w > 0 for w in images_loaded(page, "#proponents img"))
        assert sent_keys[-1] == "ui-secret"
        n_before = len(sent_keys)
        # a reload in the same tab keeps the key: no prompt
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        assert dialog.is_hidden()
        assert set(sent_keys[n_before:]) == {"ui-secret"}
        # forgetting the key: the next request asks again
        page.click("#forget-key")
        page.check("input[name=source][value=sample]", force=True)
        page.fill("#sample-id", "2")
        page.click("#q-run")
        dialog.wait_for(state="visible")
        page.click("#key-cancel")
        page.wait_for_function("() => document.querySelector('#query-error').innerText.includes('Error 401')")


# ---------------------------------------------------------------------------------- preconditioner
def test_preconditioner_choice_only_where_the_index_has_one(page, svc_server, tmp_path):
    """No stored preconditioner: no choice. With one (`proponent precondition`): the choice next to scoring,
    the request carries it, and the page shows the hits and the preconditioner the API answers with."""
    from proponent.cli import main as cli_main
    from proponent.indexer.data import load_dataset
    from proponent.indexer.job import IndexOptions, build_index, checkpoints_from_run
    from proponent.indexer.training import TrainConfig, train
    from proponent.model.architectures import ModelConfig

    open_page(page, svc_server.url)
    assert page.locator("#precondition-field").is_hidden()
    data = load_dataset("digits,limit=120")
    cfg = ModelConfig(kind="mlp", input_shape=data.shape, hidden=(8,), latent_dim=2)
    run = train(data, cfg, tmp_path / "run", TrainConfig(epochs=2, batch_size=32, checkpoints=2), show_progress=False)
    specs, _ = checkpoints_from_run(run)
    idx = build_index(data, specs, tmp_path / "idx", IndexOptions(m=2, device="cpu"), show_progress=False)
    assert cli_main(["precondition", "--index", str(idx)]) == 0
    with svc_run_server(index=idx, state_dir=tmp_path / "state") as s:
        open_page(page, s.url)
        assert page.locator("#precondition-field").is_visible()
        assert page.locator("#q-precondition option").all_inner_texts() == ["none", "gram"]
        page.select_option("#q-precondition", "gram")
        page.check("input[name=source][value=sample]", force=True)
        page.fill("#sample-id", "4")
        page.fill("#q-k", "5")
        page.select_option("#q-direction", "proponents")
        page.click("#q-run")
        page.wait_for_selector("#proponents .hit")
        scoring = page.input_value("#q-scoring")
        want = httpx.post(
            f"{s.url}/v1/influence/samples/4",
            json={"k": 5, "direction": "proponents", "scoring": scoring, "precondition": "gram"},
            timeout=60,
        ).json()
        assert card_ids(page, "#proponents") == [h["id"] for h in want["proponents"]]
        assert "preconditioner\ngram" in page.locator("#query-summary").inner_text()
