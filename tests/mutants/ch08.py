import math

import torch
import torch.nn.functional as F


def _nt(logits, ids, mask, shift=1, use=("t", "t1"), denom="valid", reduce="mean"):
    B, T, V = logits.shape
    logp = torch.log_softmax(logits.double(), -1)
    if shift == 1:
        lp, tgt = logp[:, :-1], ids[:, 1:]
        m_t, m_t1 = mask[:, :-1], mask[:, 1:]
    elif shift == 0:  # no shift: each position "predicts" its own token
        lp, tgt, m_t, m_t1 = logp, ids, mask, mask
    else:  # the wrong way: position t scored on the token before it
        lp, tgt = logp[:, 1:], ids[:, :-1]
        m_t, m_t1 = mask[:, 1:], mask[:, :-1]
    nll = -lp.gather(-1, tgt[..., None])[..., 0]
    valid = torch.ones_like(m_t)
    if "t" in use:
        valid = valid & m_t
    if "t1" in use:
        valid = valid & m_t1
    total = (nll * valid).sum()
    if reduce == "sum":
        return total.float()
    n = {"valid": valid.sum(), "all": torch.tensor(float(valid.numel())), "mask": mask.sum()}[denom]
    return (total / n).float()


def _lr(step, peak, warmup, total, ratio, warm="plus1", floor="ratio", span="after", after="flat", shape="cos",
        end="ge"):
    lo = {"ratio": peak * ratio, "zero": 0.0, "raw": ratio}[floor]
    if step < warmup:
        return peak * ((step + 1) if warm == "plus1" else step) / warmup
    if (step >= total if end == "ge" else step > total) and after == "flat":
        return lo
    p = (step - warmup) / max(1, total - warmup) if span == "after" else step / total
    if shape == "cos":
        return lo + 0.5 * (peak - lo) * (1 + math.cos(math.pi * p))
    if shape == "torch cos":
        return lo + 0.5 * (peak - lo) * (1 + torch.cos(torch.tensor(math.pi * p)))
    return peak - (peak - lo) * p


def _acc(w, x, y, n, scheme="sum_over_N", zero_between=False, loss_report="mean"):
    w = w.detach().clone().requires_grad_()
    parts = torch.tensor_split(torch.arange(x.shape[0]), n)
    total, means = 0.0, []
    for idx in parts:
        if zero_between:
            w.grad = None
        s = F.cross_entropy(x[idx] @ w, y[idx], reduction="sum")
        m = F.cross_entropy(x[idx] @ w, y[idx])
        loss = {"sum_over_N": s / x.shape[0], "mean_over_n": m / n, "sum": s, "mean": m}[scheme]
        loss.backward()
        total += float(s.detach())
        means.append(float(m.detach()))
    reported = {"mean": total / x.shape[0], "mean_of_means": sum(means) / len(means), "last": means[-1]}[loss_report]
    return reported, w.grad


