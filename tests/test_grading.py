"""The grading machinery, and proof that every exercise check bites.

- every registered exercise has mutants (plausible wrong answers), and its check fails each one,
  on every seed; right answers written another way (CORRECT) pass on every seed;
- the reference itself passes its own check (a sanity check of the cases);
- the grading core checks dtypes and ints where a statement fixes them, honours a case's own
  tolerance, and shows the smallest failing case;
- the solutions score full marks and the untouched exercises score zero, through the real
  grader (`python -m minigemma grade`) executing the notebooks in a kernel;
- exercises/ is exactly what `make exercises` generates from solutions/.
"""

import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tests.mutants as mutants_pkg
from minigemma.grading import core, notebooks

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 12345)


def _collect(attr):
    out = {}
    for m in pkgutil.iter_modules(mutants_pkg.__path__):
        out.update(getattr(importlib.import_module(f"tests.mutants.{m.name}"), attr, {}))
    return out


MUTANTS = _collect("MUTANTS")
CORRECT = _collect("CORRECT")
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


def test_softmax_reference_is_torch_softmax():
    from minigemma.grading.checks.ch00 import softmax_reference

    for seed in SEEDS:
        for case in core.get("00.softmax").cases(seed):
            x = case.args[0]
            torch.testing.assert_close(softmax_reference(x), torch.softmax(x, dim=-1), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name,label,fn", [(n, lab, f) for n, ms in sorted(MUTANTS.items()) for lab, f in ms],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_check_catches_mutant(name, label, fn):
    for seed in SEEDS:
        f = fn.new() if isinstance(fn, mutants_pkg.fresh) else fn  # a stateful mutant starts empty
        r = core.run_check(name, f, seed=seed)
        assert not r.passed, f"{name}: mutant '{label}' passed the check with seed {seed}"
        assert r.failure and r.failure.get("case"), "a failure must name its case"


@pytest.mark.parametrize("name,label,fn", [(n, lab, f) for n, ms in sorted(CORRECT.items()) for lab, f in ms],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_check_accepts_a_correct_variant(name, label, fn):
    """Right answers written differently (another order of operations, float64, torch's own op) pass."""
    for seed in SEEDS:
        r = core.run_check(name, fn, seed=seed)
        assert r.passed, f"{name}: the right answer '{label}' failed with seed {seed}: {core.format_result(r)}"


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


# --------------------------------------------------------------------------------------------
# The grading core: types, tolerances, the smallest failing case
# --------------------------------------------------------------------------------------------
def test_compare_checks_types_only_where_the_statement_fixes_them():
    x = torch.ones(3)
    assert core.compare(x, x.half(), 1e-5, 1e-4) is None  # values agree; no dtype asked for
    assert "dtype float16 != expected float32" in core.compare(x, x.half(), 1e-5, 1e-4, exact_types=True)
    assert core.compare(x, x.clone(), 1e-5, 1e-4, exact_types=True) is None
    assert core.compare(12, 12.0, 0, 0) is None
    assert "expected an int, got float" in core.compare(12, 12.0, 0, 0, exact_types=True)
    assert "expected an int" in core.compare(12, torch.tensor(12), 0, 0, exact_types=True)
    assert "expected an int" in core.compare(1, True, 0, 0, exact_types=True)
    assert core.compare(12, 12, 0, 0, exact_types=True) is None
    assert "boolean" in core.compare(torch.ones(2, dtype=torch.bool), torch.ones(2), 0, 0)
    # where the mismatch is, and which non-finite values differ
    why = core.compare(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.0, 1.0, 2.5]), 1e-5, 1e-4)
    assert "index (2,)" in why and "expected 2" in why and "got 2.5" in why
    inf = float("inf")
    assert "non-finite" in core.compare(torch.tensor([inf, 1.0]), torch.tensor([-inf, 1.0]), 1e-5, 1e-4)
    nan = torch.tensor([float("nan"), 1.0])
    assert core.compare(nan, nan.clone(), 1e-5, 1e-4) is None


