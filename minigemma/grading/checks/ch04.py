"""Chapter 04: local and global attention, and the KV cache they need."""

from types import SimpleNamespace

import torch

from ...attention import Positions, RingKVCache, causal_mask, sliding_window_mask
from ...gemma import FULL, PRESETS, SLIDING, DecoderLayer, GemmaConfig, kv_cache_bytes, layer_pattern
from ..exercise import Case, Exercise, in_place, register


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
        # the block edge: T = W sees no cut at all, T = W + 1 cuts exactly one key (key 0, for the last query)
        ("T = W: the window cuts nothing yet", (4, 0, 4, 6)),
        ("T = W + 1: only the last query loses a key (key 0)", (5, 0, 4, 6)),
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
    hint="Layers count from 0, so layer i is the (i + 1)-th. Which layers does \"every sixth is global\" "
         "mean then, and what if every is not 2 or 6?",
    recipe="1. Go through the layer indices i from 0 to num_layers − 1. 2. Layer i is global exactly when "
           "i + 1 is a multiple of every (the remainder of i + 1 divided by every is 0): give it the string "
           "'full_attention'. 3. Every other layer gets 'sliding_attention'. 4. Return the list, one string "
           "per layer, in order. Read every from the argument: every = 1 makes all layers global, and a "
           "stack shorter than every has no global layer at all."))
register(Exercise(
    "04.layer_mask", _mask_cases, layer_mask_reference,
    description="(T, T) bool mask of layer `layer_idx`: i - W < j <= i on local layers, j <= i on global ones.",
    hint="A global layer's mask is the causal one. What does a local layer add to it, and how many keys, the "
         "query's own included, does a query see there? Decide the layer's type exactly as layer_types does.",
    recipe="1. Decide the layer's type from every, as in layer_types: layer_idx + 1 a multiple of every means "
           "global. Do not hard-code Gemma 2's or Gemma 3's pattern. 2. Build index grids: query indices i "
           "as a (T, 1) column, key indices j as a (1, T) row. 3. The causal condition is j ≤ i. 4. On a "
           "local layer also require j > i − window, so a query sees window keys, its own included (window 1: "
           "only itself; a window larger than T changes nothing). 5. Return the (T, T) boolean mask, True "
           "where both conditions hold (only the causal one on a global layer)."))
register(Exercise(
    "04.kv_cache_bytes", _bytes_cases, kv_cache_bytes, exact_types=True,
    description="bytes of K and V after T tokens: global layers keep T, local layers min(T, W). An int.",
    hint="How many bytes does one token cost in one layer, and how many tokens does each kind of layer keep? "
         "Keep every step an integer.",
    recipe="1. Per token, one layer stores 2 (k and v) · batch · num_key_value_heads · head_dim numbers, each "
           "the dtype's size in bytes (its item size: 4 for float32, 2 for bfloat16, 1 for float8). 2. A "
           "global layer keeps all T tokens; a local one keeps min(T, sliding_window). 3. Count the layers of "
           "each type in the config's layer_types list (do not assume a pattern; a config may have only "
           "global layers). 4. Add the global layers' count times T and the local layers' count times "
           "min(T, W), and multiply by the per-token bytes. Multiply integers only, with no division and no "
           "bits divided by 8, so the answer is a Python int."))


# --------------------------------------------------------------------------------------------
# The ring-buffer cache of a local layer
# --------------------------------------------------------------------------------------------
def _randn(g, *shape):
    return torch.randn(*shape, generator=g)


def _ring_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, (B, K, W, D), length, T in [
        ("decode into an empty ring (W=3)", (1, 1, 3, 2), 0, 1),
        ("decode, the ring not full yet (length 2, W=4)", (1, 1, 4, 2), 2, 1),
        ("decode that wraps round to slot 0 (length 4, W=4)", (1, 1, 4, 2), 4, 1),
        ("decode far along (length 10, W=3)", (1, 1, 3, 2), 10, 1),
        ("a prompt of 2 into an empty ring (W=4)", (1, 1, 4, 2), 0, 2),
        ("a chunk longer than the window (T=6, W=4): only the last 4 stay", (1, 1, 4, 2), 0, 6),
        ("a chunk after the ring wrapped (length 5, T=3, W=4)", (2, 2, 4, 3), 5, 3),
        ("a chunk of exactly W after 7 tokens (W=3)", (2, 1, 3, 3), 7, 3),
    ]:
        # every slot holds something, the ones not written yet too: a write or a read at the wrong slot shows
        cases.append(Case(label, (_randn(g, B, K, W, D), _randn(g, B, K, W, D), length,
                                  _randn(g, B, K, T, D), _randn(g, B, K, T, D))))
    W, length, T = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((2, 6), (0, 20), (1, 8)))
    cases.append(Case(f"random: W={W}, length {length}, T={T}", (_randn(g, 2, 2, W, 3), _randn(g, 2, 2, W, 3), length,
                                                                  _randn(g, 2, 2, T, 3), _randn(g, 2, 2, T, 3))))
    return cases


