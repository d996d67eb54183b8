"""Finding the way: progress (`grade` with no argument), `reset` of one exercise, and hints.

The grader runs in a subprocess from a temporary folder holding an `exercises/` of its own, as a
learner runs it from the course folder; `reset` edits a copy of a notebook, never the repository's.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minigemma.grading import core, notebooks

ROOT = Path(__file__).resolve().parents[1]
CH01 = "01_attention_from_scratch.ipynb"


def _cli(*args, cwd=ROOT, timeout=600):
    return subprocess.run([sys.executable, "-m", "minigemma", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_grade_with_no_argument_grades_every_notebook_and_shows_progress(tmp_path):
    ex = tmp_path / "exercises"
    ex.mkdir()
    shutil.copy(ROOT / "solutions" / "00_welcome.ipynb", ex / "00_welcome.ipynb")  # done: passes
    shutil.copy(ROOT / "exercises" / "04_local_global_attention.ipynb", ex)  # untouched: all to do
    n04 = len(core.exercises_for("04"))
    r = _cli("grade", cwd=tmp_path)
    assert r.returncode == 1, r.stderr  # not everything passes yet
    out = r.stdout
    assert "00.softmax" in out and "04.layer_types" in out and "04.kv_cache_bytes" in out
    assert "progress:" in out
    assert "00_welcome.ipynb" in out and "1/1" in out and f"0/{n04}" in out
    assert f"overall: 1/{n04 + 1} exercises passed ({100 / (n04 + 1):.0f}%)" in out
    assert 'next up: 04.layer_types' in out and 'hint("04.layer_types")' in out
    assert "grading 00_welcome.ipynb" in r.stderr  # it says what it is doing while kernels run


def test_grade_with_no_notebooks_found_is_an_error(tmp_path):
    (tmp_path / "exercises").mkdir()
    r = _cli("grade", cwd=tmp_path)
    assert r.returncode == 2 and "no exercise notebooks" in r.stderr


def _sources(path):
    nb = json.loads(Path(path).read_text())
    return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in nb["cells"]]


def test_reset_restores_one_exercise_and_keeps_the_rest(tmp_path):
    learner = tmp_path / CH01
    shutil.copy(ROOT / "solutions" / CH01, learner)  # a learner who has solved everything
    before = _sources(learner)
    r = _cli("reset", str(learner), "01.rope")
    assert r.returncode == 0, r.stderr
    assert "restored `rope` (exercise 01.rope)" in r.stdout
    after = _sources(learner)
    pristine = _sources(ROOT / "exercises" / CH01)
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    rope = next(i for i, s in enumerate(pristine) if "def rope(" in s)
    assert changed == [rope] and after[rope] == pristine[rope]
    assert not list(tmp_path.glob(".*.partial")), "the write is atomic (write_atomic): no temporary file left"
    json.loads(learner.read_text())  # still a valid notebook

    # by function name, in a cell holding two exercises: only that function changes
    r = _cli("reset", str(learner), "merge_heads")
    assert r.returncode == 0, r.stderr
    cell = next(s for s in _sources(learner) if "def split_heads" in s)
    assert "return x.view(B, T, n_heads" in cell  # split_heads: still the learner's answer
    assert cell.endswith("def merge_heads(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()")

    # graded for real: exactly the reset exercises fail
    rows = {row["exercise"]: row for row in notebooks.grade_notebook(learner)}
    assert [n for n, row in rows.items() if not row["passed"]] == ["01.merge_heads", "01.rope"]
    assert "NotImplementedError" in rows["01.rope"]["note"]


def test_reset_brings_back_a_deleted_function_and_handles_broken_cells(tmp_path):
    learner = tmp_path / CH01
    nb = json.loads((ROOT / "solutions" / CH01).read_text())
    rope = next(i for i, c in enumerate(nb["cells"]) if "def rope(" in "".join(c["source"]))
    mask = next(i for i, c in enumerate(nb["cells"]) if "def causal_mask(" in "".join(c["source"]))
    del nb["cells"][rope]  # the learner deleted the cell
    nb["cells"][mask]["source"] = "def causal_mask(T):\n    return (torch.ones(T, T\n\nx = 1\n"  # does not parse
    learner.write_text(json.dumps(nb))
    assert "re-inserted `rope`" in notebooks.reset_exercise(learner, "01.rope")
    srcs = _sources(learner)
    i = next(i for i, s in enumerate(srcs) if "def rope(" in s)
    assert srcs[i + 1].startswith('check("01.rope"'), "the stub comes back just before its check"
    notebooks.reset_exercise(learner, "causal_mask")
    cell = next(s for s in _sources(learner) if "def causal_mask" in s)
    stub = next(s for s in _sources(ROOT / "exercises" / CH01) if "def causal_mask" in s)
    assert cell == stub + "\n\nx = 1\n"  # the broken def replaced, the learner's other line kept


def test_reset_unknown_exercise_lists_the_notebooks_exercises(tmp_path):
    learner = tmp_path / CH01
    shutil.copy(ROOT / "exercises" / CH01, learner)
    r = _cli("reset", str(learner), "01.nope")
    assert r.returncode == 2
    assert "no exercise '01.nope'" in r.stderr and "01.rope (rope)" in r.stderr
    r = _cli("reset", str(tmp_path / "99_none.ipynb"), "x")
    assert r.returncode == 2 and "no such notebook" in r.stderr


# --------------------------------------------------------------------------------------------
# Hints
# --------------------------------------------------------------------------------------------
core.get("00.softmax")


@pytest.mark.parametrize("name", sorted(core.EXERCISES))
def test_every_exercise_has_a_hint(name, capsys):
    ex = core.get(name)
    assert len(ex.hint) > 80, f"{name}: write a hint (Exercise(..., hint=...)) that says where to start"
    core.hint(name)
    assert ex.hint in capsys.readouterr().out


def test_a_failed_check_offers_the_hint_and_a_passed_one_does_not(capsys):
    r = core.check("01.causal_mask", lambda T: None, seed=0)
    out = capsys.readouterr().out
    assert not r.passed and 'hint("01.causal_mask")' in out
    core.check("01.causal_mask", core.get("01.causal_mask").reference, seed=0)
    assert "hint(" not in capsys.readouterr().out
    with pytest.raises(KeyError, match="unknown exercise"):
        core.hint("99.nope")
