"""Chapter 06: the sampling filters of the decode loop, left padding, and the capstone."""

import functools

import torch

from ... import learner
from ...attention import make_positions
from ...generation import left_pad, top_k_filter, top_p_filter
from ..exercise import Case, Exercise, register

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


# --------------------------------------------------------------------------------------------
# Left padding: ids, mask and the positions of a batch of prompts
# --------------------------------------------------------------------------------------------
def _pad_cases(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 5, (1,), generator=g))
    random_rows = [torch.randint(1, 50, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(n)]
    return [
        Case("one prompt: nothing to pad", ([[2, 17, 5]], 0)),
        Case("two prompts, lengths 3 and 1", ([[2, 17, 5], [2]], 0)),
        Case("equal lengths: no padding", ([[2, 8], [2, 9]], 0)),
        # a real token whose id is the pad id: only the prompt lengths say what is padding
        Case("a real token equal to the pad id", ([[2, 0, 5, 6], [2, 7]], 0)),
        Case("the longest prompt in the middle, pad id 3", ([[2, 4], [2, 5, 6, 7, 8], [2, 9, 10]], 3)),
        Case(f"random: {n} prompts", (random_rows, 0)),
    ]


def left_pad_reference(prompts, pad_id):
    """`generation.left_pad` (ids and mask), then the positions `make_positions` gives a prompt with
    this mask: real tokens count from 0 at their first one, every pad sits at 0."""
    ids, mask = left_pad(prompts, pad_id)
    return ids, mask, make_positions(ids, None, mask, None).positions


register(Exercise(
    "06.left_pad", _pad_cases, left_pad_reference, exact_types=True,
    description="prompts (lists of ids), pad_id -> (ids (B, L) long, attention_mask (B, L) bool, positions (B, L) "
                "long): padded on the left; real tokens at positions 0, 1, ... from their first one, pads at 0.",
    hint="L = the longest prompt. Row i starts with L - len(p) pads: ids[i, L - len(p):] = p, and the mask is True "
         "from there on (from the lengths, never from ids != pad_id: a real token may have the pad's id). "
         "Positions: mask.long().cumsum(-1) - 1 counts the real tokens before each one; torch.where(mask, that, 0) "
         "puts every pad at 0. ids and positions are torch.long, the mask torch.bool."))


# --------------------------------------------------------------------------------------------
# The capstone: your functions in the real Gemma 3 270M
# --------------------------------------------------------------------------------------------
CAPSTONE_PROMPTS = ("The sun rises in the", "The opposite of hot is")  # 6 tokens each: one batch, no padding
CAPSTONE_TOKENS = 4


@functools.lru_cache(maxsize=4)
def _reference_texts(prompts: tuple, max_new_tokens: int) -> list[str]:
    model, tokenizer = learner.reference_model()
    return learner.greedy_texts(model, tokenizer, prompts, max_new_tokens)


def capstone_reference(prompts, max_new_tokens):
    """The greedy texts of Gemma 3 270M (float32) itself, the package's code everywhere (computed once
    per process: they do not depend on the seed)."""
    return list(_reference_texts(tuple(prompts), max_new_tokens))


register(Exercise(
    "06.capstone",
    lambda seed: [Case(f"{len(CAPSTONE_PROMPTS)} prompts, {CAPSTONE_TOKENS} new tokens each, greedy",
                       (list(CAPSTONE_PROMPTS), CAPSTONE_TOKENS))],
    capstone_reference, timeout_s=900.0, diagnose=learner.diagnose,
    description="Your code, real weights: YourGemma(rms_norm=..., rope=..., gqa_attention=..., geglu=..., "
                "layer_mask=..., kv_cache_update=...) generates the same greedy text as Gemma 3 270M.",
    hint="Each function must first pass its own exercise (01.rope, 02.gqa_attention, 02.kv_cache_update, "
         "03.rms_norm, 03.geglu, 04.layer_mask). If the text still differs, the report names the function that "
         "breaks it when swapped in alone; test that one on the model's shapes: head_dim 256, one kv head for four "
         "query heads, positions continuing from the cache during decoding."))
