"""The machinery behind every graded exercise.

An exercise is data plus a reference: a function that draws test cases (fresh random inputs
and fixed edge cases) and the package's own implementation to compare against. The same
`Exercise` runs in a notebook (`check`), on the command line (`python -m minigemma grade`)
and in the tests, which also prove that each check catches plausible wrong answers.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .exercise import EXERCISES, Case, Exercise, clone_inputs, register  # noqa: F401  (the public API)

GRADING_ENV = "MINIGEMMA_GRADING"  # set by `python -m minigemma grade`: it runs every check itself, at the end


@dataclass
class Result:
    name: str
    passed: bool
    n_cases: int
    n_passed: int
    failure: dict | None = None  # the first failing case: label, inputs, expected, got / error
    printed: bool = field(default=False, repr=False, compare=False)  # check() has shown it already

    def summary(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        return f"{status} {self.name}: {self.n_passed}/{self.n_cases} cases"

    def _ipython_display_(self) -> None:
        """A notebook shows the report, once: `check(...)` as a cell's last line prints it already."""
        if not self.printed:
            print(format_result(self))


def exercises_for(chapter: str) -> list[Exercise]:
    """Every registered exercise of chapter "NN", in registration order."""
    from . import checks  # noqa: F401  (registers everything)

    return [ex for name, ex in EXERCISES.items() if name.split(".")[0] == chapter]


def get(name: str) -> Exercise:
    from . import checks  # noqa: F401

    if name not in EXERCISES:
        raise KeyError(f"unknown exercise {name!r}; known: {', '.join(sorted(EXERCISES))}")
    return EXERCISES[name]


# --------------------------------------------------------------------------------------------
# Comparing outputs
# --------------------------------------------------------------------------------------------
def compare(expected: Any, got: Any, atol: float | tuple, rtol: float | tuple, exact_types: bool = False,
            names: tuple[str, ...] = ()) -> str | None:
    """None if `got` matches `expected`, else a short reason. Tensors compare with a tolerance.

    atol/rtol: one tolerance for every value, or, for a tuple output, a tuple of one per item.

    exact_types: a floating tensor must also have the expected dtype, an int must be an int, and a float a
    number (not a tensor).
    names: what each item of a tuple output is ("the gradient w.r.t. q"), for the reason to name it.
    """
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"expected a tensor, got {type(got).__name__}"
        if type(got) not in (torch.Tensor, torch.nn.Parameter):  # its own __torch_function__ could answer anything
            return f"expected a plain torch.Tensor, got an instance of the subclass {type(got).__name__}"
        if tuple(got.shape) != tuple(expected.shape):
            return f"shape {tuple(got.shape)} != expected {tuple(expected.shape)}"
        if expected.dtype == torch.bool and got.dtype != torch.bool:
            return f"expected a boolean tensor, got dtype {got.dtype}"
        if exact_types and got.dtype != expected.dtype:
            return f"dtype {_dtype(got)} != expected {_dtype(expected)}"
        if expected.dtype == torch.bool or not expected.is_floating_point():
            g = got.to(expected.dtype)
            if torch.equal(g, expected):
                return None
            wrong = (g != expected).nonzero()
            idx = tuple(int(i) for i in wrong[0])
            return (f"values differ: first at index {idx} (row-major), expected {_item(expected[idx])}, got "
                    f"{_item(g[idx])}; {len(wrong)} of {expected.numel()} entries wrong")
        if got.dtype == torch.bool:
            return f"expected a {_dtype(expected)} tensor, got a boolean one"
        g, e = got.detach().double(), expected.detach().double()
        finite = torch.isfinite(e)
        if not torch.equal(finite, torch.isfinite(g)):
            idx = tuple(int(i) for i in (finite != torch.isfinite(g)).nonzero()[0])
            return (f"non-finite values (inf/nan) in different places: at index {idx} expected "
                    f"{e[idx].item():.5g}, got {g[idx].item():.5g}")
        if not (torch.equal(e.isnan(), g.isnan()) and torch.equal(e.isposinf(), g.isposinf())):
            return "non-finite values differ (inf where nan or -inf is expected, or the other way round)"
        if not torch.allclose(g[finite], e[finite], atol=atol, rtol=rtol):
            diff = torch.where(finite, (g - e).abs(), torch.zeros_like(g))
            excess = torch.where(finite, diff - atol - rtol * e.abs(), torch.full_like(g, -1.0))
            idx = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))  # the worst miss
            return (f"values differ: at index {idx} expected {e[idx].item():.5g}, got {g[idx].item():.5g} "
                    f"(error {diff[idx].item():.3g}; allowed atol {atol:g} + rtol {rtol:g}·|expected|; "
                    f"{int((excess > 0).sum())} of {e.numel()} values off)")
        return None
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"expected a sequence of {len(expected)}, got {_kind(got)}"
        for i, (e, g) in enumerate(zip(expected, got)):
            a, r = (t[i] if isinstance(t, tuple) else t for t in (atol, rtol))
            why = compare(e, g, a, r, exact_types)
            if why:
                return f"{names[i] if i < len(names) else f'item {i}'}: {why}"
        return None
    if isinstance(expected, float):
        if exact_types and (isinstance(got, bool) or not isinstance(got, numbers.Real)):
            return f"expected a float, got {_kind(got)}"  # "return a float": a number, not a tensor
        if not isinstance(got, (int, float)) and not (isinstance(got, torch.Tensor) and got.numel() == 1):
            return f"expected a number, got {type(got).__name__}"
        g = float(got)
        return None if abs(g - expected) <= atol + rtol * abs(expected) else f"{g!r} != {expected!r}"
    if exact_types and isinstance(expected, int) and not isinstance(expected, bool):
        if isinstance(got, bool) or not isinstance(got, numbers.Integral):
            return f"expected an int, got {_kind(got)} {got!r}"
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    return None if got == expected else f"{got!r} != {expected!r}"


