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
    ],
    "08.lr_schedule": [
        ("warmup starts at 0 (step / warmup)", lambda *a: _lr(*a, warm="plain")),
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
        ("F.cross_entropy with ignore_index", lambda l, i, m: F.cross_entropy(
            l[:, :-1].reshape(-1, l.shape[-1]),
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
