"""Chapter 09: distillation — the full-distribution loss (Gemma 2) and the sampled target (Gemma 3)."""

import torch

from ...losses import kd_loss, sampled_target
from ..exercise import Case, Exercise, register


def _kd_cases(seed):
    """student and teacher logits (..., V), and a mask (...) of scored positions."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, shape, V, scale, holes in [
        ("B=2, T=4, V=7, everything scored", (2, 4), 7, 3.0, False),
        ("a peaked teacher (large logits)", (1, 5), 9, 12.0, False),
        ("some positions not scored", (3, 4), 6, 2.0, True),
        ("one position, V=2", (1, 1), 2, 1.0, False),
        ("rows of a flat batch (N, V)", (6,), 11, 3.0, True),
    ]:
        s, t = scale * torch.randn(*shape, V, generator=g), scale * torch.randn(*shape, V, generator=g)
        mask = torch.ones(shape, dtype=torch.bool)
        if holes:
            mask = torch.rand(shape, generator=g) > 0.4
            mask.view(-1)[0] = True
        cases.append(Case(label, (s, t, mask)))
    s = torch.randn(2, 3, 8, generator=g)
    cases.append(Case("student = teacher: the loss is the teacher's entropy", (s, s.clone(), torch.ones(2, 3, dtype=torch.bool))))
    return cases


def _target_cases(seed):
    """teacher logits (N, V) and k distinct sampled ids per row (N, k)."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, N, V, k, scale in [("N=3, V=10, k=4", 3, 10, 4, 3.0), ("k=1: all the mass on one id", 2, 6, 1, 2.0),
                                  ("k=V: the teacher's own distribution", 2, 5, 5, 2.0),
                                  ("a peaked teacher, k=3", 4, 12, 3, 10.0), ("one row", 1, 20, 7, 1.0)]:
        t = scale * torch.randn(N, V, generator=g)
        ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)])
        cases.append(Case(label, (t, ids)))
    return cases


register(Exercise(
    "09.kd_loss", _kd_cases, kd_loss, atol=1e-5, rtol=1e-5,
    description="mean over scored positions of -Σ_v p_T(v) log p_S(v), p = softmax of the logits.",
    hint="p_T = softmax(teacher_logits, -1); log p_S = log_softmax(student_logits, -1) (more accurate than "
         "log(softmax)). Multiply, sum over the vocabulary (the last dimension), negate: one number per position. "
         "Then average over the positions where mask is True."))
register(Exercise(
    "09.sampled_target", _target_cases, sampled_target, atol=1e-6, rtol=1e-5,
    description="(N, V) target: the teacher's probabilities on the sampled ids, renormalised to sum to 1; 0 elsewhere.",
    hint="Take p_T = softmax(teacher_logits, -1), keep only the sampled ids (gather), divide by their sum so each "
         "row sums to 1, and write them back into a row of zeros (scatter). Equivalently: softmax over the "
         "gathered logits alone, since the normaliser cancels."))
