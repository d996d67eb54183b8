"""What every benchmark shares: the machine it ran on, a process's peak memory, package versions,
a minigemma level's loading arguments, running one measurement in a fresh process, and the real
English texts to measure on.

Not a benchmark itself (it has no `main`); `generate`, `quality`, `embed`, `train` and the kernels'
benchmark import from here.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
from pathlib import Path


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, or a clear error naming the value (every bench command's counts)."""
    import argparse

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def machine() -> str:
    """"<CPU model>, <N> cores (<bf16/int8 instruction sets>)": what a table's numbers were measured on."""
    model = platform.processor() or platform.machine()
    extra = []
    try:
        info = Path("/proc/cpuinfo").read_text()
        for line in info.splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        extra = [f for f in ("avx512_bf16", "avx512_vnni", "amx_bf16") if f in info]
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores" + (f" ({', '.join(extra)})" if extra else "")


def peak_rss_mb() -> float:
    """This process's own peak resident set (VmHWM); ru_maxrss would include the parent it forked from."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def versions(packages=("torch", "transformers", "llama-cpp-python")) -> dict:
    """The installed versions of `packages` (those not installed are left out)."""
    import importlib.metadata as md

    out = {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def load_kwargs(level: str) -> dict:
    """`load_pretrained`'s arguments for a minigemma system's level ("float32", "bf16", ..., "file-codes")."""
    if level == "file-codes":
        return {"file_codes": True}
    return {"quant": None if level == "float32" else level}


def child_result(module_args: list[str], label: str) -> dict | None:
    """Run `python -m <module_args>` in a fresh process and parse its one `RESULT {json}` line
    (None, with the child's stderr shown, if it failed). A fresh process per measurement keeps peak
    memories and start-up costs of different systems apart."""
    p = subprocess.run([sys.executable, "-m", *module_args], capture_output=True, text=True)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        print(f"[{label} failed]\n{p.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(line[len("RESULT "):])


# ----------------------------------------------------------------------------------------------
# Real English texts of chosen lengths: Python's own documentation strings
# ----------------------------------------------------------------------------------------------
MODULES = ["argparse", "collections", "typing", "pathlib", "subprocess", "asyncio", "email", "json", "re",
           "unittest", "logging", "decimal", "datetime", "itertools", "functools", "threading", "socket",
           "textwrap", "string", "inspect", "dataclasses", "enum", "contextlib", "shutil", "os"]


def corpus_docstrings() -> list[str]:
    """Python's documentation strings of MODULES and their members, in a fixed order, deduplicated
    (the same texts on every machine with this Python, and none written here)."""
    import importlib
    import inspect

    seen, out = set(), []
    for name in MODULES:
        mod = importlib.import_module(name)
        for obj in [mod] + [o for _, o in inspect.getmembers(mod)]:
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80 and doc not in seen:
                seen.add(doc)
                out.append(doc)
    return out


def benchmark_texts(tokenizer, lengths: list[int], counts: list[int], seed: int = 0) -> dict[int, list[str]]:
    """{L: texts}: consecutive pieces of the docstring corpus, each of a token count drawn uniformly
    from [0.75 L, 1.25 L], decoded back to text (re-tokenising gives about the same count)."""
    stream: list[int] = []
    for doc in corpus_docstrings():
        stream += tokenizer.encode(doc + "\n\n", add_bos=False)
    rng = random.Random(seed)
    out, at = {}, 0
    for L, n in zip(lengths, counts):
        texts = []
        for _ in range(n):
            k = rng.randint(int(0.75 * L), int(1.25 * L))
            if at + k > len(stream):
                at = 0  # wrap around (the corpus is ~200k tokens: only for very large runs)
            texts.append(tokenizer.decode(stream[at:at + k]))
            at += k
        out[L] = texts
    return out
