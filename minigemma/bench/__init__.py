"""Benchmarks: `python -m minigemma bench WHAT [ARGS]`, one module per WHAT in this package.

Each module has a `main(argv) -> int` and writes its table, with the command that produced it, into
docs/benchmarks/. A benchmark measures, it never asserts: speed is reported as ratios against the
anchors (HF transformers, llama.cpp, sentence-transformers, ...) measured in the same run on the same
machine.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys


def available() -> list[str]:
    """The benchmarks of this package: every module with a `main` (`common`, the shared helpers, has none).

    Each module is imported to ask; they import only the standard library at the top (torch and the
    models load inside `main`), so listing stays fast."""
    names = (m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    return sorted(n for n in names if callable(getattr(importlib.import_module(f"{__name__}.{n}"), "main", None)))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    names = available()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in names:
        print(f"usage: python -m minigemma bench {{{','.join(names)}}} [ARGS]  (--help for each)",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return importlib.import_module(f"{__name__}.{argv[0]}").main(argv[1:]) or 0
