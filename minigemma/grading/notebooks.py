"""Exercise notebooks: generated from the solutions, and graded by executing them.

`make_exercises` turns `solutions/NN_*.ipynb` into `exercises/NN_*.ipynb` the nbgrader way: the
code between `### BEGIN SOLUTION` and `### END SOLUTION` becomes `# YOUR CODE HERE` and
`raise NotImplementedError()`, at the same indentation, and outputs are cleared.

`grade` executes notebooks in a fresh kernel and scores every exercise of the notebook's chapter: the
notebook's own `check(...)` calls only say that they are graded, and right after each the grader runs
the check itself, in a cell of its own, on what the call hands over (`grade_notebook`). A learner's exception, a cell that never ran,
or a time-out is that exercise's failure; it never stops the grader. With no notebook named it
grades every exercise notebook and prints the learner's progress.

`reset_exercise` puts one exercise of a learner's notebook back to its untouched state (the stub
generated from solutions/), leaving every other cell and function as the learner left it.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
from pathlib import Path

from ..atomic import write_atomic
from .core import exercises_for

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
        if not dst.exists() or dst.read_text(encoding="utf-8") != text:
            stale.append(dst)
            if not check_only:
                write_atomic(dst, text)
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


_GRADE_CELL = """\
import importlib.util as _grade_util
_grade_spec = _grade_util.spec_from_file_location("minigemma.grading._graded_core", {core!r})
_grade_core = _grade_util.module_from_spec(_grade_spec)
__import__("sys").modules[_grade_spec.name] = _grade_core
_grade_spec.loader.exec_module(_grade_core)  # a fresh copy: what the notebook's code did to the module is not in it
try:
    _grade_obj = {func}
except NameError:
    print({nonce!r} + __import__("json").dumps({{"name": {name!r}, "missing": {func!r}}}))
else:
    print({nonce!r} + _grade_core.graded({name!r}, _grade_obj))
