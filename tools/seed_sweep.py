"""Does every check pass its own solution on many seeds? A check draws fresh inputs from a random seed on
every run, so a tolerance that is right on most seeds and wrong on a few shows up only as a rare failure
of `tests/test_grading.py::test_solutions_score_full_marks`. This runs each solutions notebook once, with
every `check(...)` in it repeated over seeds 0 .. N-1, and prints the exercises and seeds that fail:

    .venv/bin/python tools/seed_sweep.py 40 solutions/0*.ipynb solutions/1[01]_*.ipynb   # ~2 minutes
    .venv/bin/python tools/seed_sweep.py 6 solutions/12_*.ipynb solutions/13_*.ipynb    # the kernels: slower

Exit status 1 if any seed fails. (The check's own tamper guard is left alone: `minigemma.grading.check`
is wrapped, not `core.run_check`.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = '''
import minigemma.grading as _g, minigemma.grading.core as _c, time as _t
def _sweep(name, fn, seed=None):
    t, fails = _t.time(), []
    for s in range({n}):
        r = _c.run_check(name, fn, s)
        if not r.passed:
            fails.append((s, r.failure))
    print("SWEEP", name, len(fails), "of {n} seeds failed,", round(_t.time() - t, 1), "s", fails[:2], flush=True)
    return _c.check(name, fn, 0)
def _sweep_kernel(name, kernel, seed=None):
    return _sweep(name, _c.get(name).launch(kernel))
_g.check, _g.check_kernel = _sweep, _sweep_kernel
'''


def sweep(notebook: Path, n: int) -> list[str]:
    """Run one notebook with every check repeated over n seeds: its SWEEP lines and any cell error."""
    nb = nbformat.read(notebook, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(PRELUDE.format(n=n)))
    NotebookClient(nb, timeout=3000, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    lines = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            lines += [line for line in out.get("text", "").splitlines() if line.startswith("SWEEP")]
            if out.get("output_type") == "error":
                lines.append(f"ERROR {out.get('ename')}: {out.get('evalue', '')[:200]}")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit() or int(argv[0]) < 1:
        print(__doc__, file=sys.stderr)
        return 2
    n, bad = int(argv[0]), 0
    for path in map(Path, argv[1:]):
        for line in sweep(path, n):
            print(f"{path.name}: {line}", flush=True)
            bad += line.startswith("ERROR") or not line.split()[2] == "0"
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
