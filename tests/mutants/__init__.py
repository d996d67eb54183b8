"""Plausible wrong answers, one module per chapter: MUTANTS = {exercise name: [(label, fn), ...]}.

tests/test_grading.py proves that every check fails each of them on every seed, and passes each
right answer in CORRECT (other correct ways to write the same function, so a check never rejects
a learner's good answer for a detail the statement does not ask for).

A mutant that keeps state between calls (a cache) is wrapped in `fresh`, so every check run starts
it from an empty cache: the check must catch the stale state within one run.
"""


class fresh:
    """A stateful mutant: `new()` builds one with empty state."""

    def __init__(self, factory):
        self.new = factory
