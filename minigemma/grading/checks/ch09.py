"""Chapter 09: distillation — the full-distribution loss (Gemma 2), the sampled target (Gemma 3), and the
chunked loss's gradient with respect to a chunk's logits, in closed form."""

import torch

from ...losses import cross_entropy_grad, kd_loss, sampled_target
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
    # the logits of bfloat16 models: the loss is still computed, and returned, in float32 (from the same
    # bfloat16 values, so there is no bfloat16 rounding to allow for: the exercise's tolerance holds)
    s, t = (3 * torch.randn(2, 4, 7, generator=g)).bfloat16(), (3 * torch.randn(2, 4, 7, generator=g)).bfloat16()
    cases.append(Case("bfloat16 logits: the loss computed and returned in float32",
                      (s, t, torch.tensor([[True, True, False, True], [True, False, True, True]]))))
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
    # a bfloat16 teacher's logits: the target is float32 all the same (computed in float32 from the same
    # bfloat16 values: the exercise's tolerance holds)
    t = (3 * torch.randn(3, 10, generator=g)).bfloat16()
    ids = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(3)])
    cases.append(Case("bfloat16 teacher logits: the target in float32", (t, ids)))
    return cases


register(Exercise(
    "09.kd_loss", _kd_cases, kd_loss, atol=1e-5, rtol=1e-5, exact_types=True,
    description="mean over scored positions of -Σ_v p_T(v) log p_S(v), p = softmax of the logits; a 0-d float32 "
                "tensor, computed in float32 whatever the logits' dtype.",
    hint="This is a cross-entropy whose target is a whole distribution, the teacher's, instead of one id. "
         "Which of the two goes through a log, how do you take that log accurately, and over which positions "
         "do you average?",
    recipe="1. The teacher's probabilities p_T: softmax of the teacher logits over the vocabulary (the last "
           "dimension). 2. The student's log-probabilities: log_softmax of the student logits over the same "
           "dimension, which is more accurate than the log of a softmax (a peaked teacher has large logits). "
           "3. Multiply them element by element, sum over the vocabulary and negate: one number per position, "
           "for any leading shape. 4. Average over the positions where the mask is True: their sum divided by "
           "their count. When student equals teacher the result is the teacher's entropy, not 0. Work in float32 "
           "whatever the logits' dtype (convert bfloat16 logits first): the loss is a 0-d float32 tensor."))
register(Exercise(
    "09.sampled_target", _target_cases, sampled_target, atol=1e-6, rtol=1e-5, exact_types=True,
    description="(N, V) float32 target: the teacher's probabilities on the sampled ids, renormalised to sum to 1; 0 "
                "elsewhere.",
    hint="Only the sampled ids keep any mass, and each row must still sum to 1. Does the teacher's full "
         "normaliser matter once you renormalise over the sampled ids?",
    recipe="1. Take the teacher's probabilities, softmax of its logits over the vocabulary. 2. Pick out, in each "
           "row, the probabilities of that row's k sampled ids (a gather along the vocabulary). 3. Divide them "
           "by their own sum, so the row's sampled probabilities add up to 1. (Equivalently, a softmax over the "
           "picked logits alone: the full normaliser cancels.) 4. Start from an (N, V) tensor of zeros and "
           "write each renormalised probability back at its id (a scatter along the vocabulary); every other "
           "entry stays 0. With k = 1 the sampled id gets 1; with k = V this is the teacher's own "
           "distribution. The target is float32 whatever the teacher's dtype: compute in float32, and make the "
           "zeros float32 too (zeros like bfloat16 logits would be bfloat16)."))


def chunked_loss_grad_reference(z, q, mask):
    """∂/∂z of the mean over scored rows of −Σ_v q_v log softmax(z)_v, as `chunked_loss` computes it for a
    chunk: a row not scored has no target (q zeroed there), and the mean's 1 / (scored rows) multiplies the
    closed form (`losses.cross_entropy_grad`), as `chunked_loss`'s scale does."""
    q = q.float() * mask[:, None]
    logp = torch.log_softmax(z.float(), dim=-1)
    return cross_entropy_grad(logp, q, q.sum(-1)).mul_(1.0 / max(1, int(mask.sum())))


