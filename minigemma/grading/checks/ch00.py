"""Chapter 00: a warm-up exercise that shows how checks work."""

import torch

from ..core import Case, Exercise, register


def _softmax_cases(seed: int) -> list[Case]:
    g = torch.Generator().manual_seed(seed)
    return [
        Case("one row", (torch.tensor([1.0, 2.0, 3.0]),)),
        Case("batch of rows, odd size", (torch.randn(3, 7, generator=g),)),
        Case("single element (T=1)", (torch.randn(4, 1, generator=g),)),
        Case("large logits (overflow in a naive exp)", (torch.tensor([[1000.0, 999.0, 0.0]]),)),
        Case("-inf entries (masked positions)", (torch.tensor([[0.5, float("-inf"), 1.5, float("-inf")]]),)),
        Case("4-D input, last dim", (torch.randn(2, 3, 5, 6, generator=g) * 10,)),
    ]


register(Exercise(
    name="00.softmax",
    cases=_softmax_cases,
    reference=lambda x: torch.softmax(x, dim=-1),
    description="Numerically stable softmax over the last dimension.",
))
