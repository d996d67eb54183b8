"""Friendly failures (minigemma.notebook) in a real Jupyter kernel.

A notebook that enables them runs in a fresh kernel (as JupyterLab or the grader runs one); each
failure a learner meets must show a message naming what to run first, the cell must still count
as an error, other errors keep their traceback, and %tb still shows the full one.
"""

import os
import re
import sys
import textwrap

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="ipykernel subprocess on POSIX")

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _run(cells, tmp_path, env=None):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(textwrap.dedent(c)) for c in cells]
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True,
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    return nb.cells


def _error(cell):
    errors = [o for o in cell.outputs if o.output_type == "error"]
    assert errors, f"cell did not fail: {cell.source!r} -> {cell.outputs}"
    return errors[0].ename, ANSI.sub("", "\n".join(errors[0].traceback))


def _text(cell):
    return ANSI.sub("", "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
                    + "".join("\n".join(o.get("traceback", [])) for o in cell.outputs if o.output_type == "error"))


def test_friendly_failures_in_a_kernel(tmp_path):
    (tmp_path / "helper_mod.py").write_text("def broken():\n    return undefined_in_a_module\n")
    empty_cache = tmp_path / "cache"
    empty_cache.mkdir()
    cells = _run([
        "from minigemma.notebook import friendly_errors\nassert friendly_errors()",
        "y = attention_weights + 1",                                       # 1: defined in a later cell
        "from minigemma.weights import fetch\nfetch.path('gemma3-270m')",  # 2: weights missing
        "import torch\nx = torch.empty(2 ** 60, dtype=torch.uint8)",      # 3: the CPU allocator fails
        "raise MemoryError()",                                              # 4
        "1 / 0",                                                            # 5: anything else: usual traceback
        "import helper_mod\nhelper_mod.broken()",                           # 6: NameError inside a module
        "%tb",                                                              # 7: the full traceback of cell 6
        "my_weights = 1\nprint(my_weigths)",                                # 8: a typo: a close match is named
        "y = attention_weights",                                            # 9: friendly again...
        "%tb",                                                              # 10: ...and %tb shows where
        "friendly_errors(False)\nz = not_defined_either",                   # 11: switched off
    ], tmp_path, env={"MINIGEMMA_CACHE": str(empty_cache)})

    ename, text = _error(cells[1])
    assert ename == "NameError"
    assert "`attention_weights` is not defined yet" in text and "Run All Above" in text
    assert "Traceback" not in text and "%tb" in text

    ename, text = _error(cells[2])
    assert ename == "FetchError"
    assert "python -m minigemma fetch gemma3-270m" in text and "not on this machine" in text

    for i in (3, 4):
        ename, text = _error(cells[i])
        assert "Out of memory" in text and "Restart Kernel" in text, (i, text)

    ename, text = _error(cells[5])
    assert ename == "ZeroDivisionError" and "⚠️" not in text and "1 / 0" in text  # the usual traceback

    ename, text = _error(cells[6])
    assert ename == "NameError" and "⚠️" not in text and "helper_mod" in text  # a bug in a module, not order

    assert "undefined_in_a_module" in _text(cells[7])

    ename, text = _error(cells[8])
    assert "did you mean `my_weights`" in text

    _error(cells[9])
    assert "attention_weights" in _text(cells[10]) and "Traceback" in _text(cells[10])

    ename, text = _error(cells[11])
    assert ename == "NameError" and "⚠️" not in text


def test_friendly_errors_outside_ipython_is_a_no_op():
    from minigemma.notebook import friendly_errors

    assert friendly_errors() is False
