"""Chapter 01: attention from scratch."""

import torch

from ...attention import causal_mask, merge_heads, scaled_dot_product_attention, split_heads
from ...layers import apply_rope, rope_cos_sin, rope_frequencies
from ..exercise import Case, Exercise, register


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
    for label, (B, H, T, S, D), mask, scale in [
        ("causal, batch 2", (2, 3, 6, 6, 8), "causal", 1.0),
        ("T=1, one key", (1, 1, 1, 1, 4), "all", 1.0),
        ("T=1 decode step over 6 keys, some masked", (2, 2, 1, 6, 4), "partial", 1.0),
        ("odd sizes, random (non-causal) mask", (3, 2, 5, 7, 5), "random", 1.0),
        ("no mask (all True)", (1, 4, 4, 9, 16), "all", 1.0),
        ("large head_dim (scale matters)", (2, 2, 4, 4, 64), "causal", 1.0),
        # scores in the hundreds: a softmax without its max subtracted overflows
        ("large scores (|q·k|/√D ~ 400)", (1, 2, 4, 5, 8), "random", 20.0),
        # key 0 masked for every query: each row of scores starts with -inf
        ("rows start with -inf (key 0 masked)", (2, 1, 4, 6, 4), "no first key", 1.0),
    ]:
        q, k, v = _randn(g, B, H, T, D) * scale, _randn(g, B, H, S, D) * scale, _randn(g, B, H, S, D)
        if mask == "causal":
            m = causal_mask(T, S)
        elif mask == "all":
            m = torch.ones(T, S, dtype=torch.bool)
        elif mask == "no first key":
            m = torch.cat([torch.zeros(T, 1, dtype=torch.bool), _random_mask(g, T, S - 1)], dim=1)
        else:
            m = _random_mask(g, T, S)
            if mask == "partial":  # a padded or windowed cache: some keys hidden, the newest one visible
                m[:, 1], m[:, -1] = False, True
        # scores of ~1e3 carry float32 rounding (~1e-4) into the weights: a looser tolerance there
        tol = {"atol": 1e-3, "rtol": 1e-3} if scale > 1 else {}
        cases.append(Case(label, (q, k, v, m), **tol))
    # one max over the whole batch underflows every weight of the small batch row: 0/0
    q, k, v = _randn(g, 2, 2, 3, 8), _randn(g, 2, 2, 5, 8), _randn(g, 2, 2, 5, 8)
    q[1] *= 30.0
    k[1] *= 30.0
    cases.append(Case("batch rows of very different scale", (q, k, v, _random_mask(g, 3, 5)), atol=1e-3, rtol=1e-3))
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
    gaps = torch.sort(torch.randint(0, 50, (6,), generator=g)).values
    gaps[2] = gaps[1]  # a repeated position, as in left-padded batches
    cases = []
    for label, (B, H, T, D), base, positions in [
        ("positions 0..T-1", (1, 2, 5, 8), 10_000.0, torch.arange(5)),
        # the same (T, D) again: a function that caches its angles on (T, D) returns stale ones
        ("same shape, new positions 7..11", (1, 2, 5, 8), 10_000.0, torch.arange(7, 12)),
        ("same shape and positions, new base 500", (1, 2, 5, 8), 500.0, torch.arange(5)),
        ("T=1 at position 0 (identity)", (1, 1, 1, 4), 10_000.0, torch.arange(1)),
        ("batch 2, offset positions", (2, 3, 4, 16), 10_000.0, torch.arange(37, 41)),
        ("non-contiguous positions (gaps, a repeat)", (1, 2, 6, 8), 10_000.0, gaps),
        ("head_dim 6 (3 frequencies)", (2, 1, 3, 6), 10_000.0, torch.arange(3, 6)),
        # head_dim smaller than both the number of heads and T: no axis can stand in for another
        ("8 heads, T=7, head_dim 4", (1, 8, 7, 4), 10_000.0, torch.arange(7)),
        ("global-layer base 1e6", (1, 2, 6, 32), 1_000_000.0, torch.arange(1000, 1006)),
        # float16 holds integers exactly only up to 2048
        ("positions near 32K", (1, 1, 4, 8), 10_000.0, torch.tensor([8191, 20_001, 30_001, 32_767])),
    ]:
        # θ in float32 may differ in its last bits between correct formulas (base ** -e, 1 / base ** e,
        # exp(-e ln base)); the angle p·θ carries that error times p, so large positions get a tolerance
        # of a few float32 steps of p·θ (~4e-7 p relative) on |x| up to ~4
        p_max = int(positions.max())
        tol = {"atol": 1e-6 * p_max, "rtol": 3e-7 * p_max} if p_max > 100 else {}
        cases.append(Case(label, (_randn(g, B, H, T, D), positions, base), **tol))
    # The statement asks for angles in float32. bfloat16 holds integers exactly only up to 256, so
    # angles (or positions) in x's dtype are wrong by whole radians here. The tolerance covers
    # rounding x·cos and x·sin to bfloat16 (relative step 2^-8, on |x| up to ~4).
    x = _randn(g, 1, 2, 5, 16).to(torch.bfloat16)
    cases.append(Case("bfloat16 x, positions in the thousands (angles in float32)",
                      (x, torch.tensor([300, 1001, 4093, 4094, 9999]), 10_000.0), atol=0.05, rtol=0.02))
    return cases


