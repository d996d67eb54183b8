import torch

FULL, SLIDING = "full_attention", "sliding_attention"


def _band(T, lo_keys, causal=True):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    m = (i - j) < lo_keys
    return m & (j <= i) if causal else m & (j - i < lo_keys)


def _mask(T, layer, W, every, pattern=lambda i, e: (i + 1) % e == 0, keys=lambda W: W, causal=True,
          window_on_global=False):
    is_global = pattern(layer, every)
    if is_global and not window_on_global:
        return _band(T, T + 1)
    return _band(T, keys(W), causal)


def _bytes(cfg, T, batch, dtype, local=lambda T, W: min(T, W), kv=lambda c: c.num_key_value_heads,
           nbytes=lambda d: d.itemsize, factor=2, all_global=False):
    n_global = sum(t == FULL for t in cfg.layer_types)
    n_local = cfg.num_hidden_layers - n_global
    if all_global:
        n_global, n_local = cfg.num_hidden_layers, 0
    return factor * batch * kv(cfg) * cfg.head_dim * nbytes(dtype) * (n_global * T + n_local * local(T, cfg.sliding_window))


MUTANTS = {
    "04.layer_types": [
        ("Gemma 2's pattern hard-coded (every second layer)", lambda n, e: [FULL if i % 2 == 1 else SLIDING for i in range(n)]),
        ("Gemma 3's pattern hard-coded (every sixth layer)", lambda n, e: [FULL if i % 6 == 5 else SLIDING for i in range(n)]),
        ("reads `every` only to choose between 2 and 6",
         lambda n, e: [FULL if (i + 1) % (2 if e == 2 else 6) == 0 else SLIDING for i in range(n)]),
        ("layer 0 global (i % every == 0)", lambda n, e: [FULL if i % e == 0 else SLIDING for i in range(n)]),
        ("global and local swapped", lambda n, e: [SLIDING if (i + 1) % e == 0 else FULL for i in range(n)]),
        ("global every `every + 1` layers", lambda n, e: [FULL if (i + 1) % (e + 1) == 0 else SLIDING for i in range(n)]),
    ],
    "04.layer_mask": [
        ("W + 1 keys (i - W <= j)", lambda T, l, W, e: _mask(T, l, W, e, keys=lambda W: W + 1)),
        ("W - 1 keys", lambda T, l, W, e: _mask(T, l, W, e, keys=lambda W: W - 1)),
        ("layer 0 global", lambda T, l, W, e: _mask(T, l, W, e, pattern=lambda i, e: i % e == 0)),
        ("symmetric band (sees the future)", lambda T, l, W, e: _mask(T, l, W, e, causal=False)),
        ("window on global layers too", lambda T, l, W, e: _mask(T, l, W, e, window_on_global=True)),
        ("Gemma 2's pattern hard-coded", lambda T, l, W, e: _mask(T, l, W, e, pattern=lambda i, e: i % 2 == 1)),
        ("Gemma 3's pattern hard-coded", lambda T, l, W, e: _mask(T, l, W, e, pattern=lambda i, e: i % 6 == 5)),
        ("reads `every` only to choose between 2 and 6",
         lambda T, l, W, e: _mask(T, l, W, e, pattern=lambda i, e: (i + 1) % (2 if e == 2 else 6) == 0)),
        ("every=1 treated as 'no global layer'",
         lambda T, l, W, e: _mask(T, l, W, e, pattern=lambda i, e: e > 1 and (i + 1) % e == 0)),
        ("off by one at the window's edge: no cut while T <= W + 1",
         lambda T, l, W, e: _mask(T, l, W, e) if T > W + 1 else _mask(T, l, W, e, keys=lambda W: T + 1)),
    ],
    "04.kv_cache_bytes": [
        ("every layer global", lambda c, T, b, d: _bytes(c, T, b, d, all_global=True)),
        ("local layers always hold W", lambda c, T, b, d: _bytes(c, T, b, d, local=lambda T, W: W)),
        ("keys only (no factor 2)", lambda c, T, b, d: _bytes(c, T, b, d, factor=1)),
        ("query heads instead of kv heads", lambda c, T, b, d: _bytes(c, T, b, d, kv=lambda c: c.num_attention_heads)),
        ("always 2 bytes per value", lambda c, T, b, d: _bytes(c, T, b, d, nbytes=lambda d: 2)),
        ("batch ignored", lambda c, T, b, d: _bytes(c, T, 1, d)),
        ("a float: bytes per value from finfo bits / 8",
         lambda c, T, b, d: _bytes(c, T, b, d, nbytes=lambda d: torch.finfo(d).bits / 8)),
        ("a 0-d tensor instead of an int", lambda c, T, b, d: torch.tensor(_bytes(c, T, b, d))),
    ],
}

