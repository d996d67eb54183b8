"""Chapter 02: multi-query and grouped-query attention, and the KV cache."""

import torch

from ...attention import KVCache, causal_mask, grouped_query_attention, repeat_kv
from ..exercise import Case, Exercise, in_place, register


def _randn(g, *shape):
    return torch.randn(*shape, generator=g)


def _repeat_cases(seed):
    g = torch.Generator().manual_seed(seed)
    return [Case(f"B={B}, K={K}, S={S}, D={D}, n_rep={n}", (_randn(g, B, K, S, D), n))
            for B, K, S, D, n in [(2, 2, 5, 4, 3), (1, 1, 1, 3, 4), (3, 4, 2, 2, 2), (1, 3, 6, 5, 1)]] + [
        # copying numbers rounds nothing: bfloat16 in, the same bfloat16 numbers out (exactly)
        Case("bfloat16 x, K=2, n_rep=2 (returned in bfloat16)", (_randn(g, 1, 2, 3, 4).to(torch.bfloat16), 2),
             atol=0.0, rtol=0.0)]


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
    # bfloat16 keeps 8 significant bits (2^-8 = 0.4% relative a rounding). Computed in bfloat16, the scores
    # (|s| up to ~3), the weights and the product with v (|v| up to ~3) each round: the weights are off by ~1%,
    # and a sum of weights·v that nearly cancels keeps ~0.03 of absolute error: atol 5e-2, rtol 2e-2. The
    # expected values are computed in float32 from the same inputs.
    q, k, v = _randn(g, 2, 4, 3, 8), _randn(g, 2, 2, 5, 8), _randn(g, 2, 2, 5, 8)
    cases.append(Case("bfloat16 q, k, v, 4 heads / 2 kv heads (returned in bfloat16)",
                      (q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16), _random_mask(g, 3, 5)),
                      atol=5e-2, rtol=2e-2))
    return cases


def gqa_reference(q, k, v, mask):
    """The package's grouped-query attention computed in float32 (from the same, possibly bfloat16, inputs),
    returned in q's dtype."""
    return grouped_query_attention(q.float(), k.float(), v.float(), mask).to(q.dtype)


register(Exercise(
    "02.repeat_kv", _repeat_cases, repeat_kv, exact_types=True,
    description="(B, K, S, D) -> (B, K·n_rep, S, D); query head h reads kv head h // n_rep; in x's dtype.",
    hint="Query head h reads kv head h // n_rep, so the copies of one kv head must sit next to each other: "
         "0, 0, 1, 1, not 0, 1, 0, 1. Which way of repeating gives that order?",
    recipe="1. Insert a new axis of size 1 right after the K axis: (B, K, 1, S, D). 2. Expand that axis to "
           "n_rep, which makes no copy: (B, K, n_rep, S, D). 3. Reshape, merging the K and n_rep axes into "
           "one of size K·n_rep: (B, K·n_rep, S, D). The copies of each kv head end up adjacent. (Repeating "
           "each head n_rep times along the head axis, one head after another, is the same; tiling the "
           "whole stack of heads n_rep times gives the wrong order 0, 1, 0, 1.) With n_rep = 1 the input "
           "comes back unchanged. Nothing is computed: the numbers keep x's dtype."))
register(Exercise(
    "02.gqa_attention", _gqa_cases, gqa_reference, exact_types=True,
    description="attention where H query heads share K kv heads (q (B,H,T,D), k, v (B,K,S,D)), "
                "with the given mask (any (T, S) pattern, or None); in q's dtype.",
    hint="Once every query head has its own copy of the right kv head, this is chapter 01's masked "
         "attention. Which mask do you apply: the one you are given (not always causal, sometimes None)?",
    recipe="1. Repeat k and v with your repeat_kv, n_rep = H / K, so both become (B, H, S, D) and query "
           "head h meets kv head h / n_rep (rounded down). 2. Scores: q times k transposed over its last two "
           "axes, divided by √D: (B, H, T, S). 3. If a mask is given, set the scores where it is False to "
           "−inf; use the mask you get, which is not always causal (a one-token decode step can still have "
           "hidden padded keys); if it is None, mask nothing. 4. Softmax over the keys, with each row's own "
           "maximum subtracted (large scores, rows that start with −inf). 5. Multiply the weights by v: "
           "(B, H, T, D), in q's dtype (bfloat16 in, bfloat16 out)."))


# --------------------------------------------------------------------------------------------
# The KV cache: the update, and cached attention equals full attention
# --------------------------------------------------------------------------------------------
def _kv_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, (B, K, max_len, D), length, T in [
        ("prefill 3 tokens into an empty cache", (1, 1, 5, 2), 0, 3),
        ("one decode step (T=1) after 4 tokens", (1, 1, 6, 2), 4, 1),
        ("T=1 into an empty cache", (2, 1, 3, 2), 0, 1),
        ("a chunk of 3 after 2 tokens, 2 kv heads", (2, 2, 8, 3), 2, 3),
        ("the chunk fills the buffer exactly", (1, 2, 7, 4), 4, 3),
        ("decode step into the last free slot", (2, 2, 6, 4), 5, 1),
    ]:
        # every slot holds something (old values past `length` too): a write at the wrong slot shows
        ck, cv = _randn(g, B, K, max_len, D), _randn(g, B, K, max_len, D)
        cases.append(Case(label, (ck, cv, length, _randn(g, B, K, T, D), _randn(g, B, K, T, D))))
    n = int(torch.randint(1, 5, (1,), generator=g))
    length = int(torch.randint(0, 9 - n, (1,), generator=g))
    cases.append(Case(f"random: {n} new tokens after {length}",
                      (_randn(g, 2, 2, 10, 3), _randn(g, 2, 2, 10, 3), length, _randn(g, 2, 2, n, 3), _randn(g, 2, 2, n, 3))))
    return cases


