"""Chapter 04: local and global attention, and the KV cache they need."""

import torch

from ...attention import causal_mask, sliding_window_mask
from ...gemma import PRESETS, SLIDING, GemmaConfig, kv_cache_bytes, layer_pattern
from ..core import Case, Exercise, register


def _pattern_cases(seed):
    return [Case(f"{n} layers, every {k}", (n, k)) for n, k in
            [(26, 2), (18, 6), (7, 6), (5, 6), (3, 1), (1, 2), (13, 4)]]


def layer_mask_reference(T, layer_idx, window, every):
    if layer_pattern(layer_idx + 1, every)[layer_idx] == SLIDING:
        return sliding_window_mask(T, window)
    return causal_mask(T)


def _mask_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = [Case(label, args) for label, args in [
        ("local layer 0, T=9, W=3 (Gemma 2 pattern)", (9, 0, 3, 2)),
        ("global layer 1, T=9, W=3 (Gemma 2 pattern)", (9, 1, 3, 2)),
        ("local layer 4, W=4 (Gemma 3 pattern)", (10, 4, 4, 6)),
        ("global layer 5 (Gemma 3 pattern)", (10, 5, 4, 6)),
        ("local layer 6 starts a new group", (8, 6, 2, 6)),
        ("T=1", (1, 0, 3, 2)),
        ("window 1: a query sees only itself", (5, 0, 1, 2)),
        ("window larger than T", (4, 0, 16, 6)),
    ]]
    T, W, every = int(torch.randint(5, 14, (1,), generator=g)), int(torch.randint(2, 6, (1,), generator=g)), 6
    layer = int(torch.randint(0, 12, (1,), generator=g))
    cases.append(Case(f"random: T={T}, layer {layer}, W={W}, every {every}", (T, layer, W, every)))
    return cases


def _tiny(g, **kw):
    n = int(torch.randint(3, 9, (1,), generator=g))
    heads = int(torch.randint(1, 5, (1,), generator=g))
    base = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=n,
                num_attention_heads=heads * 2, num_key_value_heads=heads, head_dim=8,
                layer_types=layer_pattern(n, 3), sliding_window=int(torch.randint(2, 9, (1,), generator=g)),
                query_pre_attn_scalar=8)
    base.update(kw)
    return GemmaConfig(**base)


def _bytes_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for name, T, batch, dtype in [("gemma3-270m", 32_768, 1, torch.bfloat16), ("gemma3-1b", 100, 1, torch.bfloat16),
                                  ("gemma2-2b", 8192, 2, torch.float32), ("gemma3-27b", 131_072, 1, torch.bfloat16),
                                  ("gemma3-4b", 1, 4, torch.float16)]:
        cases.append(Case(f"{name}, T={T}, batch {batch}, {dtype}", (PRESETS[name], T, batch, dtype)))
    tiny = _tiny(g)
    W = tiny.sliding_window
    for T in (W - 1, W, W + 1, 5 * W + 3):
        cases.append(Case(f"random tiny config (W={W}), T={T}", (tiny, T, 1, torch.float32)))
    every_global = _tiny(g, num_hidden_layers=4, layer_types=layer_pattern(4, 1))
    cases.append(Case("all layers global", (every_global, 50, 1, torch.bfloat16)))
    return cases


register(Exercise("04.layer_types", _pattern_cases, layer_pattern,
                  description="['sliding_attention' | 'full_attention'] per layer: layer i is global iff (i+1) % every == 0."))
register(Exercise("04.layer_mask", _mask_cases, layer_mask_reference,
                  description="(T, T) bool mask of layer `layer_idx`: i - W < j <= i on local layers, j <= i on global ones."))
register(Exercise("04.kv_cache_bytes", _bytes_cases, kv_cache_bytes,
                  description="bytes of K and V after T tokens: global layers keep T, local layers min(T, W)."))
