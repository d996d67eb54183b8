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
