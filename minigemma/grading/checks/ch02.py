"""Chapter 02: multi-query and grouped-query attention."""

import torch

from ...attention import causal_mask, grouped_query_attention, repeat_kv
from ..core import Case, Exercise, register


def _randn(g, *shape):
    return torch.randn(*shape, generator=g)


def _repeat_cases(seed):
    g = torch.Generator().manual_seed(seed)
    return [Case(f"B={B}, K={K}, S={S}, D={D}, n_rep={n}", (_randn(g, B, K, S, D), n))
            for B, K, S, D, n in [(2, 2, 5, 4, 3), (1, 1, 1, 3, 4), (3, 4, 2, 2, 2), (1, 3, 6, 5, 1)]]


def _gqa_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, (B, H, K, T, S, D), masked in [
        ("GQA 4 heads / 2 kv heads, causal", (2, 4, 2, 5, 5, 8), True),
        ("MQA: 6 heads share 1 kv head", (1, 6, 1, 4, 4, 6), True),
        ("MHA: K = H", (2, 3, 3, 3, 3, 4), True),
        ("T=1 query on a cache of 7 keys", (3, 4, 2, 1, 7, 8), True),
        ("8 heads / 2 kv heads, odd sizes, no mask", (1, 8, 2, 3, 5, 5), False),
    ]:
        q, k, v = _randn(g, B, H, T, D), _randn(g, B, K, S, D), _randn(g, B, K, S, D)
        mask = causal_mask(T, S) if masked else None
        cases.append(Case(label, (q, k, v, mask)))
    return cases


register(Exercise("02.repeat_kv", _repeat_cases, repeat_kv,
                  description="(B, K, S, D) -> (B, K·n_rep, S, D); query head h reads kv head h // n_rep."))
register(Exercise("02.gqa_attention", _gqa_cases, grouped_query_attention,
                  description="causal attention where H query heads share K kv heads (q (B,H,T,D), k, v (B,K,S,D))."))
