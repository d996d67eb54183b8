import torch
import torch.nn.functional as F


def _nce(q, p, n, ids, tau, alpha, mask="ids", weight="log", mean=True, hard_tau=True, w_scaled=False,
         drop_hard=False, stopgrad=True, in_input_dtype=False):
    dtype = q.dtype
    q, p = (q, p) if in_input_dtype else (q.double(), p.double())
    B = len(q)
    logits = q @ p.T / tau
    if ids is not None and mask != "none":
        same = ids[:, None] == ids[None, :]
        if mask == "ids":
            same = same & ~torch.eye(B, dtype=torch.bool)
        logits = logits.masked_fill(same, float("-inf"))
    if n is not None and not drop_hard:
        c = (q * n.to(q.dtype)).sum(-1)
        z = c / tau if hard_tau else c
        cw = c.detach() if stopgrad else c  # the hardness weight is a constant: stopgrad
        lw = alpha * (cw / tau if w_scaled else cw)
        if weight == "log":
            col = z + lw
        elif weight == "times":  # the logit multiplied by w instead of the term
            col = z * torch.exp(lw)
        elif weight == "none":
            col = z
        elif weight == "all":  # every negative weighted, not only the hard one
            logits = logits + lw[:, None] * (1 - torch.eye(B, dtype=logits.dtype))
            col = z + lw
        logits = torch.cat([logits, col[:, None]], 1)
    loss = F.cross_entropy(logits, torch.arange(B), reduction="mean" if mean else "sum")
    return loss.to(dtype) if in_input_dtype else loss.float()


def _spread(e, how="right"):
    if how == "in the input dtype":
        g = e @ e.T
        return g[~torch.eye(len(e), dtype=torch.bool)].pow(2).mean()
    e = e.double()
    g = e @ e.T
    N = len(e)
    off = ~torch.eye(N, dtype=torch.bool)
    if how == "diag":
        return g.pow(2).mean().float()
    if how == "unsquared":
        return g[off].mean().float()
    if how == "abs":
        return g[off].abs().mean().float()
    if how == "upper":
        return (torch.triu(g, 1).pow(2).sum() / (N * (N - 1))).float()
    if how == "n2":
        return (g[off].pow(2).sum() / N ** 2).float()
    if how == "first_moment":  # GOR's other term, the squared mean, added
        return (g[off].pow(2).mean() + g[off].mean() ** 2).float()
    raise ValueError(how)


def _spread_right64(e):
    e = e.double()
    g = e @ e.T
    return g[~torch.eye(len(e), dtype=torch.bool)].pow(2).mean()


MUTANTS = {
    "11.nce_loss": [
        ("false negatives not masked", lambda q, p, n, i, t, a: _nce(q, p, n, i, t, a, mask="none")),
        ("the positive masked too (diagonal included)", lambda q, p, n, i, t, a: _nce(q, p, n, i, t, a, mask="all")),
        ("hardness weight ignored", lambda q, p, n, i, t, a: _nce(q, p, n, i, t, a, weight="none")),
        ("logit multiplied by w instead of the term", lambda q, p, n, i, t, a: _nce(q, p, n, i, t, a, weight="times")),
        ("every negative weighted", lambda q, p, n, i, t, a: _nce(q, p, n, i, t, a, weight="all")),
        ("w = exp(α · s / τ): the scaled similarity", lambda q, p, n, i, t, a: _nce(q, p, n, i, t, a, w_scaled=True)),
        ("no temperature on the hard negative", lambda q, p, n, i, t, a: _nce(q, p, n, i, t, a, hard_tau=False)),
        ("hard negative left out", lambda q, p, n, i, t, a: _nce(q, p, n, i, t, a, drop_hard=True)),
        ("sum over the batch instead of the mean", lambda q, p, n, i, t, a: _nce(q, p, n, i, t, a, mean=False)),
        ("no stop-gradient on the hardness weight", lambda q, p, n, i, t, a: _nce(q, p, n, i, t, a, stopgrad=False)),
        ("computed in the embeddings' dtype: a bfloat16 loss for bfloat16 embeddings",
         lambda q, p, n, i, t, a: _nce(q, p, n, i, t, a, in_input_dtype=True)),
        ("returned in float64", lambda q, p, n, i, t, a: _nce(q, p, n, i, t, a).double()),
    ],
    "11.spread_out": [
        ("diagonal included (mean over N²)", lambda e: _spread(e, "diag")),
        ("dot products not squared", lambda e: _spread(e, "unsquared")),
        ("absolute values instead of squares", lambda e: _spread(e, "abs")),
        ("upper triangle only, divided by N(N-1)", lambda e: _spread(e, "upper")),
        ("divided by N² instead of N(N-1)", lambda e: _spread(e, "n2")),
        ("the squared mean added (GOR's first moment)", lambda e: _spread(e, "first_moment")),
        ("computed in the embeddings' dtype: a bfloat16 result for bfloat16 rows", lambda e: _spread(e, "in the input dtype")),
        ("returned in float64", _spread_right64),
    ],
}

CORRECT = {
    "11.nce_loss": [
        ("float64 with the weight as a factor in the denominator", lambda q, p, n, i, t, a: (lambda s, pos, den: (
            -(pos - den)).mean().float())(*_weighted(q, p, n, i, t, a))),
    ],
    "11.spread_out": [
        ("a double loop over pairs", lambda e: torch.tensor(
            sum(float(e[i].double() @ e[j].double()) ** 2 for i in range(len(e)) for j in range(len(e)) if i != j)
            / (len(e) * (len(e) - 1)), dtype=torch.float32)),
    ],
}


def _weighted(q, p, n, ids, tau, alpha):
    """log of the numerator and of the denominator, the hard negative's term multiplied by w."""
    q, p = q.double(), p.double()
    B = len(q)
    s = q @ p.T / tau
    keep = torch.ones(B, B, dtype=torch.bool)
    if ids is not None:
        keep = ~(ids[:, None] == ids[None, :]) | torch.eye(B, dtype=torch.bool)
    terms = torch.where(keep, s.exp(), torch.zeros((), dtype=s.dtype)).sum(1)
    if n is not None:
        c = (q * n.double()).sum(-1)
        terms = terms + torch.exp(alpha * c.detach()) * torch.exp(c / tau)
    return s, s.diagonal(), terms.log()