def rope_reference(x, positions, base):
    cos, sin = rope_cos_sin(positions, rope_frequencies(x.shape[-1], base))
    return apply_rope(x, cos, sin)


register(Exercise(
    "01.causal_mask", _causal_cases, lambda T: causal_mask(T),
    description="(T, T) boolean mask, True where query i may see key j.",
    hint="Compare two index grids: rows i = torch.arange(T)[:, None], columns j = torch.arange(T)[None, :]. "
         "Broadcasting gives a (T, T) grid, and a comparison of tensors is already boolean. "
         "(torch.tril of a boolean ones tensor works too.)"))
register(Exercise(
    "01.masked_attention", _attention_cases, scaled_dot_product_attention,
    description="softmax(q kᵀ / sqrt(D), masked) v for q (B,H,T,D), k, v (B,H,S,D).",
    hint="Three lines: scores = q @ k.transpose(-2, -1) / sqrt(D) is (B, H, T, S); "
         "scores.masked_fill(~mask, float('-inf')) hides the keys a query may not see (the (T, S) mask "
         "broadcasts over B and H; it need not be causal); torch.softmax over the last dimension (the keys), "
         "then @ v. Masking must happen before the softmax, so the visible weights still sum to 1."))
register(Exercise(
    "01.split_heads", _split_cases, split_heads,
    description="(B, T, H·D) -> (B, H, T, D).",
    hint="view the last dimension as (H, D) first, giving (B, T, H, D), because head h owns a contiguous "
         "block of D features; then swap the T and H axes with transpose(1, 2)."))
register(Exercise(
    "01.merge_heads", _merge_cases, merge_heads,
    description="(B, H, T, D) -> (B, T, H·D).",
    hint="Undo split_heads in reverse order: transpose(1, 2) back to (B, T, H, D), then reshape to "
         "(B, T, H·D). After a transpose the memory is not contiguous, so use reshape (or "
         ".contiguous().view)."))
register(Exercise(
    "01.rope", _rope_cases, rope_reference,
    description="RoPE, split-half convention, on x (B,H,T,D) at the given positions.",
    hint="θ_i = base ** (-2i / D) for i = 0 .. D/2-1 (torch.arange(0, D, 2) / D gives 2i/D). The angles are "
         "positions.float()[:, None] * θ, shape (T, D/2): use the positions you are given (they may have "
         "gaps), in float32 whatever x's dtype, and recompute them on every call. With x1, x2 = the two "
         "halves of the last dimension, return cat([x1·cos − x2·sin, x2·cos + x1·sin])."))
