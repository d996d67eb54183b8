"""Chapter 11: training an embedding model the EmbeddingGemma way — NCE and the spread-out regulariser."""

import torch
import torch.nn.functional as F

from ...contrastive import nce_loss, spread_out
from ..exercise import Case, Exercise, register


def _unit(g, *shape):
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _nce_cases(seed):
    """q, p, n (B, E) unit vectors, doc_ids (B,) or None, tau, alpha."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, B, E, ids, with_n, tau, alpha in [
        ("B=4, E=8, all documents distinct", 4, 8, [0, 1, 2, 3], True, 0.1, 5.0),
        ("rows 0 and 2 share their positive (a false negative)", 5, 6, [7, 3, 7, 1, 2], True, 0.1, 5.0),
        ("two pairs of duplicates, α = 2", 6, 8, [0, 1, 0, 1, 4, 5], True, 0.2, 2.0),
        ("α = 0: the plain hard negative", 4, 5, [0, 1, 2, 3], True, 0.1, 0.0),
        ("no hard negative (n is None)", 5, 8, [0, 0, 2, 3, 4], False, 0.1, 5.0),
        ("no doc_ids: nothing masked", 4, 8, None, True, 0.05, 5.0),
        ("B=1: only the positive and the hard negative", 1, 4, [0], True, 0.1, 5.0),
    ]:
        q, p, n = _unit(g, B, E), _unit(g, B, E), _unit(g, B, E)
        ids_t = None if ids is None else torch.tensor(ids)
        cases.append(Case(label, (q, p, n if with_n else None, ids_t, tau, alpha)))
    # a hard negative close to the query: its weight matters most
    q = _unit(g, 4, 8)
    n = F.normalize(q + 0.3 * torch.randn(4, 8, generator=g), dim=-1)
    cases.append(Case("hard negatives near their queries", (q, _unit(g, 4, 8), n, torch.tensor([0, 1, 2, 1]), 0.1, 5.0)))
    # bfloat16 embeddings: the loss is computed, and returned, in float32 from the same bfloat16 values, so it
    # matches as closely as any float32 case. The gradients with respect to the bfloat16 q, p, n come back in
    # bfloat16, and q reaches the loss twice (the in-batch logits and the hard negative's): a q.float() written
    # twice rounds each part to bfloat16 before autograd adds them, itself in bfloat16. Each part is at most
    # 2 / (B·τ) = 0.5 here (τ = 1 keeps it there), where a bfloat16 step is 2^-9; two parts and their sum each
    # rounded: 1.5 steps, under atol 3e-3.
    q, p, n = (_unit(g, 4, 8).bfloat16() for _ in range(3))
    cases.append(Case("bfloat16 embeddings: the loss computed and returned in float32",
                      (q, p, n, torch.tensor([0, 1, 0, 3]), 1.0, 5.0),
                      atol=(1e-5, 3e-3, 3e-3, 3e-3), rtol=(1e-5, 0.0, 0.0, 0.0)))
    return cases


def _spread_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = [Case(f"N={N}, E={E}", (_unit(g, N, E),)) for N, E in [(4, 8), (10, 3), (2, 16), (7, 7)]]
    cases.append(Case("orthonormal rows: 0", (torch.eye(4)[:3],)))
    base = _unit(g, 1, 6)
    cases.append(Case("near-identical rows: close to 1", (F.normalize(base + 0.05 * torch.randn(5, 6, generator=g), dim=-1),)))
    # computed, and returned, in float32 from the same bfloat16 values: the exercise's tolerance holds
    cases.append(Case("bfloat16 rows: the result computed and returned in float32", (_unit(g, 5, 8).bfloat16(),)))
    return cases


def _loss_and_grads(fn, args, kwargs):
    """The loss and its gradients with respect to q, p and n: the hardness weight's stop-gradient
    changes no loss value, only what training learns from it, so the check grades both."""
    q, p, n, *rest = args
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (q, p, n)]
    loss = fn(*leaves, *rest, **kwargs)
    if not (isinstance(loss, torch.Tensor) and loss.requires_grad):
        raise ValueError("the loss has no gradient with respect to q, p, n (was everything detached?): "
                         "training could not learn from it")
    used = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, used, allow_unused=True)
    return (loss.detach(), *[torch.zeros_like(t) if g is None else g for t, g in zip(used, grads)])


register(Exercise(
    "11.nce_loss", _nce_cases, nce_loss, atol=1e-5, rtol=1e-5, call=_loss_and_grads, exact_types=True,
    outputs=("the loss", "the gradient w.r.t. q", "the gradient w.r.t. p", "the gradient w.r.t. n"),
    description="EmbeddingGemma's NCE: in-batch negatives, one hard negative weighted by exp(α·stopgrad(cos(q, n))), "
                "false negatives (equal doc_ids) masked; the mean over the batch, a 0-d float32 tensor (computed in "
                "float32 whatever the embeddings' dtype). Graded on the loss and on its gradients with respect to q, "
                "p and n (the stop-gradient shows only there).",
    hint="A weight w on a term e^{z} of the denominator is the same as adding log w to that logit. So the "
         "whole loss is one cross-entropy over one row of logits per query: which columns does that row have, "
         "which are hidden, and which part carries no gradient?",
    recipe="1. Logits of the in-batch pairs: every query against every positive, cos(q_i, p_j) / τ, a (B, B) "
           "matrix (the vectors are unit length, so the cosine is the dot product; compute in float32). The "
           "diagonal holds each query's own positive. 2. If doc_ids is given: where the doc ids of i and j are "
           "equal but i ≠ j, p_j is the query's own document again, a false negative: set that logit to −inf. "
           "Never mask the diagonal. 3. If n is given: add one column, the hard negative's logit "
           "cos(q_i, n_i) / τ plus log w_i, where log w_i = α · stopgrad(cos(q_i, n_i)): the weight's cosine is "
           "detached, the logit's own cosine is not (the gradients with respect to q and n show the "
           "difference; α = 0 is the plain hard negative). (B, B + 1). 4. The loss is the cross-entropy of "
           "each row with target i (its positive), averaged over the batch: a 0-d float32 tensor that still "
           "has gradients with respect to q, p and n."))
register(Exercise(
    "11.spread_out", _spread_cases, spread_out, atol=1e-6, rtol=1e-5, exact_types=True,
    description="The global orthogonal regulariser: mean over ordered pairs i ≠ j of (e_i · e_j)², a 0-d float32 "
                "tensor (computed in float32 whatever e's dtype).",
    hint="One matrix product holds every dot product e_i · e_j. Which of its entries are not pairs i ≠ j, "
         "and how many pairs are there?",
    recipe="1. Form the Gram matrix G = e eᵀ, (N, N), in float32: entry (i, j) is e_i · e_j. 2. Square every "
           "entry. 3. Leave out the diagonal (each row with itself, 1 for unit vectors): sum all squared "
           "entries and subtract the sum of the squared diagonal. 4. Divide by the number of ordered "
           "off-diagonal pairs, N (N − 1). Orthonormal rows give 0, near-identical rows close to 1. Return a "
           "0-d tensor."))