@pytest.fixture
def sized_exercise():
    """A throwaway exercise whose cases come in mixed sizes, removed afterwards."""
    def cases(seed):
        return [core.Case(f"n={n}", (torch.arange(n, dtype=torch.float32),)) for n in (50, 3, 200, 1, 12)]

    ex = core.register(core.Exercise("99.sized", cases, lambda x: x * 2))
    yield ex
    del core.EXERCISES["99.sized"]


def test_the_failure_shown_is_the_first_failing_case_in_the_curated_order(sized_exercise):
    """Cases run in the exercise's order (the plain case of the idea first), not by size."""
    r = core.run_check("99.sized", lambda x: x * 3, seed=0)  # wrong everywhere except at 0
    assert r.failure["case"].startswith("n=50") and "first of 4 failing cases" in r.failure["case"]
    assert (r.n_passed, r.n_cases) == (1, 5)  # n=1 is [0.]: 0 * 3 = 0 * 2
    r = core.run_check("99.sized", lambda x: x * 2 if len(x) < 100 else x, seed=0)
    assert r.failure["case"] == "n=200" and r.n_passed == 4  # the only failing case, alone
    r = core.run_check("99.sized", lambda x: 1 / 0 if len(x) == 12 else x * 2, seed=0)
    assert r.failure["case"] == "n=12" and "ZeroDivisionError" in r.failure["error"]


def test_the_report_names_the_mistake():
    """The first failing case's label names the idea, a known wrong answer is recognised, a tuple's items are
    named, and a wrong mask is drawn in 2-D with its first wrong (i, j)."""
    from tests.mutants.ch01 import _rope_interleaved
    from tests.mutants.ch03 import _rms

    r = core.run_check("01.rope", _rope_interleaved, seed=0)
    assert r.failure["case"].startswith("positions 0..T-1"), r.failure["case"]
    assert "this matches a known wrong answer: interleaved (GPT-J) convention" in r.failure["why"]
    # RMSNorm over a block of 4 channels instead of all C
    def blocked(x, w, eps):
        xf = x.float().unflatten(-1, (-1, 4)) if x.shape[-1] % 4 == 0 else x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (y.flatten(-2) if x.shape[-1] % 4 == 0 else y) * (1 + w.float())
    r = core.run_check("03.rms_norm", blocked, seed=0)
    assert r.failure["case"].startswith("batch 2, T 3, C 8"), r.failure["case"]
    r = core.run_check("03.rms_norm", lambda x, w, eps: _rms(x, w, eps, one_plus=False), seed=0)
    assert "this matches a known wrong answer: w instead of (1 + w)" in r.failure["why"]

    assert core.compare((torch.tensor(1.0), torch.zeros(2)), (torch.tensor(1.0), torch.ones(2)), 1e-5, 1e-5,
                        names=("the loss", "the gradient w.r.t. q")).startswith("the gradient w.r.t. q: values differ")

    expected = torch.ones(3, 3, dtype=torch.bool).tril()
    got = expected.clone()
    got[2, 0] = False
    why = core.compare(expected, got, 0, 0)
    assert "first at index (2, 0)" in why and "1 of 9 entries wrong" in why
    assert core._describe(got) == "bool mask(3, 3) rows: 1.. / 11. / .11"
def test_a_case_can_carry_its_own_tolerance(sized_exercise):
    sized_exercise.cases = lambda seed: [core.Case("loose", (torch.ones(4),), atol=0.1),
                                         core.Case("strict", (torch.ones(4),))]
    r = core.run_check("99.sized", lambda x: x * 2 + 0.05, seed=0)
    assert r.n_passed == 1 and r.failure["case"] == "strict"


