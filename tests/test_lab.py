"""The course in JupyterLab, as a learner meets it: `make lab`, then a real browser.

`make lab` starts on a free localhost port with a token (JUPYTER_TOKEN), in a temporary copy of
the course, so nothing the UI writes (executed outputs, the learner's answer) touches the
repository. The REST listing is checked always. The end-to-end test then drives Debian's
chromium through Playwright's Python package (the Debian binary, never a Playwright browser
download):

1. it opens chapter 01, runs all its cells through the menu, and checks that no output is an error;
2. it moves a widget control (ipywidgets) and checks that the plot changes;
3. it opens the exercises of chapter 01, types an answer into a cell, runs the check: PASS;
4. it breaks the answer: FAIL, with the failing case.

A screenshot of each step lands in test-artifacts/browser/ (gitignored); the path is printed.
Without chromium the browser test skips, saying why; under .ci/run, which installs chromium
first (as the README says), MINIGEMMA_REQUIRE_BROWSER=1 makes a missing browser a failure.
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
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHAPTER = "01_attention_from_scratch.ipynb"  # fast, and it ends with a widget
TOKEN = "minigemma-test-token"
NB = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook"  # the notebook in the active tab
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _course_copy(dst: Path) -> Path:
    """What `make lab` needs, copied: the Makefile, pyproject.toml (its mtime kept, so make sees the
    same set-up), the chapters and exercises; the virtual environment is linked, not copied."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(ROOT / name, dst / name)
    for name in ("chapters", "exercises"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    (dst / ".venv").symlink_to(ROOT / ".venv", target_is_directory=True)
    return dst


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    course = _course_copy(tmp_path_factory.mktemp("course"))
    port = _free_port()
    env = dict(os.environ, JUPYTER_TOKEN=TOKEN)
    # -o: the linked .venv is the repository's, set up already; never re-install from the copy
    proc = subprocess.Popen(["make", "-s", "-o", ".venv/.minigemma-installed", "lab", f"PORT={port}"],
                            cwd=course, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                out = proc.stdout.read() if proc.poll() is not None else "(still running)"
                pytest.fail(f"JupyterLab did not come up: {out[-3000:]}")
            time.sleep(0.5)
        yield base, course
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_lab_lists_the_chapters(lab):
    base, _ = lab
    assert CHAPTERS, "no chapters found"
    with urllib.request.urlopen(f"{base}/api/contents/chapters?token={TOKEN}", timeout=10) as r:
        listing = json.load(r)
    names = {item["name"] for item in listing["content"]}
    assert set(CHAPTERS) <= names, set(CHAPTERS) - names
    with urllib.request.urlopen(f"{base}/lab/tree/chapters?token={TOKEN}", timeout=10) as r:
        page = r.read().decode()
    assert "JupyterLab" in page


# --------------------------------------------------------------------------------------------
# The browser
# --------------------------------------------------------------------------------------------
def _chromium() -> str:
    path = shutil.which("chromium")
    why = None
    if path is None:
        why = "Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            why = "Playwright's Python package is missing (pip install -e '.[test]')"
    if why:
        if os.environ.get("MINIGEMMA_REQUIRE_BROWSER"):
            pytest.fail(f"{why}, yet MINIGEMMA_REQUIRE_BROWSER is set (.ci/run installed chromium)")
        pytest.skip(why)
    return path


@pytest.fixture(scope="module")
def browser(lab, request):
    path = _chromium()
    from playwright.sync_api import sync_playwright

    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True, args=LAUNCH_ARGS)
        try:
            yield b
        finally:
            b.close()
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"\nbrowser screenshots: {ARTIFACTS}")


class Steps:
    """Numbered screenshots of one test."""

    def __init__(self, page, prefix):
        self.page, self.prefix, self.n = page, prefix, 0

    def shot(self, what):
        self.n += 1
        path = ARTIFACTS / f"{self.prefix}_{self.n:02d}_{what}.png"
        self.page.screenshot(path=str(path))
        print(f"screenshot: {path}")
        return path


def _open(page, base, path, n_cells):
    """Open a notebook and wait until its cells are drawn and its kernel is up and idle."""
    page.goto(f"{base}/lab/tree/{path}?token={TOKEN}&reset", timeout=90_000)  # reset: no restored tabs
    deadline = time.time() + 120
    while time.time() < deadline:
        status = " ".join(page.locator(".jp-StatusBar-Widget").all_text_contents())
        if page.locator(f"{NB} .jp-Cell").count() == n_cells and "Python 3" in status and "Idle" in status:
            return
        time.sleep(0.5)
    raise AssertionError(f"{path}: the notebook or its kernel did not come up (status bar: {status!r})")


def _menu(page, menu, item):
    page.locator(".lm-MenuBar-itemLabel", has_text=menu).first.click()
    page.locator(".lm-Menu-itemLabel", has_text=item).first.click()


def _kernel_idle(page) -> bool:
    return "Idle" in " ".join(page.locator(".jp-StatusBar-Widget").all_text_contents())