def kv_cache_update_reference(cache_k, cache_v, length, k, v):
    """`KVCache.update` on a cache holding these buffers: (the buffers after it, the new length).

    What update also returns, the keys and values the new queries attend (at the indices its `Keys`
    name; in a KVCache slot s holds index s), must be the buffers' first `length` slots: checked here,
    so that a wrong one fails too."""
    cache = KVCache.__new__(KVCache)  # its __init__ would allocate new zero buffers: use the case's
    cache.k, cache.v, cache.max_len, cache.length = cache_k, cache_v, cache_k.shape[2], length
    k_all, v_all, keys = cache.update(k, v)
    held = torch.arange(keys.first, keys.first + keys.count)  # the token indices the keys hold
    n = cache.length
    if not (held.tolist() == list(range(n)) and torch.equal(k_all[:, :, held], cache.k[:, :, :n])
            and torch.equal(v_all[:, :, held], cache.v[:, :, :n])):
        raise AssertionError("KVCache.update returned other keys and values than the ones it holds")
    return cache.k, cache.v, n


def _cached_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, (B, H, K, T, D), prefill in [
        ("one token (prefill only)", (1, 1, 1, 1, 2), 1),
        ("prefill 1, then 2 decode steps", (1, 1, 1, 3, 2), 1),
        ("prefill all 4 (no decode step)", (1, 2, 1, 4, 4), 4),
        ("prefill 2, then 3 decode steps, 4 heads / 2 kv heads", (2, 4, 2, 5, 4), 2),
        ("MQA, prefill 3, then 5 decode steps", (2, 4, 1, 8, 8), 3),
    ]:
        q, k, v = _randn(g, B, H, T, D), _randn(g, B, K, T, D), _randn(g, B, K, T, D)
        cases.append(Case(label, (q, k, v, prefill)))
    # the buffers must be allocated in k's dtype: float32 zeros would hold the bfloat16 keys, and the
    # attention would then meet bfloat16 queries and float32 keys. Tolerance: as 02.gqa_attention's bfloat16
    # case (each step's scores, weights and product round to 8 significant bits: atol 5e-2, rtol 2e-2); the
    # expected values are computed in float32 from the same inputs.
    q, k, v = _randn(g, 1, 4, 5, 8), _randn(g, 1, 2, 5, 8), _randn(g, 1, 2, 5, 8)
    cases.append(Case("bfloat16 q, k, v, prefill 2, then 3 decode steps (buffers and output in bfloat16)",
                      (q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16), 2), atol=5e-2, rtol=2e-2))
    return cases


def cached_attention_reference(q, k, v, prefill):
    """Full causal attention over all T tokens at once: what cached decoding must reproduce. Computed in float32
    (from the same, possibly bfloat16, inputs) and returned in q's dtype."""
    return grouped_query_attention(q.float(), k.float(), v.float(), causal_mask(q.shape[2])).to(q.dtype)


register(Exercise(
    "02.kv_cache_update", _kv_cases, kv_cache_update_reference, atol=0.0, rtol=0.0, exact_types=True,
    call=in_place("cache_k", "cache_v"),
    outputs=("cache_k", "cache_v", "the new length"),
    description="Write k, v (B, K, T, D) into slots length..length+T-1 of the (B, K, max_len, D) buffers cache_k, "
                "cache_v (in place; every other slot unchanged); return (cache_k, cache_v, length + T).",
    hint="Which slots do the new tokens' keys and values go to, and what must stay untouched? Nothing "
         "grows: the buffer keeps its max_len slots, and the next call must see what this one wrote.",
    recipe="1. T is the size of k's time axis (the third), and the new length is length + T. 2. Write k into "
           "the time slots from length up to, but not including, length + T of cache_k, in place (assign "
           "into that slice of the buffer itself), for every batch row and kv head; do the same with v and "
           "cache_v. Every other slot keeps what it held, even old values past length. 3. Do not concatenate: "
           "that makes a new, longer tensor and leaves the caller's buffer as it was. 4. Return cache_k, "
           "cache_v and the new length as a Python int (not a tensor)."))
register(Exercise(
    "02.cached_attention", _cached_cases, cached_attention_reference, exact_types=True,
    description="Causal attention over T tokens computed the cached way: prefill the first `prefill` tokens, then "
                "one token per step through your kv_cache_update; returns (B, H, T, D) in q's dtype, equal to full attention.",
    hint="A decode step writes its token into the cache before it attends, so that it sees itself. Which "
         "slots of the buffer hold keys at that moment, and which still hold zeros?",
    recipe="1. Allocate two zero buffers of shape (B, K, T, D), like k in dtype and device. 2. Prefill: write "
           "the first prefill keys and values with your kv_cache_update, and attend the first prefill queries "
           "to them with your gqa_attention under a causal (prefill, prefill) mask. 3. Then for each t from "
           "prefill to T − 1: write token t's key and value first, then attend the single query t (a time "
           "axis of length 1) to the first n filled slots only, where n is the length the update returned; "
           "the slots after n hold zeros, not keys. All of them are in its past, so no mask. "
           "4. Concatenate the prefill output and each step's output along the time axis: (B, H, T, D). "
           "When prefill equals T there is no decode step."))
