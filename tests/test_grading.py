"""The grading machinery, and proof that every exercise check bites.

- every registered exercise has mutants (plausible wrong answers), and its check fails each one,
  on several fresh seeds;
- the reference itself passes its own check (a sanity check of the cases);
- the solutions score full marks and the untouched exercises score zero, through the real
  grader (`python -m minigemma grade`) executing the notebooks in a kernel;
- exercises/ is exactly what `make exercises` generates from solutions/.
"""

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import tests.mutants as mutants_pkg
from minigemma.grading import core, notebooks

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 12345)


def _all_mutants():
    out = {}
    for m in pkgutil.iter_modules(mutants_pkg.__path__):
        out.update(importlib.import_module(f"tests.mutants.{m.name}").MUTANTS)
    return out


MUTANTS = _all_mutants()
core.get("00.softmax")  # registers every exercise
EXERCISES = sorted(core.EXERCISES)


def test_every_exercise_has_mutants():
    missing = [n for n in EXERCISES if len(MUTANTS.get(n, [])) < 2]
    assert not missing, f"exercises with fewer than 2 mutants: {missing}"
    unknown = sorted(set(MUTANTS) - set(EXERCISES))
    assert not unknown, f"mutants for unknown exercises: {unknown}"


@pytest.mark.parametrize("name", EXERCISES)
def test_reference_passes_its_own_check(name):
    for seed in SEEDS:
        r = core.run_check(name, core.get(name).reference, seed=seed)
        assert r.passed, r.failure


@pytest.mark.parametrize("name,label,fn", [(n, lab, f) for n, ms in sorted(MUTANTS.items()) for lab, f in ms],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_check_catches_mutant(name, label, fn):
    for seed in SEEDS:
        r = core.run_check(name, fn, seed=seed)
        assert not r.passed, f"{name}: mutant '{label}' passed the check with seed {seed}"
        assert r.failure and r.failure.get("case"), "a failure must name its case"


def test_check_reports_error_and_timeout():
    def raises(*a, **k):
        raise NotImplementedError()

    r = core.run_check("00.softmax", raises, seed=0)
    assert not r.passed and "NotImplementedError" in r.failure["error"]

    ex = core.get("00.softmax")
    old = ex.timeout_s
    ex.timeout_s = 0.5
    try:
        def hangs(x):
            while True:
                pass

        r = core.run_check("00.softmax", hangs, seed=0)
    finally:
        ex.timeout_s = old
    assert not r.passed and "longer than" in r.failure["error"]


def test_exercises_are_up_to_date():
    stale = notebooks.make_exercises(check_only=True)
    assert not stale, f"exercises/ is out of date; run `make exercises`: {stale}"


def test_strip_solutions_keeps_indentation():
    src = "def f(x):\n    ### BEGIN SOLUTION\n    return x + 1\n    ### END SOLUTION\n"
    out = notebooks.strip_solutions(src)
    assert out == "def f(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()"
    with pytest.raises(notebooks.NotebookError):
        notebooks.strip_solutions("### BEGIN SOLUTION\nx = 1\n")


def _grade(paths):
    import json

    res = subprocess.run([sys.executable, "-m", "minigemma", "grade", "--json", "--timeout", "300", *map(str, paths)],
                         cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert res.returncode in (0, 1), res.stderr
    return json.loads(res.stdout)


SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))


def test_solutions_score_full_marks():
    rows = _grade(SOLUTIONS)
    graded = {r["exercise"] for r in rows}
    assert graded == set(EXERCISES), f"exercises never graded: {set(EXERCISES) - graded}"
    failed = [r for r in rows if not r["passed"]]
    assert not failed, failed


def test_untouched_exercises_score_zero():
    rows = _grade([ROOT / "exercises" / p.name for p in SOLUTIONS])
    passed = [r["exercise"] for r in rows if r["passed"]]
    assert not passed, f"untouched exercises passed: {passed}"
    assert all(r["note"] for r in rows)


def test_grader_survives_a_hanging_and_a_raising_notebook(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("from minigemma.grading import check"),
        nbformat.v4.new_code_cell("def softmax(x):\n    while True:\n        pass"),
        nbformat.v4.new_code_cell("raise RuntimeError('learner broke a cell')"),
        nbformat.v4.new_code_cell("check('00.softmax', softmax)"),
    ]
    path = tmp_path / "00_hang.ipynb"
    nbformat.write(nb, str(path))
    rows = _grade([path])
    assert [r["exercise"] for r in rows] == ["00.softmax"]
    assert not rows[0]["passed"] and "longer than" in rows[0]["note"]