def _item(t: torch.Tensor) -> Any:
    v = t.item()
    return round(v, 5) if isinstance(v, float) else v


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _kind(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {_dtype(x)} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _size(x: Any) -> int:
    """How big a value is: numbers in tensors and sequences."""
    if isinstance(x, torch.Tensor):
        return x.numel()
    if isinstance(x, (tuple, list)):
        return sum(_size(v) for v in x)
    if isinstance(x, dict):
        return sum(_size(v) for v in x.values())
    return 1


def _describe(x: Any, limit: int = 6) -> str:
    if isinstance(x, torch.Tensor) and type(x) not in (torch.Tensor, torch.nn.Parameter):
        return f"an instance of the tensor subclass {type(x).__name__}"  # its own ops could do anything
    if isinstance(x, torch.Tensor) and x.dtype == torch.bool and x.dim() >= 2 and x.shape[-1] <= 32 \
            and x.numel() <= 512:
        # a mask is read in 2-D: one row per query, 1 where a key is seen, . where it is not
        rows = x.reshape(-1, x.shape[-1]).tolist()
        drawn = " / ".join("".join("1" if v else "." for v in row) for row in rows)
        return f"bool mask{tuple(x.shape)} rows: {drawn}"
    if isinstance(x, torch.Tensor):
        head = x.flatten()[:limit].tolist()
        head = [round(v, 4) if isinstance(v, float) else v for v in head]
        more = ", ..." if x.numel() > limit else ""
        return f"tensor{tuple(x.shape)} {str(x.dtype).replace('torch.', '')} {head}{more}"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_describe(v, limit) for v in x) + ")"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}={_describe(v, limit)}" for k, v in x.items()) + "}"
    return repr(x)


# --------------------------------------------------------------------------------------------
# What a check relies on, guarded
# --------------------------------------------------------------------------------------------
# The comparison runs in the learner's process, after the learner's code: a function of theirs that
# replaced torch.allclose (or this module's compare) would pass every case. The originals are
# recorded here; a check refuses to run with any of them replaced, and fails a case that replaces one
# (restoring it). A determined learner can still defeat an in-process check: this closes the easy ways.
_TORCH_FUNCTIONS = ("allclose", "equal", "isfinite", "isnan", "isposinf", "where", "zeros_like", "full_like")
_TENSOR_METHODS = ("double", "detach", "abs", "to", "isnan", "isposinf", "__sub__", "__ne__", "__eq__")


def _originals() -> dict:
    found = {(torch, n): getattr(torch._C._VariableFunctions, n, None) or getattr(torch, n) for n in _TORCH_FUNCTIONS}
    found.update({(torch.Tensor, n): torch.Tensor.__dict__.get(n, getattr(torch.Tensor, n)) for n in _TENSOR_METHODS})
    return found


_ORIGINALS = _originals()


def _replaced() -> list[str]:
    """The guarded functions that are not the originals any more (and they are put back)."""
    out = []
    for (owner, n), f in _ORIGINALS.items():
        if getattr(owner, n) is not f:
            out.append(f"{'torch' if owner is torch else 'torch.Tensor'}.{n}")
            setattr(owner, n, f)
    module = globals()
    for n, f in _OWN.items():
        if module[n] is not f:
            out.append(f"minigemma.grading.core.{n}")
            module[n] = f
    return out


