"""Chapter 01: attention from scratch."""

import torch

from ...attention import causal_mask, merge_heads, scaled_dot_product_attention, split_heads
from ...layers import apply_rope, rope_cos_sin, rope_frequencies
from ..core import Case, Exercise, register


def _randn(g, *shape):
    return torch.randn(*shape, generator=g)


def _random_mask(g, T, S):
    """A random boolean mask with at least one visible key per query."""
    m = torch.rand(T, S, generator=g) < 0.6
    m[torch.arange(T), torch.randint(0, S, (T,), generator=g)] = True
    return m


def _causal_cases(seed):
    return [Case(f"T={T}", (T,)) for T in (1, 2, 5, 16)]


def _attention_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, (B, H, T, S, D), mask in [
        ("causal, batch 2", (2, 3, 6, 6, 8), "causal"),
        ("T=1, one key", (1, 1, 1, 1, 4), "all"),
        ("odd sizes, random mask", (3, 2, 5, 7, 5), "random"),
        ("no mask (all True)", (1, 4, 4, 9, 16), "all"),
        ("large head_dim (scale matters)", (2, 2, 4, 4, 64), "causal"),
    ]:
        q, k, v = _randn(g, B, H, T, D), _randn(g, B, H, S, D), _randn(g, B, H, S, D)
        m = {"causal": causal_mask(T, S), "all": torch.ones(T, S, dtype=torch.bool),
             "random": _random_mask(g, T, S)}[mask]
        cases.append(Case(label, (q, k, v, m)))
    return cases


def _split_cases(seed):
    g = torch.Generator().manual_seed(seed)
    return [Case(f"B={B}, T={T}, H={H}, D={D}", (_randn(g, B, T, H * D), H))
            for B, T, H, D in [(2, 3, 4, 5), (1, 1, 2, 3), (3, 7, 1, 4), (2, 5, 3, 2)]]


def _merge_cases(seed):
    g = torch.Generator().manual_seed(seed)
    return [Case(f"B={B}, H={H}, T={T}, D={D}", (_randn(g, B, H, T, D),))
            for B, H, T, D in [(2, 4, 3, 5), (1, 2, 1, 3), (3, 1, 7, 4), (2, 3, 5, 2)]]


def _rope_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, (B, H, T, D), base, offset in [
        ("positions 0..T-1", (1, 2, 5, 8), 10_000.0, 0),
        ("T=1 at position 0 (identity)", (1, 1, 1, 4), 10_000.0, 0),
        ("batch 2, offset positions", (2, 3, 4, 16), 10_000.0, 37),
        ("global-layer base 1e6", (1, 2, 6, 32), 1_000_000.0, 1000),
    ]:
        cases.append(Case(label, (_randn(g, B, H, T, D), torch.arange(offset, offset + T), base)))
    return cases


def rope_reference(x, positions, base):
    cos, sin = rope_cos_sin(positions, rope_frequencies(x.shape[-1], base))
    return apply_rope(x, cos, sin)


register(Exercise("01.causal_mask", _causal_cases, lambda T: causal_mask(T),
                  description="(T, T) boolean mask, True where query i may see key j."))
register(Exercise("01.masked_attention", _attention_cases, scaled_dot_product_attention,
                  description="softmax(q kᵀ / sqrt(D), masked) v for q (B,H,T,D), k, v (B,H,S,D)."))
register(Exercise("01.split_heads", _split_cases, split_heads,
                  description="(B, T, H·D) -> (B, H, T, D)."))
register(Exercise("01.merge_heads", _merge_cases, merge_heads,
                  description="(B, H, T, D) -> (B, T, H·D)."))
register(Exercise("01.rope", _rope_cases, rope_reference,
                  description="RoPE, split-half convention, on x (B,H,T,D) at the given positions."))
