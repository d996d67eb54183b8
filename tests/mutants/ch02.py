import math

import torch

from minigemma.attention import causal_mask, grouped_query_attention

from .ch01 import _own_softmax


def _attend(q, k, v, mask, scale=None):
    s = (q @ k.transpose(-2, -1)) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


def _gqa(q, k, v, mask, softmax=None, mask_rule=lambda q, m: m):
    n = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n, 1), v.repeat_interleave(n, 1)
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    mask = mask_rule(q, mask)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, -1) if softmax is None else _own_softmax(s, softmax)) @ v


def _repeat_into_zeros(x, n):
    """Each kv head copied n times into a fresh buffer of zeros: float32, whatever x's dtype."""
    B, K, S, D = x.shape
    out = torch.zeros(B, K * n, S, D)
    for h in range(K * n):
        out[:, h] = x[:, h // n]
    return out


def _tiled(x, n):  # heads in the order [0, 1, .., K-1, 0, 1, ..]: query head h reads kv head h % K
    return x.repeat(1, n, 1, 1)


MUTANTS = {
    "02.repeat_kv": [
        ("tiled instead of repeated (head h reads h % K)", _tiled),
        ("repeats along the sequence axis", lambda x, n: x.repeat_interleave(n, dim=2).view(x.shape[0], -1, x.shape[2], x.shape[3])),
        ("interleaves the head_dim features", lambda x, n: x.repeat_interleave(n, dim=-1).view(x.shape[0], x.shape[1] * n, x.shape[2], x.shape[3])),
        ("copied into a float32 buffer of zeros (bfloat16 comes back float32)", _repeat_into_zeros),
    ],
    "02.gqa_attention": [
        ("kv heads tiled (h % K) instead of grouped (h // K)",
         lambda q, k, v, m: _attend(q, _tiled(k, q.shape[1] // k.shape[1]), _tiled(v, q.shape[1] // k.shape[1]), m)),
        ("every query head uses kv head 0",
         lambda q, k, v, m: _attend(q, k[:, :1].expand(-1, q.shape[1], -1, -1), v[:, :1].expand(-1, q.shape[1], -1, -1), m)),
        ("scaled by 1/sqrt(K·D)",
         lambda q, k, v, m: _attend(q, k.repeat_interleave(q.shape[1] // k.shape[1], 1),
                                    v.repeat_interleave(q.shape[1] // k.shape[1], 1), m,
                                    scale=1 / math.sqrt(k.shape[1] * q.shape[-1]))),
        ("keys grouped, values tiled",
         lambda q, k, v, m: _attend(q, k.repeat_interleave(q.shape[1] // k.shape[1], 1), _tiled(v, q.shape[1] // k.shape[1]), m)),
        ("every mask assumed causal",
         lambda q, k, v, m: _gqa(q, k, v, m, mask_rule=lambda q, m: None if m is None else causal_mask(*m.shape))),
        ("a T=1 decode step ignores the mask",
         lambda q, k, v, m: _gqa(q, k, v, m, mask_rule=lambda q, m: None if q.shape[2] == 1 else m)),
        ("own softmax without the max (overflows)", lambda q, k, v, m: _gqa(q, k, v, m, softmax="no max")),
        ("one max over the whole batch", lambda q, k, v, m: _gqa(q, k, v, m, softmax="global max")),
        ("streaming softmax, nan while the first keys are masked",
         lambda q, k, v, m: _gqa(q, k, v, m, softmax="streaming")),
        ("computed in float32 and returned in float32 for bfloat16 inputs",
         lambda q, k, v, m: _gqa(q.float(), k.float(), v.float(), m)),
    ],
}

CORRECT = {
    "02.repeat_kv": [
        ("repeat_interleave on the head axis", lambda x, n: x.repeat_interleave(n, dim=1)),
    ],
    "02.gqa_attention": [
        ("repeat_interleave, then attention", lambda q, k, v, m: _gqa(q, k, v, m)),
        ("queries grouped per kv head (no copies of k, v)",
         lambda q, k, v, m: _grouped(q, k, v, m)),
        ("the package's attention run in bfloat16 for bfloat16 inputs", grouped_query_attention),
    ],
}


def _grouped(q, k, v, mask):
    """Right, another way: view q as (B, K, H/K, T, D) so each kv head serves its query group."""
    B, H, T, D = q.shape
    K = k.shape[1]
    s = (q.view(B, K, H // K, T, D) @ k[:, :, None].transpose(-2, -1)) / math.sqrt(D)  # (B, K, H/K, T, S)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, -1) @ v[:, :, None]).reshape(B, H, T, D)


# --------------------------------------------------------------------------------------------
# 02.kv_cache_update and 02.cached_attention
# --------------------------------------------------------------------------------------------
def _update(ck, cv, length, k, v, at=lambda length: length, write_v=True, count=lambda end: end, swap=False):
    T = k.shape[2]
    s = at(length)
    ck[:, :, s:s + T] = k
    if write_v:
        cv[:, :, s:s + T] = v if not swap else k
    return ck, cv, count(length + T)


def _grown(ck, cv, length, k, v):  # concatenates: a longer tensor, the buffer's slots past `length` lost
    return torch.cat([ck[:, :, :length], k], 2), torch.cat([cv[:, :, :length], v], 2), length + k.shape[2]


def _cached(q, k, v, prefill, read=lambda ck, n: ck[:, :, :n], write_first=True, prefill_mask=True,
            decode_mask=None, update=_update, dtype=None):
    B, K, T, D = k.shape
    ck, cv = k.new_zeros(B, K, T, D, dtype=dtype), v.new_zeros(B, K, T, D, dtype=dtype)
    ck, cv, n = update(ck, cv, 0, k[:, :, :prefill], v[:, :, :prefill])
    m = causal_mask(prefill) if prefill_mask else None
    outs = [_gqa(q[:, :, :prefill], read(ck, n), read(cv, n), m)]
    for t in range(prefill, T):
        if write_first:
            ck, cv, n = update(ck, cv, n, k[:, :, t:t + 1], v[:, :, t:t + 1])
            outs.append(_gqa(q[:, :, t:t + 1], read(ck, n), read(cv, n), decode_mask))
        else:  # attends, then writes: the new token never sees itself
            outs.append(_gqa(q[:, :, t:t + 1], read(ck, n), read(cv, n), decode_mask))
            ck, cv, n = update(ck, cv, n, k[:, :, t:t + 1], v[:, :, t:t + 1])
    return torch.cat(outs, dim=2)


MUTANTS.update({
    "02.kv_cache_update": [
        ("new buffers (clone, then write): the caller's cache is never written",
         lambda ck, cv, l, k, v: _update(ck.clone(), cv.clone(), l, k, v)),
        ("writes at slot 0 every time (length ignored)", lambda ck, cv, l, k, v: _update(ck, cv, l, k, v, at=lambda l: 0)),
        ("writes one slot too far", lambda ck, cv, l, k, v: _update(ck, cv, l, k, v, at=lambda l: l + 1)),
        ("writes the keys only", lambda ck, cv, l, k, v: _update(ck, cv, l, k, v, write_v=False)),
        ("writes the keys into the value buffer too", lambda ck, cv, l, k, v: _update(ck, cv, l, k, v, swap=True)),
        ("returns the old length", lambda ck, cv, l, k, v: _update(ck, cv, l, k, v, count=lambda e: e - k.shape[2])),
        ("returns the length as a tensor", lambda ck, cv, l, k, v: _update(ck, cv, l, k, v, count=lambda e: torch.tensor(e))),
        ("grows by concatenation instead of writing into the buffer", _grown),
    ],
    "02.cached_attention": [
        ("decode steps read the whole buffer, zeros past n included",
         lambda q, k, v, p: _cached(q, k, v, p, read=lambda c, n: c)),
        ("attends before writing: a decode step misses its own key",
         lambda q, k, v, p: _cached(q, k, v, p, write_first=False)),
        ("no causal mask in the prefill", lambda q, k, v, p: _cached(q, k, v, p, prefill_mask=False)),
        ("decode steps attend only the newest key",
         lambda q, k, v, p: _cached(q, k, v, p, read=lambda c, n: c[:, :, n - 1:n] if n > 0 else c[:, :, :0])),
        ("buffers allocated as float32 zeros, not in k's dtype",
         lambda q, k, v, p: _cached(q, k, v, p, dtype=torch.float32)),
    ],
})

CORRECT.update({
    "02.kv_cache_update": [
        ("index_copy_ into the buffers", lambda ck, cv, l, k, v: (
            ck.index_copy_(2, torch.arange(l, l + k.shape[2]), k), cv.index_copy_(2, torch.arange(l, l + k.shape[2]), v),
            l + k.shape[2])),
    ],
    "02.cached_attention": [
        ("every token one at a time (the prefill as steps too)", lambda q, k, v, p: _cached(q, k, v, 1)),
        ("decode steps with an explicit all-True mask",
         lambda q, k, v, p: _cached(q, k, v, p, decode_mask=torch.ones(1, 1, dtype=torch.bool))),
    ],
})
