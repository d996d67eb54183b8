"""Chapter 07: Griffin / RecurrentGemma — the RG-LRU, the associative scan, the causal conv, and the capstone."""

import functools
from types import SimpleNamespace

import torch
from torch import nn

from ... import learner_griffin
from ...attention import Positions, grouped_query_attention, sliding_window_mask
from ...griffin import (RGLRU, Conv1D, GriffinConfig, RecurrentBlock, associative_combine, causal_conv1d,
                        rglru_step, scan_associative)
from ...layers import apply_rope, rope_cos_sin, rope_frequencies
from ..exercise import Case, Exercise, register
from .ch03 import Sublayer


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
                                                                       torch.randn(4, 6, generator=g)))),
            # bfloat16 keeps 8 significant bits (2^-8 = 0.4% relative a rounding): a2·a1, a2·b1 and the sum
            # round, ~1.2% relative at most, and a sum that cancels keeps ~0.01 absolute (|b| up to ~3): atol
            # 2e-2, rtol 1.6e-2. The expected values are computed in float32 from the same inputs.
            Case("bfloat16 pairs (returned in bfloat16)",
                 tuple((torch.randn(3, 5, generator=g).bfloat16(), torch.randn(3, 5, generator=g).bfloat16())
                       for _ in range(2)), atol=2e-2, rtol=1.6e-2)]


def associative_combine_reference(first, second):
    """The package's combine computed in float32 (from the same, possibly bfloat16, values), returned in the
    inputs' dtype."""
    (a1, b1), (a2, b2) = first, second
    a, b = associative_combine((a1.float(), b1.float()), (a2.float(), b2.float()))
    return a.to(a1.dtype), b.to(b1.dtype)


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
    # a bfloat16 model: x, the kernel, the bias and the cache all bfloat16. bfloat16 keeps 8 significant bits
    # (2^-8 = 0.4% relative a rounding): the W = 4 products and their running sum round, on outputs up to ~6;
    # ~0.024 of absolute error at most over 300 seeds at rtol 2e-2: atol 6e-2, rtol 2e-2. The new cache holds
    # inputs as they are (exact). The expected values are computed in float32 from the same inputs.
    x, w, bias, x_prev = (torch.randn(*shape, generator=g).bfloat16() for shape in ((2, 5, 6), (4, 6), (6,), (2, 3, 6)))
    cases.append(Case("bfloat16 x, kernel, bias and cache (y and the new cache in bfloat16)", (x, w, bias, x_prev),
                      atol=6e-2, rtol=2e-2))
    return cases


def conv1d_with_cache(x, w, bias, x_prev):
    """The exercise's view of `causal_conv1d`: one document, returns (y, new cache), computed in float32 (from the
    same, possibly bfloat16, values) and returned in x's dtype."""
    y, cache = causal_conv1d(x.float(), w.float(), bias.float(), x_prev.float())
    return y.to(x.dtype), cache.to(x.dtype)


register(Exercise(
    "07.rglru_step", _rglru_cases, rglru_step,
    description="h = a·h_prev + sqrt(1 - a²)·(i·x), a = sigmoid(Λ)^(8 r); "
                "at a reset a = 0 and the multiplier is 1.",
    hint="The decay a is σ(Λ) raised to the power 8·r: mind what the exponent is. And at a reset, two things "
         "change, not one: what happens to a, and what to the input's multiplier?",
    recipe="1. a = σ(Λ)^(8·r): the whole product 8·r is the exponent, element by element, (B, D). 2. The input "
           "multiplier is sqrt(1 − a²). 3. On the rows where reset is True, replace a by 0 and the multiplier "
           "by 1; the reset flag has shape (B,), so give it a trailing axis of size 1 to broadcast over D. "
           "4. Return a·h_prev + multiplier·(i·x). With r = 0 the decay is 1: the state is kept exactly and "
           "the input's multiplier is 0."))
register(Exercise(
    "07.associative_combine", _combine_cases, associative_combine_reference, exact_types=True,
    description="(a1, b1) ∘ (a2, b2) = (a2·a1, a2·b1 + b2): first step 1, then step 2; in the inputs' dtype.",
    hint="Each pair is the affine map h ↦ a·h + b. What single map do you get by applying the first and then "
         "the second?",
    recipe="1. Apply the first map, then the second: a2·(a1·h + b1) + b2. 2. Expand it: a2·a1·h + (a2·b1 + b2). "
           "3. Read off the new a, the factor of h, which is a2·a1, and the new b, the rest, which is "
           "a2·b1 + b2. 4. Return the pair (new a, new b), element by element, for any shape and in the inputs' "
           "dtype. Nothing more: a may be negative or zero, so no logarithms and no divisions."))
