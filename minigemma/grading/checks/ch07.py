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
    return cases


def _combine_cases(seed):
    g = torch.Generator().manual_seed(seed)

    def pair(*shape):
        return torch.rand(*shape, generator=g), torch.randn(*shape, generator=g)

    return [Case("scalars as tensors", (pair(1), pair(1))),
            Case("batch of vectors", (pair(3, 5), pair(3, 5))),
            Case("odd shape (2, 7, 3)", (pair(2, 7, 3), pair(2, 7, 3)))]


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
    ]:
        x, w, bias = (torch.randn(B, T, D, generator=g), torch.randn(W, D, generator=g),
                      torch.randn(D, generator=g))
        x_prev = torch.zeros(B, W - 1, D) if prev == "zeros" else torch.randn(B, W - 1, D, generator=g)
        cases.append(Case(label, (x, w, bias, x_prev)))
    return cases


def conv1d_with_cache(x, w, bias, x_prev):
    """The exercise's view of `causal_conv1d`: one document, returns (y, new cache)."""
    y, x_tail, _ = causal_conv1d(x, w, bias, x_prev)
    return y, x_tail


register(Exercise("07.rglru_step", _rglru_cases, rglru_step,
                  description="h = a·h_prev + sqrt(1 - a²)·(i·x), a = sigmoid(Λ)^(8 r); "
                              "at a reset a = 0 and the multiplier is 1."))
register(Exercise("07.associative_combine", _combine_cases, associative_combine,
                  description="(a1, b1) ∘ (a2, b2) = (a2·a1, a2·b1 + b2): first step 1, then step 2."))
register(Exercise("07.associative_scan", _scan_cases, scan_associative,
                  description="h_t = a_t·h_{t-1} + b_t for all t with log2(T) rounds of the combine; "
                              "returns (h (B, T, D), h_T (B, D))."))
register(Exercise("07.conv1d_with_cache", _conv_cases, conv1d_with_cache,
                  description="Depthwise causal conv y_t = bias + Σ_s w[W-1-s]·x_{t-s}, continuing from the "
                              "cache of the previous W-1 inputs; returns (y, new cache)."))
