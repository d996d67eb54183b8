"""The command line's front door: usage, unknown commands, and `fetch` argument errors."""

import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "minigemma", *args], capture_output=True, text=True, timeout=120)


def test_usage_lists_every_command():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("fetch", "generate", "grade", "exercises", "bench"):
        assert cmd in r.stdout


def test_unknown_command_is_an_error():
    r = run("frobnicate")
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr


def test_fetch_unknown_name_lists_valid_names():
    r = run("fetch", "gemma-7b")
    assert r.returncode == 2
    assert "gemma3-270m" in r.stderr + r.stdout and "embeddinggemma-300m" in r.stderr + r.stdout


def test_grade_missing_notebook():
    r = run("grade", "exercises/99_nope.ipynb")
    assert r.returncode == 2 and "no such notebook" in r.stderr