def test_check_prints_its_report_once_in_a_notebook(capsys):
    r = core.check("00.softmax", lambda x: torch.softmax(x, -1), seed=0)
    assert capsys.readouterr().out.count("PASS 00.softmax") == 1
    r._ipython_display_()  # what IPython does with a cell's last value: nothing more to show
    assert capsys.readouterr().out == ""
    bare = core.run_check("00.softmax", lambda x: x, seed=0)
    bare._ipython_display_()  # a Result from run_check shows its report
    assert "FAIL 00.softmax" in capsys.readouterr().out


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
    rows = _grade([])  # no notebook named: every exercises/NN_*.ipynb
    assert {r["notebook"] for r in rows} == {p.name for p in SOLUTIONS}
    passed = [r["exercise"] for r in rows if r["passed"]]
    assert not passed, f"untouched exercises passed: {passed}"
    assert all(r["note"] for r in rows)


def test_grader_survives_a_hanging_and_a_raising_notebook(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        # the check's own time limit ends the hang; 1 s instead of its 30 s, the same way
        nbformat.v4.new_code_cell("from minigemma.grading import check, get\nget('00.softmax').timeout_s = 1"),
        nbformat.v4.new_code_cell("def softmax(x):\n    while True:\n        pass"),
        nbformat.v4.new_code_cell("raise RuntimeError('learner broke a cell')"),
        nbformat.v4.new_code_cell("check('00.softmax', softmax)"),
    ]
    path = tmp_path / "00_hang.ipynb"
    nbformat.write(nb, str(path))
    # the next notebook gets a fresh kernel (kernels are forked from a server): softmax is not defined there
    after = nbformat.v4.new_notebook()
    after.cells = [nbformat.v4.new_code_cell("from minigemma.grading import check\ncheck('00.softmax', softmax)")]
    nbformat.write(after, str(tmp_path / "00_after.ipynb"))
    rows = _grade([path, tmp_path / "00_after.ipynb"])
    assert [(r["notebook"], r["exercise"]) for r in rows] == [("00_hang.ipynb", "00.softmax"),
                                                              ("00_after.ipynb", "00.softmax")]
    assert not rows[0]["passed"] and "longer than" in rows[0]["note"]
    assert not rows[1]["passed"] and "never ran" in rows[1]["note"], rows[1]