"""


def _check_calls(nb) -> dict[str, str]:
    """exercise name -> the name of what its check(...) or check_kernel(...) call hands over, from every code cell."""
    found = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            for ex, func in _CHECK_CALL.findall(_source(cell)):
                found.setdefault(ex, func)
    return found


def grade_notebook(path: Path, cell_timeout: float = 120.0) -> list[dict]:
    """Execute one notebook and return a row per exercise of its chapter.

    The notebook runs as it is, in a fresh kernel, with its own check(...) calls switched off; after each of
    them the grader inserts a cell of its own that runs the check on what that call hands over (the learner's
    function or kernel), with a fresh copy of the grading code, and prints the result behind a random marker.
    Nothing the notebook writes or prints can stand for a result."""
    import secrets

    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    from . import core
    from .forked_kernels import ForkedKernelManager

    path = Path(path)
    expected = [ex.name for ex in exercises_for(chapter_of(path))]
    nb = nbformat.read(str(path), as_version=4)
    calls = _check_calls(nb)
    pristine = Path(ROOT / "solutions" / path.name)
    if any(name not in calls for name in expected) and pristine.is_file():  # a check cell removed: the stub's name
        for ex, func in _check_calls(exercise_notebook(json.loads(pristine.read_text()))).items():
            calls.setdefault(ex, func)
    nonce = f"[grade {secrets.token_hex(8)}] "

    def grade_cell(name):
        cell = nbformat.v4.new_code_cell(_GRADE_CELL.format(core=core.__file__, func=calls[name], nonce=nonce,
                                                            name=name))
        cell.metadata["minigemma_grade"] = True
        return cell

    # each exercise is graded right after the notebook's own check of it, on what its name holds there (a later
    # cell may rebind the name, e.g. to the package's function); an exercise whose check cell is gone, at the end
    cells, placed = [], set()
    for cell in nb.cells:
        cells.append(cell)
        if cell.cell_type == "code":
            for ex, _ in _CHECK_CALL.findall(_source(cell)):
                if ex in expected and ex not in placed:
                    cells.append(grade_cell(ex))
                    placed.add(ex)
    cells += [grade_cell(name) for name in expected if name in calls and name not in placed]
    nb.cells = cells
    old = os.environ.get(core.GRADING_ENV)
    os.environ[core.GRADING_ENV] = "1"  # the kernel inherits it: the notebook's own checks only say so
    problem = None
    try:
        # The kernel is forked with torch already imported, not started anew (about 2 s less per notebook),
        # and killed once its last cell has run.
        client = NotebookClient(nb, kernel_manager_class=ForkedKernelManager, kernel_name="python3",
                                timeout=cell_timeout, allow_errors=True, interrupt_on_timeout=True,
                                shutdown_kernel="immediate", resources={"metadata": {"path": str(path.parent)}})
        try:
            client.execute()
        except CellTimeoutError as e:
            problem = f"a cell ran past {cell_timeout:g} s: {e}"
        except DeadKernelError as e:
            problem = f"the kernel died: {e}"
    finally:
        if old is None:
            os.environ.pop(core.GRADING_ENV, None)
        else:
            os.environ[core.GRADING_ENV] = old
    reported: dict[str, dict] = {}
    for cell in nb.cells:
        if not cell.metadata.get("minigemma_grade"):
            continue
        for out in cell.get("outputs", []):
            for line in (out.get("text") or "").splitlines():
                if line.startswith(nonce):
                    try:
                        rec = json.loads(line[len(nonce):])
                    except json.JSONDecodeError:
                        continue
                    reported[rec.get("name")] = rec
    rows = []
    for name in expected:
        rec = reported.get(name)
        if rec is None or "missing" in rec:
            if rec is not None:
                why = f"its check never ran: `{rec['missing']}` is not defined (an earlier cell failed, or was removed)"
            elif name not in calls:
                why = "its check never ran: no check(...) cell for it in this notebook"
            else:
                why = problem or "its check never ran (the kernel stopped before the grader's cells)"
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


def format_progress(rows: list[dict], width: int = 20) -> str:
    """Progress per notebook and overall, as bars."""
    by_nb: dict[str, list[dict]] = {}
    for r in rows:
        by_nb.setdefault(r["notebook"], []).append(r)
    w = max(len(nb) for nb in by_nb)
    lines = ["progress:"]
    for nb, rs in by_nb.items():
        done = sum(r["passed"] for r in rs)
        bar = "█" * round(width * done / len(rs)) + "·" * (width - round(width * done / len(rs)))
        lines.append(f"  {nb:<{w}}  {bar}  {done}/{len(rs)}")
    done = sum(r["passed"] for r in rows)
    lines.append(f"overall: {done}/{len(rows)} exercises passed ({100 * done / len(rows):.0f}%)")
    todo = [r["exercise"] for r in rows if not r["passed"]]
    if todo:
        lines.append(f"next up: {todo[0]} (python -m minigemma grade shows why; hint(\"{todo[0]}\") helps)")
    return "\n".join(lines)


def exercises_dir() -> Path:
    """The learner's exercises/: the one in the current folder, else the repository's."""
    here = Path.cwd() / "exercises"
    return here if here.is_dir() else ROOT / "exercises"


def grade_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m minigemma grade",
                                description="Execute exercise notebooks and print a score table. With no "
                                            "notebook named, grade every exercises/NN_*.ipynb and show progress.")
    p.add_argument("notebooks", nargs="*", type=Path)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per cell (default 120)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    every = not args.notebooks
    if every:
        args.notebooks = sorted(exercises_dir().glob("[0-9][0-9]_*.ipynb"))
        if not args.notebooks:
            print(f"error: no exercise notebooks in {exercises_dir()}", file=sys.stderr)
            return 2
    for nb in args.notebooks:
        if not nb.is_file():
            print(f"error: {nb}: no such notebook", file=sys.stderr)
            return 2
    rows = []
    for nb in args.notebooks:
        if every and not args.json:
            print(f"grading {nb.name} ...", file=sys.stderr, flush=True)
        rows += grade_notebook(nb, args.timeout)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows))
        if every or len(args.notebooks) > 1:
            print()
            print(format_progress(rows))
    return 0 if all(r["passed"] for r in rows) else 1


# --------------------------------------------------------------------------------------------
# Resetting one exercise
# --------------------------------------------------------------------------------------------
_CHECK_CALL = re.compile(r"""check(?:_kernel)?\(\s*["']([0-9]{2}\.\w+)["']\s*,\s*([A-Za-z_]\w*)""")


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _set_source(cell: dict, text: str) -> None:
    cell["source"] = text.splitlines(keepends=True) if isinstance(cell["source"], list) else text


def _def_span(src: str, func: str) -> tuple[int, int] | None:
    """Line span [start, end) of the top-level `def func` in `src` (decorators and the indented
    comments that close its body included), or None."""
    lines = src.splitlines(keepends=True)
    start = None
    try:
        tree = ast.parse(src)
    except SyntaxError:  # the learner's cell does not parse: find the def by its indentation
        start = next((i for i, line in enumerate(lines)
                      if re.match(rf"(async\s+)?def\s+{re.escape(func)}\s*\(", line)), None)
        end = None if start is None else start + 1
    else:
        node = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                     and n.name == func), None)
        if node is not None:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            end = node.end_lineno
    if start is None:
        return None
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t)"):
        end += 1  # the body goes on while lines are indented (a closing `### END SOLUTION` comment too)
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    return start, end