def ring_update_reference(ring_k, ring_v, length, k, v):
    """`RingKVCache.update` on a ring holding these buffers: (the ring after the call, and the keys and
    values of the last min(length + T, W) tokens, oldest first, taken from what update returns and the
    indices its `Keys` give: the window the last new query attends)."""
    W = ring_k.shape[2]
    ring = RingKVCache.__new__(RingKVCache)  # its __init__ would allocate new zero buffers: use the case's
    ring.k, ring.v, ring.window, ring.size, ring.max_len, ring.length = ring_k, ring_v, W, W, None, length
    k_all, v_all, keys = ring.update(k, v)
    held = torch.arange(keys.first, keys.first + keys.count) if keys.in_order else keys.index()  # (S,) indices
    window = (held > ring.length - 1 - W) & (held >= 0)  # the last W indices: the last query's window
    order = torch.where(window)[0][held[window].argsort()]  # those keys, oldest first
    return ring.k, ring.v, k_all[:, :, order], v_all[:, :, order]


# --------------------------------------------------------------------------------------------
# QK-norm and the per-layer RoPE base (Gemma 3)
# --------------------------------------------------------------------------------------------
def _gemma3_config(n_layers, every, H, K, D, scaling=1.0, eps=1e-6):
    return GemmaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=n_layers,
                       num_attention_heads=H, num_key_value_heads=K, head_dim=D,
                       layer_types=layer_pattern(n_layers, every), sliding_window=4, query_pre_attn_scalar=D,
                       rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rope_scaling_factor=scaling,
                       use_qk_norm=True, rms_norm_eps=eps)


def _qk_cases(seed):
    g = torch.Generator().manual_seed(seed)
    gaps = torch.sort(torch.randint(0, 40, (5,), generator=g)).values
    cases = []
    for label, (n_layers, every, H, K, D, scaling), layer, positions in [
        ("local layer 0 (base 10k), T=1", (6, 6, 1, 1, 4, 1.0), 0, torch.arange(1)),
        ("global layer 5 of 6 (base 1M), T=3", (6, 6, 2, 1, 4, 1.0), 5, torch.arange(3)),
        ("local layer 6, after the global one", (12, 6, 2, 1, 4, 1.0), 6, torch.arange(20, 23)),
        ("every=3: layer 2 is global", (6, 3, 2, 2, 6, 1.0), 2, torch.arange(4)),
        ("every=3: layer 3 is local", (6, 3, 2, 2, 6, 1.0), 3, torch.arange(4)),
        ("4B and up: a global layer's RoPE is scaled (x8)", (6, 6, 2, 1, 8, 8.0), 5, torch.arange(30, 35)),
        ("4B and up: a local layer is not scaled", (6, 6, 2, 1, 8, 8.0), 4, torch.arange(30, 35)),
        ("4 heads / 2 kv heads, positions with gaps", (6, 6, 4, 2, 8, 1.0), 1, gaps),
        # more heads and more tokens than head_dim (the cases above have H, T <= D): a size read from the
        # wrong axis of (B, H, T, D) shows
        ("6 heads / 3 kv heads, T=6 > head_dim 4", (6, 6, 6, 3, 4, 1.0), 0, torch.arange(6)),
        # q and k of ~1e-2 (mean square ~1e-4) against rms_norm_eps 1e-2: QK-norm must use the config's eps
        ("tiny activations: the config's eps (1e-2) matters", (6, 6, 2, 1, 4, 1.0), 1, torch.arange(3)),
    ]:
        tiny = label.startswith("tiny")
        cfg = _gemma3_config(n_layers, every, H, K, D, scaling, eps=1e-2 if tiny else 1e-6)
        T = positions.numel()
        x = _randn(g, 2 if H > 2 else 1, T, cfg.hidden_size) * (1e-2 if tiny else 1.0)
        w_qkv = _randn(g, (H + 2 * K) * D, cfg.hidden_size) * cfg.hidden_size ** -0.5
        cases.append(Case(label, (x, w_qkv, 0.5 * _randn(g, D), 0.5 * _randn(g, D), positions, cfg, layer)))
    # a bfloat16 model: x and w_qkv in bfloat16, the norm weights float32 (the package keeps norms in float32),
    # whose (1 + w) would promote a bfloat16 q to float32. bfloat16 keeps 8 significant bits (2^-8 = 0.4%
    # relative a rounding): the projection, the norm and RoPE each round, on values up to ~5; ~0.01 of absolute
    # error at most over 300 seeds: atol 3e-2, rtol 2e-2. The expected values are computed in float32.
    cfg = _gemma3_config(6, 6, 4, 2, 8, 8.0)
    x, w_qkv = _randn(g, 2, 5, cfg.hidden_size), _randn(g, 64, cfg.hidden_size) * cfg.hidden_size ** -0.5
    cases.append(Case("bfloat16 x and w_qkv, float32 norm weights (q, k, v in bfloat16)",
                      (x.to(torch.bfloat16), w_qkv.to(torch.bfloat16), 0.5 * _randn(g, 8), 0.5 * _randn(g, 8),
                       torch.arange(100, 105), cfg, 5), atol=3e-2, rtol=2e-2))
    return cases


