"""Chapter 06: the sampling filters of the decode loop."""

import torch

from ...generation import top_k_filter, top_p_filter
from ..core import Case, Exercise, register

NEG_INF = float("-inf")


def _top_k_cases(seed):
    g = torch.Generator().manual_seed(seed)
    return [
        Case("k = 1 keeps only the largest", (torch.tensor([0.5, 2.0, -1.0, 1.5]), 1)),
        Case("k = 2 of 5", (torch.tensor([0.1, 3.0, 2.0, -4.0, 2.5]), 2)),
        Case("a tie at the k-th value keeps both", (torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0]), 2)),
        Case("k >= vocabulary keeps everything", (torch.tensor([0.3, -0.2, 1.1]), 5)),
        Case("already -inf entries stay -inf", (torch.tensor([[NEG_INF, 1.0, 0.5, NEG_INF, 2.0]]), 2)),
        Case("batch: each row keeps its own top k", (torch.randn(3, 11, generator=g) * 3, 4)),
        Case("bf16 logits stay bf16", ((torch.randn(2, 9, generator=g) * 4).bfloat16(), 3)),
        Case("a large vocabulary", (torch.randn(2, 1000, generator=g) * 5, 17)),
    ]


def _top_p_cases(seed):
    g = torch.Generator().manual_seed(seed)
    peaked = torch.tensor([[8.0, 1.0, 0.5, 0.0, -1.0]])
    # probabilities 0.5, 0.25, 0.125, 0.125: p = 0.75 sits exactly on the cumulative mass of the top two
    exact = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    return [
        Case("p = 1 keeps everything", (torch.tensor([0.2, 1.0, -0.5, 0.0]), 1.0)),
        Case("a tiny p keeps only the most likely token", (torch.tensor([0.2, 1.0, -0.5, 0.0]), 0.01)),
        Case("a peaked distribution", (peaked, 0.9)),
        Case("p equal to the mass of the top two", (exact, 0.75)),
        Case("the token that crosses p is kept", (exact, 0.6)),
        Case("unsorted logits: the result stays in vocabulary order", (torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]]), 0.8)),
        Case("-inf entries (already filtered)", (torch.tensor([[NEG_INF, 2.0, 1.0, NEG_INF, 0.0]]), 0.7)),
        Case("batch rows of very different scale", (torch.stack([torch.randn(13, generator=g) * 40,
                                                               torch.randn(13, generator=g) * 0.1]), 0.5)),
        Case("a large vocabulary", (torch.randn(2, 1000, generator=g) * 3, 0.9)),
    ]


register(Exercise(
    "06.top_k_filter", _top_k_cases, top_k_filter, exact_types=True,
    description="logits (..., V), k >= 1 -> the logits with all but the k largest of each row set to -inf "
                "(ties with the k-th value kept), in the logits' dtype.",
    hint="torch.topk(logits, k, dim=-1).values[..., -1:] is each row's k-th largest value, shaped to broadcast. "
         "Keep what is >= it (so ties survive) with masked_fill(logits < kth, -inf). If k is at least the "
         "vocabulary size there is nothing to drop."))
register(Exercise(
    "06.top_p_filter", _top_p_cases, top_p_filter, exact_types=True,
    description="logits (..., V), 0 < p <= 1 -> the logits with -inf outside the nucleus: keep a token if the "
                "tokens ranked strictly above it hold probability < p.",
    hint="Sort each row descending (torch.sort returns the order too), softmax the sorted logits in float32, "
         "and take the mass strictly before each token: cumsum - the token's own probability. Drop where that "
         "mass is >= p, then put the drop mask back in vocabulary order with scatter(-1, order, ...)."))
