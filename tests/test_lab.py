"""`make lab` brings up a JupyterLab server that lists the chapters.

The server is started exactly as a learner starts it (`make lab`), on a free port with a token
from JUPYTER_TOKEN. The REST API must list every chapter notebook; the lab page must load. Where
Debian's chromium is installed, Playwright's Python package drives it (never a Playwright browser
download) and checks that the file browser shows the chapters.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(p.name for p in (ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab():
    port, token = _free_port(), "minigemma-test-token"
    env = dict(os.environ, JUPYTER_TOKEN=token)
    proc = subprocess.Popen(["make", "-s", "lab", f"PORT={port}"], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                out = proc.stdout.read() if proc.poll() is not None else "(still running)"
                pytest.fail(f"JupyterLab did not come up: {out[-3000:]}")
            time.sleep(0.5)
        yield base, token
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_lab_lists_the_chapters(lab):
    base, token = lab
    assert CHAPTERS, "no chapters found"
    with urllib.request.urlopen(f"{base}/api/contents/chapters?token={token}", timeout=10) as r:
        listing = json.load(r)
    names = {item["name"] for item in listing["content"]}
    assert set(CHAPTERS) <= names, set(CHAPTERS) - names
    with urllib.request.urlopen(f"{base}/lab/tree/chapters?token={token}", timeout=10) as r:
        page = r.read().decode()
    assert "JupyterLab" in page


@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed (apt-get install chromium)")
def test_lab_file_browser_shows_the_chapters_in_a_browser(lab, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    base, token = lab
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium"), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.goto(f"{base}/lab/tree/chapters?token={token}", timeout=60_000)
            page.wait_for_selector(f"text={CHAPTERS[0]}", timeout=60_000)
            listed = page.locator(".jp-DirListing-itemText").all_inner_texts()
            page.screenshot(path=str(tmp_path / "lab.png"))
        finally:
            browser.close()
    assert set(CHAPTERS) <= set(listed), (CHAPTERS, listed)