def qk_norm_rope_reference(x, w_qkv, q_norm_weight, k_norm_weight, positions, config, layer_idx):
    """The attention input of layer `layer_idx` as the model computes it: `DecoderLayer` builds the layer's
    attention with its RoPE (base and scaling by layer type) and QK-norm, and `project` applies them, in
    float32 (from the same, possibly bfloat16, values); q, k and v are returned in x's dtype."""
    attn = DecoderLayer(config, layer_idx).self_attn
    with torch.no_grad():
        attn.qkv_proj.weight.copy_(w_qkv)
        attn.q_norm.weight.copy_(q_norm_weight)
        attn.k_norm.weight.copy_(k_norm_weight)
        B, T = x.shape[:2]
        q, k, v = attn.project(x.float(), Positions(0, torch.arange(T), positions.expand(B, T)))
        return q.to(x.dtype), k.to(x.dtype), v.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Prediction questions: a number first, then the code
# --------------------------------------------------------------------------------------------
def kv_cache_mib_reference():
    """Gemma 3 270M's KV cache for one 32,768-token sequence in bfloat16, in MiB: as it is, and with
    every layer global (the same config, each layer's type changed)."""
    cfg = PRESETS["gemma3-270m"]
    all_global = SimpleNamespace(**{**vars(cfg), "layer_types": [FULL] * cfg.num_hidden_layers})
    return tuple(kv_cache_bytes(c, 32_768, 1, torch.bfloat16) / 2 ** 20 for c in (cfg, all_global))


def window_reach_reference():
    """How far back the last token of a long prompt can see through Gemma 3 270M's first local layers
    (the ones before its first global layer): the composed sliding-window masks, computed."""
    cfg = PRESETS["gemma3-270m"]
    n_local, W = cfg.layer_types.index(FULL), cfg.sliding_window
    T = n_local * W + 2  # longer than the reach, so the reach is what stops it
    mask = sliding_window_mask(T, W).float()  # (T, T): one layer's mask
    seen = mask[-1]  # the tokens the last one sees after one layer
    for _ in range(n_local - 1):
        seen = (seen @ mask > 0).float()  # ... after one more layer: what any of those saw
    return T - 1 - int(seen.nonzero()[0])


def _one_question(label):
    return lambda seed: [Case(label)]


register(Exercise(
    "04.ring_update", _ring_cases, ring_update_reference, atol=0.0, rtol=0.0, exact_types=True,
    call=in_place("ring_k", "ring_v"),
    outputs=("ring_k", "ring_v", "the keys attended, oldest first", "the values attended, oldest first"),
    description="A local layer's ring of W slots, token i in slot i % W: write the T new tokens (in place), return "
                "(ring_k, ring_v, keys, values of the last min(length + T, W) tokens, oldest first).",
    hint="Token i lives in slot i mod W, so the slots are not in time order once the ring has wrapped. Which "
         "slot does each new token go to, what happens when the chunk is longer than W, and how do you read "
         "the window back oldest first?",
    recipe="1. New token t (t from 0 to T − 1) has index length + t and goes to slot (length + t) mod W, in "
           "place in ring_k and ring_v. Writing them in order of t means that when T > W the later tokens "
           "overwrite the earlier ones, as they should (or write only the last min(T, W)). 2. After the "
           "write, n is length + T. 3. The window is the token indices from max(0, n − W) up to n − 1, and "
           "index j sits in slot j mod W. 4. Gather the slots of those indices, in increasing index order, "
           "from ring_k and from ring_v: these are the keys and values, oldest first, min(n, W) of them. "
           "5. Return ring_k, ring_v, the keys and the values."))