def _exercise_function(pristine: dict, name: str) -> tuple[str, str]:
    """(exercise name, function name) for `name`, which may be either, from the check(...) calls."""
    pairs = [m for cell in pristine["cells"] if cell["cell_type"] == "code"
             for m in _CHECK_CALL.findall(_source(cell))]
    for ex, func in pairs:
        if name in (ex, func):
            return ex, func
    known = ", ".join(f"{ex} ({func})" for ex, func in pairs)
    raise NotebookError(f"no exercise {name!r} in this notebook; its exercises are: {known}")


def reset_exercise(path: Path, name: str, solutions: Path = ROOT / "solutions") -> str:
    """Restore exercise `name` ("01.rope" or "rope") of the learner's notebook `path` to its stub.

    Only that function's lines change (and its cell's outputs are cleared); a deleted function's
    cell comes back just before the cell that checks it. The file is replaced atomically.
    """
    path = Path(path)
    src = Path(solutions) / path.name
    if not src.is_file():
        raise NotebookError(f"{path.name}: no solutions/{path.name} to restore from")
    pristine = exercise_notebook(json.loads(src.read_text()), src.name)
    ex_name, func = _exercise_function(pristine, name)
    stub_cell = next((c for c in pristine["cells"] if c["cell_type"] == "code" and _def_span(_source(c), func)), None)
    if stub_cell is None:  # the check is handed an object, not a function of its own (06.capstone)
        raise NotebookError(f"{ex_name} checks `{func}`, which is not one function: reset the functions it uses "
                            f"by their own exercises, or edit the cell")
    stub_src = _source(stub_cell)
    s0, s1 = _def_span(stub_src, func)
    stub = "".join(stub_src.splitlines(keepends=True)[s0:s1]).rstrip("\n")

    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        text = _source(cell)
        span = _def_span(text, func)
        if span is None:
            continue
        lines = text.splitlines(keepends=True)
        tail = "".join(lines[span[1]:])
        new = "".join(lines[:span[0]]) + stub + ("\n" + tail if tail else "")
        _set_source(cell, new)
        cell["outputs"], cell["execution_count"] = [], None
        where = "restored"
        break
    else:  # the function is gone: put its cell back before the check that needs it
        checks = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
                  and any(ex == ex_name for ex, _ in _CHECK_CALL.findall(_source(c)))]
        cell = json.loads(json.dumps(stub_cell))
        cell.pop("id", None)
        nb["cells"].insert(checks[0] if checks else len(nb["cells"]), cell)
        where = "re-inserted"
    write_atomic(path, _dump(nb))
    return (f"{where} `{func}` (exercise {ex_name}) in {path}; every other cell is as you left it. "
            f"If the notebook is open, reload it (File > Reload Notebook from Disk) before saving.")


def reset_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m minigemma reset",
                                description="Restore one exercise of a notebook to its untouched state.")
    p.add_argument("notebook", type=Path)
    p.add_argument("name", help='the exercise ("01.rope") or its function ("rope")')
    args = p.parse_args(argv)
    if not args.notebook.is_file():
        print(f"error: {args.notebook}: no such notebook", file=sys.stderr)
        return 2
    try:
        print(reset_exercise(args.notebook, args.name))
    except NotebookError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


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
