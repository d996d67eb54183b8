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
    # bfloat16 keeps 8 significant bits (2^-8 = 0.4% relative a rounding). Computed in bfloat16, the scores
    # (|s| up to ~3), the weights and the product with v (|v| up to ~3) each round: the weights are off by ~1%,
    # and a sum of weights·v that nearly cancels keeps ~0.03 of absolute error (the largest seen over 300
    # seeds): atol 5e-2, rtol 2e-2. The expected values are computed in float32 from the same inputs.
    q, k, v = (_randn(g, 2, 2, T, 8).to(torch.bfloat16) for T in (4, 6, 6))
    cases.append(Case("bfloat16 q, k, v (returned in bfloat16)", (q, k, v, _random_mask(g, 4, 6)), atol=5e-2, rtol=2e-2))
    return cases


def attention_reference(q, k, v, mask):
    """The package's attention computed in float32 (from the same, possibly bfloat16, inputs), returned in q's
    dtype."""
    return scaled_dot_product_attention(q.float(), k.float(), v.float(), mask).to(q.dtype)


def _split_cases(seed):
    g = torch.Generator().manual_seed(seed)
    return [Case(f"B={B}, T={T}, H={H}, D={D}", (_randn(g, B, T, H * D), H))
            for B, T, H, D in [(2, 3, 4, 5), (1, 1, 2, 3), (3, 7, 1, 4), (2, 5, 3, 2)]] + [
        # moving numbers rounds nothing: bfloat16 in, the same bfloat16 numbers out (exactly)
        Case("bfloat16 x, B=2, T=3, H=2, D=4 (returned in bfloat16)", (_randn(g, 2, 3, 8).to(torch.bfloat16), 2),
             atol=0.0, rtol=0.0)]


def _merge_cases(seed):
    g = torch.Generator().manual_seed(seed)
    return [Case(f"B={B}, H={H}, T={T}, D={D}", (_randn(g, B, H, T, D),))
            for B, H, T, D in [(2, 4, 3, 5), (1, 2, 1, 3), (3, 1, 7, 4), (2, 3, 5, 2)]] + [
        Case("bfloat16 x, B=2, H=2, T=3, D=4 (returned in bfloat16)", (_randn(g, 2, 2, 3, 4).to(torch.bfloat16),),
             atol=0.0, rtol=0.0)]


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
    # The statement asks for angles in float32 and the result in x's dtype. bfloat16 holds integers exactly
    # only up to 256, so angles (or positions) in x's dtype are wrong by whole radians here. The expected
    # values are computed in float32 and rounded once; the tolerance covers rounding x·cos and x·sin to
    # bfloat16 too (relative step 2^-8, on |x| up to ~4).
    x = _randn(g, 1, 2, 5, 16).to(torch.bfloat16)
    cases.append(Case("bfloat16 x, positions in the thousands (angles in float32, the result in bfloat16)",
                      (x, torch.tensor([300, 1001, 4093, 4094, 9999]), 10_000.0), atol=0.05, rtol=0.02))
    return cases


def rope_reference(x, positions, base):
    cos, sin = rope_cos_sin(positions, rope_frequencies(x.shape[-1], base))
    return apply_rope(x, cos, sin)


register(Exercise(
    "01.causal_mask", _causal_cases, lambda T: causal_mask(T),
    description="(T, T) boolean mask, True where query i may see key j.",
    hint="Query i may see key j exactly when j is not after i. How can you compare every row index with "
         "every column index at once, without a loop?",
    recipe="1. Make the query indices 0 … T−1 as a column, shape (T, 1), and the key indices 0 … T−1 as a "
           "row, shape (1, T). 2. Compare them, key index at most query index: broadcasting turns the one "
           "comparison into a (T, T) grid, and a comparison of tensors is already boolean. 3. Return it: True "
           "on and below the diagonal, False above it (for T = 1, a single True). Keeping the lower triangle "
           "of a boolean all-True (T, T) matrix gives the same mask."))
