"""Chapter 00: a warm-up exercise that shows how checks work."""

import torch

from ..exercise import Case, Exercise, register

NEG_INF = float("-inf")


def _softmax_cases(seed: int) -> list[Case]:
    g = torch.Generator().manual_seed(seed)
    return [
        Case("one row", (torch.tensor([1.0, 2.0, 3.0]),)),
        Case("batch of rows, odd size", (torch.randn(3, 7, generator=g),)),
        Case("single element (T=1)", (torch.randn(4, 1, generator=g),)),
        Case("square batch (keepdim matters)", (torch.randn(5, 5, generator=g) * 3,)),
        Case("large logits (overflow in a naive exp)", (torch.tensor([[1000.0, 999.0, 0.0]]),)),
        Case("very negative logits (underflow in a naive exp)", (torch.tensor([[-1000.0, -1001.5, -1003.0]]),)),
        # one max over the whole batch sends every exp of the small row to 0: 0/0
        Case("rows of very different scale in one batch",
             (torch.stack([torch.randn(6, generator=g) * 500, torch.randn(6, generator=g)]),)),
        Case("-inf entries (masked positions)", (torch.tensor([[0.5, NEG_INF, 1.5, NEG_INF]]),)),
        # a running max that starts from the first element computes -inf - (-inf) = nan
        Case("rows that start with -inf", (torch.tensor([[NEG_INF, 2.0, 0.5], [NEG_INF, NEG_INF, -3.0]]),)),
        Case("4-D input, last dim", (torch.randn(2, 3, 5, 6, generator=g) * 10,)),
        # bfloat16 keeps 8 significant bits (one rounding step is 2^-8 = 0.4% relative). Computed in bfloat16,
        # x − max (|x − max| up to ~8 here) is off by up to 8·2^-9 ≈ 0.016, which exp turns into 1.6% relative,
        # and exp, the sum, the division and the expected value's own rounding add ~0.2% each: rtol 3e-2, and
        # atol 1e-2 for the smallest probabilities. The expected values are computed in float32.
        Case("bfloat16 rows (returned in bfloat16)", ((torch.randn(3, 8, generator=g) * 2).to(torch.bfloat16),),
             atol=1e-2, rtol=3e-2),
    ]


def softmax_reference(x: torch.Tensor) -> torch.Tensor:
    """exp(x - max) / sum over the last dimension, written out so that mutation testing can change
    it (tools/mutation/); tests/test_grading.py checks it against torch.softmax on every case. It computes
    in float32 (from the same, possibly bfloat16, values) and returns x's dtype, as torch.softmax does."""
    x32 = x.float()
    z = x32 - x32.amax(dim=-1, keepdim=True)
    e = z.exp()
    return (e / e.sum(dim=-1, keepdim=True)).to(x.dtype)


register(Exercise(
    name="00.softmax",
    cases=_softmax_cases,
    reference=softmax_reference,
    exact_types=True,
    description="Numerically stable softmax over the last dimension, returned in x's dtype.",
    hint="softmax(x) = softmax(x − c) for any constant c per row. Which c makes the largest exponent "
         "exp(0) = 1, so that logits of ±1000 neither overflow nor all underflow to zero?",
    recipe="1. For each row (the last dimension) find that row's own maximum m, keeping the reduced dimension "
           "with size 1 so it broadcasts against the row; one maximum for the whole batch would send the "
           "exponentials of a small-scale row to 0 and give 0/0. 2. Subtract it and exponentiate, exp(x − m): "
           "the largest term is exp(0) = 1, nothing overflows, and a masked entry at −inf becomes exactly 0 "
           "(a row may even start with −inf). 3. Sum the exponentials over the same last dimension, again "
           "keeping it with size 1, and divide every exponential by its row's sum. Any number of leading "
           "dimensions works the same way. 4. Return the result in x's dtype: bfloat16 in, bfloat16 out.",
))
