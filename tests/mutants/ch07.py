import math

import torch
import torch.nn.functional as F


def _rglru(x, r, i, lam, h_prev, reset, c=8.0, norm="sqrt", a_form="power", reset_a=True, reset_mult=True,
           lam_sign=1.0):
    sig = torch.sigmoid(lam_sign * lam)
    a = {"power": lambda: sig ** (c * r), "product": lambda: sig * c * r,
         "precedence": lambda: sig ** c * r}[a_form]()
    mult = {"sqrt": torch.sqrt(1 - a ** 2), "none": torch.ones_like(a), "linear": 1 - a}[norm]
    if reset_a:
        a = torch.where(reset[:, None], torch.zeros_like(a), a)
    if reset_mult:
        mult = torch.where(reset[:, None], torch.ones_like(mult), mult)
    return a * h_prev + mult * i * x


def _scan(a, b, h0, combine_order="right", rounds_short=False, exclusive=False, h0_everywhere=False):
    B, T, D = a.shape
    if h0 is not None:
        if h0_everywhere:
            b = b + h0[:, None]
        else:
            b = torch.cat([b[:, :1] + a[:, :1] * h0[:, None], b[:, 1:]], 1)
    d, limit = 1, (T // 2 if rounds_short else T)
    while d < limit:
        a1, b1, a2, b2 = a[:, :-d], b[:, :-d], a[:, d:], b[:, d:]
        if combine_order == "right":
            na, nb = a2 * a1, a2 * b1 + b2
        else:  # the operands swapped
            na, nb = a1 * a2, a1 * b2 + b1
        a, b = torch.cat([a[:, :d], na], 1), torch.cat([b[:, :d], nb], 1)
        d *= 2
    if exclusive:
        start = torch.zeros_like(b[:, :1]) if h0 is None else h0[:, None]
        b = torch.cat([start, b[:, :-1]], 1)
    return b, b[:, -1]


def _scan_fixed_rounds(a, b, h0, rounds=4):
    """Hillis-Steele with a fixed number of rounds: each state sees only the last 2^rounds steps."""
    B, T, D = a.shape
    if h0 is not None:
        b = torch.cat([b[:, :1] + a[:, :1] * h0[:, None], b[:, 1:]], 1)
    for r in range(rounds):
        d = 2 ** r
        if d >= T:
            break
        a, b = torch.cat([a[:, :d], a[:, d:] * a[:, :-d]], 1), torch.cat([b[:, :d], a[:, d:] * b[:, :-d] + b[:, d:]], 1)
    return b, b[:, -1]


def _scan_log_space(a, b, h0):
    """h_t = A_t (h0 + Σ_s b_s / A_s) with A_t = exp(Σ log a): nan for a zero or a negative a."""
    logA = torch.cumsum(torch.log(a), 1)
    A = logA.exp()
    h = A * ((0 if h0 is None else h0[:, None]) + torch.cumsum(b / A, 1))
    return h, h[:, -1]


def _scan_cumprod(a, b, h0):
    """The same closed form with cumprod: dividing by a product that underflows (or hits 0)."""
    A = torch.cumprod(a, 1)
    h = A * ((0 if h0 is None else h0[:, None]) + torch.cumsum(b / A, 1))
    return h, h[:, -1]


def _scan_sequential(a, b, h0, clamp=False):
    """Right, another way (a loop over time; the statement asks for rounds, but the values agree)."""
    if clamp:  # "a is a decay": clamped to [0, 1]
        a = a.clamp(0, 1)
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    hs = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        hs.append(h)
    return torch.stack(hs, 1), h


def _conv(x, w, bias, x_prev, flip=False, use_bias=True, use_cache=True, tail="ok"):
    B, T, D = x.shape
    W = w.shape[0]
    prev = x_prev if use_cache else torch.zeros_like(x_prev)
    xs = torch.cat([prev, x], 1)
    y = bias.expand(B, T, D).clone() if use_bias else torch.zeros(B, T, D)
    for s in range(W):
        k = w[s] if flip else w[W - 1 - s]
        y = y + k * xs[:, W - 1 - s: W - 1 - s + T]
    new = {"ok": xs[:, T:], "negative slice": xs[:, -(W - 1):], "stale": x_prev, "first": xs[:, :W - 1]}[tail]
    return y, new


MUTANTS = {
    "07.rglru_step": [
        ("no sqrt(1 - a²) normalisation", lambda *a: _rglru(*a, norm="none")),
        ("(1 - a) instead of sqrt(1 - a²)", lambda *a: _rglru(*a, norm="linear")),
        ("a = sigmoid(Λ)·c·r instead of a power", lambda *a: _rglru(*a, a_form="product")),
        ("c = 1 instead of 8", lambda *a: _rglru(*a, c=1.0)),
        ("state not reset (a kept at a document start)", lambda *a: _rglru(*a, reset_a=False)),
        ("reset forgets h but still scales the input", lambda *a: _rglru(*a, reset_mult=False)),
        ("sigmoid(-Λ) (the a_param sign slip)", lambda *a: _rglru(*a, lam_sign=-1.0)),
        ("a = σ(Λ)^8 · r (operator precedence)", lambda *a: _rglru(*a, a_form="precedence")),
    ],
    "07.associative_combine": [
        ("operands swapped: (a1·a2, a1·b2 + b1)", lambda e1, e2: (e1[0] * e2[0], e1[0] * e2[1] + e1[1])),
        ("b parts added: (a2·a1, b1 + b2)", lambda e1, e2: (e2[0] * e1[0], e1[1] + e2[1])),
        ("a2 applied to b2 too: (a2·a1, a2·(b1 + b2))", lambda e1, e2: (e2[0] * e1[0], e2[0] * (e1[1] + e2[1]))),
        ("a multiplied in log space", lambda e1, e2: ((e1[0].log() + e2[0].log()).exp(), e2[0] * e1[1] + e2[1])),
        ("a taken as a magnitude", lambda e1, e2: (e2[0].abs() * e1[0].abs(), e2[0].abs() * e1[1] + e2[1])),
        ("computed in float32 and returned in float32 for bfloat16 pairs",
         lambda e1, e2: (e2[0].float() * e1[0].float(), e2[0].float() * e1[1].float() + e2[1].float())),
    ],
    "07.associative_scan": [
        ("operator applied in the wrong order", lambda a, b, h0: _scan(a, b, h0, combine_order="left")),
        ("stops after log2(T) - 1 rounds", lambda a, b, h0: _scan(a, b, h0, rounds_short=True)),
        ("exclusive scan (h_{t-1} instead of h_t)", lambda a, b, h0: _scan(a, b, h0, exclusive=True)),
        ("h0 ignored", lambda a, b, h0: _scan(a, b, None)),
        ("h0 added to every b", lambda a, b, h0: _scan(a, b, h0, h0_everywhere=True)),
        ("a fixed 4 rounds (remembers 16 steps)", _scan_fixed_rounds),
        ("closed form in log space", _scan_log_space),
        ("closed form with cumprod", _scan_cumprod),
        ("a clamped to [0, 1] (assumed a decay)", lambda a, b, h0: _scan_sequential(a, b, h0, clamp=True)),
    ],
    "07.conv1d_with_cache": [
        ("kernel flipped (w[s] on x_{t-s})", lambda x, w, b, p: _conv(x, w, b, p, flip=True)),
        ("bias forgotten", lambda x, w, b, p: _conv(x, w, b, p, use_bias=False)),
        ("cache ignored (zeros before every chunk)", lambda x, w, b, p: _conv(x, w, b, p, use_cache=False)),
        ("cache never updated", lambda x, w, b, p: _conv(x, w, b, p, tail="stale")),
        ("oldest inputs kept as the cache", lambda x, w, b, p: _conv(x, w, b, p, tail="first")),
        ("new cache as xs[:, -(W-1):] (all of xs when W = 1)", lambda x, w, b, p: _conv(x, w, b, p, tail="negative slice")),
        ("computed in float32 and returned in float32 for bfloat16 inputs",
         lambda x, w, b, p: _conv(x.float(), w.float(), b.float(), p.float())),
    ],
}

CORRECT = {
    "07.rglru_step": [
        ("sigmoid then power, in float32", lambda *a: _rglru(*a)),
    ],
    "07.associative_scan": [
        ("a loop over time", _scan_sequential),
        ("a loop over time in float64", lambda a, b, h0: tuple(
            t.float() for t in _scan_sequential(a.double(), b.double(), None if h0 is None else h0.double()))),
    ],
    "07.conv1d_with_cache": [
        ("F.conv1d with groups = D", lambda x, w, b, p: _conv_torch(x, w, b, p)),
        ("computed in float32, rounded back to x's dtype",
         lambda x, w, b, p: tuple(t.to(x.dtype) for t in _conv(x.float(), w.float(), b.float(), p.float()))),
    ],
    "07.associative_combine": [
        ("computed in float64, rounded back", lambda e1, e2: (
            (e2[0].double() * e1[0].double()).to(e1[0].dtype),
            (e2[0].double() * e1[1].double() + e2[1].double()).to(e1[1].dtype))),
    ],
}


def _conv_torch(x, w, bias, x_prev):
    T, W, D = x.shape[1], w.shape[0], x.shape[2]
    xs = torch.cat([x_prev, x], 1)  # (B, W-1+T, D)
    y = F.conv1d(xs.transpose(1, 2), w.T[:, None, :], bias, groups=D).transpose(1, 2)  # w.T[:, None]: (D, 1, W)
    return y, xs[:, T:]


# --------------------------------------------------------------------------------------------
# 07.recurrent_block, 07.local_attention and the prediction
# --------------------------------------------------------------------------------------------
def _gelu(t):
    return F.gelu(t, approximate="tanh")


def _block(x, ly, lx, conv, lru, lo, kind="right"):
    if kind == "GELU on the recurrent branch":
        return lo(_gelu(lru(conv(lx(x)))) * ly(x))
    if kind == "exact (erf) GELU":
        return lo(F.gelu(ly(x)) * lru(conv(lx(x))))
    if kind == "the conv after the RG-LRU":
        return lo(_gelu(ly(x)) * conv(lru(lx(x))))
    if kind == "no conv":
        return lo(_gelu(ly(x)) * lru(lx(x)))
    if kind == "the branches' linears swapped":
        return lo(_gelu(lx(x)) * lru(conv(ly(x))))
    if kind == "branches added, not multiplied":
        return lo(_gelu(ly(x)) + lru(conv(lx(x))))
    if kind == "a sigmoid gate (GLU) instead of GELU":
        return lo(torch.sigmoid(ly(x)) * lru(conv(lx(x))))
    return lo(_gelu(ly(x)) * lru(conv(lx(x))))


def _local(q, k, v, positions, cfg, keys=None, rotate="first", scale_dim=None, rope_k=True, round_back=True,
           edge_late=False):
    B, H, T, D = q.shape
    d = {"all": D, "half": D // 2}.get(rotate, int(D * cfg.partial_rotary_factor))
    theta = cfg.rope_base ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    angle = positions.float()[:, None] * theta
    cos, sin = angle.cos(), angle.sin()

    def rope(x):
        part, rest = (x[..., :d], x[..., d:]) if rotate != "last" else (x[..., D - d:], x[..., :D - d])
        x1, x2 = part[..., : d // 2], part[..., d // 2:]
        r = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        r = r.to(x.dtype) if round_back else r  # the float32 angles would promote a bfloat16 x
        return torch.cat([r, rest], -1) if rotate != "last" else torch.cat([rest, r], -1)

    q = rope(q)
    k = rope(k) if rope_k else k
    W = cfg.attention_window_size
    n_keys = (W + 1 if cfg.window_edge == "inclusive" else W) if keys is None else keys(cfg)
    if edge_late and T <= n_keys + 1:  # off by one at the edge: no cut until T > W + 2
        n_keys = T
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    mask = (j <= i) & (i - j < n_keys)
    n = H // k.shape[1]
    k, v = k.repeat_interleave(n, 1), v.repeat_interleave(n, 1)
    s = (q @ k.transpose(-2, -1)) / math.sqrt(D if scale_dim is None else scale_dim(D, d))
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v


_BLOCK_KINDS = ["GELU on the recurrent branch", "exact (erf) GELU", "the conv after the RG-LRU", "no conv",
                "the branches' linears swapped", "branches added, not multiplied", "a sigmoid gate (GLU) instead of GELU"]

MUTANTS.update({
    "07.recurrent_block": [(kind, lambda *a, kind=kind: _block(*a, kind=kind)) for kind in _BLOCK_KINDS],
    "07.local_attention": [
        ("HF's edge always: W keys", lambda *a: _local(*a, keys=lambda c: c.attention_window_size)),
        ("the official edge always: W + 1 keys (window_edge ignored)",
         lambda *a: _local(*a, keys=lambda c: c.attention_window_size + 1)),
        ("RoPE on all of head_dim", lambda *a: _local(*a, rotate="all")),
        ("RoPE on D // 2 dims always (partial_rotary_factor ignored)", lambda *a: _local(*a, rotate="half")),
        ("RoPE on the last half of head_dim", lambda *a: _local(*a, rotate="last")),
        ("no RoPE on the keys", lambda *a: _local(*a, rope_k=False)),
        ("scaled by 1/sqrt(rotary_dim)", lambda *a: _local(*a, scale_dim=lambda D, d: d)),
        ("off by one at the window's edge: no cut until T > W + 2", lambda *a: _local(*a, edge_late=True)),
        ("RoPE's float32 angles promote bfloat16 q and k (not rounded back)", lambda *a: _local(*a, round_back=False)),
        ("computed in float32 and returned in float32 for bfloat16 inputs",
         lambda q, k, v, p, c: _local(q.float(), k.float(), v.float(), p, c)),
    ],
    "07.predict_rglru_halflife": [
        ("c = 8 forgotten (a = σ(Λ)^r)", lambda: (693.0, 5545.0)),
        ("the 1/e horizon 1 / (1 - a), not the half-life", lambda: (125.4, 1000.0)),
        ("the half-life of h² (a² per step)", lambda: (43.3, 346.4)),
        ("the two r swapped", lambda: (693.0, 87.0)),
    ],
})

CORRECT.update({
    "07.recurrent_block": [("as written in the statement", _block)],
    "07.local_attention": [
        ("written out", _local),
        ("in float64, returned in q's dtype",
         lambda q, k, v, p, c: _local(q.double(), k.double(), v.double(), p, c).to(q.dtype)),
    ],
    "07.predict_rglru_halflife": [("ln 2 / (8 r ln(1/0.999)), not rounded", lambda: (86.6, 692.8))],
})


# --------------------------------------------------------------------------------------------
# 07.capstone: the exercises' answers (written as a learner would), and each of them broken once
# --------------------------------------------------------------------------------------------
from minigemma.learner_griffin import YourGriffin  # noqa: E402


def _your_scan(a, b, h0=None):
    if h0 is not None:
        b = torch.cat([b[:, :1] + a[:, :1] * h0[:, None], b[:, 1:]], dim=1)
    T, d = a.shape[1], 1
    while d < T:
        a, b = (torch.cat([a[:, :d], a[:, d:] * a[:, :-d]], dim=1),
                torch.cat([b[:, :d], a[:, d:] * b[:, :-d] + b[:, d:]], dim=1))
        d *= 2
    return b, b[:, -1]


YOUR_ANSWERS = dict(rglru_step=lambda *a: _rglru(*a), associative_scan=_your_scan,
                    conv1d_with_cache=lambda x, w, b, p: _conv(x, w, b, p),
                    recurrent_block=lambda *a: _block(*a), local_attention=lambda *a: _local(*a))
CAPSTONE_BROKEN = {  # the function each capstone mutant breaks, for tests/test_learner_griffin.py
    "an RG-LRU step without the sqrt(1 - a²) input normalisation":
        ("rglru_step", lambda *a: _rglru(*a, norm="none")),
    "a scan that ignores h0 (a chunk after the prompt starts from zeros)":
        ("associative_scan", lambda a, b, h0=None: _scan(a, b, None)),
    "a conv that drops its cache (zeros before every call: decoding forgets the prompt)":
        ("conv1d_with_cache", lambda x, w, b, p: _conv(x, w, b, p, use_cache=False)),
    "a conv that hands back the oldest inputs as its cache":
        ("conv1d_with_cache", lambda x, w, b, p: _conv(x, w, b, p, tail="first")),
    "a recurrent block with the conv after the RG-LRU":
        ("recurrent_block", lambda *a: _block(*a, kind="the conv after the RG-LRU")),
    "a local attention with a window one key short (W keys with the official edge)":
        ("local_attention", lambda *a: _local(*a, keys=lambda c: c.attention_window_size)),
}

MUTANTS["07.capstone"] = [(label, YourGriffin(**{**YOUR_ANSWERS, name: fn}))
                          for label, (name, fn) in CAPSTONE_BROKEN.items()]
CORRECT["07.capstone"] = [
    ("the exercises' answers, written out", YourGriffin(**YOUR_ANSWERS)),
    ("the scan as a loop over time, the conv with F.conv1d", YourGriffin(
        **{**YOUR_ANSWERS, "associative_scan": lambda a, b, h0=None: _scan_sequential(a, b, h0),
           "conv1d_with_cache": _conv_torch})),
]
