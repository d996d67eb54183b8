import torch


# --- 10.mean_pool ------------------------------------------------------------------------------
def _pool(h, mask, count=lambda m: m.sum(1).clamp(min=1.0), weights=lambda m: m):
    m = mask.float()[..., None]  # (B, T, 1)
    return (h * weights(m)).sum(1) / count(m)


def _drop_first(m):
    m = m.clone()
    m[:, 0] = 0
    return m


def _last_real(h, mask):
    idx = (mask.long() * torch.arange(1, mask.shape[1] + 1)).argmax(1)  # the last real column of each row
    return h[torch.arange(h.shape[0]), idx]


def _max_real(h, mask):
    out = h.masked_fill(~mask.bool()[..., None], float("-inf")).amax(1)
    return torch.where(torch.isinf(out), torch.zeros_like(out), out)


# --- 10.mrl_truncate ---------------------------------------------------------------------------
def _unit(x, dim=-1):
    return x / x.norm(dim=dim, keepdim=True)


# --- 10.encoder_mask ---------------------------------------------------------------------------
def _band(mask, W, inside=lambda d, W: d <= W // 2, docs="alone", causal=False):
    T = mask.shape[1]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    real = mask.bool()
    if docs == "alone":  # the right rule: real with real, and each pad with itself
        m = (real[:, :, None] & real[:, None, :]) | (i == j)
    elif docs == "keys only":  # HF's padding mask: pads hidden as keys, pad queries see real keys
        m = real[:, None, :].expand(-1, T, -1)
    elif docs == "real only":  # pad rows empty
        m = real[:, :, None] & real[:, None, :]
    else:  # padding ignored
        m = torch.ones(mask.shape[0], T, T, dtype=torch.bool)
    if W is not None:
        m = m & inside((i - j).abs(), W)
    if causal:
        m = m & (j <= i)
    return m


MUTANTS = {
    "10.mean_pool": [
        ("mean over every token, pads included", lambda h, m: h.mean(1)),
        ("masked sum, not mean", lambda h, m: _pool(h, m, count=lambda m: torch.ones(m.shape[0], 1))),
        ("masked sum divided by T", lambda h, m: _pool(h, m, count=lambda m: torch.full((m.shape[0], 1), float(m.shape[1])))),
        ("sum of pads and real tokens over the real count", lambda h, m: _pool(h, m, weights=lambda m: torch.ones_like(m))),
        ("first token (BOS) left out", lambda h, m: _pool(h, _drop_first(m))),
        ("no clamp: an empty row is NaN", lambda h, m: _pool(h, m, count=lambda m: m.sum(1))),
        ("divides by the real tokens of the whole batch", lambda h, m: _pool(h, m, count=lambda m: m.sum().clamp(min=1.0))),
        ("last real token (last-token pooling)", _last_real),
        ("the mean in the hidden states' dtype: bfloat16 for a bfloat16 model", lambda h, m: (
            h * m.to(h.dtype)[..., None]).sum(1) / m.to(h.dtype).sum(1, keepdim=True).clamp(min=1.0)),
        ("max over real tokens", _max_real),
    ],
    "10.mrl_truncate": [
        ("no renormalisation", lambda e, d: e[:, :d]),
        ("normalise, then truncate", lambda e, d: _unit(e)[:, :d]),
        ("the last dim numbers", lambda e, d: _unit(e[:, -d:])),
        ("normalised over the batch axis", lambda e, d: _unit(e[:, :d], dim=0)),
        ("one column short", lambda e, d: _unit(e[:, :d - 1])),
        ("rescaled by sqrt(E / dim) instead of renormalised", lambda e, d: e[:, :d] * (e.shape[1] / d) ** 0.5),
        ("L1 normalisation", lambda e, d: e[:, :d] / e[:, :d].abs().sum(-1, keepdim=True)),
        ("divided by the full vector's norm", lambda e, d: e[:, :d] / e.norm(dim=-1, keepdim=True)),
    ],
    "10.encoder_mask": [
        ("|i - j| < W // 2 (one key short on each side)", lambda m, W: _band(m, W, inside=lambda d, W: d < W // 2)),
        ("|i - j| <= W // 2 + 1", lambda m, W: _band(m, W, inside=lambda d, W: d <= W // 2 + 1)),
        ("|i - j| <= W (the whole window on each side)", lambda m, W: _band(m, W, inside=lambda d, W: d <= W)),
        ("|i - j| < W (a decoder's W keys, mirrored)", lambda m, W: _band(m, W, inside=lambda d, W: d < W)),
        ("W / 2 rounded up", lambda m, W: _band(m, W, inside=lambda d, W: d <= (W + 1) // 2)),
        ("causal (a decoder's band)", lambda m, W: _band(m, W, causal=True)),
        ("padding ignored", lambda m, W: _band(m, W, docs="none")),
        ("pads hidden as keys only (pad queries see the text)", lambda m, W: _band(m, W, docs="keys only")),
        ("no band while the text fits in W tokens (the band taken as W keys in all)",
         lambda m, W: _band(m, None if W is not None and m.shape[1] <= W else W)),
        ("pad rows empty (a pad does not see itself)", lambda m, W: _band(m, W, docs="real only")),
        ("a band on global layers too (W = T)", lambda m, W: _band(m, W if W is not None else m.shape[1] // 2)),
    ],
}

CORRECT = {
    "10.mean_pool": [
        ("a loop over rows", lambda h, m: torch.stack([h[b, m[b].bool()].float().mean(0) if m[b].any() else torch.zeros(h.shape[2])
                                                       for b in range(h.shape[0])])),
        ("einsum in float64", lambda h, m: (torch.einsum("btc,bt->bc", h.double(), m.double())
                                            / m.double().sum(1, keepdim=True).clamp(min=1e-9)).float()),
    ],
    "10.mrl_truncate": [
        ("torch.nn.functional.normalize", lambda e, d: torch.nn.functional.normalize(e[:, :d], dim=1)),
    ],
    "10.encoder_mask": [
        ("documents as ids", lambda m, W: (lambda doc: (doc[:, :, None] == doc[:, None, :]) & (
            True if W is None else ((torch.arange(m.shape[1])[:, None] - torch.arange(m.shape[1])[None, :]).abs()
                                    < W // 2 + 1)))(torch.where(m.bool(), 0, torch.arange(1, m.shape[1] + 1)))),
    ],
}


# --- 10.capstone: the exercises' answers (written as a learner would), and each of them broken ----------
from minigemma.learner_encoder import YourEmbeddingGemma  # noqa: E402


def _your_mean_pool(hidden, attention_mask, pads_too=False):
    if pads_too:
        return hidden.float().mean(1)
    m = attention_mask.float()[..., None]
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)


def _your_mrl_truncate(embeddings, dim, renormalise=True):
    e = embeddings[:, :dim]
    return e / e.norm(dim=-1, keepdim=True) if renormalise else e


def _your_encoder_mask(attention_mask, sliding_window, causal=False, half=True, inclusive=True):
    T = attention_mask.shape[1]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    real = attention_mask.bool()
    mask = (real[:, :, None] & real[:, None, :]) | (i == j)
    if sliding_window is not None:
        reach = sliding_window // 2 if half else sliding_window
        mask = mask & ((i - j).abs() <= reach if inclusive else (i - j).abs() < reach)
    if causal:
        mask = mask & (j <= i)
    return mask


YOUR_ANSWERS = dict(mean_pool=_your_mean_pool, mrl_truncate=_your_mrl_truncate, encoder_mask=_your_encoder_mask)
CAPSTONE_BROKEN = {  # the function each capstone mutant breaks, for tests/test_learner_encoder.py
    "the mean over the pads too": ("mean_pool", lambda h, m: _your_mean_pool(h, m, pads_too=True)),
    "the prefix not normalised again": ("mrl_truncate", lambda e, d: _your_mrl_truncate(e, d, renormalise=False)),
    "a causal mask (a decoder's)": ("encoder_mask", lambda m, W: _your_encoder_mask(m, W, causal=True)),
    "a band of the whole window on each side (|i - j| <= W)":
        ("encoder_mask", lambda m, W: _your_encoder_mask(m, W, half=False)),
    "a band one key short on each side (|i - j| < W // 2): the smallest error, 3e-4 on the long document":
        ("encoder_mask", lambda m, W: _your_encoder_mask(m, W, inclusive=False)),
}

MUTANTS["10.capstone"] = [(label, YourEmbeddingGemma(**{**YOUR_ANSWERS, name: fn}))
                          for label, (name, fn) in CAPSTONE_BROKEN.items()]
CORRECT["10.capstone"] = [("the exercises' answers, written out", YourEmbeddingGemma(**YOUR_ANSWERS))]
