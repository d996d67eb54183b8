"""Chapter 04: local and global attention, and the KV cache they need."""

import torch

from ...attention import causal_mask, sliding_window_mask
from ...gemma import PRESETS, SLIDING, GemmaConfig, kv_cache_bytes, layer_pattern
from ..core import Case, Exercise, register


def _pattern_cases(seed):
    return [Case(f"{n} layers, every {k}", (n, k)) for n, k in
            [(26, 2), (18, 6), (7, 6), (5, 6), (3, 1), (1, 2), (13, 4), (12, 3), (4, 4)]]


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
        # each branch of `every`, where a hard-coded Gemma 2 or Gemma 3 pattern answers wrongly
        ("local layer 1 when every=6 (global under Gemma 2's pattern)", (7, 1, 2, 6)),
        ("local layer 5 when every=4 (global under Gemma 3's pattern)", (7, 5, 2, 4)),
        ("global layer 2 when every=3", (6, 2, 2, 3)),
        ("local layer 3 when every=3", (6, 3, 2, 3)),
        ("every=1: every layer is global", (6, 0, 2, 1)),
        ("every=8: layer 5 is local", (6, 5, 2, 8)),
        ("T=1", (1, 0, 3, 2)),
        ("window 1: a query sees only itself", (5, 0, 1, 2)),
        ("window larger than T", (4, 0, 16, 6)),
    ]]
    T, W = int(torch.randint(5, 14, (1,), generator=g)), int(torch.randint(2, 6, (1,), generator=g))
    every, layer = int(torch.randint(1, 8, (1,), generator=g)), int(torch.randint(0, 12, (1,), generator=g))
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
                                  ("gemma3-4b", 1, 4, torch.float16), ("gemma3-1b", 600, 3, torch.float8_e4m3fn)]:
        cases.append(Case(f"{name}, T={T}, batch {batch}, {dtype}", (PRESETS[name], T, batch, dtype)))
    tiny = _tiny(g)
    W = tiny.sliding_window
    for T in (W - 1, W, W + 1, 5 * W + 3):
        cases.append(Case(f"random tiny config (W={W}), T={T}", (tiny, T, 1, torch.float32)))
    every_global = _tiny(g, num_hidden_layers=4, layer_types=layer_pattern(4, 1))
    cases.append(Case("all layers global", (every_global, 50, 1, torch.bfloat16)))
    return cases


register(Exercise(
    "04.layer_types", _pattern_cases, layer_pattern,
    description="['sliding_attention' | 'full_attention'] per layer: layer i is global iff (i+1) % every == 0.",
    hint="Layers count from 0, so layer i is the (i+1)-th: it is global when (i + 1) % every == 0. "
         "A list comprehension over range(num_layers) does it; read `every`, don't assume 2 or 6."))
register(Exercise(
    "04.layer_mask", _mask_cases, layer_mask_reference,
    description="(T, T) bool mask of layer `layer_idx`: i - W < j <= i on local layers, j <= i on global ones.",
    hint="Start from the causal mask j <= i (index grids i = arange(T)[:, None], j = arange(T)[None, :]). "
         "Decide the layer's type from `every` exactly as in layer_types, (layer_idx + 1) % every == 0 means "
         "global. On a local layer also require j > i - window: `window` keys, the query's own included."))
register(Exercise(
    "04.kv_cache_bytes", _bytes_cases, kv_cache_bytes, exact_types=True,
    description="bytes of K and V after T tokens: global layers keep T, local layers min(T, W). An int.",
    hint="Per token, one layer stores 2 (k and v) · batch · num_key_value_heads · head_dim · dtype.itemsize "
         "bytes. A global layer holds all T tokens, a local one min(T, sliding_window). Count the layers of "
         "each type in config.layer_types. Multiply ints only (no / and no float bits / 8) so the answer "
         "stays an int."))
