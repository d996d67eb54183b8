import torch

NEG_INF = float("-inf")


def _top_k(logits, k, strict=False, fill=NEG_INF, largest=True, minus_one=False):
    if k >= logits.shape[-1]:
        return logits
    kk = k - 1 if minus_one and k > 1 else k
    kth = torch.topk(logits, kk, dim=-1, largest=largest).values[..., -1:]
    drop = (logits <= kth) if strict else (logits < kth) if largest else (logits > kth)
    if strict:
        drop = drop & (logits != logits.amax(-1, keepdim=True))
    return logits.masked_fill(drop, fill)


def _top_p(logits, p, inclusive=False, descending=True, unsort=True, strict=False, float32=True):
    s, order = torch.sort(logits, dim=-1, descending=descending)
    probs = torch.softmax(s.float() if float32 else s, dim=-1)
    mass = probs.cumsum(-1) if inclusive else probs.cumsum(-1) - probs
    drop = (mass > p) if strict else (mass >= p)
    if unsort:
        drop = drop.scatter(-1, order, drop)
    return logits.masked_fill(drop, NEG_INF)


def _top_p_unsorted(logits, p):
    probs = torch.softmax(logits.float(), -1)
    return logits.masked_fill(probs.cumsum(-1) - probs >= p, NEG_INF)  # cumulative mass in vocabulary order


MUTANTS = {
    "06.top_k_filter": [
        ("k-th value dropped too (strict >)", lambda l, k: _top_k(l, k, strict=True)),
        ("fills with 0 instead of -inf", lambda l, k: _top_k(l, k, fill=0.0)),
        ("keeps the k smallest", lambda l, k: _top_k(l, k, largest=False)),
        ("keeps k - 1 (off by one)", lambda l, k: _top_k(l, k, minus_one=True)),
        ("returns float32 probabilities' logits (dtype lost)", lambda l, k: _top_k(l.float(), k)),
    ],
    "06.top_p_filter": [
        ("counts the token's own probability (drops the token that crosses p)", lambda l, p: _top_p(l, p, inclusive=True)),
        ("sorted ascending", lambda l, p: _top_p(l, p, descending=False)),
        ("returns the mask in sorted order", lambda l, p: _top_p(l, p, unsort=False)),
        ("keeps a token whose preceding mass equals p (> instead of >=)", lambda l, p: _top_p(l, p, strict=True)),
        ("cumulative mass in vocabulary order, not sorted", _top_p_unsorted),
        ("filters a float32 copy: bf16 logits come back float32", lambda l, p: _top_p(l.float(), p)),
        ("softmax in the logits' dtype (bfloat16), not float32", lambda l, p: _top_p(l, p, float32=False)),
    ],
}


# --------------------------------------------------------------------------------------------
# 06.left_pad and 06.capstone
# --------------------------------------------------------------------------------------------
def _pad(prompts, pad_id, side="left", mask_rule="lengths", positions="count", mask_dtype=torch.bool):
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.bool)
    for i, p in enumerate(prompts):
        cols = slice(L - len(p), L) if side == "left" else slice(0, len(p))
        ids[i, cols] = torch.tensor(p, dtype=torch.long)
        mask[i, cols] = True
    if mask_rule == "ids != pad_id":
        mask = ids != pad_id
    if positions == "count":
        pos = torch.where(mask, mask.long().cumsum(-1) - 1, 0)
    elif positions == "0..L-1":
        pos = torch.arange(L).expand(len(prompts), L).clone()
    elif positions == "pads included":
        pos = torch.arange(L) - (L - mask.sum(-1, keepdim=True))
    elif positions == "pads at -1":
        pos = torch.where(mask, mask.long().cumsum(-1) - 1, -1)
    else:  # "from 1"
        pos = torch.where(mask, mask.long().cumsum(-1), 0)
    return ids, mask.to(mask_dtype), pos


MUTANTS.update({
    "06.left_pad": [
        ("padded on the right", lambda p, pad: _pad(p, pad, side="right")),
        ("mask from ids != pad_id", lambda p, pad: _pad(p, pad, mask_rule="ids != pad_id")),
        ("positions 0..L-1 in every row (padding ignored)", lambda p, pad: _pad(p, pad, positions="0..L-1")),
        ("positions count the pads (negative at pads)", lambda p, pad: _pad(p, pad, positions="pads included")),
        ("pads at position -1", lambda p, pad: _pad(p, pad, positions="pads at -1")),
        ("positions start at 1", lambda p, pad: _pad(p, pad, positions="from 1")),
        ("the mask as 0/1 integers", lambda p, pad: _pad(p, pad, mask_dtype=torch.long)),
    ],
})

CORRECT = {
    "06.left_pad": [("as written in the statement", _pad)],
}


# The capstone: the exercises' answers (written as a learner would), and two of them broken
import math  # noqa: E402

from minigemma.learner import YourGemma  # noqa: E402


def _rms_norm(x, weight, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())).to(x.dtype)


def _rope(x, positions, base, interleaved=False):
    D = x.shape[-1]
    theta = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    angle = positions.float()[:, None] * theta
    cos, sin = angle.cos(), angle.sin()
    if interleaved:  # pairs (2i, 2i+1): RoFormer's layout, not Gemma's
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _gqa_attention(q, k, v, mask):
    n = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n, 1), v.repeat_interleave(n, 1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _geglu(x, w_gate, w_up, w_down):
    return (F_gelu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def F_gelu(g):
    return 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g ** 3)))


def _layer_mask(T, layer_idx, window, every):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    mask = j <= i
    if (layer_idx + 1) % every != 0:
        mask &= j > i - window
    return mask


def _kv_cache_update(cache_k, cache_v, length, k, v, at=None):
    end = length + k.shape[2]
    start = length if at is None else at
    cache_k[:, :, start:start + k.shape[2]] = k
    cache_v[:, :, start:start + k.shape[2]] = v
    return cache_k, cache_v, end


YOUR_ANSWERS = dict(rms_norm=_rms_norm, rope=_rope, gqa_attention=_gqa_attention, geglu=_geglu,
                    layer_mask=_layer_mask, kv_cache_update=_kv_cache_update)
CAPSTONE_BROKEN = {  # the function each capstone mutant breaks, for tests/test_learner_hook.py
    "interleaved RoPE (pairs 2i, 2i+1)": ("rope", lambda x, p, b: _rope(x, p, b, interleaved=True)),
    "a KV cache that writes at slot 0 (length ignored)":
        ("kv_cache_update", lambda ck, cv, n, k, v: _kv_cache_update(ck, cv, n, k, v, at=0)),
    "a local band of window + 1 keys (j >= i - window)":
        ("layer_mask", lambda T, l, W, e: _layer_mask(T, l, W + 1, e)),
    "RoPE's positions rounded to bfloat16 (exact only up to 256)":
        ("rope", lambda x, p, b: _rope(x, p.bfloat16().float(), b)),
}

MUTANTS["06.capstone"] = [(label, YourGemma(**{**YOUR_ANSWERS, name: fn}))
                          for label, (name, fn) in CAPSTONE_BROKEN.items()]
CORRECT["06.capstone"] = [("the exercises' answers, written out", YourGemma(**YOUR_ANSWERS))]
