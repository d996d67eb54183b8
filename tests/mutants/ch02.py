import math

import torch

from minigemma.attention import causal_mask

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


def _tiled(x, n):  # heads in the order [0, 1, .., K-1, 0, 1, ..]: query head h reads kv head h % K
    return x.repeat(1, n, 1, 1)


MUTANTS = {
    "02.repeat_kv": [
        ("tiled instead of repeated (head h reads h % K)", _tiled),
        ("repeats along the sequence axis", lambda x, n: x.repeat_interleave(n, dim=2).view(x.shape[0], -1, x.shape[2], x.shape[3])),
        ("interleaves the head_dim features", lambda x, n: x.repeat_interleave(n, dim=-1).view(x.shape[0], x.shape[1] * n, x.shape[2], x.shape[3])),
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