register(Exercise(
    "07.associative_scan", _scan_cases, scan_associative,
    description="h_t = a_t·h_{t-1} + b_t for all t with log2(T) rounds of the combine; "
                "returns (h (B, T, D), h_T (B, D)).",
    hint="Where does h0 enter, so that the rest is a scan from zero? And in each round, step t is combined "
         "with the step how far before it, and for how many rounds?",
    recipe="1. Fold h0 in first (zeros if it is None): the first step's b becomes b_0 + a_0·h0. Build new "
           "tensors for this; do not write into the inputs. 2. For d = 1, 2, 4, … while d < T: every position "
           "t ≥ d combines the pair at t − d, as the first step, with the pair at t, as the second step; "
           "positions before d keep their pair. Compute all of a round from the previous round's pairs. "
           "3. Keep doubling d until it reaches T; stopping early forgets the far past, which only shows when "
           "a is close to 1 (T = 300). 4. The b's are now the states h (B, T, D), and h_T is the last one "
           "(B, D). Return both. No logarithms or divisions: a can be 0 (a reset) or negative."))
register(Exercise(
    "07.conv1d_with_cache", _conv_cases, conv1d_with_cache, exact_types=True,
    description="Depthwise causal conv y_t = bias + Σ_s w[W-1-s]·x_{t-s}, continuing from the "
                "cache of the previous W-1 inputs; returns (y, new cache), both in x's dtype.",
    hint="The first outputs need inputs from before this call: where are they, and how do you line them up "
         "with x? And what must the next call find in the cache, even when W is 1?",
    recipe="1. Put the cache in front of x along the time axis: a sequence xs of shape (B, W − 1 + T, D). "
           "2. Input x_{t−s} is then row W − 1 + t − s of xs, so for each shift s from 0 to W − 1 the rows "
           "W − 1 − s up to W − 1 − s + T (not included) give it for every t at once. 3. Multiply each such "
           "block by the kernel row w_{W−1−s} (one weight per channel: the conv is depthwise) and sum over s; "
           "add the bias. That is y, (B, T, D). 4. The new cache is the last W − 1 rows of xs, that is, "
           "everything after its first T rows (counting W − 1 rows back from the end gives all of xs when "
           "W = 1, where the cache must be empty). When T < W − 1 it mixes old and new inputs. "
           "5. Return y and the new cache, both in x's dtype (bfloat16 in, bfloat16 out)."))


