import math

import torch
import torch.nn.functional as F

from minigemma.attention import causal_mask, merge_heads, scaled_dot_product_attention, split_heads

from . import fresh


def _attn(q, k, v, mask, scale=None, fill=float("-inf"), dim=-1):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    return torch.softmax(s.masked_fill(~mask, fill), dim=dim) @ v


def _own_softmax(s, how):
    if how == "no max":  # exp of scores in the hundreds overflows: inf / inf
        e = s.exp()
        return e / e.sum(-1, keepdim=True)
    if how == "global max":  # one max for the whole batch: rows far below it underflow to 0 / 0
        e = (s - s.amax()).exp()
        return e / e.sum(-1, keepdim=True)
    # "streaming": flash-attention's running max from -inf, unguarded: nan while keys are masked
    m = torch.full_like(s[..., 0], float("-inf"))
    d = torch.zeros_like(m)
    for j in range(s.shape[-1]):
        m_new = torch.maximum(m, s[..., j])
        d = d * (m - m_new).exp() + (s[..., j] - m_new).exp()
        m = m_new
    return (s - m[..., None]).exp() / d[..., None]


def _attn_own_softmax(q, k, v, mask, how):
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return _own_softmax(s.masked_fill(~mask, float("-inf")), how) @ v


def _attn_decode_unmasked(q, k, v, mask):  # "a single new token may see the whole cache"
    return _attn(q, k, v, torch.ones_like(mask) if q.shape[-2] == 1 else mask)


def _attn_assumes_causal(q, k, v, mask):
    return _attn(q, k, v, causal_mask(q.shape[-2], k.shape[-2]))


def _rope_interleaved(x, pos, base):
    D = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, D, 2).float() / D)
    ang = pos.float()[:, None] * inv  # (T, D/2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1)
    return out.flatten(-2)


def _rope_split(x, pos, base, exponent_den=None, sign=1.0, angle_dtype=None, pos_dtype=torch.float32):
    D = x.shape[-1]
    den = D if exponent_den is None else exponent_den
    inv = 1.0 / base ** (torch.arange(0, D, 2).float() / den)
    ang = torch.cat([pos.to(pos_dtype)[:, None] * inv] * 2, -1)
    if angle_dtype is not None:
        ang = ang.to(angle_dtype)
    x1, x2 = x.chunk(2, -1)
    rot = torch.cat([-x2, x1], -1)
    return x * ang.cos() + sign * rot * ang.sin()


def _rope_cached_on_shape():
    """Angles cached on (T, D), the first positions and base they saw kept for good."""
    cache = {}

    def rope(x, pos, base):
        key = (x.shape[-2], x.shape[-1])
        if key not in cache:
            cache[key] = (pos.clone(), base)
        return _rope_split(x, *cache[key])
    return rope


def _rope_theta_variants(x, pos, base, how):
    """Right answers that compute θ another way in float32 (it may differ in its last bit)."""
    D = x.shape[-1]
    i2 = torch.arange(0, D, 2, dtype=torch.float32)
    theta = {"neg power": lambda: base ** (-i2 / D),
             "exp log": lambda: torch.exp(-math.log(base) * i2 / D),
             "float64 then float32": lambda: (1.0 / base ** (i2.double() / D)).float()}[how]()
    ang = pos.float()[:, None] * theta
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1).to(x.dtype)