register(Exercise(
    "04.qk_norm_rope", _qk_cases, qk_norm_rope_reference, exact_types=True,
    outputs=("q", "k", "v"),
    description="Gemma 3's attention inputs of one layer: x @ w_qkvᵀ split into q (H heads), k, v (K heads); "
                "RMSNorm (1 + w) over head_dim on q and on k; RoPE with the layer's base (local: "
                "rope_local_base_freq, global: rope_theta, its positions / rope_scaling_factor). Returns (q, k, v), in "
                "x's dtype.",
    hint="One fused projection gives q, k and v side by side. Which of them are normed, over which axis, and "
         "which RoPE base and scaling does this layer's type call for?",
    recipe="1. Project x with the fused weight (times its transpose): (B, T, (H + 2K)·D). 2. Cut the last "
           "dimension into three consecutive pieces of H·D, K·D and K·D features: q, k and v. 3. Split each "
           "into heads as in split_heads: (B, H, T, D) for q, (B, K, T, D) for k and v (read H, K and D from "
           "the config). 4. RMSNorm with (1 + w) over head_dim, the last axis: q with the q-norm weight, k with "
           "the k-norm weight, one (D,) vector shared by every head, and the config's rms_norm_eps. 5. The "
           "layer's type is the config's layer_types entry for layer_idx. A global layer uses rope_theta as its "
           "base and divides the positions by rope_scaling_factor; a local layer uses rope_local_base_freq and "
           "no scaling. 6. Apply RoPE at those positions (they may have gaps) to the normed q and k: norm "
           "first, then RoPE. v gets neither. Return q, k and v, all three in x's dtype: the norm weights may be "
           "float32 while x is bfloat16, so round q and k back once at the end."))
register(Exercise(
    "04.predict_kv_cache_mib", _one_question("Gemma 3 270M, one sequence of 32,768 tokens, bfloat16: "
                                             "(MiB as it is, MiB if every layer were global)"),
    kv_cache_mib_reference, atol=0.0, rtol=0.02,
    outputs=("MiB with the real layer pattern", "MiB with every layer global"),
    description="Predict, then check: the MiB of Gemma 3 270M's KV cache at 32,768 tokens in bfloat16, and "
                "with every layer global. Within 2%.",
    hint="What does one token cost in one layer, and how many tokens does a global layer keep compared with "
         "a local one? Gemma 3 270M has 18 layers, every sixth of them global.",
    recipe="1. Per token and layer: k and v, each num_key_value_heads (1) · head_dim (256) numbers, at 2 bytes "
           "per bfloat16 number. 2. Of the 18 layers, every sixth is global: 3 global layers keep all 32,768 "
           "tokens, and the 15 local ones keep only the window of 512. 3. Add up the bytes of all layers and "
           "divide by 2^20 to get MiB. 4. For the second number, count all 18 layers as global, each keeping "
           "32,768 tokens. 5. Return both numbers, the real pattern first."))
register(Exercise(
    "04.predict_window_reach", _one_question("Gemma 3 270M's first five (local) layers, W = 512: how many "
                                             "tokens back can the last token see?"),
    window_reach_reference,
    description="Predict, then check: through Gemma 3 270M's five local layers before its first global layer, "
                "how far back can information reach the last token? An exact number of tokens.",
    hint="One local layer lets a token see W keys, itself included. How far back is that, and what do the "
         "tokens it sees pass on from the layers below?",
    recipe="1. One local layer lets token i see tokens i − (W − 1) up to i: W keys, itself included, so W − 1 "
           "tokens back. 2. In the next layer, each of those tokens passes on what it saw in the layer below, "
           "so the reach grows by another W − 1 tokens per layer. 3. Count the local layers before the first "
           "global one (five here) and multiply that count by W − 1, with W = 512. 4. Return that exact "
           "number of tokens, an integer."))
