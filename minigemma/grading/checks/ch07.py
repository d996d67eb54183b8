"""Chapter 07: Griffin / RecurrentGemma — the RG-LRU, the associative scan, the causal conv."""

import torch

from ...griffin import associative_combine, causal_conv1d, rglru_step, scan_associative
from ..core import Case, Exercise, register


def _rglru_cases(seed):
    """x, r, i, Λ, h_prev, reset: random draws plus the edges (resets, a near 0 and near 1)."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, B, D, reset_kind, lam_scale in [
        ("batch 3, no reset", 3, 8, "none", 3.0),
        ("one row resets", 4, 5, "some", 3.0),
        ("B=1, D=1, reset", 1, 1, "all", 3.0),
        ("long memory: Λ large (a near 1)", 2, 6, "none", 9.0),
        ("odd width, big previous state", 3, 7, "some", 1.0),
    ]:
        x = torch.randn(B, D, generator=g)
        r, i = torch.rand(B, D, generator=g), torch.rand(B, D, generator=g)
        lam = lam_scale * torch.rand(D, generator=g) - (0.5 if lam_scale < 5 else -1.0)
        h_prev = 5 * torch.randn(B, D, generator=g)
        reset = {"none": torch.zeros(B, dtype=torch.bool), "all": torch.ones(B, dtype=torch.bool),
                 "some": torch.arange(B) % 2 == 1}[reset_kind]
        cases.append(Case(label, (x, r, i, lam, h_prev, reset)))
    x, i, h_prev = torch.randn(3, 4, generator=g), torch.rand(3, 4, generator=g), torch.randn(3, 4, generator=g)
    r = torch.rand(3, 4, generator=g)
    r[0] = 0.0  # a = sigmoid(Λ)^0 = 1: the state is kept exactly and the input multiplier is 0
    lam = torch.tensor([-6.0, -1.0, 2.0, 8.0])  # a from ~0 to ~1 in one row
    # near a = 1, sqrt(1 - a²) cancels: float32 sigmoid and the reference's log space differ by ~1e-5
    cases.append(Case("r = 0 in one row (a = 1), Λ from -6 to 8",
                      (x, r, i, lam, h_prev, torch.tensor([False, True, False])), atol=1e-4))
    return cases


def _combine_cases(seed):
    g = torch.Generator().manual_seed(seed)

    def pair(*shape):
        return torch.rand(*shape, generator=g), torch.randn(*shape, generator=g)

    signed = (torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g))
    signed[0][0, :2] = 0.0  # a zero a is a reset
    return [Case("scalars as tensors", (pair(1), pair(1))),
            Case("batch of vectors", (pair(3, 5), pair(3, 5))),
            Case("odd shape (2, 7, 3)", (pair(2, 7, 3), pair(2, 7, 3))),
            # any affine map h -> a·h + b: a may be negative or zero, not only a decay in (0, 1)
            Case("negative and zero a (a general affine map)", (signed, (torch.randn(4, 6, generator=g),
                                                                       torch.randn(4, 6, generator=g))))]


def _scan_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, B, T, D, with_h0 in [
        ("T=1", 2, 1, 3, True),
        ("T=2, no h0 (zeros)", 1, 2, 4, False),
        ("T=7 (not a power of 2)", 3, 7, 5, True),
        ("T=16", 2, 16, 3, True),
        ("T=37, no h0", 2, 37, 2, False),
    ]:
        a, b = torch.rand(B, T, D, generator=g), torch.randn(B, T, D, generator=g)
        h0 = torch.randn(B, D, generator=g) if with_h0 else None
        cases.append(Case(label, (a, b, h0)))
    # long memory: a in (0.99, 0.999) remembers for hundreds of steps, so every round of the scan
    # matters. States reach ~30; float32 sums in a different order differ by ~1e-5 relative.
    a = 0.99 + 0.009 * torch.rand(2, 300, 3, generator=g)
    cases.append(Case("T=300, a close to 1 (long memory)",
                      (a, torch.randn(2, 300, 3, generator=g), torch.randn(2, 3, generator=g)), atol=1e-4))
    a = torch.rand(2, 20, 3, generator=g)
    a[:, 5], a[0, 12, 1] = 0.0, 0.0  # a zero is a reset: nothing before it survives
    cases.append(Case("zeros in a (resets)", (a, torch.randn(2, 20, 3, generator=g), torch.randn(2, 3, generator=g))))
    cases.append(Case("negative a (a general affine map)",
                      (torch.rand(2, 9, 4, generator=g) * 2 - 1, torch.randn(2, 9, 4, generator=g),
                       torch.randn(2, 4, generator=g))))
    return cases


def _conv_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, B, T, D, W, prev in [
        ("fresh sequence, T=6", 2, 6, 5, 4, "zeros"),
        ("one decode step (T=1) with a cache", 3, 1, 4, 4, "random"),
        ("T=2 < W-1: the new cache mixes old and new inputs", 2, 2, 3, 4, "random"),
        ("continue a chunk, odd width", 1, 9, 7, 4, "random"),
        ("width 3 kernel", 2, 5, 4, 3, "random"),
        ("width 2 kernel, T=1", 2, 1, 3, 2, "random"),
        ("width 1 kernel: no cache at all (W-1 = 0)", 2, 4, 3, 1, "random"),
    ]:
        x, w, bias = (torch.randn(B, T, D, generator=g), torch.randn(W, D, generator=g),
                      torch.randn(D, generator=g))
        x_prev = torch.zeros(B, W - 1, D) if prev == "zeros" else torch.randn(B, W - 1, D, generator=g)
        cases.append(Case(label, (x, w, bias, x_prev)))
    return cases


def conv1d_with_cache(x, w, bias, x_prev):
    """The exercise's view of `causal_conv1d`: one document, returns (y, new cache)."""
    return causal_conv1d(x, w, bias, x_prev)