CORRECT = {
    "04.layer_types": [
        ("i % every == every - 1", lambda n, e: [FULL if i % e == e - 1 else SLIDING for i in range(n)]),
    ],
    "04.layer_mask": [
        ("tril minus an earlier tril", lambda T, l, W, e: torch.ones(T, T, dtype=torch.bool).tril()
         if (l + 1) % e == 0 else torch.ones(T, T, dtype=torch.bool).tril() & ~torch.ones(T, T, dtype=torch.bool).tril(-W)),
    ],
    "04.kv_cache_bytes": [
        ("summed layer by layer", lambda c, T, b, d: sum(
            2 * b * c.num_key_value_heads * c.head_dim * d.itemsize * (T if t == FULL else min(T, c.sliding_window))
            for t in c.layer_types)),
    ],
}


# --------------------------------------------------------------------------------------------
# 04.ring_update, 04.qk_norm_rope and the prediction questions
# --------------------------------------------------------------------------------------------
def _ring(rk, rv, length, k, v, slot=lambda i, W: i % W, keep="last", window_order="index", window_keys=None,
          clamp=True):
    W, T = rk.shape[2], k.shape[2]
    ts = range(T) if keep == "last" else range(min(T, W))  # "first": only the first W new tokens written
    for t in ts:
        rk[:, :, slot(length + t, W)] = k[:, :, t]
        rv[:, :, slot(length + t, W)] = v[:, :, t]
    n = length + T
    if window_order == "slot":  # the live slots as they lie in the ring, not oldest first
        idx = torch.arange(min(n, W))
        return rk, rv, rk[:, :, idx], rv[:, :, idx]
    w = W if window_keys is None else window_keys(W, n)
    idx = torch.arange(max(0, n - w) if clamp else n - w, n) % W
    return rk, rv, rk[:, :, idx], rv[:, :, idx]


def _rope(x, positions, base, scaling=1.0):
    D = x.shape[-1]
    theta = base ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
    angle = (positions.float() / scaling)[:, None] * theta
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _qk(x, w_qkv, wq, wk, positions, cfg, layer, base=None, scale_on=lambda glob: glob, norm="head",
        k_weight="k", order="norm first"):
    B, T, _ = x.shape
    H, K, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q, k, v = (x @ w_qkv.T).split([H * D, K * D, K * D], dim=-1)
    glob = cfg.layer_types[layer] == FULL
    b = (cfg.rope_theta if glob else cfg.rope_local_base_freq) if base is None else base(cfg, glob)
    s = cfg.rope_scaling_factor if scale_on(glob) else 1.0

    def heads(t, n):
        return t.view(B, T, n, D).transpose(1, 2)

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * (1 + w)

    wk = wq if k_weight == "q" else wk
    if norm == "over H·D":  # one norm over all heads' features: (1 + w) tiled per head
        q, k = heads(rms(q, wq.repeat(H)), H), heads(rms(k, wk.repeat(K)), K)
    else:
        q, k = heads(q, H), heads(k, K)
        if order == "norm first":
            q, k = rms(q, wq), rms(k, wk)
    q, k = _rope(q, positions, b, s), _rope(k, positions, b, s)
    if order == "rope first":
        q, k = rms(q, wq), rms(k, wk)
    return q, k, heads(v, K)


