"""Chapter 10: EmbeddingGemma, the Gemma 3 stack as an encoder."""

import functools
from collections.abc import Sequence

import torch

from ... import learner_encoder
from ...encoder import encoder_mask, mean_pool, truncate
from ..exercise import Case, Exercise, register


def _mask(B, T, spans, dtype=torch.long):
    """(B, T) 0/1 mask with row b real on [lo, hi)."""
    m = torch.zeros(B, T, dtype=dtype)
    for b, (lo, hi) in enumerate(spans):
        m[b, lo:hi] = 1
    return m


def _pool_cases(seed):
    g = torch.Generator().manual_seed(seed)

    def h(B, T, C):
        return torch.randn(B, T, C, generator=g)

    cases = [
        Case("no padding", (h(2, 5, 4), _mask(2, 5, [(0, 5), (0, 5)]))),
        Case("right padding (sentence-transformers' side)", (h(3, 6, 4), _mask(3, 6, [(0, 6), (0, 3), (0, 1)]))),
        Case("left padding", (h(3, 6, 4), _mask(3, 6, [(0, 6), (2, 6), (5, 6)]))),
        Case("a boolean mask", (h(2, 7, 3), _mask(2, 7, [(0, 4), (1, 7)], torch.bool))),
        Case("a row with no real token gives zeros", (h(2, 4, 3), _mask(2, 4, [(0, 4), (0, 0)]))),
        Case("one token", (h(1, 1, 5), _mask(1, 1, [(0, 1)]))),
        # a bfloat16 model's states: the mean is float32 all the same (computed in float32 from the same
        # bfloat16 values: the exercise's tolerance holds)
        Case("bfloat16 hidden states: the mean in float32", (h(2, 5, 4).bfloat16(), _mask(2, 5, [(0, 5), (1, 4)]))),
    ]
    B, T, C = (int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(3, 12, (1,), generator=g)),
               int(torch.randint(2, 9, (1,), generator=g)))
    spans = []
    for _ in range(B):
        n = int(torch.randint(1, T + 1, (1,), generator=g))
        lo = int(torch.randint(0, T - n + 1, (1,), generator=g))
        spans.append((lo, lo + n))
    cases.append(Case(f"random: B={B}, T={T}, C={C}, real spans {spans}", (h(B, T, C) * 3 + 1, _mask(B, T, spans))))
    return cases


def _truncate_cases(seed):
    g = torch.Generator().manual_seed(seed)

    def unit(N, E):
        e = torch.randn(N, E, generator=g)
        return e / e.norm(dim=-1, keepdim=True)

    cases = [Case(f"unit vectors, 768 -> {d}", (unit(3, 768), d)) for d in (512, 256, 128)]
    cases += [
        Case("vectors that are not unit length, 16 -> 8", (torch.randn(4, 16, generator=g) * 5, 8)),
        Case("dim = E: just normalised", (torch.randn(2, 6, generator=g) * 3, 6)),
        Case("dim = 1: a sign", (torch.randn(5, 4, generator=g), 1)),
        Case("one vector", (unit(1, 10), 3)),
    ]
    N, E = int(torch.randint(2, 7, (1,), generator=g)), int(torch.randint(4, 40, (1,), generator=g))
    d = int(torch.randint(1, E, (1,), generator=g))
    cases.append(Case(f"random: N={N}, E={E}, dim={d}", (torch.randn(N, E, generator=g) * 2, d)))
    return cases


def _band_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = [
        Case("global layer, no padding", (_mask(1, 6, [(0, 6)]), None)),
        Case("global layer, right padding", (_mask(2, 6, [(0, 6), (0, 4)]), None)),
        Case("local layer W=4 (|i - j| <= 2), no padding", (_mask(1, 9, [(0, 9)]), 4)),
        Case("local layer W=6, right padding", (_mask(2, 10, [(0, 10), (0, 6)]), 6)),
        Case("local layer W=6, left padding", (_mask(2, 10, [(0, 10), (3, 10)]), 6)),
        Case("odd W=5 (|i - j| <= 2)", (_mask(1, 8, [(0, 8)]), 5)),
        Case("odd W=7, padded", (_mask(2, 11, [(0, 11), (0, 8)]), 7)),
        Case("W=1: each token sees only itself", (_mask(1, 5, [(0, 5)]), 1)),
        Case("W=2: one neighbour on each side", (_mask(1, 6, [(0, 6)]), 2)),
        # the band's edge: |i - j| <= W // 2 reaches W // 2 keys each way, so a text of T = W tokens is already cut
        # (its first and last tokens are W - 1 apart); the band is not W keys wide on each side, nor in all
        Case("T = W = 6: the band already cuts (|i - j| <= 3)", (_mask(1, 6, [(0, 6)]), 6)),
        Case("a boolean mask, every pad alone", (_mask(2, 7, [(0, 7), (2, 5)], torch.bool), 8)),
        Case("W larger than the text", (_mask(1, 5, [(0, 5)]), 512)),
    ]
    B, T = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(5, 16, (1,), generator=g))
    W = int(torch.randint(1, 12, (1,), generator=g))
    spans = []
    for _ in range(B):
        n = int(torch.randint(1, T + 1, (1,), generator=g))
        left = bool(torch.randint(0, 2, (1,), generator=g))
        spans.append((T - n, T) if left else (0, n))
    cases.append(Case(f"random: B={B}, T={T}, W={W}, real spans {spans}", (_mask(B, T, spans), W)))
    return cases


