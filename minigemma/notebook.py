"""Friendly failures in a notebook: a short message that names what to run first, not a traceback.

    from minigemma.notebook import friendly_errors
    friendly_errors()          # in a chapter's first cell

Three failures a learner meets in the chapters get a message of their own:

- the pretrained weights are not fetched (or a file is corrupt): the command that fetches them;
- out of memory: restart the kernel to free what earlier cells hold, then what to try next;
- a name that is not defined in the notebook's own code: the cell that defines it has not run
  yet (a kernel restart, or cells run out of order), so run the cells above first.

Everything else keeps IPython's usual traceback. The cell still fails (Run All stops there, and
the grader and nbval see the error), and `%tb` prints the full traceback of a friendly one.
"""

from __future__ import annotations

import difflib
import re
import sys

_ALLOCATOR = re.compile(r"can't allocate memory|not enough memory|out of memory|CUDA out of memory", re.I)
_CELL_FILE = re.compile(r"^<ipython-input-\d+-|/ipykernel_\d+/\d+\.py$")
_IMPORTED_FIRST = {"torch", "math", "np", "numpy", "plt", "F", "nn", "widgets", "display", "check", "inspect",
                   "minigemma", "hint"}


def friendly_message(etype, value, tb, user_ns: dict | None = None) -> list[str] | None:
    """The lines to show instead of the traceback, or None to keep the usual one."""
    from .weights.fetch import FetchError

    if isinstance(value, FetchError):
        text = str(value)
        m = re.match(r"(\S+) is not fetched", text) or re.match(r"(\S+): corrupt", text)
        name = m.group(1) if m else "all"
        head = ("The pretrained weights are not on this machine yet." if "not fetched" in text
                else "A weights file is damaged.")
        return [f"⚠️  {head}",
                f"   Run this in a terminal, in the course folder:  python -m minigemma fetch {name}",
                "   (`make lab` fetches every checkpoint too), then run this cell again.",
                f"   Details: {text}"]
    if isinstance(value, MemoryError) or (isinstance(value, RuntimeError) and _ALLOCATOR.search(str(value))):
        first = str(value).strip().splitlines()[0] if str(value).strip() else type(value).__name__
        return ["⚠️  Out of memory: this cell needed more memory than is free.",
                "   Tensors made by earlier cells are still held. Restart the kernel (Kernel > Restart Kernel),",
                "   close the kernels of other notebooks (Running Terminals and Kernels tab), then run this notebook",
                "   from the top. If it fails again here, use a smaller batch or sequence length in this cell.",
                f"   Details: {first[:300]}"]
    if isinstance(value, NameError) and _raised_in_a_cell(tb):
        name = getattr(value, "name", None) or (re.findall(r"'(\w+)'", str(value)) or ["?"])[0]
        lines = [f"⚠️  `{name}` is not defined yet in this kernel.",
                 "   It is defined in a cell above that has not run since the kernel started (or that failed).",
                 "   Run the cells above first (Run > Run All Above Selected Cell), then this one again."]
        if name in _IMPORTED_FIRST:
            lines.append(f"   `{name}` comes from the imports in the notebook's first cell.")
        close = difflib.get_close_matches(name, [k for k in (user_ns or {}) if not k.startswith("_")], n=1)
        if close:
            lines.append(f"   Or did you mean `{close[0]}`, which is defined?")
        return lines
    return None


def _raised_in_a_cell(tb) -> bool:
    """True if the innermost frame is the notebook's own code (a cell), not a module's."""
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and bool(_CELL_FILE.search(tb.tb_frame.f_code.co_filename))


def _handler(shell, etype, value, tb, tb_offset=None):
    """IPython's custom-exception hook: it must show the error itself (the kernel sends it on)."""
    lines = friendly_message(etype, value, tb, shell.user_ns)
    if lines is None:
        shell.showtraceback((etype, value, tb), tb_offset=tb_offset, running_compiled_code=True)
        return None
    sys.last_type, sys.last_value, sys.last_traceback = etype, value, tb  # for %tb
    if sys.version_info >= (3, 12):
        sys.last_exc = value
    header = f"{etype.__name__}: {value}".splitlines()[0][:300]
    shell._showtraceback(etype, value, [header, *lines, "   (%tb shows the full traceback)"])
    return None


def friendly_errors(enable: bool = True) -> bool:
    """Install (or with enable=False remove) the friendly messages in the running IPython kernel.

    Returns False outside IPython (a plain script keeps Python's tracebacks).
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None:
        return False
    if enable:
        shell.set_custom_exc((NameError, MemoryError, RuntimeError), _handler)
    else:
        shell.set_custom_exc((), None)
    return True