MUTANTS = {
    "08.next_token_loss": [
        ("no shift: position t scored on its own token", lambda l, i, m: _nt(l, i, m, shift=0)),
        ("shifted the wrong way (t predicts t - 1)", lambda l, i, m: _nt(l, i, m, shift=-1)),
        ("padding mask ignored", lambda l, i, m: _nt(l, i, m, use=())),
        ("only mask[t] checked (a real token predicts a pad)", lambda l, i, m: _nt(l, i, m, use=("t",))),
        ("only mask[t+1] checked (a pad predicts a real token)", lambda l, i, m: _nt(l, i, m, use=("t1",))),
        ("divided by B·(T-1), not by the scored positions", lambda l, i, m: _nt(l, i, m, denom="all")),
        ("divided by the number of real tokens", lambda l, i, m: _nt(l, i, m, denom="mask")),
        ("a sum, not a mean", lambda l, i, m: _nt(l, i, m, reduce="sum")),
        ("F.cross_entropy on the bfloat16 logits: a bfloat16 loss (not float32)", lambda l, i, m: F.cross_entropy(
            l[:, :-1].reshape(-1, l.shape[-1]),
            torch.where(m[:, :-1] & m[:, 1:], i[:, 1:], torch.full_like(i[:, 1:], -100)).reshape(-1),
            ignore_index=-100)),
        ("returned in float64", lambda l, i, m: _nt(l, i, m).double()),
    ],
    "08.lr_schedule": [
        ("warmup starts at 0 (step / warmup)", lambda *a: _lr(*a, warm="plain")),
        ("a 0-d tensor, not a float (the cosine taken with torch.cos)", lambda *a: _lr(*a, shape="torch cos")),
        ("decays to 0, not to peak · min_ratio", lambda *a: _lr(*a, floor="zero")),
        ("min_ratio used as the floor itself", lambda *a: _lr(*a, floor="raw")),
        ("cosine over the whole run (step / total)", lambda *a: _lr(*a, span="all")),
        ("linear decay instead of cosine", lambda *a: _lr(*a, shape="linear")),
        ("the cosine keeps going after total", lambda *a: _lr(*a, after="cos")),
        ("step > total for the floor: step total falls in the cosine", lambda *a: _lr(*a, end="gt")),
    ],
    "08.accumulate": [
        ("each micro-batch's mean / n_micro (wrong for unequal sizes)",
         lambda w, x, y, n: _acc(w, x, y, n, scheme="mean_over_n", loss_report="mean_of_means")),
        ("sums not divided: gradients N times too large", lambda w, x, y, n: _acc(w, x, y, n, scheme="sum")),
        ("micro-batch means not divided: n_micro times too large", lambda w, x, y, n: _acc(w, x, y, n, scheme="mean")),
        ("gradients zeroed between micro-batches", lambda w, x, y, n: _acc(w, x, y, n, zero_between=True)),
        ("returns the last micro-batch's loss", lambda w, x, y, n: _acc(w, x, y, n, loss_report="last")),
    ],
}

CORRECT = {
    "08.next_token_loss": [
        ("F.cross_entropy with ignore_index, on float32 logits", lambda l, i, m: F.cross_entropy(
            l[:, :-1].float().reshape(-1, l.shape[-1]),
            torch.where(m[:, :-1] & m[:, 1:], i[:, 1:], torch.full_like(i[:, 1:], -100)).reshape(-1),
            ignore_index=-100)),
    ],
    "08.lr_schedule": [
        ("cos² form", lambda s, pk, w, t, r: pk * (s + 1) / w if s < w else pk * r if s >= t else
         pk * r + (pk - pk * r) * math.cos(math.pi * (s - w) / (t - w) / 2) ** 2),
    ],
    "08.accumulate": [
        ("weights each micro-batch's mean by its share of rows",
         lambda w, x, y, n: (lambda w2: (sum(
             (lambda idx: (lambda l: (l * len(idx) / x.shape[0]).backward() or float(l) * len(idx))(
                 F.cross_entropy(x[idx] @ w2, y[idx])))(idx)
             for idx in torch.tensor_split(torch.arange(x.shape[0]), n)) / x.shape[0], w2.grad))(
             w.detach().clone().requires_grad_())),
    ],
}


# --------------------------------------------------------------------------------------------
# 08.adamw_step: one AdamW step, in place
# --------------------------------------------------------------------------------------------
def _adamw(p, g, m, v, step, lr, betas, eps, wd, bias=True, decay="decoupled", eps_inside=False, count_from=1,
           writes="all"):
    b1, b2 = betas
    t = step if count_from == 1 else step - 1
    if decay == "coupled":  # Adam + L2: the decay goes through the gradient, so through m and v
        g = g + wd * p
    p_new = {"decoupled": p * (1 - lr * wd), "no_lr": p * (1 - wd)}.get(decay, p)
    m_new = b1 * m + (1 - b1) * g
    v_new = b2 * v + (1 - b2) * g * g
    m_hat = m_new / (1 - b1 ** t) if bias else m_new
    v_hat = v_new / (1 - b2 ** t) if bias else v_new
    denom = torch.sqrt(v_hat + eps) if eps_inside else torch.sqrt(v_hat) + eps
    p_new = p_new - lr * m_hat / denom
    if decay == "after":
        p_new = p_new * (1 - lr * wd)
    if writes == "none":  # new tensors returned, the state left as it was
        return p_new, m_new, v_new
    p.copy_(p_new)
    if writes == "all":
        m.copy_(m_new)
        v.copy_(v_new)
    return None


