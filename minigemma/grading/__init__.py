"""Graded exercises: `check(name, fn)` in a notebook, `python -m minigemma grade` on the command line."""

from .core import Case, Exercise, Result, check, check_kernel, exercises_for, get, hint, register, run_check

__all__ = ["Case", "Exercise", "Result", "check", "check_kernel", "exercises_for", "get", "hint", "register",
           "run_check"]