# --------------------------------------------------------------------------------------------
# The recurrent block: two branches, multiplied
# --------------------------------------------------------------------------------------------
def _filled(module: nn.Module, g) -> nn.Module:
    """Random parameters (a fresh RG-LRU or conv holds empty ones), drawn from the case's generator."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() > 1 else 1.0))
    return module.requires_grad_(False)


def _linear(g, name, n_in, n_out):
    lin = _filled(nn.Linear(n_in, n_out), g)
    lin.weight.mul_(n_in ** -0.5)
    return Sublayer(name, lin)


def _block_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, (B, T, C, R, H), scale in [
        ("B=1, T=1, C=4, R=4", (1, 1, 4, 4, 1), 1.0),
        ("T=3, the RG-LRU wider than the model (C=4, R=6)", (1, 3, 4, 6, 2), 1.0),
        ("batch 2, T=5, C=8, R=8, 2 heads", (2, 5, 8, 8, 2), 1.0),
        ("T=7, large inputs (GELU's tails)", (2, 7, 6, 6, 3), 4.0),
    ]:
        conv, rg_lru = _filled(Conv1D(R, 4), g), _filled(RGLRU(R, H), g)
        positions = torch.arange(T).expand(B, T)  # one document per row
        cases.append(Case(label, (
            torch.randn(B, T, C, generator=g) * scale,
            _linear(g, "linear_y", C, R), _linear(g, "linear_x", C, R),
            Sublayer("conv_1d (the causal conv of 4 taps)", lambda u, m=conv: m(u, None), module=conv),
            Sublayer("rg_lru (the RG-LRU over the sequence)", lambda u, m=rg_lru, p=positions: m(u, p), module=rg_lru),
            _linear(g, "linear_out", R, C),
        )))
    return cases


def recurrent_block_reference(x, linear_y, linear_x, conv_1d, rg_lru, linear_out):
    """`RecurrentBlock.forward` itself, run on the block's modules given (the conv and the RG-LRU are
    called as the block calls them, with the positions of one document and no decoding state)."""
    B, T, _ = x.shape
    block = SimpleNamespace(linear_y=linear_y, linear_x=linear_x, linear_out=linear_out,
                            conv_1d=conv_1d.module, rg_lru=rg_lru.module)
    return RecurrentBlock.forward(block, x, Positions(0, torch.arange(T), torch.arange(T).expand(B, T)))


# --------------------------------------------------------------------------------------------
# Griffin's local attention: MQA, RoPE on part of head_dim (half in Griffin), the official window edge
# --------------------------------------------------------------------------------------------
def _griffin_config(H, K, D, W, edge="inclusive", base=10_000.0, rotary=0.5):
    return GriffinConfig(vocab_size=16, width=H * D, num_layers=3, num_heads=H, num_kv_heads=K,
                         mlp_expanded_width=8, attention_window_size=W, window_edge=edge, rope_base=base,
                         partial_rotary_factor=rotary)


def _local_cases(seed):
    g = torch.Generator().manual_seed(seed)
    gaps = torch.sort(torch.randint(0, 30, (7,), generator=g)).values
    cases = []
    for label, (B, H, K, T, D, W), edge, positions, base, rotary in [
        ("T=1", (1, 1, 1, 1, 4, 2), "inclusive", torch.arange(1), 10_000.0, 0.5),
        ("T=4, W=4: every key in the window", (1, 2, 1, 4, 4, 4), "inclusive", torch.arange(4), 10_000.0, 0.5),
        ("T=6, W=2: a query sees W + 1 = 3 keys (the official edge)", (1, 2, 1, 6, 4, 2), "inclusive",
         torch.arange(6), 10_000.0, 0.5),
        ("window_edge='exclusive' (HF's): W keys", (1, 2, 1, 6, 4, 2), "exclusive", torch.arange(6), 10_000.0, 0.5),
        # the window's edge: with W + 1 keys, T = W + 2 is the first length where a key is cut (key 0, for the
        # last query only)
        ("T = W + 2 = 5, W=3: only the last query loses a key (key 0)", (1, 2, 1, 5, 4, 3), "inclusive",
         torch.arange(5), 10_000.0, 0.5),
        ("head_dim 8: only its first 4 dims rotate", (1, 2, 1, 5, 8, 3), "inclusive", torch.arange(5), 10_000.0, 0.5),
        ("MQA, 4 heads, positions with gaps", (2, 4, 1, 7, 8, 3), "inclusive", gaps, 10_000.0, 0.5),
        ("2 kv heads, T=9, W=3", (2, 4, 2, 9, 4, 3), "inclusive", torch.arange(9), 10_000.0, 0.5),
        ("rope_base 100: the config's base, not a fixed 10 000", (1, 2, 1, 6, 8, 3), "inclusive",
         torch.arange(6) * 5, 100.0, 0.5),
        # not half: rotary_dim comes from partial_rotary_factor (8 of 32 dims, 4 frequencies), not D // 2
        ("partial_rotary_factor 0.25: 8 of head_dim 32 rotate", (1, 2, 1, 5, 32, 3), "inclusive",
         torch.arange(5) * 3, 10_000.0, 0.25),
    ]:
        q, k, v = (torch.randn(B, n, T, D, generator=g) for n in (H, K, K))
        cases.append(Case(label, (q, k, v, positions, _griffin_config(H, K, D, W, edge, base, rotary))))
    # bfloat16 q, k, v: RoPE's float32 angles must not promote q and k (the product with v would then mix
    # dtypes). bfloat16 keeps 8 significant bits (2^-8 = 0.4% relative a rounding): RoPE, the scores, the
    # weights and the product with v each round; ~0.017 of absolute error at most over 300 seeds: atol 5e-2,
    # rtol 2e-2. The expected values are computed in float32 from the same inputs.
    q, k, v = (torch.randn(2, n, 8, 8, generator=g).bfloat16() for n in (4, 1, 1))
    cases.append(Case("bfloat16 q, k, v at positions 40..47, T=8, W=3 (returned in bfloat16)",
                      (q, k, v, torch.arange(40, 48), _griffin_config(4, 1, 8, 3)), atol=5e-2, rtol=2e-2))
    return cases


def local_attention_reference(q, k, v, positions, config):
    """Griffin's local attention on q, k, v after the projection, read from the config as
    `griffin.local_attention` reads it: split-half RoPE (base config.rope_base) on the first
    rotary_dim = head_dim · partial_rotary_factor dims, a window of W + 1 keys (the official edge) or
    W (HF's), then the readable GQA reference with its default scale head_dim^-1/2. Only what the
    exercise asks for runs: the model's layer (projections, norms) is not built here; tests/test_griffin.py
    checks that layer against the official and HF code. Computed in float32 (from the same, possibly bfloat16,
    values) and returned in q's dtype."""
    dtype, q, k, v = q.dtype, q.float(), k.float(), v.float()
    rotary_dim = int(q.shape[-1] * config.partial_rotary_factor)
    cos, sin = rope_cos_sin(positions, rope_frequencies(rotary_dim, config.rope_base))  # (T, rotary_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # the other dims pass through
    keys = config.attention_window_size + (1 if config.window_edge == "inclusive" else 0)
    return grouped_query_attention(q, k, v, sliding_window_mask(q.shape[2], keys)).to(dtype)


# --------------------------------------------------------------------------------------------
# Prediction: a horizon of the RG-LRU
# --------------------------------------------------------------------------------------------
def rglru_halflife_reference():
    """Steps until one input's share of h falls to half, for σ(Λ) = 0.999 with the gate r held at 1
    and at 1/8: an impulse through the package's `rglru_step`, counted."""
    lam = torch.logit(torch.tensor([0.999]))  # σ(Λ) = 0.999, one channel
    one, zero = torch.ones(1, 1), torch.zeros(1, 1)
    steps = []
    for r in (1.0, 0.125):
        gate = torch.full((1, 1), r)
        h = rglru_step(one, gate, one, lam, zero)  # the input, at step 0
        h0, n = h, 0
        while h.item() > h0.item() / 2:
            h = rglru_step(zero, gate, one, lam, h)  # nothing new comes in
            n += 1
        steps.append(float(n))
    return tuple(steps)


register(Exercise(
    "07.recurrent_block", _block_cases, recurrent_block_reference,
    description="Griffin's recurrent block from its modules: linear_out(gelu_tanh(linear_y(x)) · "
                "rg_lru(conv_1d(linear_x(x)))).",
    hint="Two branches read the same x. Which one is the gate, which GELU does it use, and in which order "
         "do the conv and the RG-LRU come on the other branch?",
    recipe="1. Gate branch: apply linear_y to x, then GELU in its tanh approximation (not the exact erf form; "
           "large inputs show the difference). 2. Recurrent branch: apply linear_x to the same x, then the "
           "conv (conv_1d), then the RG-LRU (rg_lru), in that order: the conv mixes a few neighbours before "
           "the recurrence carries them on. 3. Multiply the two branches element by element. 4. Project back "
           "to the model's width with linear_out and return that."))
register(Exercise(
    "07.local_attention", _local_cases, local_attention_reference, exact_types=True,
    description="Griffin's local attention on q (B, H, T, D), k, v (B, K, T, D): RoPE (base config.rope_base) on the "
                "first rotary_dim = head_dim · partial_rotary_factor dims only, causal, a window of W + 1 keys "
                "(window_edge 'inclusive', the official code) or W ('exclusive', HF), scale D^-1/2; in q's dtype.",
    hint="Only part of head_dim rotates, and the window has two conventions for its edge. How many dims does "
         "the config say to rotate, with which base, and how many keys does a query see?",
    recipe="1. d is head_dim times the config's partial_rotary_factor, as a whole number (not always half). "
           "2. Apply split-half RoPE to the first d dims of q and of k only, with d/2 frequencies "
           "base^(−2i/d) and the config's rope_base (not a fixed 10 000), at the positions you are given (they "
           "may have gaps); the remaining dims pass through untouched, joined back after the rotated ones. "
           "3. W is the config's attention_window_size. With the inclusive edge (the official code) query i "
           "sees keys j with j ≤ i and i − j ≤ W, that is W + 1 keys; with the exclusive edge (HF) i − j < W, "
           "W keys. 4. Run your grouped-query attention with that (T, T) mask, K kv heads (often 1) and scale "
           "1/sqrt(D). v is not rotated. The result is in q's dtype: round the rotated dims back to it, as "
           "01.rope does, so that bfloat16 q and k stay bfloat16."))
register(Exercise(
    "07.predict_rglru_halflife", lambda seed: [Case("σ(Λ) = 0.999, c = 8: (steps to half with r = 1, with r = 1/8)")],
    rglru_halflife_reference, atol=0.0, rtol=0.02,
    description="Predict, then check: with σ(Λ) = 0.999, after how many steps has one input's share of the RG-LRU's "
                "state halved, with the gate r held at 1, and at 1/8? Within 2%.",
    hint="With no new input, h_t = a·h_{t−1}. What share of one input is left after n steps, and how does the "
         "gate r change a?",
    recipe="1. With no new input each step multiplies the state by a, so after n steps the input's share is a^n. "
           "2. Here a = σ(Λ)^(8r) with σ(Λ) = 0.999, the same every step. 3. Solve a^n = 1/2 for n: "
           "n = log 2 / (8r · log(1/0.999)), natural logarithms. 4. Compute it for r = 1 and for r = 1/8 (a smaller r means a "
           "slower decay, so a longer half-life), and return the two step counts in that order."))


# --------------------------------------------------------------------------------------------
# The capstone: your functions inside a RecurrentGemma
# --------------------------------------------------------------------------------------------
def _capstone_cases(seed):
    """Token ids drawn from the seed; the model (`learner_griffin.capstone_model`) is the same every run.
    Its window is 8 (a query sees 9 keys) and its conv keeps the last 3 inputs."""
    g = torch.Generator().manual_seed(seed)
    V = learner_griffin.CAPSTONE_CONFIG["vocab_size"]
    cases = []
    for label, B, feed in [
        ("1 row: a prompt of 2 tokens (fewer than the conv's 3 cached inputs), then 10 decode steps that go past "
         "the window", 1, (2,) + (1,) * 10),
        ("2 rows: a prompt of 11 tokens (past the window), a chunk of 2 that continues it, then 4 decode steps",
         2, (11, 2, 1, 1, 1, 1)),
        ("2 rows: a prompt of 3 tokens, a chunk of 13 (longer than the window) that continues it, then 2 decode "
         "steps", 2, (3, 13, 1, 1)),
    ]:
        cases.append(Case(label, (torch.randint(0, V, (B, sum(feed)), generator=g), feed)))
    return cases


@functools.lru_cache(maxsize=16)
def _capstone_logits(ids: tuple, shape: tuple, feed: tuple) -> torch.Tensor:
    return learner_griffin.fed_logits(learner_griffin.capstone_model(), torch.tensor(ids).view(shape), feed)


def capstone_reference(ids, feed):
    """The logits of the capstone's RecurrentGemma itself, the package's code everywhere, fed the same way
    (remembered per ids and feed: a check run again on the same seed computes them once)."""
    return _capstone_logits(tuple(ids.flatten().tolist()), tuple(ids.shape), tuple(feed)).clone()


register(Exercise(
    "07.capstone", _capstone_cases, capstone_reference, diagnose=learner_griffin.diagnose,
    atol=learner_griffin.ATOL, rtol=learner_griffin.RTOL,
    description="Your code inside a RecurrentGemma: YourGriffin(rglru_step=..., associative_scan=..., "
                "conv1d_with_cache=..., recurrent_block=..., local_attention=...) gives the logits of a small "
                "RecurrentGemma (random weights from a fixed seed, a window of 8, a conv of 4 taps) for a prompt, "
                "a chunk that continues it and one-token decode steps, within 1e-4 (the same maths summed in "
                "another order differs by about 1e-6 in float32).",
    hint="Each function must first pass its own exercise. If the logits still differ, the report names the "
         "function that changes them when swapped in alone. Inside the model your functions meet inputs a single "
         "exercise case may not give: your scan starts a chunk from the state the prompt left (h0 is not zeros), "
         "your rglru_step continues that state one token at a time, your conv continues from the inputs the "
         "previous call left in its cache, and your local attention sees more tokens than its window.",
    recipe="First make the five exercises pass on their own: 07.rglru_step, 07.associative_scan, "
           "07.conv1d_with_cache, 07.recurrent_block and 07.local_attention. Then build the YourGriffin with each "
           "of your five functions given under its own name, and check it. If it fails, read which function the "
           "report names: swapped in alone, that one changes the logits. Compare that one with the package's "
           "version (minigemma.griffin) on the inputs the model gives it: for the scan, an h0 that is not zeros; "
           "for the RG-LRU step, one token from a state that is not zeros and no reset; for the conv, one token "
           "whose cache holds the previous three inputs, and the cache it hands back; for the local attention, "
           "more tokens than the window with the official edge (W + 1 keys); for the block, linear_x, the conv "
           "and the RG-LRU in that order, times the tanh GELU of linear_y."))
