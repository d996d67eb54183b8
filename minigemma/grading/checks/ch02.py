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


def _random_mask(g, T, S):
    """A random, non-causal boolean mask with at least one visible key per query."""
    m = torch.rand(T, S, generator=g) < 0.6
    m[torch.arange(T), torch.randint(0, S, (T,), generator=g)] = True
    return m


def _gqa_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, (B, H, K, T, S, D), mask, scale in [
        ("GQA 4 heads / 2 kv heads, causal", (2, 4, 2, 5, 5, 8), "causal", 1.0),
        ("MQA: 6 heads share 1 kv head", (1, 6, 1, 4, 4, 6), "causal", 1.0),
        ("MHA: K = H", (2, 3, 3, 3, 3, 4), "causal", 1.0),
        ("T=1 query on a cache of 7 keys", (3, 4, 2, 1, 7, 8), "causal", 1.0),
        # left padding in a batch: the decode query must not see the pad keys
        ("T=1 decode step, 2 padded keys masked", (2, 4, 2, 1, 6, 8), "padded", 1.0),
        ("8 heads / 2 kv heads, odd sizes, no mask", (1, 8, 2, 3, 5, 5), None, 1.0),
        ("random (non-causal) mask, 6 heads / 3 kv heads", (2, 6, 3, 4, 6, 4), "random", 1.0),
        ("large scores (|q·k|/√D ~ 400)", (1, 4, 2, 3, 5, 8), "random", 20.0),
        ("rows start with -inf (key 0 masked)", (1, 4, 1, 3, 5, 4), "no first key", 1.0),
    ]:
        q, k, v = _randn(g, B, H, T, D) * scale, _randn(g, B, K, S, D) * scale, _randn(g, B, K, S, D)
        if mask == "causal":
            m = causal_mask(T, S)
        elif mask == "padded":
            m = torch.ones(T, S, dtype=torch.bool)
            m[:, :2] = False
        elif mask == "random":
            m = _random_mask(g, T, S)
        elif mask == "no first key":
            m = torch.cat([torch.zeros(T, 1, dtype=torch.bool), _random_mask(g, T, S - 1)], dim=1)
        else:
            m = None
        # scores of ~1e3 carry float32 rounding (~1e-4) into the weights: a looser tolerance there
        tol = {"atol": 1e-3, "rtol": 1e-3} if scale > 1 else {}
        cases.append(Case(label, (q, k, v, m), **tol))
    # one max over the whole batch underflows every weight of the small batch row: 0/0
    q, k, v = _randn(g, 2, 4, 3, 8), _randn(g, 2, 2, 5, 8), _randn(g, 2, 2, 5, 8)
    q[1] *= 30.0
    k[1] *= 30.0
    cases.append(Case("batch rows of very different scale", (q, k, v, _random_mask(g, 3, 5)), atol=1e-3, rtol=1e-3))
    return cases


register(Exercise(
    "02.repeat_kv", _repeat_cases, repeat_kv,
    description="(B, K, S, D) -> (B, K·n_rep, S, D); query head h reads kv head h // n_rep.",
    hint="Insert a new axis after K: x[:, :, None] is (B, K, 1, S, D); expand it to (B, K, n_rep, S, D) "
         "(no copy), then reshape to (B, K·n_rep, S, D). Copies of one kv head end up adjacent. "
         "x.repeat(1, n_rep, 1, 1) tiles the heads instead (0, 1, 0, 1, ...), which is the wrong order; "
         "torch.repeat_interleave(x, n_rep, dim=1) is right."))
register(Exercise(
    "02.gqa_attention", _gqa_cases, grouped_query_attention,
    description="attention where H query heads share K kv heads (q (B,H,T,D), k, v (B,K,S,D)), "
                "with the given mask (any (T, S) pattern, or None).",
    hint="Repeat k and v with your repeat_kv(·, H // K) so each query head has its kv head, then do "
         "exactly the masked attention of chapter 01: scores / √D, masked_fill(~mask, -inf) only when a "
         "mask is given (use the mask you get: it is not always causal, and a one-token decode step can "
         "still have hidden keys), softmax over the keys, @ v."))
