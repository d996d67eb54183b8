"""Chapter 10: EmbeddingGemma, the Gemma 3 stack as an encoder."""

import torch

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
    "10.mean_pool", _pool_cases, mean_pool,
    description="(B, C) float32 mean of hidden (B, T, C) over the real tokens (attention_mask 1); 0 for a row without one.",
    hint="Turn the mask into floats of shape (B, T, 1) so it broadcasts over C. The masked sum over T divided by "
         "the number of real tokens per row is the mean; clamp that count to at least 1 so an empty row gives "
         "0 / 1 = 0 instead of 0 / 0 = NaN."))
register(Exercise(
    "10.mrl_truncate", _truncate_cases, truncate,
    description="MRL: the first `dim` numbers of each row of embeddings (N, E), scaled back to unit length.",
    hint="Slice the first `dim` columns, then divide each row by its own L2 norm (over the last axis, "
         "keepdim=True so it broadcasts). Normalising before slicing is not enough: the prefix of a unit "
         "vector is shorter than 1."))
register(Exercise(
    "10.encoder_mask", _band_cases, encoder_mask,
    description="(B, T, T) bool: key j visible to query i iff same document (pads alone) and, on a local "
                "layer, |i - j| <= W // 2.",
    hint="Index grids i = arange(T)[:, None], j = arange(T)[None, :]. Documents: real tokens share one, each pad "
         "is its own, so i sees j if both are real or i == j. A local layer adds (i - j).abs() <= W // 2: the "
         "band is symmetric (an encoder looks both ways), W // 2 keys on each side plus the query itself. "
         "Build (B, T, T) by broadcasting the mask as (B, T, 1) and (B, 1, T)."))
