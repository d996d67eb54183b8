"""The test suite mutmut runs on every mutant: each exercise's own check, on every seed.

mutmut (tools/mutation/run.py) copies this file into its work folder and runs it against a copy of
`minigemma` in which every function is mutated; the environment variable MUTANT_UNDER_TEST names
the mutant that mutmut's trampolines route calls to. A check compares a learner's function with
the reference, so here the mutated reference plays the learner and the original code everything
else: the cases are drawn and the check's own reference is computed with MUTANT_UNDER_TEST
cleared, and only the call in the learner's place runs the mutant. mutmut's coverage pass
("stats") therefore maps each exercise to exactly the functions its reference executes.

A test fails (the mutant is killed) if the check fails on any seed; every outcome is also logged
per seed to $MINIGEMMA_MUTATION_LOG, so run.py can count mutants killed on every seed.
"""

import json
import os

import pytest
import torch

from minigemma.grading import core

SEEDS = (0, 1, 12345)  # the seeds of tests/test_grading.py
KEY = "MUTANT_UNDER_TEST"
LOG = os.environ.get("MINIGEMMA_MUTATION_LOG")
ONLY = [n for n in os.environ.get("MINIGEMMA_MUTATION_EXERCISES", "").split(",") if n]

torch.set_num_threads(1)  # mutmut forks a worker per mutant; one thread each, no pool to inherit
_mode, os.environ[KEY] = os.environ.get(KEY), ""  # importing the package (PRESETS, ...) runs the original
core.get("00.softmax")  # registers every exercise
if _mode is not None:
    os.environ[KEY] = _mode
NAMES = sorted(n for n in core.EXERCISES if not ONLY or n in ONLY)


@pytest.mark.parametrize("name", NAMES)
def test_check(name):
    mutant = os.environ.get(KEY, "")
    ex = core.get(name)

    def mutated(*args, **kwargs):
        os.environ[KEY] = mutant
        try:
            return ex.reference(*args, **kwargs)
        finally:
            os.environ[KEY] = ""

    # a mutant that loops for ever fails on the check's time limit; 15 s leaves room for the slower
    # references (a few training steps) on a loaded machine
    old_timeout, ex.timeout_s = ex.timeout_s, min(ex.timeout_s, 15.0)
    os.environ[KEY] = ""
    try:
        failed = {seed: core.run_check(name, mutated, seed=seed) for seed in SEEDS}
        failed = {seed: r for seed, r in failed.items() if not r.passed}
    finally:
        os.environ[KEY] = mutant
        ex.timeout_s = old_timeout
    if LOG and mutant not in ("", "stats", "fail", "mutant_generation"):
        first = next(iter(failed.values()), None)
        with open(LOG, "a") as f:
            f.write(json.dumps({"mutant": mutant, "exercise": name, "killed_seeds": sorted(failed),
                                "why": first and {k: first.failure.get(k) for k in ("case", "why", "error")}}) + "\n")
    assert not failed, f"{name}: the check failed on seeds {sorted(failed)}"
