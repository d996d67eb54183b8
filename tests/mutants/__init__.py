"""Plausible wrong answers, one module per chapter: MUTANTS = {exercise name: [(label, fn), ...]}.

tests/test_grading.py proves that every check fails each of them.
"""
