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
        # the kept logits come back unchanged: bfloat16 in, the same bfloat16 numbers out
        Case("bf16 logits stay bf16", ((torch.randn(2, 9, generator=g) * 3).bfloat16(), 0.8)),
        # the probabilities in float32 put 0.9183 before the token of logit -0.8477 (>= p: dropped); rounded to
        # bfloat16 (8 significant bits) they put 0.9141 (< p: kept). p sits 0.002 from both.
        Case("bf16 logits: the softmax in float32 (bfloat16 probabilities sum to less than p)",
             (torch.tensor([0.890625, -0.1904296875, -1.09375, 1.078125, -0.84765625, 0.8671875]).bfloat16(), 0.9162)),
        Case("a large vocabulary", (torch.randn(2, 1000, generator=g) * 3, 0.9)),
    ]


register(Exercise(
    "06.top_k_filter", _top_k_cases, top_k_filter, exact_types=True,
    description="logits (..., V), k >= 1 -> the logits with all but the k largest of each row set to -inf "
                "(ties with the k-th value kept), in the logits' dtype.",
    hint="You need one threshold per row: which value is it, and should a logit equal to it survive? And what "
         "is there to drop when k is at least the vocabulary size?",
    recipe="1. If k is at least the vocabulary size (the last dimension), return the logits unchanged. "
           "2. Otherwise find each row's k-th largest value, kept with a trailing dimension of size 1 so it "
           "broadcasts against the row. 3. Set every logit strictly smaller than that threshold to −inf; keep "
           "everything greater than or equal to it, so ties with the k-th value survive (a row may keep more "
           "than k). Entries already at −inf stay −inf. 4. Return a tensor in the logits' dtype (bfloat16 in, "
           "bfloat16 out), of the same shape, for any number of leading dimensions."))
register(Exercise(
    "06.top_p_filter", _top_p_cases, top_p_filter, exact_types=True,
    description="logits (..., V), 0 < p <= 1 -> the logits with -inf outside the nucleus: keep a token if the "
                "tokens ranked strictly above it hold probability < p.",
    hint="A token is kept when the tokens ranked strictly above it hold less than p. In which order must you "
         "look at the tokens to measure that mass, and how do you bring the answer back to vocabulary order?",
    recipe="1. Sort each row's logits in descending order, and keep the permutation the sort used. 2. Softmax "
           "the sorted logits over the last dimension, in float32. 3. For each sorted token, the mass strictly "
           "before it is the running (cumulative) sum of the probabilities up to and including it, minus its "
           "own probability. 4. Mark a token to drop where that mass is at least p: the most likely token is "
           "always kept, the token that crosses p is kept, and p = 1 keeps everything. 5. Scatter the drop "
           "marks back through the permutation into vocabulary order. 6. Set the dropped logits to −inf and "
           "return the result in the logits' dtype (bfloat16 in, bfloat16 out: the softmax alone is float32), "
           "same shape."))


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
    outputs=("ids", "attention_mask", "positions"),
    description="prompts (lists of ids), pad_id -> (ids (B, L) long, attention_mask (B, L) bool, positions (B, L) "
                "long): padded on the left; real tokens at positions 0, 1, ... from their first one, pads at 0.",
    hint="Every row's last prompt token must end up in the last column. What tells you which entries are "
         "padding: the ids, or the prompts' lengths? (A real token may have the pad's id.)",
    recipe="1. L is the length of the longest prompt. 2. ids: a (B, L) long tensor filled with pad_id; row i "
           "gets its prompt of length n in its last n columns, after L − n pads. 3. attention_mask: a "
           "(B, L) bool tensor, False in the pad columns and True from the first real token on, built from the "
           "lengths, never by comparing ids with pad_id. 4. positions: in each row, a running count of the real "
           "tokens up to and including each one, minus 1, so the first real token is at 0, the next at 1, and "
           "so on; then set every pad's position to 0. A long tensor (B, L). 5. Return ids, attention_mask and "
           "positions, in that order."))