# --------------------------------------------------------------------------------------------
# Running a check
# --------------------------------------------------------------------------------------------
class ExerciseTimeout(BaseException):
    """The check's time limit. A BaseException, so that `except Exception:` in the learner's code does not
    swallow it; it fires again every second until the check ends, for a loop that catches it anyway."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise ExerciseTimeout in the learner's code after `seconds` (main thread, Unix only)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def _raise(signum, frame):
        raise ExerciseTimeout(f"took longer than {seconds:g} s (an endless loop?)")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_check(name: str, fn: Callable[..., Any], seed: int | None = None) -> Result:
    """Run every case of exercise `name` on `fn` and report the first failing one. Never raises.

    Cases run in the exercise's order, which is curated: the plain case of the idea first, then one
    case per concept (an edge, a dtype, a mistake learners make), random draws last. So the first case
    that fails isolates the first idea that is wrong, and its label names it; where the wrong output
    equals a known wrong answer (the course's catalogue of them), the report says which.
    """
    ex = get(name)
    seed = int(time.time_ns() % 2**31) if seed is None else seed
    replaced = _replaced()
    if replaced:
        return Result(name, False, 0, 0, {"case": "(before any case)", "seed": seed, "error": (
            f"{', '.join(replaced)} had been replaced before this check: put back, but this run does not count "
            "(run the check again, without code that replaces the checking tools)")})
    cases = ex.cases(seed)
    n_passed, failure, n_failed = 0, None, 0
    try:
        with _time_limit(ex.timeout_s):
            prepared = [(case, ex.run(ex.reference, case)) for case in cases]
            for case, expected in prepared:
                why = _run_case(ex, case, expected, fn)
                if why is None:
                    n_passed += 1
                    continue
                n_failed += 1
                if failure is None:
                    failure = {"case": case.label, "inputs": _describe((case.args, case.kwargs)),
                               "expected": _describe(expected), **why, "seed": seed}
                    failed_case = (case, expected)
            if failure is not None and "got" in failure:
                mistake = known_mistake(ex, fn, *failed_case)
                if mistake:
                    failure["why"] = f"this matches a known wrong answer: {mistake} ({failure['why']})"
            if failure is not None and ex.diagnose is not None:
                found = ex.diagnose(fn, *failed_case)
                if found:  # put first in the reason, so every report (notebook, grade table) shows it
                    key = "why" if "why" in failure else "error"
                    failure[key] = f"{found} ({failure[key]})"
    except ExerciseTimeout as e:
        failure = {"case": "(time limit)", "error": str(e), "seed": seed}
    if failure is not None and n_failed > 1:
        failure["case"] += f"  (the first of {n_failed} failing cases)"
    return Result(name, failure is None, len(cases), n_passed, failure)


def _mistakes_catalogue() -> dict:
    """exercise name -> [(label, wrong function)]: the course's plausible wrong answers (tests/mutants/,
    where this copy of the course has them; an installed package has none, and says nothing)."""
    global _CATALOGUE
    if _CATALOGUE is None:
        import importlib
        import pkgutil
        import sys
        from pathlib import Path

        _CATALOGUE = {}
        root = Path(__file__).resolve().parents[2]
        if (root / "tests" / "mutants" / "__init__.py").exists():
            added = str(root) not in sys.path
            if added:
                sys.path.insert(0, str(root))
            try:
                package = importlib.import_module("tests.mutants")
                for m in pkgutil.iter_modules(package.__path__):
                    _CATALOGUE.update(getattr(importlib.import_module(f"tests.mutants.{m.name}"), "MUTANTS", {}))
            except Exception:  # noqa: BLE001 - no catalogue: the report just names no known mistake
                _CATALOGUE = {}
            finally:
                if added:
                    sys.path.remove(str(root))
    return _CATALOGUE


_CATALOGUE: dict | None = None


def known_mistake(ex: Exercise, fn: Callable[..., Any], case: Case, expected: Any) -> str | None:
    """The label of the known wrong answer whose output on `case` equals `fn`'s (within the exercise's
    tolerance), if exactly one does; None otherwise (an ambiguous match names nothing)."""
    entries = _mistakes_catalogue().get(ex.name, [])
    if not entries or ex.launch is not None or ex.diagnose is not None:
        return None  # a kernel's launches, a capstone's model runs: too slow to repeat for every wrong answer
    try:
        got = ex.run(fn, case)
    except BaseException:  # noqa: BLE001
        return None
    atol = ex.atol if case.atol is None else case.atol
    rtol = ex.rtol if case.rtol is None else case.rtol
    matches = []
    for label, wrong in entries:
        wrong = wrong.new() if hasattr(wrong, "new") else wrong  # a stateful wrong answer starts empty
        try:
            theirs = ex.run(wrong, case)
        except Exception:  # noqa: BLE001 - a wrong answer that raises here matches nothing
            continue
        if compare(expected, theirs, atol, rtol) is None:
            continue  # right on this case: it cannot explain a failure here
        if compare(theirs, got, atol, rtol) is None:
            matches.append(label)
    return matches[0] if len(matches) == 1 else None


def _run_case(ex: Exercise, case: Case, expected: Any, fn: Callable[..., Any]) -> dict | None:
    """None if `fn` passes `case`, else what went wrong: {"got", "why"} or {"error"}."""
    try:
        got = ex.run(fn, case)
    except ExerciseTimeout:
        raise
    except BaseException as e:  # noqa: BLE001 - the learner's error is a failed case
        if isinstance(e, KeyboardInterrupt):
            raise
        return {"error": traceback.format_exception_only(type(e), e)[-1].strip()}
    replaced = _replaced()
    if replaced:
        return {"error": f"the function replaced {', '.join(replaced)}, which the check uses to compare: not "
                         "allowed (put back)"}
    atol = ex.atol if case.atol is None else case.atol
    rtol = ex.rtol if case.rtol is None else case.rtol
    why = compare(expected, got, atol, rtol, ex.exact_types, ex.outputs)
    return None if why is None else {"got": _describe(got), "why": why}


def graded(name: str, obj: Any) -> str:
    """What `python -m minigemma grade` runs for exercise `name` after the notebook: the check on `obj` (the
    learner's function, or kernel for a kernel exercise), as one JSON line."""
    ex = get(name)
    try:
        result = run_check(name, ex.launch(obj) if ex.launch is not None else obj)
    except BaseException as e:  # noqa: BLE001 - whatever the learner's object did, the grade is a failure
        result = Result(name, False, 0, 0, {"case": "(the check could not run)",
                                            "error": traceback.format_exception_only(type(e), e)[-1].strip()})
    return json.dumps({"name": result.name, "passed": result.passed, "n_cases": result.n_cases,
                       "n_passed": result.n_passed, "failure": result.failure}, default=str)


def format_result(result: Result) -> str:
    lines = [("✅ " if result.passed else "❌ ") + result.summary()]
    if result.failure:
        for key in ("case", "inputs", "expected", "got", "why", "error", "seed"):
            if key in result.failure:
                lines.append(f"   {key:>8}: {result.failure[key]}")
        if get(result.name).hint:
            lines.append(f'   stuck? hint("{result.name}") gives a hint')
    return "\n".join(lines)


def check(name: str, fn: Callable[..., Any], seed: int | None = None) -> Result:
    """Check the learner's `fn` for exercise `name` and print pass/fail with the first failing case."""
    if os.environ.get(GRADING_ENV):  # the grader runs every check itself once the notebook has run
        print(f"{name}: graded after the notebook has run")
        return Result(name, False, 0, 0, {"case": "(graded after the notebook has run)"}, printed=True)
    result = run_check(name, fn, seed)
    print(format_result(result))
    result.printed = True
    return result


def check_kernel(name: str, kernel, seed: int | None = None) -> Result:
    """`check` for a Triton kernel exercise: the exercise's launcher runs `kernel` with its grid and
    blocks on every case."""
    ex = get(name)
    if ex.launch is None:
        raise ValueError(f"{name} is not a kernel exercise: use check({name!r}, fn)")
    return check(name, ex.launch(kernel), seed)


def hint(name: str, tier: int = 1) -> None:
    """Print a hint for exercise `name`: tier 1 (hint("01.rope")) nudges towards the idea; tier 2
    (hint("01.rope", 2)) spells out the recipe in words. Neither gives code."""
    ex = get(name)
    if tier not in (1, 2):
        raise ValueError(f"hint tier is 1 (a nudge) or 2 (the recipe in words), not {tier!r}")
    text = ex.hint if tier == 1 else ex.recipe
    print(f"💡 {name}{' (recipe)' if tier == 2 else ''}: "
          f"{text or 'no hint for this one: re-read the statement above the cell.'}")
    if tier == 1 and ex.recipe:
        print(f'   still stuck? hint("{name}", 2) gives the recipe in words')


_OWN = {n: globals()[n] for n in ("compare", "run_check", "_run_case", "_describe", "format_result", "graded")}