register(Exercise(
    "07.rglru_step", _rglru_cases, rglru_step,
    description="h = a·h_prev + sqrt(1 - a²)·(i·x), a = sigmoid(Λ)^(8 r); "
                "at a reset a = 0 and the multiplier is 1.",
    hint="a = torch.sigmoid(lam) ** (8 * r): the power is 8·r, so keep the parentheses. The multiplier is "
         "torch.sqrt(1 - a ** 2). On reset rows replace a by 0 AND the multiplier by 1 "
         "(torch.where(reset[:, None], ...) broadcasts the (B,) flag over D); then a * h_prev + multiplier * (i * x)."))
register(Exercise(
    "07.associative_combine", _combine_cases, associative_combine,
    description="(a1, b1) ∘ (a2, b2) = (a2·a1, a2·b1 + b2): first step 1, then step 2.",
    hint="Apply the first map, then the second: a2·(a1·h + b1) + b2. Expand it and read off the new a (the "
         "factor of h) and the new b (the rest). Nothing more: a may be negative or zero, so no logs."))
register(Exercise(
    "07.associative_scan", _scan_cases, scan_associative,
    description="h_t = a_t·h_{t-1} + b_t for all t with log2(T) rounds of the combine; "
                "returns (h (B, T, D), h_T (B, D)).",
    hint="Fold h0 in first: the first step's b becomes b[:, 0] + a[:, 0] * h0 (build a new tensor with "
         "torch.cat; do not write into the input). Then for d = 1, 2, 4, ... while d < T: combine "
         "(a[:, :-d], b[:, :-d]) as the first step with (a[:, d:], b[:, d:]) as the second, and put the result "
         "back at positions d.. (positions < d stay). Keep going until d >= T; stopping early forgets the far "
         "past, which only shows when a is close to 1. No logs or divisions: a can be 0 or negative."))
register(Exercise(
    "07.conv1d_with_cache", _conv_cases, conv1d_with_cache,
    description="Depthwise causal conv y_t = bias + Σ_s w[W-1-s]·x_{t-s}, continuing from the "
                "cache of the previous W-1 inputs; returns (y, new cache).",
    hint="Glue the cache in front: xs = cat([x_prev, x], dim=1), (B, W-1+T, D); x_{t-s} is then "
         "xs[:, W-1+t-s], so the slice xs[:, W-1-s : W-1-s+T] gives it for every t at once. Sum "
         "w[W-1-s] * slice over s, plus bias. The new cache is the last W-1 rows of xs: xs[:, T:] "
         "(careful: xs[:, -(W-1):] is all of xs when W = 1)."))