# --------------------------------------------------------------------------------------------
# The capstone: your functions in the real Gemma 3 270M
# --------------------------------------------------------------------------------------------
CAPSTONE_PROMPTS = ("The sun rises in the", "The opposite of hot is")  # 6 tokens each: one batch, no padding
CAPSTONE_TOKENS = 4
CAPSTONE_WINDOW = 3  # the local layers' window in the second case: cut from the 4th token on, prompt and steps
LONG_TOKENS = 540  # the long prompt: past the real window of 512, positions where a rounded RoPE shows


@functools.lru_cache(maxsize=1)
def long_prompt() -> str:
    """540 tokens of CPython's language reference (`help("assignment")`, in the standard library, so
    every machine has it), BOS not counted."""
    from pydoc_data.topics import topics

    _, tokenizer = learner.reference_model()
    ids = tokenizer.encode(topics["assignment"])[1:1 + LONG_TOKENS]  # [0] is BOS
    if len(ids) < LONG_TOKENS:
        raise RuntimeError(f"help('assignment') has only {len(ids)} tokens here, the capstone needs {LONG_TOKENS}")
    return tokenizer.decode(ids)


@functools.lru_cache(maxsize=8)
def _reference_texts(prompts: tuple, max_new_tokens: int, window: int | None) -> list[str]:
    model, tokenizer = learner.reference_model()
    model = model if window is None else learner.windowed(model, window)
    return learner.greedy_texts(model, tokenizer, prompts, max_new_tokens)


def capstone_reference(prompts, max_new_tokens, window=None):
    """The greedy texts of Gemma 3 270M (float32) itself, the package's code everywhere, its local layers'
    window `window` if given (computed once per process: they do not depend on the seed)."""
    return list(_reference_texts(tuple(prompts), max_new_tokens, window))


def _capstone_cases(seed):
    return [
        Case(f"{len(CAPSTONE_PROMPTS)} prompts, {CAPSTONE_TOKENS} new tokens each, greedy",
             (list(CAPSTONE_PROMPTS), CAPSTONE_TOKENS)),
        Case(f"the same, the local layers' window cut to {CAPSTONE_WINDOW} keys (window={CAPSTONE_WINDOW}): the "
             "edge of layer_mask's band in the prompt and in every step", (list(CAPSTONE_PROMPTS), CAPSTONE_TOKENS),
             dict(window=CAPSTONE_WINDOW)),
        Case(f"a prompt of {LONG_TOKENS} tokens (help('assignment')), 2 new tokens: past the real window of 512, "
             "RoPE at positions over 512", ([long_prompt()], 2)),
    ]


register(Exercise(
    "06.capstone",
    _capstone_cases, capstone_reference, timeout_s=900.0, diagnose=learner.diagnose,
    description="Your code, real weights: YourGemma(rms_norm=..., rope=..., gqa_attention=..., geglu=..., "
                "layer_mask=..., kv_cache_update=...) generates the same greedy text as Gemma 3 270M.",
    hint="Each function must first pass its own exercise (01.rope, 02.gqa_attention, 02.kv_cache_update, "
         "03.rms_norm, 03.geglu, 04.layer_mask). If the text still differs, what does the real model give your "
         "functions that the small cases did not?",
    recipe="1. Run the six checks (01.rope, 02.gqa_attention, 02.kv_cache_update, 03.rms_norm, 03.geglu, "
           "04.layer_mask) and fix the first that fails. 2. Build YourGemma with each of your six functions "
           "given under its own name, and check it. 3. If the text differs, read which function the report "
           "names: swapped in alone, that one breaks the text. 4. Test that one on the model's shapes and "
           "compare it with the package's version: head_dim 256, one kv head shared by four query heads, "
           "positions that continue from the cache during decoding (not restarting at 0), a cache that "
           "must keep what earlier steps wrote into it, a local layer's band of exactly window keys (the second "
           "case cuts the window to 3, so a 6-token prompt reaches its edge), and RoPE angles that stay exact at "
           "positions past 512 (the long prompt): compute them in float32."))
