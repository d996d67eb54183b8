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
    ],
}
