"""Regenerate the web page's screenshots in docs/ (``make docs-shots``) from a small demo index.

Trains the default VAE on scikit-learn's digits, indexes it with the default layout, serves it on
loopback and drives the page in headless Chromium through Playwright (Debian's ``/usr/bin/chromium``
or ``PROPONENT_CHROMIUM``; nothing is downloaded), writing ``ui-query.png`` (an upload and its
proponents and opponents, one hit's per-checkpoint contributions on hover), ``ui-self-influence.png``
(a self-influence job's ranked grid, two samples marked) and ``ui-index.png`` (the index view).

    python docs/shots.py [--workdir DIR] [--out docs]

The index is kept in ``--workdir`` and reused when present (delete it to rebuild).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from playwright import sync_api

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("PROPONENT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # without these Chromium's own outbound connections are refused here
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 800}  # a laptop screen, as the browser tests use


def proponent(*args: str, env: dict[str, str]) -> None:
    exe = Path(sys.executable).with_name("proponent")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "proponent"]
    subprocess.run([*cmd, *args], check=True, env=env)


def demo_index(work: Path, env: dict[str, str]) -> Path:
    """The default pipeline on the digits: train (5 checkpoints) and index with the default layout."""
    idx = work / "idx"
    if (idx / "manifest.json").is_file():
        return idx
    proponent("train", "--data", "digits", "--out", str(work / "run"), "--epochs", "10", "--quiet", env=env)
    proponent("index", "--run", str(work / "run"), "--out", str(idx), "--quiet", env=env)
    return idx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def served(idx: Path, work: Path, env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    exe = Path(sys.executable).with_name("proponent")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "proponent"]
    server_env = {**env, "PROPONENT_STATE_DIR": str(work / "state")}
    proc = subprocess.Popen(
        [*cmd, "serve", "--index", str(idx), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=server_env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {proc.returncode}")
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not load the index within 300 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def open_view(page: sync_api.Page, url: str, view: str) -> None:
    page.goto(f"{url}/#{view}")
    page.wait_for_selector("body[data-ready='1']")


def wait_images(page: sync_api.Page, sel: str) -> None:
    page.wait_for_function(
        "sel => [...document.querySelectorAll(sel)]"
        ".every(i => (i.complete && i.src) || i.classList.contains('broken'))",
        arg=sel,
        timeout=60_000,
    )


def query_shot(page: sync_api.Page, url: str, out: Path) -> None:
    png = httpx.get(f"{url}/v1/samples/0/image.png").content
    open_view(page, url, "query")
    page.fill("#q-k", "8")
    page.select_option("#q-direction", "both")
    page.set_input_files("#upload-file", files=[{"name": "sample-0.png", "mimeType": "image/png", "buffer": png}])
    page.click("#q-run")
    page.wait_for_selector("#proponents .hit")
    wait_images(page, "#proponents img, #opponents img")
    page.locator("#proponents .hit").nth(1).hover()
    page.locator("#tooltip").wait_for(state="visible")
    page.screenshot(path=str(out / "ui-query.png"))


def self_influence_shot(page: sync_api.Page, url: str, out: Path) -> None:
    open_view(page, url, "self-influence")
    page.click("#j-start")
    page.wait_for_selector("#job-status[data-state='succeeded']", timeout=300_000)
    page.wait_for_selector("#rank-grid .hit")
    wait_images(page, "#rank-grid img")
    cards = page.locator("#rank-grid .hit")
    cards.nth(0).click()
    cards.nth(2).locator(".mark-box").check()
    page.screenshot(path=str(out / "ui-self-influence.png"))


def index_shot(page: sync_api.Page, url: str, out: Path) -> None:
    open_view(page, url, "index")
    page.wait_for_selector("#checkpoint-table tbody tr")
    page.screenshot(path=str(out / "ui-index.png"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/proponent-docs-shots", help="demo run and index (reused)")
    ap.add_argument("--out", default=str(REPO / "docs"), help="where the PNG files go")
    a = ap.parse_args()
    if not Path(CHROMIUM).exists():
        print(f"docs-shots: no Chromium at {CHROMIUM}: run `make browsers` or set PROPONENT_CHROMIUM", file=sys.stderr)
        return 2
    work, out = Path(a.workdir), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PROPONENT_THREADS": os.environ.get("PROPONENT_THREADS", "2")}
    idx = demo_index(work, env)
    with served(idx, work, env) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for take in (query_shot, self_influence_shot, index_shot):
                ctx = browser.new_context(viewport=VIEWPORT)
                ctx.set_default_timeout(60_000)
                take(ctx.new_page(), url, out)
                ctx.close()
        finally:
            browser.close()
    for name in ("ui-query.png", "ui-self-influence.png", "ui-index.png"):
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
