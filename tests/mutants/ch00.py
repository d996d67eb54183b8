import torch


def _online(x):
    """A streaming softmax (running max m from -inf, running sum d from 0), unguarded: while every
    score so far is -inf, exp(m - m_new) = exp(-inf - (-inf)) = nan."""
    m = torch.full_like(x[..., 0], float("-inf"))
    d = torch.zeros_like(m)
    for j in range(x.shape[-1]):
        m_new = torch.maximum(m, x[..., j])
        d = d * (m - m_new).exp() + (x[..., j] - m_new).exp()
        m = m_new
    return (x - m[..., None]).exp() / d[..., None]


MUTANTS = {
    "00.softmax": [
        ("naive exp overflows", lambda x: x.exp() / x.exp().sum(-1, keepdim=True)),
        ("wrong dimension", lambda x: torch.softmax(x, dim=0)),
        ("forgot to normalise", lambda x: (x - x.amax(-1, keepdim=True)).exp()),
        ("one max over the whole tensor, not per row",
         lambda x: (x - x.max()).exp() / (x - x.max()).exp().sum(-1, keepdim=True)),
        ("streaming softmax: nan while a row starts with -inf", _online),
        ("sum without keepdim", lambda x: (x - x.amax(-1, keepdim=True)).exp() / (x - x.amax(-1, keepdim=True)).exp().sum(-1)),
        ("max without keepdim", lambda x: (x - x.amax(-1)).exp() / (x - x.amax(-1)).exp().sum(-1, keepdim=True)),
        ("computed in float32 and returned in float32 for a bfloat16 x", lambda x: torch.softmax(x.float(), -1)),
        ("returned in float64", lambda x: torch.softmax(x.double(), -1)),
        ("subtracts the mean instead of the max",
         lambda x: (x - x.mean(-1, keepdim=True)).exp() / (x - x.mean(-1, keepdim=True)).exp().sum(-1, keepdim=True)),
    ],
}

CORRECT = {
    "00.softmax": [
        ("torch.softmax", lambda x: torch.softmax(x, dim=-1)),
        ("exp(x - logsumexp)", lambda x: (x - torch.logsumexp(x, -1, keepdim=True)).exp()),
        ("computed in float64, rounded back to x's dtype", lambda x: torch.softmax(x.double(), -1).to(x.dtype)),
        ("computed in x's dtype throughout (bfloat16 for a bfloat16 x)",
         lambda x: (x - x.amax(-1, keepdim=True)).exp() / (x - x.amax(-1, keepdim=True)).exp().sum(-1, keepdim=True)),
    ],
}