register(Exercise(
    "01.masked_attention", _attention_cases, attention_reference, exact_types=True,
    description="softmax(q kᵀ / sqrt(D), masked) v for q (B,H,T,D), k, v (B,H,S,D), in q's dtype.",
    hint="Scores, mask, softmax, weighted sum: in which order must the mask and the softmax come so that "
         "each query's visible weights still sum to 1? And the mask is (T, S): what does it do across B and H?",
    recipe="1. Scores: multiply q by k transposed over its last two axes and divide by sqrt(D), giving "
           "(B, H, T, S). 2. Where the mask is False, set the score to −inf; the (T, S) mask broadcasts over B "
           "and H, and it may be any pattern, not only causal. Masking must happen before the softmax. "
           "3. Softmax over the last axis (the keys), the stable way: each row's own maximum subtracted, so "
           "scores in the hundreds do not overflow and a row whose first key is masked gives no nan. "
           "4. Multiply the weights (B, H, T, S) by v (B, H, S, D): the output is (B, H, T, D), in q's dtype "
           "(bfloat16 in, bfloat16 out)."))
register(Exercise(
    "01.split_heads", _split_cases, split_heads, exact_types=True,
    description="(B, T, H·D) -> (B, H, T, D), in x's dtype.",
    hint="Head h owns a contiguous block of D features of the last dimension. Which axis do you split "
         "first, and which two axes must trade places afterwards?",
    recipe="1. D is the last dimension's size divided by H. 2. Read the last dimension as two axes (H, D), "
           "H first because each head's D features sit next to each other: the tensor becomes (B, T, H, D). "
           "3. Swap the T and H axes (the second and the third), giving (B, H, T, D). Splitting as (D, H), "
           "or reshaping straight to (B, H, T, D) without the swap, mixes tokens and heads. Nothing is computed: "
           "the numbers come back as they are, in x's dtype (a new buffer of float32 zeros would change it)."))
register(Exercise(
    "01.merge_heads", _merge_cases, merge_heads, exact_types=True,
    description="(B, H, T, D) -> (B, T, H·D), in x's dtype.",
    hint="This is split_heads undone, in reverse order. What does swapping two axes do to the memory "
         "layout, and which way of reshaping copes with that?",
    recipe="1. Swap the H and T axes (the second and the third) back, giving (B, T, H, D). 2. Flatten the "
           "last two axes into one of size H·D, head 0's D features first, then head 1's, and so on: "
           "(B, T, H·D). After the swap the memory is not contiguous, so use a reshape that copies when it "
           "must (or make the tensor contiguous first): a plain view refuses. The numbers come back as they are, "
           "in x's dtype."))
register(Exercise(
    "01.rope", _rope_cases, rope_reference, exact_types=True,
    description="RoPE, split-half convention, on x (B,H,T,D) at the given positions; angles in float32, the "
                "result in x's dtype.",
    hint="Feature i and feature i + D/2 turn together, by the angle p·θ_i of the token's position p. Which "
         "positions do you use, in which dtype, and when are the angles computed? The cases move the "
         "positions, leave gaps, repeat one, and go up to 32K with bfloat16 x.",
    recipe="1. Frequencies: θ_i = base^(−2i/D) for i = 0 … D/2 − 1, in float32. 2. Angles: every position "
           "you are given (converted to float32 whatever x's dtype; they may have gaps or repeats) times "
           "every θ_i, an outer product of shape (T, D/2); recompute them on every call, never reuse angles "
           "kept from an earlier call with the same shape. 3. Take their cosine and sine. 4. Split the last "
           "dimension of x into its two halves, x1 (the first D/2 features) and x2 (the last D/2). "
           "5. Return x1·cos − x2·sin followed by x2·cos + x1·sin, joined along the last dimension, with cos "
           "and sin broadcasting over B and H, computed in float32 and returned in x's dtype."))
