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


def test_generate_precision_flags_are_one_choice():
    """--quant is a precision level only; the file's own codes are --file-codes; one of them, or --dtype."""
    r = run("generate", "x", "--quant", "gguf")
    assert r.returncode == 2 and "invalid choice: 'gguf'" in r.stderr
    r = run("generate", "x", "--quant", "int8", "--file-codes")
    assert r.returncode == 2 and "give one of them" in r.stderr
    r = run("generate", "--help")
    assert "--file-codes" in r.stdout and "{none,bf16,int8,int4}" in r.stdout


def test_grade_missing_notebook():
    r = run("grade", "exercises/99_nope.ipynb")
    assert r.returncode == 2 and "no such notebook" in r.stderr



def test_bench_lists_only_the_modules_with_a_main():
    """`minigemma.bench.common` holds what the benchmarks share; having no `main`, it is no benchmark."""
    from minigemma.bench import available

    names = available()
    assert {"embed", "generate", "train"} <= set(names) and "common" not in names
    r = run("bench", "--help")
    assert r.returncode == 0 and "common" not in r.stdout and "generate" in r.stdout
    assert run("bench", "common").returncode == 2