register(Exercise(
    "10.mean_pool", _pool_cases, mean_pool, exact_types=True,
    description="(B, C) float32 mean of hidden (B, T, C) over the real tokens (attention_mask 1); 0 for a row without one.",
    hint="Only the real tokens may count, in the sum and in the count, wherever the padding is. What shape "
         "must the mask take to multiply hidden, and what does a row with no real token divide by?",
    recipe="1. Convert the attention mask (ints or booleans) to float32 and give it a trailing axis: (B, T, 1), "
           "so it broadcasts over C. 2. Multiply hidden (in float32) by it and sum over T: the sum of each "
           "row's real vectors, (B, C). 3. Sum the mask over T: the number of real tokens per row, (B, 1). "
           "Raise that count to at least 1, so an empty row gives 0 / 1 = 0 instead of 0 / 0 = NaN. 4. Divide "
           "the sum by the count and return the (B, C) float32 result."))
register(Exercise(
    "10.mrl_truncate", _truncate_cases, truncate,
    description="MRL: the first `dim` numbers of each row of embeddings (N, E), scaled back to unit length.",
    hint="The first dim numbers of a unit vector make a vector shorter than 1. So what must happen after you "
         "cut, and is normalising before cutting enough?",
    recipe="1. Keep the first dim columns of each row: (N, dim). 2. Compute each row's own L2 length, the "
           "square root of the sum of its squares over the last axis, kept with size 1 so it broadcasts. "
           "3. Divide each row by its length, so every row has length 1 again. Normalising only before "
           "cutting is not enough, and inputs that are not unit length must come out unit length too. With "
           "dim equal to the full width this just normalises; with dim = 1 every row becomes ±1. Return "
           "float32."))
register(Exercise(
    "10.encoder_mask", _band_cases, encoder_mask,
    description="(B, T, T) bool: key j visible to query i iff same document (pads alone) and, on a local "
                "layer, |i - j| <= W // 2.",
    hint="An encoder looks both ways, and a pad is a document of its own. When may query i see key j, and how "
         "wide is a local layer's band on each side?",
    recipe="1. Documents: the real tokens of a row share one, and each pad is its own, so i may see j if both "
           "are real, or if i = j (a pad sees only itself, and no real token sees a pad). Read real or pad from "
           "the attention mask, wherever the padding is. 2. Build that per row by broadcasting the mask as "
           "(B, T, 1) for the queries against (B, 1, T) for the keys, and allow the diagonal: (B, T, T). "
           "3. On a global layer (sliding_window None) that is the mask. 4. On a local layer, also require "
           "|i − j| ≤ W // 2 (W halved, rounded down): a symmetric band of W // 2 keys on each side plus the "
           "query itself (W = 1: only itself; odd W = 5: two on each side), built from a (T, 1) column and a "
           "(1, T) row of indices. 5. Return the (B, T, T) boolean mask."))