def _rope_rotate_pairs_complex(x, pos, base):
    """Right, another way: the halves as the real and imaginary parts of complex numbers."""
    D = x.shape[-1]
    ang = pos.float()[:, None] * (1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    z = torch.complex(x[..., : D // 2].float(), x[..., D // 2:].float()) * torch.polar(torch.ones_like(ang), ang)
    return torch.cat([z.real, z.imag], -1).to(x.dtype)


def _split_into_zeros(x, H):
    """Each head's features copied into a fresh buffer of zeros: float32, whatever x's dtype."""
    B, T, C = x.shape
    D = C // H
    out = torch.zeros(B, H, T, D)
    for h in range(H):
        out[:, h] = x[..., h * D:(h + 1) * D]
    return out


def _merge_into_zeros(x):
    B, H, T, D = x.shape
    out = torch.zeros(B, T, H * D)
    for h in range(H):
        out[..., h * D:(h + 1) * D] = x[:, h]
    return out


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
        ("own softmax without the max (overflows)", lambda q, k, v, m: _attn_own_softmax(q, k, v, m, "no max")),
        ("one max over the whole batch", lambda q, k, v, m: _attn_own_softmax(q, k, v, m, "global max")),
        ("streaming softmax, nan while the first keys are masked",
         lambda q, k, v, m: _attn_own_softmax(q, k, v, m, "streaming")),
        ("a T=1 decode step ignores the mask", _attn_decode_unmasked),
        ("every mask assumed causal", _attn_assumes_causal),
        ("computed in float32 and returned in float32 for bfloat16 inputs",
         lambda q, k, v, m: _attn(q.float(), k.float(), v.float(), m)),
    ],
    "01.split_heads": [
        ("heads split in the wrong order", lambda x, H: x.reshape(x.shape[0], H, x.shape[1], -1)),
        ("interleaved heads", lambda x, H: x.reshape(x.shape[0], x.shape[1], -1, H).permute(0, 3, 1, 2)),
        ("copied into a float32 buffer of zeros (bfloat16 comes back float32)", _split_into_zeros),
    ],
    "01.merge_heads": [
        ("merged without the transpose", lambda x: x.reshape(x.shape[0], x.shape[2], -1)),
        ("heads merged in the wrong order", lambda x: x.permute(0, 2, 3, 1).reshape(x.shape[0], x.shape[2], -1)),
        ("copied into a float32 buffer of zeros (bfloat16 comes back float32)", _merge_into_zeros),
    ],
    "01.rope": [
        ("interleaved (GPT-J) convention", _rope_interleaved),
        ("frequencies with d/2 in the exponent", lambda x, p, b: _rope_split(x, p, b, exponent_den=x.shape[-1] // 2)),
        ("rotation in the wrong direction", lambda x, p, b: _rope_split(x, p, b, sign=-1.0)),
        ("positions ignored (all at 0)", lambda x, p, b: x),
        ("positions assumed contiguous from the first",
         lambda x, p, b: _rope_split(x, p[0] + torch.arange(len(p)), b)),
        ("positions assumed 0..T-1", lambda x, p, b: _rope_split(x, torch.arange(len(p)), b)),
        ("base ignored (10000)", lambda x, p, b: _rope_split(x, p, 10_000.0)),
        ("angles cached on (T, D)", fresh(_rope_cached_on_shape)),
        ("angles in x's dtype", lambda x, p, b: _rope_split(x, p, b, angle_dtype=x.dtype)),
        ("positions in x's dtype", lambda x, p, b: _rope_split(x, p, b, pos_dtype=x.dtype)),
        ("positions in float16", lambda x, p, b: _rope_split(x, p, b, pos_dtype=torch.float16)),
        ("float32 result for a bfloat16 x (not rounded back to x's dtype)", lambda x, p, b: _rope_split(x, p, b)),
    ],
}

CORRECT = {
    "01.masked_attention": [
        ("masked_fill with -1e9", lambda q, k, v, m: _attn(q, k, v, m, fill=-1e9)),
        ("torch's scaled_dot_product_attention", lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)),
        ("computed in float64, returned in q's dtype",
         lambda q, k, v, m: _attn(q.double(), k.double(), v.double(), m).to(q.dtype)),
        ("the package's attention run in bfloat16 for bfloat16 inputs", scaled_dot_product_attention),
    ],
    "01.rope": [
        ("the statement's formula, rounded back to x's dtype", lambda x, p, b: _rope_split(x, p, b).to(x.dtype)),
        ("complex multiplication", _rope_rotate_pairs_complex),
        ("θ = base ** (-2i/D)", lambda x, p, b: _rope_theta_variants(x, p, b, "neg power")),
        ("θ = exp(-2i/D · ln base)", lambda x, p, b: _rope_theta_variants(x, p, b, "exp log")),
        ("θ in float64, rounded to float32", lambda x, p, b: _rope_theta_variants(x, p, b, "float64 then float32")),
    ],
}
