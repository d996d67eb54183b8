"""Swapping modules: how every fast or alternative variant enters a model (gpt-fast's design).

A model has one forward. Quantisation (`quant.quantize`), the Triton kernels (`kernels.use_triton`)
and the learner's own functions (`learner.with_functions`) never write a second one: each names,
per module class, what that module becomes, and `swap_modules` walks the model and does it.

    swap_modules(model, {nn.Linear: lambda m: Int8Linear.from_weight(m.weight, m.bias)})  # a new module
    swap_modules(model, {RMSNorm: retype(TritonRMSNorm)})                                 # the same object,
                                                                                           # another class
Matching is by exact class: a subclass with a forward of its own is never swapped by mistake.
A replacement function may return None to leave that module as it is.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Mapping

from torch import nn

Swap = Callable[[nn.Module], "nn.Module | None"]


def swap_modules(model: nn.Module, table: Mapping[type, Swap]) -> Counter:
    """In place: every submodule whose exact class is a key of `table` becomes table[cls](module)
    (None: left alone). Children are visited before the swap, each module once, the root never.
    Returns how many modules of each class were swapped."""
    swapped: Counter = Counter()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            cls = type(child)
            make = table.get(cls)
            new = None if make is None else make(child)
            if new is None:
                continue
            if new is not child:
                setattr(parent, name, new)
            swapped[cls.__name__] += 1
    return swapped


def retype(cls: type) -> Swap:
    """A swap that keeps the module object and changes its class to `cls` (a subclass with the same
    parameters and no state of its own): parameters, state dict, caches, hooks and every reference
    to the module stay as they are. `retype(torch_cls)` on the swapped module swaps it back."""

    def swap(module: nn.Module) -> nn.Module:
        module.__class__ = cls
        return module

    return swap
