import math

import torch

from minigemma.attention import causal_mask, merge_heads, split_heads


def _attn(q, k, v, mask, scale=None, fill=float("-inf"), dim=-1):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    return torch.softmax(s.masked_fill(~mask, fill), dim=dim) @ v


def _rope_interleaved(x, pos, base):
    D = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, D, 2).float() / D)
    ang = pos.float()[:, None] * inv  # (T, D/2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1)
    return out.flatten(-2)


def _rope_split(x, pos, base, exponent_den=None, sign=1.0):
    D = x.shape[-1]
    den = D if exponent_den is None else exponent_den
    inv = 1.0 / base ** (torch.arange(0, D, 2).float() / den)
    ang = torch.cat([pos.float()[:, None] * inv] * 2, -1)
    x1, x2 = x.chunk(2, -1)
    rot = torch.cat([-x2, x1], -1)
    return x * ang.cos() + sign * rot * ang.sin()


MUTANTS = {
    "01.causal_mask": [
        ("strict: a query cannot see itself", lambda T: torch.ones(T, T).tril(-1).bool()),
        ("upper triangle (sees the future)", lambda T: torch.ones(T, T).triu().bool()),
        ("float mask, not boolean", lambda T: torch.ones(T, T).tril()),
    ],
    "01.masked_attention": [
        ("missing 1/sqrt(d) scale", lambda q, k, v, m: _attn(q, k, v, m, scale=1.0)),
        ("1/d instead of 1/sqrt(d)", lambda q, k, v, m: _attn(q, k, v, m, scale=1 / q.shape[-1])),
        ("mask ignored", lambda q, k, v, m: _attn(q, k, v, torch.ones_like(m))),
        # rows left with no visible key keep their own mask, so the mutant stays finite
        ("mask inverted", lambda q, k, v, m: _attn(q, k, v, ~m | m.all(-1, keepdim=True))),
        ("softmax over queries", lambda q, k, v, m: _attn(q, k, v, m, dim=-2)),
        ("masked by zeroing weights after softmax",
         lambda q, k, v, m: (torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]), -1) * m) @ v),
    ],
    "01.split_heads": [
        ("heads split in the wrong order", lambda x, H: x.reshape(x.shape[0], H, x.shape[1], -1)),
        ("interleaved heads", lambda x, H: x.reshape(x.shape[0], x.shape[1], -1, H).permute(0, 3, 1, 2)),
    ],
    "01.merge_heads": [
        ("merged without the transpose", lambda x: x.reshape(x.shape[0], x.shape[2], -1)),
        ("heads merged in the wrong order", lambda x: x.permute(0, 2, 3, 1).reshape(x.shape[0], x.shape[2], -1)),
    ],
    "01.rope": [
        ("interleaved (GPT-J) convention", _rope_interleaved),
        ("frequencies with d/2 in the exponent", lambda x, p, b: _rope_split(x, p, b, exponent_den=x.shape[-1] // 2)),
        ("rotation in the wrong direction", lambda x, p, b: _rope_split(x, p, b, sign=-1.0)),
        ("positions ignored (all at 0)", lambda x, p, b: x),
    ],
}