def _adamw_float64(p, g, m, v, step, lr, betas, eps, wd):
    b1, b2 = betas
    p64, g64, m64, v64 = p.double(), g.double(), m.double(), v.double()
    m64 = m64 * b1 + g64 * (1 - b1)
    v64 = v64 * b2 + g64 ** 2 * (1 - b2)
    upd = (m64 / (1 - b1 ** step)) / ((v64 / (1 - b2 ** step)).sqrt() + eps)
    p.copy_(p64 - lr * wd * p64 - lr * upd)
    m.copy_(m64)
    v.copy_(v64)


def _adamw_torch(p, g, m, v, step, lr, betas, eps, wd):
    """torch.optim.AdamW itself, its state set to the step before this one."""
    param = torch.nn.Parameter(p.clone())
    param.grad = g.clone()
    opt = torch.optim.AdamW([param], lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False)
    opt.state[param] = {"step": torch.tensor(float(step - 1)), "exp_avg": m, "exp_avg_sq": v}
    opt.step()
    p.copy_(param.detach())


MUTANTS["08.adamw_step"] = [
    ("no bias correction", lambda *a: _adamw(*a, bias=False)),
    ("the step counted from 0 (bias correction 1 - β^(step - 1))", lambda *a: _adamw(*a, count_from=0)),
    ("weight decay coupled into the gradient (Adam + L2)", lambda *a: _adamw(*a, decay="coupled")),
    ("weight decay not scaled by lr: p · (1 - wd)", lambda *a: _adamw(*a, decay="no_lr")),
    ("weight decay applied after the update", lambda *a: _adamw(*a, decay="after")),
    ("eps inside the square root", lambda *a: _adamw(*a, eps_inside=True)),
    ("new tensors returned, the state left unchanged", lambda *a: _adamw(*a, writes="none")),
    ("param updated in place, the moments not", lambda *a: _adamw(*a, writes="param")),
]
CORRECT["08.adamw_step"] = [
    ("the formulas written out, in place", lambda *a: _adamw(*a)),
    ("in float64, copied back", _adamw_float64),
    ("torch.optim.AdamW itself", _adamw_torch),
]


# --------------------------------------------------------------------------------------------
# 08.bpe_merge: one merge of byte-pair encoding
# --------------------------------------------------------------------------------------------
def _bpe(corpus, new_id, count="every", tie="smallest", across=False, direction="left", skip=2, replace="all",
         keep_empty=True, no_pair="none"):
    seqs = [list(s) for s in corpus]
    counts = {}
    units = [[x for s in seqs for x in s]] if across else seqs  # across: the corpus as one long sequence
    for s in units:
        if count == "every":
            pairs = list(zip(s, s[1:]))
        elif count == "once_per_sequence":
            pairs = list(dict.fromkeys(zip(s, s[1:])))
        else:  # non-overlapping: [7, 7, 7] holds (7, 7) once
            pairs, i = [], 0
            while i + 1 < len(s):
                pairs.append((s[i], s[i + 1]))
                i += 2 if i + 2 < len(s) and s[i] == s[i + 1] == s[i + 2] else 1
        for p in pairs:
            counts[p] = counts.get(p, 0) + 1
    if not counts:
        if no_pair == "crash":
            max(counts.values())  # ValueError: max() of an empty sequence
        return ([s for s in seqs if s or keep_empty]), None
    top = max(counts.values())
    tied = [p for p, n in counts.items() if n == top]
    pair = {"smallest": min(tied), "largest": max(tied), "first": tied[0]}[tie]

    def merge(s):
        if direction == "right":
            return _merge_right(s)
        out, i, done = [], 0, False
        while i < len(s):
            if i + 1 < len(s) and (s[i], s[i + 1]) == pair and not done:
                out.append(new_id)
                i += skip
                done = replace == "first"
            else:
                out.append(s[i])
                i += 1
        return out

    def _merge_right(s):
        out, i = [], len(s) - 1
        while i >= 0:
            if i >= 1 and (s[i - 1], s[i]) == pair:
                out.append(new_id)
                i -= 2
            else:
                out.append(s[i])
                i -= 1
        return out[::-1]

    return [merge(s) for s in seqs if s or keep_empty], pair