def _grad_cases(seed):
    """z (N, V) float32 logits, q (N, V) float32 target weights (Σq <= 1 per row), mask (N,) bool."""
    g = torch.Generator().manual_seed(seed)

    def one_hot(N, V):
        return torch.zeros(N, V).scatter_(-1, torch.randint(0, V, (N, 1), generator=g), 1.0)

    def teacher(N, V, scale=2.0):
        return torch.softmax(scale * torch.randn(N, V, generator=g), -1)

    def every(N):
        return torch.ones(N, dtype=torch.bool)

    cases = [Case("one row, a one-hot label: p - onehot (the sign: the label's logit must go up, the others down)",
                  (3 * torch.randn(1, 4, generator=g), one_hot(1, 4), every(1)))]
    # Σq < 1: the teacher's probabilities on 3 sampled ids, not renormalised (about half the mass)
    V = 6
    t = teacher(1, V)
    ids = torch.randperm(V, generator=g)[:3]
    q = torch.zeros(1, V)
    q[0, ids] = t[0, ids]
    if q.sum() > 0.9 or q.sum() < 0.1:  # keep the mass well away from 1 (and from 0)
        q = q / q.sum() * 0.5
    cases.append(Case("a target holding less than all the mass (sampled probabilities, not renormalised): "
                      "p·Σq - q, not p - q", (3 * torch.randn(1, V, generator=g), q, every(1))))
    # the denominator alone: the rows not scored hold q = softmax(z), whose gradient is 0 whatever the mask
    z = 3 * torch.randn(4, 3, generator=g)
    q = torch.where(torch.tensor([True, False, True, False])[:, None], teacher(4, 3), torch.softmax(z, -1))
    cases.append(Case("2 of 4 rows scored: the mean divides by 2, the rows scored (not 4, and not the sum)",
                      (z, q, torch.tensor([True, False, True, False]))))
    cases.append(Case("a very peaked row, logits up to ±1000: softmax computed stably (no exp of 1000)",
                      (torch.stack([torch.linspace(-1000.0, 1000.0, 8), 3 * torch.randn(8, generator=g)]),
                       teacher(2, 8), every(2))))
    cases.append(Case("rows not scored (mask False) get zero gradient: their targets count for nothing",
                      (3 * torch.randn(5, 4, generator=g), teacher(5, 4), torch.tensor([True, False, True, True, False]))))
    for label, N, V in [("random one-hot labels, N=6, V=17, some rows not scored", 6, 17),
                        ("random teacher distributions, N=8, V=31", 8, 31),
                        ("random sampled targets (Σq < 1), N=16, V=64, some rows not scored", 16, 64)]:
        z = 3 * torch.randn(N, V, generator=g)
        mask = torch.rand(N, generator=g) > 0.3 if "not scored" in label else every(N)
        mask[0] = True
        if "one-hot" in label:
            q = one_hot(N, V)
        elif "sampled" in label:
            keep = torch.rand(N, V, generator=g) < 0.2
            keep[:, 0] = True
            q = teacher(N, V) * keep
        else:
            q = teacher(N, V)
        cases.append(Case(label, (z, q, mask)))
    return cases


register(Exercise(
    "09.chunked_loss_grad", _grad_cases, chunked_loss_grad_reference, atol=1e-7, rtol=1e-5, exact_types=True,
    description="∂/∂z of the mean over scored rows of -Σ_v q_v log softmax(z)_v: "
                "mask[:, None] · (softmax(z)·Σq - q) / (number of scored rows), float32 (N, V).",
    hint="Differentiate one row's loss -Σ_v q_v log softmax(z)_v by hand: log softmax(z)_v is z_v minus the "
         "log-sum-exp of the row, and the derivative of the log-sum-exp is softmax(z). So each logit gets "
         "softmax(z) times the row's total target mass, minus its own target weight. Then think about what the "
         "mean over scored rows does to each row's share.",
    recipe="1. Softmax each row over the vocabulary with torch's own softmax (it subtracts the row's maximum "
           "first, so logits of 1000 are fine). 2. Sum each row's target weights: the mass, a number per row "
           "that need not be 1. 3. The row's gradient is the softmax times that mass, minus the target. "
           "4. Zero the rows the mask leaves out. 5. Divide everything by the number of scored rows (the mask's "
           "count, not the number of rows). 6. Return it in float32, the shape of the logits."))