MUTANTS.update({
    "04.ring_update": [
        ("a new ring (clone, then write): the caller's ring is never written",
         lambda rk, rv, l, k, v: _ring(rk.clone(), rv.clone(), l, k, v)),
        ("writes every call from slot 0 (length ignored)",
         lambda rk, rv, l, k, v: _ring(rk, rv, l, k, v, slot=lambda i, W: (i - l) % W)),
        ("slot i % (W - 1)", lambda rk, rv, l, k, v: _ring(rk, rv, l, k, v, slot=lambda i, W: i % max(W - 1, 1))),
        ("a chunk longer than W keeps its first W tokens", lambda rk, rv, l, k, v: _ring(rk, rv, l, k, v, keep="first")),
        ("the window in slot order, not oldest first",
         lambda rk, rv, l, k, v: _ring(rk, rv, l, k, v, window_order="slot")),
        ("the window is always all W slots, the unwritten ones too",
         lambda rk, rv, l, k, v: _ring(rk, rv, l, k, v, clamp=False)),
        ("the window has W - 1 keys", lambda rk, rv, l, k, v: _ring(rk, rv, l, k, v, window_keys=lambda W, n: W - 1)),
    ],
    "04.qk_norm_rope": [
        ("base 10k on every layer", lambda *a: _qk(*a, base=lambda c, g: c.rope_local_base_freq)),
        ("base 1M on every layer", lambda *a: _qk(*a, base=lambda c, g: c.rope_theta)),
        ("local and global bases swapped", lambda *a: _qk(*a, base=lambda c, g: c.rope_local_base_freq if g else c.rope_theta)),
        ("RoPE scaling ignored", lambda *a: _qk(*a, scale_on=lambda g: False)),
        ("RoPE scaling on local layers too", lambda *a: _qk(*a, scale_on=lambda g: True)),
        ("one norm over all heads' features (H·D)", lambda *a: _qk(*a, norm="over H·D")),
        ("q's norm weight used for k too", lambda *a: _qk(*a, k_weight="q")),
        ("RoPE before the norm", lambda *a: _qk(*a, order="rope first")),
        ("q and k come back float32 for a bfloat16 x (promoted by the float32 norm weights)", lambda *a: _qk(*a)),
    ],
    "04.predict_kv_cache_mib": [
        ("keys only (no factor 2)", lambda: (51.75, 288.0)),
        ("MB (10^6 bytes), not MiB", lambda: (108.5, 603.98)),
        ("float32 (4 bytes per number)", lambda: (207.0, 1152.0)),
        ("the local layers hold the whole sequence too (no window)", lambda: (576.0, 576.0)),
    ],
    "04.predict_window_reach": [
        ("W per layer, not W - 1", lambda: 2560),
        ("one layer's window only", lambda: 511),
        ("six layers (the global one counted)", lambda: 3066),
        ("off by one: 5 · 511 + 1", lambda: 2556),
    ],
})

CORRECT.update({
    "04.ring_update": [
        ("writes only the last min(T, W) tokens, vectorised", lambda rk, rv, l, k, v: _ring_vectorised(rk, rv, l, k, v)),
    ],
    "04.qk_norm_rope": [("written out, rounded back to x's dtype", lambda *a: tuple(t.to(a[0].dtype) for t in _qk(*a)))],
    "04.predict_kv_cache_mib": [("rounded to 3 digits", lambda: (104.0, 576.0))],
    "04.predict_window_reach": [("a float", lambda: 2555.0)],
})


def _ring_vectorised(rk, rv, length, k, v):
    W, T = rk.shape[2], k.shape[2]
    keep = min(T, W)
    slots = torch.arange(length + T - keep, length + T) % W
    rk[:, :, slots], rv[:, :, slots] = k[:, :, T - keep:], v[:, :, T - keep:]
    n = length + T
    idx = torch.arange(max(0, n - W), n) % W
    return rk, rv, rk[:, :, idx], rv[:, :, idx]
