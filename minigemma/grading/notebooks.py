"""Exercise notebooks: generated from the solutions, and graded by executing them.

`make_exercises` turns `solutions/NN_*.ipynb` into `exercises/NN_*.ipynb` the nbgrader way: the
code between `### BEGIN SOLUTION` and `### END SOLUTION` becomes `# YOUR CODE HERE` and
`raise NotImplementedError()`, at the same indentation, and outputs are cleared.

`grade` executes notebooks in a fresh kernel, collects what each `check(...)` reported, and
scores every exercise of the notebook's chapter. A learner's exception, a cell that never ran,
or a time-out is that exercise's failure; it never stops the grader.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

from .core import REPORT_ENV, exercises_for

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
ROOT = Path(__file__).resolve().parents[2]


class NotebookError(ValueError):
    pass


def strip_solutions(source: str, where: str = "cell") -> str:
    """Replace every solution block in one cell's source with a stub at the block's indentation."""
    out: list[str] = []
    inside = False
    for line in source.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith(BEGIN):
            if inside:
                raise NotebookError(f"{where}: nested '{BEGIN}'")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}# YOUR CODE HERE\n{indent}raise NotImplementedError()\n")
        elif stripped.startswith(END):
            if not inside:
                raise NotebookError(f"{where}: '{END}' without '{BEGIN}'")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise NotebookError(f"{where}: '{BEGIN}' is never closed")
    return "".join(out).rstrip("\n")


def exercise_notebook(solution: dict, name: str = "notebook") -> dict:
    """The learner's copy of a solution notebook (a dict in nbformat 4 JSON)."""
    nb = json.loads(json.dumps(solution))
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        cell["source"] = strip_solutions(src, f"{name} cell {i}")
        cell["outputs"] = []
        cell["execution_count"] = None
    return nb


def _dump(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def make_exercises(solutions: Path = ROOT / "solutions", exercises: Path = ROOT / "exercises",
                   check_only: bool = False) -> list[Path]:
    """Write (or with check_only, compare) every exercise notebook. Returns the stale ones."""
    stale = []
    for src in sorted(Path(solutions).glob("[0-9][0-9]_*.ipynb")):
        text = _dump(exercise_notebook(json.loads(src.read_text()), src.name))
        dst = Path(exercises) / src.name
        if not dst.exists() or dst.read_text() != text:
            stale.append(dst)
            if not check_only:
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_suffix(".ipynb.tmp")
                tmp.write_text(text)
                os.replace(tmp, dst)
    for dst in sorted(Path(exercises).glob("[0-9][0-9]_*.ipynb")):
        if not (Path(solutions) / dst.name).exists():
            stale.append(dst)  # an exercise without a solution is stale too
    return stale


# --------------------------------------------------------------------------------------------
# Grading
# --------------------------------------------------------------------------------------------
def chapter_of(path: Path) -> str:
    m = re.match(r"(\d\d)_", Path(path).name)
    if not m:
        raise NotebookError(f"{path}: expected a name like 01_attention.ipynb")
    return m.group(1)


def grade_notebook(path: Path, cell_timeout: float = 120.0) -> list[dict]:
    """Execute one notebook and return a row per exercise of its chapter."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    path = Path(path)
    expected = [ex.name for ex in exercises_for(chapter_of(path))]
    nb = nbformat.read(str(path), as_version=4)
    fd, report = tempfile.mkstemp(suffix=".jsonl", prefix="grade-")
    os.close(fd)
    old = os.environ.get(REPORT_ENV)
    os.environ[REPORT_ENV] = report  # the kernel inherits it
    problem = None
    try:
        client = NotebookClient(nb, timeout=cell_timeout, kernel_name="python3", allow_errors=True,
                                interrupt_on_timeout=True,
                                resources={"metadata": {"path": str(path.parent)}})
        try:
            client.execute()
        except CellTimeoutError as e:
            problem = f"a cell ran past {cell_timeout:g} s: {e}"
        except DeadKernelError as e:
            problem = f"the kernel died: {e}"
        reported: dict[str, dict] = {}
        for line in Path(report).read_text().splitlines():
            rec = json.loads(line)
            reported[rec["name"]] = rec  # the last run of a check counts
    finally:
        os.unlink(report)
        if old is None:
            os.environ.pop(REPORT_ENV, None)
        else:
            os.environ[REPORT_ENV] = old
    rows = []
    for name in expected:
        rec = reported.get(name)
        if rec is None:
            why = problem or "its check(...) never ran (an earlier cell failed, or the cell was removed)"
            rows.append({"notebook": path.name, "exercise": name, "passed": False, "cases": "-", "note": why})
        else:
            fail = rec["failure"] or {}
            note = fail.get("why") or fail.get("error") or ""
            rows.append({"notebook": path.name, "exercise": name, "passed": rec["passed"],
                         "cases": f"{rec['n_passed']}/{rec['n_cases']}", "note": note})
    return rows


def format_table(rows: list[dict]) -> str:
    w = max([len(r["exercise"]) for r in rows] + [8])
    lines = [f"{'exercise':<{w}}  {'result':<6}  {'cases':>7}  note", "-" * (w + 40)]
    for r in rows:
        note = r["note"] if len(r["note"]) < 90 else r["note"][:87] + "..."
        lines.append(f"{r['exercise']:<{w}}  {'pass' if r['passed'] else 'FAIL':<6}  {r['cases']:>7}  {note}")
    passed = sum(r["passed"] for r in rows)
    lines.append("-" * (w + 40))
    lines.append(f"score: {passed}/{len(rows)} exercises passed")
    return "\n".join(lines)


def grade_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m minigemma grade",
                                description="Execute exercise notebooks and print a score table.")
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per cell (default 120)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    rows = []
    for nb in args.notebooks:
        if not nb.is_file():
            print(f"error: {nb}: no such notebook", file=sys.stderr)
            return 2
        rows += grade_notebook(nb, args.timeout)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0 if all(r["passed"] for r in rows) else 1


def exercises_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m minigemma exercises",
                                description="Generate exercises/ from solutions/.")
    p.add_argument("--check", action="store_true", help="only report stale notebooks (exit 1 if any)")
    args = p.parse_args(argv)
    stale = make_exercises(check_only=args.check)
    for s in stale:
        print(("stale: " if args.check else "wrote: ") + str(s.relative_to(ROOT)))
    return 1 if (args.check and stale) else 0