def test_a_grade_cannot_be_forged_from_the_notebook(tmp_path):
    """What a notebook prints or writes is not a result: a fake report line in the old format, a fake
    PASS printed, a function that replaces torch.allclose or the module's compare, a Tensor subclass that
    answers "equal", and a loop that swallows the time limit with `except Exception` all fail."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import json, os, torch\nfrom minigemma.grading import check, get\n"
                                  "from minigemma.grading import core\nget('00.softmax').timeout_s = 1"),
        nbformat.v4.new_code_cell(  # every way of claiming a pass without a softmax
            "for name in ('00.softmax',):\n"
            "    line = json.dumps({'name': name, 'passed': True, 'n_cases': 5, 'n_passed': 5, 'failure': None})\n"
            "    print(line); print('✅ PASS 00.softmax: 5/5 cases')\n"
            "    for var in ('MINIGEMMA_GRADE_REPORT', 'MINIGEMMA_GRADING'):\n"
            "        if os.environ.get(var, '').endswith('.jsonl'):\n"
            "            open(os.environ[var], 'a').write(line + '\\n')\n"
            "core.compare = lambda *a, **k: None"),
        nbformat.v4.new_code_cell("def softmax(x):\n    torch.allclose = lambda *a, **k: True\n    return x"),
        nbformat.v4.new_code_cell("check('00.softmax', softmax)"),
    ]
    nbformat.write(nb, str(tmp_path / "00_forged.ipynb"))
    subclass = nbformat.v4.new_notebook()
    subclass.cells = [nbformat.v4.new_code_cell(
        "import torch\nfrom minigemma.grading import check\n"
        "class Yes(torch.Tensor):\n"
        "    @classmethod\n"
        "    def __torch_function__(cls, func, types, args=(), kwargs=None):\n"
        "        return True\n"
        "def softmax(x):\n    return torch.zeros_like(x).as_subclass(Yes)\n"
        "check('00.softmax', softmax)")]
    nbformat.write(subclass, str(tmp_path / "00_subclass.ipynb"))
    swallow = nbformat.v4.new_notebook()
    swallow.cells = [nbformat.v4.new_code_cell(
        "from minigemma.grading import check, get\nget('00.softmax').timeout_s = 1\n"
        "def softmax(x):\n    while True:\n        try:\n            sum(range(10**6))\n"
        "        except Exception:\n            pass\n"
        "check('00.softmax', softmax)")]
    nbformat.write(swallow, str(tmp_path / "00_swallow.ipynb"))
    rows = _grade([tmp_path / "00_forged.ipynb", tmp_path / "00_subclass.ipynb", tmp_path / "00_swallow.ipynb"])
    assert [r["passed"] for r in rows] == [False, False, False], rows
    assert "replaced torch.allclose" in rows[0]["note"], rows[0]
    assert "subclass" in rows[1]["note"], rows[1]
    assert "longer than" in rows[2]["note"], rows[2]


def test_the_check_refuses_replaced_tools_and_puts_them_back():
    original = torch.allclose

    def cheats(x):
        torch.allclose = lambda *a, **k: True
        return x

    r = core.run_check("00.softmax", cheats, seed=0)
    assert not r.passed and "replaced torch.allclose" in r.failure["error"] and torch.allclose is original
    core.compare = lambda *a, **k: None  # replaced before a check: refused, put back
    r = core.run_check("00.softmax", cheats, seed=0)
    assert not r.passed and "had been replaced" in r.failure["error"]
    assert core.run_check("00.softmax", lambda x: torch.softmax(x, -1), seed=0).passed


# --------------------------------------------------------------------------------------------
# Hints: two tiers, words only
# --------------------------------------------------------------------------------------------
# a call (but the maths' own functions: exp(x), sqrt(v) are notation), indexing, an API's name, a backtick
_MATHS = r"(?:exp|log|sqrt|rsqrt|softmax|log_softmax|logsumexp|max|min|sum|mean|cos|sin|tanh|GELU|gelu|σ|sigmoid|abs|round|RMS|RMSNorm|cap|stopgrad|sg)"
_CODE = re.compile(r"(?<![\w.])(?!" + _MATHS + r"\()[A-Za-z_][\w.]*\(|[A-Za-z_]\w*\[|\btorch\.|\btl\.|\bF\.|\.\w+\(|`|^\s*\w+ = ")


@pytest.mark.parametrize("name", EXERCISES)
def test_every_exercise_has_two_tier_hints_in_words(name):
    """hint(name) nudges, hint(name, 2) gives the recipe in words; neither is code (no calls, indexing,
    assignments or API names), and the recipe says more than the nudge."""
    ex = core.get(name)
    assert ex.hint and ex.recipe, f"{name}: a nudge (hint=) and a recipe (recipe=) are both needed"
    for tier, text in (("hint", ex.hint), ("recipe", ex.recipe)):
        found = _CODE.search(text)
        assert not found, f"{name}'s {tier} reads like code at {text[max(0, found.start() - 30):found.end() + 30]!r}"
    assert len(ex.recipe) > len(ex.hint), f"{name}: the recipe should spell out more than the nudge"


def test_hint_prints_the_tier_asked_for(capsys):
    core.hint("00.softmax")
    out = capsys.readouterr().out
    assert core.get("00.softmax").hint in out and 'hint("00.softmax", 2)' in out
    core.hint("00.softmax", 2)
    assert core.get("00.softmax").recipe in capsys.readouterr().out
    with pytest.raises(ValueError, match="tier"):
        core.hint("00.softmax", 3)
