import math

import torch


def _attend(q, k, v, mask, scale=None):
    s = (q @ k.transpose(-2, -1)) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


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
    ],
}