def _wait_until_run(page, timeout_s=180):
    """Until every code cell has an execution count and none is queued or running ([*]).

    textContent, not innerText: cells scrolled out of view are not rendered (content-visibility).
    """
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        prompts = page.locator(f"{NB} .jp-CodeCell .jp-InputArea-prompt").all_text_contents()
        if prompts and all(p.strip() not in ("[ ]:", "[*]:", "") and "*" not in p for p in prompts):
            if _kernel_idle(page):
                return prompts
        time.sleep(1)
    raise AssertionError(f"cells still running after {timeout_s} s: {prompts}")


def _save_and_read(page, path: Path, predicate, timeout_s=60) -> dict:
    """Save through the UI (Ctrl+S) and read the notebook back from disk once `predicate` holds."""
    page.keyboard.press("Control+s")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            nb = json.loads(path.read_text())
            if predicate(nb):
                return nb
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{path} was not saved with the expected content")


def _cell_text(page, index) -> str:
    return page.locator(f"{NB} .jp-Cell").nth(index).locator(".jp-OutputArea").text_content() or ""


def _wait_for_output(page, index, needle, timeout_s=60) -> str:
    deadline = time.time() + timeout_s
    text = ""
    while time.time() < deadline:
        text = _cell_text(page, index)
        if needle in text:
            return text
        time.sleep(0.3)
    raise AssertionError(f"cell {index} never showed {needle!r}; it shows: {text!r}")


def _type_into_cell(page, index, text):
    """Replace a code cell's source as a learner would: click in it, select all, type (paste-like
    insertion, so the editor's auto-indent and bracket closing do not rewrite the text)."""
    editor = page.locator(f"{NB} .jp-Cell").nth(index).locator(".cm-content")
    editor.click()
    page.keyboard.press("Control+a")
    page.keyboard.insert_text(text)


def test_chapter_runs_in_the_browser_and_its_widget_responds(lab, browser):
    base, course = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    steps = Steps(page, "chapter")
    _open(page, base, f"chapters/{CHAPTER}", len(json.loads((course / "chapters" / CHAPTER).read_text())["cells"]))
    steps.shot("opened")

    _menu(page, "Run", "Run All Cells")
    prompts = _wait_until_run(page)
    steps.shot("ran_all_cells")
    errors_shown = page.locator(f"{NB} .jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    shown = [t for t in errors_shown.all_text_contents() if "Traceback" in t or "Error" in t.split("\n")[0]]
    assert not shown, f"error outputs in the page: {shown[:2]}"
    nb = _save_and_read(page, course / "chapters" / CHAPTER,
                        lambda nb: all(c.get("execution_count") for c in nb["cells"] if c["cell_type"] == "code"))
    errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
              for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"cells that raised: {errors}"
    assert len(prompts) == sum(c["cell_type"] == "code" for c in nb["cells"])

    # the last cell's interact: a head dropdown and a query slider; its first view is drawn already
    widget = page.locator(f"{NB} .widget-interact").last
    widget.scroll_into_view_if_needed()
    image = widget.locator(".widget-output img").first
    image.wait_for(timeout=60_000)
    before = image.get_attribute("src")
    steps.shot("widget_first_view")
    handle = widget.locator(".widget-slider .noUi-handle").first
    handle.focus()
    page.keyboard.press("ArrowLeft")  # query 8 -> 7
    deadline = time.time() + 60
    while time.time() < deadline:
        img = widget.locator(".widget-output img").first
        if img.count() and img.get_attribute("src") not in (None, before) and _kernel_idle(page):
            break
        time.sleep(0.3)
    else:
        raise AssertionError("moving the slider did not redraw the plot")
    assert widget.locator(".widget-readout").first.text_content().strip() == "7"
    steps.shot("widget_moved")
    page.close()


def test_exercise_passes_then_fails_in_the_browser(lab, browser):
    base, course = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    steps = Steps(page, "exercise")
    path = "exercises/01_attention_from_scratch.ipynb"
    nb = json.loads((course / path).read_text())
    _open(page, base, path, len(nb["cells"]))
    code = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]
    answer_cell = next(i for i in code if "def causal_mask" in "".join(nb["cells"][i]["source"]))
    check_cell = next(i for i in code if "check(\"01.causal_mask\"" in "".join(nb["cells"][i]["source"]))
    steps.shot("opened")

    page.locator(f"{NB} .jp-Cell").nth(code[0]).click()  # the imports
    page.keyboard.press("Shift+Enter")
    _type_into_cell(page, answer_cell,
                    "def causal_mask(T):\n    return torch.ones(T, T, dtype=torch.bool).tril()")
    page.keyboard.press("Shift+Enter")  # runs the answer, moves to the check
    page.keyboard.press("Shift+Enter")
    text = _wait_for_output(page, check_cell, "PASS")
    assert "01.causal_mask" in text and "FAIL" not in text
    assert "Result(" not in text  # check() prints its report once, not also the repr of what it returns
    steps.shot("check_passes")

    _type_into_cell(page, answer_cell,
                    "def causal_mask(T):\n    return torch.ones(T, T, dtype=torch.bool).triu()")
    page.keyboard.press("Shift+Enter")
    page.keyboard.press("Shift+Enter")
    text = _wait_for_output(page, check_cell, "FAIL")
    assert "case: T=2" in text, text  # the smallest case that fails (T=1 passes: [[True]] either way)
    assert "expected" in text and "got" in text
    steps.shot("check_fails_with_its_case")
    page.close()
