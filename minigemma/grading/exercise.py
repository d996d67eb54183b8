"""What an exercise is: data plus a reference, and the table every chapter's checks register in.

This module holds only the data types and the registry, so the per-chapter checks
(`grading/checks/chNN.py`) import it and nothing above it; `grading/core.py` loads the checks and
runs them (`check`, `run_check`, `hint`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class Case:
    """One call of the learner's function: positional args, keyword args, and a label.

    atol/rtol: this case's own tolerance, where reduced precision is the point of the case (a
    bfloat16 input, say); None keeps the exercise's. A tuple gives one per item of a tuple output.
    """

    label: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    atol: float | tuple | None = None
    rtol: float | tuple | None = None


@dataclass
class Exercise:
    """A graded exercise.

    name:      "<chapter>.<short name>", e.g. "01.masked_attention".
    cases:     (seed) -> list[Case]; random draws use a torch.Generator seeded with `seed`, so every
               run sees fresh inputs but a failure can be reproduced.
    reference: the package's implementation, called with the same arguments.
    atol/rtol: tolerance for tensor outputs (float32 references; the tolerance covers
               summation-order differences, not algorithmic ones). A Case may set its own.
    exact_types: the statement fixes the output's type: a floating tensor must have the
               reference's dtype ("a float32 tensor", "in x's dtype"), an int must be a
               Python int, not 1.0 ("return an int"), and a float a number, not a 0-d tensor
               ("return a float"). Off, only values and shapes count.
    hint:      revealed on request by `hint(name)`: the first tier, a nudge towards the idea.
    recipe:    the second tier, `hint(name, 2)`: the steps in words. Neither tier is code.
    launch:    for a Triton kernel exercise, kernel -> the torch function the cases call (it picks
               the grid and block sizes and launches); `check_kernel(name, kernel)` uses it.
    call:      (fn, args, kwargs) -> what is compared; how the check calls the reference and the
               learner's function alike. Default fn(*args, **kwargs); a check that also grades
               gradients (where a missing stop-gradient changes nothing but the gradient) wraps it.
    """

    name: str
    cases: Callable[[int], list[Case]]
    reference: Callable[..., Any]
    atol: float = 1e-5
    rtol: float = 1e-4
    timeout_s: float = 30.0
    description: str = ""
    exact_types: bool = False
    hint: str = ""
    recipe: str = ""
    outputs: tuple[str, ...] = ()  # names of a tuple output's items, for the report ("the gradient w.r.t. q")
    # diagnose(fn, case, expected) -> str | None: run on the smallest failing case to say what broke it
    # (the capstone swaps the learner's functions in one at a time and names the one that breaks the text)
    diagnose: Callable[[Callable[..., Any], Case, Any], str | None] | None = None
    call: Callable[[Callable[..., Any], tuple, dict], Any] | None = None
    # a kernel exercise (chapters 12-13): kernel -> the torch function the cases call (grid, blocks, launch)
    launch: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None

    def run(self, fn: Callable[..., Any], case: Case) -> Any:
        """fn on a fresh copy of the case's inputs (a function that writes into them spoils nothing)."""
        args, kwargs = clone_inputs(case.args), clone_inputs(case.kwargs)
        return fn(*args, **kwargs) if self.call is None else self.call(fn, args, kwargs)


EXERCISES: dict[str, Exercise] = {}


def register(ex: Exercise) -> Exercise:
    if ex.name in EXERCISES:
        raise ValueError(f"exercise {ex.name} registered twice")
    EXERCISES[ex.name] = ex
    return ex


def clone_inputs(x: Any) -> Any:
    """Deep-copy tensors so a learner's in-place edit cannot change the reference's inputs."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, tuple):
        return tuple(clone_inputs(v) for v in x)
    if isinstance(x, list):
        return [clone_inputs(v) for v in x]
    if isinstance(x, dict):
        return {k: clone_inputs(v) for k, v in x.items()}
    return x


def in_place(*names: str) -> Callable[[Callable[..., Any], tuple, dict], Any]:
    """An `Exercise.call` for a statement that writes into its first len(names) arguments (the buffers) and
    returns them first: each buffer must come back as itself (not a new tensor), and what is compared is the
    caller's buffers after the call, so an answer that leaves them unwritten fails even if it returns the
    right values."""

    def call(fn, args, kwargs):
        out = fn(*args, **kwargs)
        if not isinstance(out, tuple) or len(out) < len(names):
            return out  # the comparison says what is wrong with its shape
        for i, name in enumerate(names):
            got, given = out[i], args[i]
            if isinstance(got, torch.Tensor) and not (got.data_ptr() == given.data_ptr() and got.shape == given.shape):
                raise ValueError(f"{name} came back as a new tensor: write into the buffer you were given (in "
                                 "place) and return that buffer; the next call must see what this one wrote")
        return (*args[:len(names)], *out[len(names):])

    return call