MUTANTS["08.bpe_merge"] = [
    ("pairs counted across sequence boundaries", lambda c, n: _bpe(c, n, across=True)),
    ("a tie goes to the first pair counted", lambda c, n: _bpe(c, n, tie="first")),
    ("a tie goes to the largest pair", lambda c, n: _bpe(c, n, tie="largest")),
    ("overlapping occurrences counted once ([7, 7, 7] holds (7, 7) once)", lambda c, n: _bpe(c, n, count="nonoverlap")),
    ("a pair counted once per sequence", lambda c, n: _bpe(c, n, count="once_per_sequence")),
    ("merged from the right: [7, 7, 7] -> [7, new]", lambda c, n: _bpe(c, n, direction="right")),
    ("after a merge, the second id is read again", lambda c, n: _bpe(c, n, skip=1)),
    ("only the first occurrence in each sequence merged", lambda c, n: _bpe(c, n, replace="first")),
    ("empty sequences dropped", lambda c, n: _bpe(c, n, keep_empty=False)),
    ("no pair: max() of nothing raises", lambda c, n: _bpe(c, n, no_pair="crash")),
]
CORRECT["08.bpe_merge"] = [
    ("collections.Counter, max over the sorted pairs, and a scan with a skip flag",
     lambda c, n: (lambda counts: ([list(s) for s in c], None) if not counts else (lambda pair: (
         [_merge_flag(s, pair, n) for s in c], pair))(
         max(sorted(counts), key=lambda p: counts[p])))(
         __import__("collections").Counter(p for s in c for p in zip(s, s[1:])))),
]


def _merge_flag(s, pair, new_id):
    out, skip = [], False
    for i, x in enumerate(s):
        if skip:
            skip = False
        elif i + 1 < len(s) and (x, s[i + 1]) == pair:
            out.append(new_id)
            skip = True
        else:
            out.append(x)
    return out


# --------------------------------------------------------------------------------------------
# 08.capstone: the exercises' answers (written as a learner would) train a tiny Gemma; one of them broken
# --------------------------------------------------------------------------------------------
from minigemma.learner_train import YourTraining  # noqa: E402


def _next_token_loss(logits, ids, mask):
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    scored = mask[:, :-1] & mask[:, 1:]
    return (nll * scored).sum() / scored.sum()


YOUR_ANSWERS = dict(next_token_loss=_next_token_loss, lr_schedule=lambda *a: _lr(*a),
                    adamw_step=lambda *a: _adamw(*a))
CAPSTONE_BROKEN = {  # the function each capstone mutant breaks, for tests/test_learner_train.py
    "padding mask ignored": ("next_token_loss", lambda l, i, m: _nt(l, i, m, use=())),
    "warmup starts at 0 (step / warmup)": ("lr_schedule", lambda *a: _lr(*a, warm="plain")),
    "linear decay instead of cosine": ("lr_schedule", lambda *a: _lr(*a, shape="linear")),
    "no bias correction": ("adamw_step", lambda *a: _adamw(*a, bias=False)),
    "weight decay applied after the update": ("adamw_step", lambda *a: _adamw(*a, decay="after")),
    "new tensors returned, the state left unchanged": ("adamw_step", lambda *a: _adamw(*a, writes="none")),
}
MUTANTS["08.capstone"] = [(label, YourTraining(**{**YOUR_ANSWERS, name: fn}))
                          for label, (name, fn) in CAPSTONE_BROKEN.items()]
CORRECT["08.capstone"] = [
    ("the exercises' answers, written out", YourTraining(**YOUR_ANSWERS)),
    ("torch's cross-entropy, the cos² schedule, AdamW in float64",
     YourTraining(next_token_loss=CORRECT["08.next_token_loss"][0][1], lr_schedule=CORRECT["08.lr_schedule"][0][1],
                  adamw_step=_adamw_float64)),
]