# --------------------------------------------------------------------------------------------
# The capstone: your functions in the real EmbeddingGemma 300M
# --------------------------------------------------------------------------------------------
CAPSTONE_QUERIES = (
    "how do I keep sourdough bread from going stale?",
    "which planet has the largest volcano in the solar system?",
    "who invented the safety bicycle with a chain drive?",
)
CAPSTONE_DOCUMENTS = (
    "Keep a sourdough loaf cut side down on a board, or wrapped in a cloth; in the fridge bread goes stale fastest.",
    "Olympus Mons on Mars is the tallest volcano known in the solar system, about 22 kilometres high.",
    "Yeast eats the sugars in dough and gives off carbon dioxide, which makes bread rise.",
    "Io, a moon of Jupiter, has hundreds of active volcanoes.",
    "In Python, sorted(xs) returns a new sorted list; xs.sort() sorts the list in place.",
    "The Tour de France is a bicycle race of three weeks around France.",
    "For espresso, grind the coffee finely and press hot water through it at high pressure.",
    # 324 tokens with its prompt, BOS and EOS: past the local layers' band |i - j| <= 256, which then leaves
    # its first and last tokens out of each other's sight
    "A short history of the bicycle. In 1817 Karl Drais of Mannheim built the first two-wheeled machine, a wooden "
    "running machine without pedals: the rider sat between the wheels and pushed against the ground with his feet. "
    "In the 1860s French makers, among them Pierre Michaux and Pierre Lallement, fixed cranks and pedals to the "
    "front wheel. Their velocipede was nicknamed the boneshaker, because its iron tyres on cobbled streets made "
    "every ride a rough one. To go faster, the front wheel grew larger, since each turn of the pedals turned the "
    "wheel once: the high wheeler, or penny-farthing, of the 1870s had a front wheel as tall as a man, and a fall "
    "from it, headfirst over the handlebars, was a real danger. In 1885 John Kemp Starley of Coventry built the "
    "Rover, the first successful safety bicycle: two wheels of the same size, the rider low between them, and a "
    "chain drive to the rear wheel, geared so that a small wheel could still go fast. Three years later John Boyd "
    "Dunlop, a veterinary surgeon in Belfast, made a pneumatic tyre for his son's tricycle, and air-filled tyres "
    "soon made the ride smooth. By the 1890s the safety bicycle had replaced the high wheeler almost everywhere, "
    "and the bicycle boom had begun: factories made millions of them, women rode them in new and looser clothes, "
    "and roads were paved for cyclists before there were any cars to use them.",
)
CAPSTONE_K = 3
CAPSTONE_DIMS = (None, 128)  # the full 768, and the smallest prefix EmbeddingGemma was trained for (MRL)
# Vectors in float32 through 24 layers: your mask attends by an explicit softmax over the whole (B, T, T) mask
# where the package runs fused attention block by block, so right answers differ from the package's by
# summation order, ~2e-7 (measured). The smallest mechanism error, a band one key too wide or too narrow on the
# long document, moves them by 3e-4 (tests/mutants/ch10.py); 1e-5 sits between, with room both ways.
CAPSTONE_ATOL, CAPSTONE_RTOL = 1e-5, 1e-4


@functools.lru_cache(maxsize=4)
def _reference_results(queries: tuple, documents: tuple, k: int, dims: tuple):
    return learner_encoder.search(learner_encoder.reference_encode, queries, documents, k, dims)


def capstone_reference(queries, documents, k, dims):
    """The search results of EmbeddingGemma 300M (float32) itself, the package's code everywhere (computed
    once per process: they do not depend on the seed)."""
    return list(_reference_results(tuple(queries), tuple(documents), k, tuple(dims)))


class _Texts(Sequence):
    """The case's texts, shown cut short in a report (the whole of them is in minigemma/grading/checks/ch10.py)."""

    def __init__(self, texts):
        self._texts = tuple(texts)

    def __getitem__(self, i):
        return self._texts[i]

    def __len__(self):
        return len(self._texts)

    def __repr__(self):
        return "[" + ", ".join(repr(t if len(t) <= 32 else t[:29] + "...") for t in self._texts) + "]"


def _capstone_cases(seed):
    return [Case(f"{len(CAPSTONE_QUERIES)} queries against {len(CAPSTONE_DOCUMENTS)} documents (padded batches, one "
                 f"document of 324 tokens), at full width and at 128: for each, the top {CAPSTONE_K} documents of "
                 f"every query, then the query vectors, then the document vectors",
                 (_Texts(CAPSTONE_QUERIES), _Texts(CAPSTONE_DOCUMENTS), CAPSTONE_K, CAPSTONE_DIMS),
                 atol=CAPSTONE_ATOL, rtol=CAPSTONE_RTOL)]


register(Exercise(
    "10.capstone", _capstone_cases, capstone_reference, atol=CAPSTONE_ATOL, rtol=CAPSTONE_RTOL, timeout_s=300.0,
    diagnose=learner_encoder.diagnose,
    description="Your code, real weights: YourEmbeddingGemma(mean_pool=..., mrl_truncate=..., encoder_mask=...) "
                "ranks documents for queries as EmbeddingGemma 300M does, with the same vectors, at full width and "
                "at an MRL prefix of 128.",
    hint="Each function must first pass its own exercise (10.mean_pool, 10.mrl_truncate, 10.encoder_mask). If the "
         "results still differ, the report names the function that changes them when swapped in alone: think about "
         "what the real model gives it that the small cases did not, a padded batch, a text longer than half the "
         "window, vectors of the model's width.",
    recipe="1. Run the three checks above until each passes. 2. Run the capstone cell: it builds YourEmbeddingGemma "
           "from those three functions and checks it. 3. If it names mean_pool: the batch of documents is padded on "
           "the right, and only the real tokens may count, in the sum and in the count. 4. If it names mrl_truncate: "
           "the first 128 numbers of a unit vector are shorter than 1, so divide them by their own length. 5. If it "
           "names encoder_mask: on a local layer the model asks with sliding_window 512, so a token sees 256 "
           "neighbours on each side and itself, in both directions; on a global layer (None) it sees its whole "
           "text; a pad sees only itself and no real token sees a pad. 6. Compare your function with the package's "
           "on the model's shapes (encoder.mean_pool, encoder.truncate, encoder.encoder_mask in minigemma/encoder.py).",
))
