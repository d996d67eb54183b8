import torch
import torch.nn.functional as F


def _kd(s, t, mask, direction="forward", teacher="softmax", reduce_v="sum", use_mask=True, temp=1.0, kl=False):
    log_ps = torch.log_softmax(s.double() / temp, -1)
    pt = {"softmax": torch.softmax(t.double() / temp, -1), "logits": t.double(),
          "log": torch.log_softmax(t.double(), -1)}[teacher]
    if direction == "reverse":
        per = -(torch.softmax(s.double(), -1) * torch.log_softmax(t.double(), -1))
    else:
        per = -(pt * log_ps)
    per = per.sum(-1) if reduce_v == "sum" else per.mean(-1)
    if kl:
        per = per + (pt * torch.log(pt)).sum(-1)
    m = mask if use_mask else torch.ones_like(mask)
    return ((per * m).sum() / m.sum()).float()


def _target(t, ids, how="renorm"):
    p = torch.softmax(t.double(), -1)
    out = torch.zeros_like(p)
    if how == "renorm":
        keep = p.gather(-1, ids)
        return out.scatter(-1, ids, keep / keep.sum(-1, keepdim=True)).float()
    if how == "raw":
        return out.scatter(-1, ids, p.gather(-1, ids)).float()
    if how == "uniform":
        return out.scatter(-1, ids, torch.full(ids.shape, 1.0 / ids.shape[-1], dtype=p.dtype)).float()
    if how == "dense":  # the full teacher distribution, nothing zeroed
        return p.float()
    if how == "logits":  # the sampled logits divided by their sum
        z = t.double().gather(-1, ids)
        return out.scatter(-1, ids, z / z.sum(-1, keepdim=True)).float()
    if how == "by_k":
        return out.scatter(-1, ids, p.gather(-1, ids) * (t.shape[-1] / ids.shape[-1])).float()
    raise ValueError(how)


MUTANTS = {
    "09.kd_loss": [
        ("reverse direction: -Σ p_S log p_T", lambda s, t, m: _kd(s, t, m, direction="reverse")),
        ("teacher logits used as weights (no softmax)", lambda s, t, m: _kd(s, t, m, teacher="logits")),
        ("teacher log-probabilities used as weights", lambda s, t, m: _kd(s, t, m, teacher="log")),
        ("mean over the vocabulary instead of a sum", lambda s, t, m: _kd(s, t, m, reduce_v="mean")),
        ("mask ignored", lambda s, t, m: _kd(s, t, m, use_mask=False)),
        ("temperature 2", lambda s, t, m: _kd(s, t, m, temp=2.0)),
        ("KL(p_T || p_S): the teacher's entropy subtracted", lambda s, t, m: _kd(s, t, m, kl=True)),
        ("computed in the logits' dtype: a bfloat16 loss for bfloat16 logits", lambda s, t, m: (lambda per: (
            per * m).sum() / m.sum())(-(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1))),
    ],
    "09.sampled_target": [
        ("not renormalised", lambda t, i: _target(t, i, "raw")),
        ("uniform weights 1/k on the sample", lambda t, i: _target(t, i, "uniform")),
        ("the full teacher distribution (nothing zeroed)", lambda t, i: _target(t, i, "dense")),
        ("sampled logits divided by their sum", lambda t, i: _target(t, i, "logits")),
        ("scaled by V / k instead of renormalised", lambda t, i: _target(t, i, "by_k")),
        ("zeros like the logits: a bfloat16 target for a bfloat16 teacher",
         lambda t, i: torch.zeros_like(t).scatter(-1, i, torch.softmax(t.float().gather(-1, i), -1).to(t.dtype))),
    ],
}

CORRECT = {
    "09.kd_loss": [
        ("KL plus the teacher's entropy, in float32", lambda s, t, m: (lambda s, t: (lambda per: (per * m).sum() / m.sum())(
            F.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
            - (torch.softmax(t, -1) * torch.log_softmax(t, -1)).sum(-1)))(s.float(), t.float())),
    ],
    "09.sampled_target": [
        ("softmax over the gathered logits, in float32", lambda t, i: torch.zeros(t.shape).scatter(
            -1, i, torch.softmax(t.float().gather(-1, i), -1))),
    ],
}


# --------------------------------------------------------------------------------------------
# 09.chunked_loss_grad
# --------------------------------------------------------------------------------------------
def _grad(z, q, mask, mass=True, sign=1.0, denominator="scored", zero_masked=True, stable=True, out=torch.float32):
    if stable:
        p = torch.softmax(z.double(), -1)
    else:  # exp of the raw logits: inf for a logit of 1000
        e = torch.exp(z.double())
        p = e / e.sum(-1, keepdim=True)
    q = q.double()
    g = p * q.sum(-1, keepdim=True) - q if mass else p - q
    g = sign * g
    if zero_masked:
        g = g * mask[:, None]
    n = {"scored": mask.sum(), "rows": mask.numel(), "none": 1}[denominator]
    return (g / n).to(out)


MUTANTS.update({
    "09.chunked_loss_grad": [
        ("p - q: the target's mass Σq forgotten", lambda z, q, m: _grad(z, q, m, mass=False)),
        ("the sign flipped: q - p·Σq", lambda z, q, m: _grad(z, q, m, sign=-1.0)),
        ("mean over all rows, not the scored ones", lambda z, q, m: _grad(z, q, m, denominator="rows")),
        ("summed, not averaged", lambda z, q, m: _grad(z, q, m, denominator="none")),
        ("rows not scored keep their gradient", lambda z, q, m: _grad(z, q, m, zero_masked=False)),
        ("softmax as exp(z) / Σ exp(z), without subtracting the maximum", lambda z, q, m: _grad(z, q, m, stable=False)),
        ("returned in float64", lambda z, q, m: _grad(z, q, m, out=torch.float64)),
    ],
})

CORRECT.update({
    "09.chunked_loss_grad": [
        ("torch.autograd on the mean loss", lambda z, q, m: torch.autograd.grad(
            ((-(q * torch.log_softmax(z.requires_grad_(), -1)).sum(-1) * m).sum() / m.sum()), z)[0]),
        ("float32 throughout, exp of log_softmax", lambda z, q, m: (torch.log_softmax(z, -1).exp() * q.sum(-1, keepdim=True)
                                                                   - q) * (m[:, None] / m.sum())),
    ],
})
