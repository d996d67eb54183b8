"""Chapter 08: pre-training — the next-token loss, the learning-rate schedule, gradient accumulation, one
AdamW step, one BPE merge, and the capstone (the learner's loss, schedule and AdamW step train a tiny Gemma)."""

import torch
import torch.nn.functional as F

from ... import learner_train
from ...data import bpe_merge
from ...losses import next_token_loss
from ...train import accumulate_gradients, adamw_step, lr_at
from ..exercise import Case, Exercise, register


def _loss_cases(seed):
    """logits (B, T, V), ids (B, T), mask (B, T) bool: no padding, left and right padding, edges."""
    g = torch.Generator().manual_seed(seed)

    def draw(B, T, V, mask_rows):
        logits = 3 * torch.randn(B, T, V, generator=g)
        ids = torch.randint(0, V, (B, T), generator=g)
        mask = torch.tensor(mask_rows, dtype=torch.bool)
        return logits, ids, mask

    cases = [
        Case("no padding, B=2, T=5", draw(2, 5, 7, [[1] * 5] * 2)),
        Case("left padding (a pad must not predict the first real token)", draw(2, 6, 9, [[0, 0, 1, 1, 1, 1],
                                                                                          [0, 1, 1, 1, 1, 1]])),
        Case("right padding (a real token must not predict a pad)", draw(2, 6, 9, [[1, 1, 1, 1, 0, 0],
                                                                                   [1, 1, 1, 1, 1, 0]])),
        Case("rows with different amounts of padding", draw(3, 7, 11, [[1] * 7, [0, 0, 0, 1, 1, 1, 1],
                                                                       [1, 1, 0, 0, 0, 0, 0]])),
        Case("T=2: a single scored position", draw(1, 2, 5, [[1, 1]])),
        Case("one row with only one real token (nothing to score there)", draw(2, 4, 6, [[0, 0, 0, 1], [1, 1, 1, 1]])),
    ]
    # the logits of a bfloat16 model: the loss is still computed, and returned, in float32 (from the same
    # bfloat16 values, so there is no bfloat16 rounding to allow for: the exercise's tolerance holds)
    logits, ids, mask = draw(2, 6, 9, [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    cases.append(Case("bfloat16 logits: the loss computed and returned in float32", (logits.bfloat16(), ids, mask)))
    B, T, V = (int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(3, 9, (1,), generator=g)),
               int(torch.randint(5, 40, (1,), generator=g)))
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, :2] = True  # at least one scored position per row
    cases.append(Case(f"random B={B}, T={T}, V={V}, random holes in the mask",
                      (3 * torch.randn(B, T, V, generator=g), torch.randint(0, V, (B, T), generator=g), mask)))
    return cases


def _lr_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    peak, warm, total, ratio = 3e-3, 10, 110, 0.1
    for step in (0, 1, 5, 9, 10, 11, 35, 60, 85, 109, 110, 111, 500):
        cases.append(Case(f"step {step} (peak 3e-3, warmup 10, total 110, min ratio 0.1)",
                          (step, peak, warm, total, ratio)))
    cases.append(Case("min ratio 0: decays to 0 at the end", (90, 1.0, 20, 100, 0.0)))
    cases.append(Case("min ratio 0.5, after the end", (150, 1.0, 20, 100, 0.5)))
    cases.append(Case("warmup 1: the first step is already the peak", (0, 2.0, 1, 50, 0.1)))
    cases.append(Case("warmup 1, step 1 (the cosine starts)", (1, 2.0, 1, 50, 0.1)))
    # the one schedule where step == total is not also the end of the cosine: with no decay phase,
    # `step > total` (instead of >=) would give the peak (or divide by total - warmup = 0)
    cases.append(Case("warmup = total (no decay phase): step total is already min", (20, 1.0, 20, 20, 0.1)))
    w, t = int(torch.randint(1, 50, (1,), generator=g)), int(torch.randint(60, 300, (1,), generator=g))
    for _ in range(3):
        s = int(torch.randint(0, t + 20, (1,), generator=g))
        cases.append(Case(f"random: step {s}, warmup {w}, total {t}", (s, 1e-2, w, t, 0.05)))
    return cases


def accumulation_reference(w, x, y, n_micro):
    """(mean loss, gradient of w) with the rows split into n_micro micro-batches (torch.tensor_split)."""
    w = w.detach().clone().requires_grad_()
    parts = torch.tensor_split(torch.arange(x.shape[0]), n_micro)
    loss = accumulate_gradients(lambda idx: F.cross_entropy(x[idx] @ w, y[idx], reduction="sum"), parts, x.shape[0])
    return loss, w.grad


def _accum_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, N, C, V, n in [("12 rows in 3 equal micro-batches", 12, 4, 5, 3),
                              ("10 rows in 4 micro-batches (sizes 3, 3, 2, 2)", 10, 3, 6, 4),
                              ("1 micro-batch: the plain batch", 7, 5, 4, 1),
                              ("5 rows in 5 micro-batches of one row", 5, 2, 3, 5),
                              ("9 rows in 2 micro-batches (5 and 4)", 9, 6, 7, 2)]:
        cases.append(Case(label, (torch.randn(C, V, generator=g), torch.randn(N, C, generator=g),
                                  torch.randint(0, V, (N,), generator=g), n)))
    return cases


register(Exercise(
    "08.next_token_loss", _loss_cases, next_token_loss, atol=1e-5, rtol=1e-5, exact_types=True,
    description="mean over scored positions of -log softmax(logits[b, t])[ids[b, t+1]]; scored iff mask[b, t] "
                "and mask[b, t+1]; a 0-d float32 tensor, computed in float32 whatever the logits' dtype.",
    hint="Position t predicts the token at t + 1, so logits and targets are shifted against each other. "
         "When does a pair count, with padding on the left or the right, and what do you divide by?",
    recipe="1. Pair the logits of positions 0 … T − 2 with the ids of positions 1 … T − 1: (B, T − 1, V) "
           "against (B, T − 1). 2. A pair counts only if both its tokens are real: the mask at t and the mask "
           "at t + 1 are both True (a pad must not predict the first real token, a real token must not predict "
           "a pad). 3. Take log_softmax of the logits over the vocabulary (the last dimension) and pick out, "
           "at each position, the entry of its target id; negate it. 4. Average over the pairs that count: "
           "sum their losses and divide by their number, not by B·(T − 1). A row with a single real token "
           "contributes nothing. 5. Work in float32 whatever the logits' dtype (convert bfloat16 logits before "
           "the log_softmax), so the loss is a 0-d float32 tensor."))
register(Exercise(
    "08.lr_schedule", _lr_cases, lr_at, atol=1e-12, rtol=1e-7, exact_types=True,
    description="lr of step `step` (0-based): linear warmup to peak, then cosine to peak·min_ratio, then flat; "
                "a Python float.",
    hint="Three regimes: warmup, cosine, flat. Does step 0 already get a learning rate, and which regime owns "
         "the step equal to total (even when warmup equals total)?",
    recipe="1. Let min be peak · min_ratio. 2. If step < warmup: return peak · (step + 1) / warmup, so step 0 "
           "already gets a little and step warmup − 1 reaches the peak. 3. Else, if step ≥ total: return min "
           "(test this before the cosine, so that warmup = total never divides by zero). 4. Otherwise the "
           "progress p = (step − warmup) / (total − warmup) runs from 0 towards 1, and the rate is "
           "min + (peak − min) · (1 + cos(π p)) / 2. Return a Python float."))
register(Exercise(
    "08.accumulate", _accum_cases, accumulation_reference, atol=1e-6, rtol=1e-5,
    description="(mean loss over all N rows, dL/dw) from n_micro backward passes, one per micro-batch.",
    hint="Gradients add up over backward passes. What must each micro-batch's loss be divided by so that the "
         "total is the mean over all N rows, even when the micro-batches have different sizes?",
    recipe="1. Make a fresh copy of w, detached from any graph, that requires a gradient (a leaf). 2. Split the "
           "row indices 0 … N − 1 into n_micro consecutive parts, as evenly as possible, the first parts one "
           "larger when N does not divide (10 rows in 4 parts: 3, 3, 2, 2). 3. For each part: logits are its "
           "rows of x times w; take the SUM of the cross-entropies of its rows against their targets, divide "
           "it by N, the total number of rows, and run backward: the gradients add up in the leaf's gradient. "
           "Dividing each part's mean by n_micro is only right when the parts have equal sizes. 4. Return the "
           "mean loss over all N rows (the parts' sums added, divided by N) and the accumulated gradient "
           "of w."))


# --------------------------------------------------------------------------------------------
# One AdamW step, in place
# --------------------------------------------------------------------------------------------
def adamw_reference(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    """`train.adamw_step` (torch.optim.AdamW's step, bit for bit), run through `_adamw_call`."""
    return adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay)


def _adamw_call(fn, args, kwargs):
    """What is compared: param, exp_avg and exp_avg_sq after the call (the update is in place; what the
    function returns is not used)."""
    fn(*args, **kwargs)
    return args[0], args[2], args[3]


def _adam_case(g, label, shape, step, lr, betas, eps, wd, grad_scale=1.0):
    """param ~ N(0, 1); gradients of size grad_scale·[0.5, 1.5) (never near 0, so eps matters only where a case
    says so); moments of a run in progress (zero at step 1), with v >= m²."""
    param = torch.randn(shape, generator=g)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    grad = grad_scale * sign * (0.5 + torch.rand(shape, generator=g))
    if step == 1:
        m, v = torch.zeros(shape), torch.zeros(shape)
    else:
        m = 0.3 * grad_scale * torch.randn(shape, generator=g)
        v = m ** 2 + grad_scale ** 2 * (0.05 + 0.5 * torch.rand(shape, generator=g))
    return Case(label, (param, grad, m, v, step, lr, betas, eps, wd))


def _adamw_cases(seed):
    """Cases from small to large; each of the first six isolates one idea (the others cannot change it), so
    the first failing case names the mistake."""
    g = torch.Generator().manual_seed(seed)
    big = 100_000  # both bias corrections are 1 (β2^100000 < 1e-43)
    std = (0.9, 0.999)
    cases = [
        _adam_case(g, "in place: param, exp_avg and exp_avg_sq themselves hold the new values", (2,), big, 0.1,
                   std, 1e-8, 0.0),
        _adam_case(g, "step 1 is the first step, not step 0: bias correction 1 - β^step (betas 0, 0)", (3,), 1,
                   0.1, (0.0, 0.0), 1e-8, 0.0),
        _adam_case(g, "bias correction at step 3: m / (1 - β1^3) and v / (1 - β2^3)", (4,), 3, 0.1, std, 1e-8,
                   0.0),
        _adam_case(g, "decoupled weight decay: p · (1 - lr·wd) on the weights, never wd·p added to the gradient "
                   "(that is Adam + L2)", (5,), big, 1e-4, std, 1e-8, 0.5),
        _adam_case(g, "weight decay on the weights before the update, not after it (lr 0.5, wd 0.5)", (6,), big, 0.5,
                   std, 1e-8, 0.5),
        _adam_case(g, "eps is added to sqrt(v̂), outside the square root (gradients near 1e-4, eps 1e-3)", (7,), big,
                   0.1, std, 1e-3, 0.0, grad_scale=1e-4),
        _adam_case(g, "weight_decay 0: plain Adam, step 7", (2, 4), 7, 0.01, (0.9, 0.95), 1e-8, 0.0),
        _adam_case(g, "step 1 from zero moments (the first update)", (3, 3), 1, 0.01, std, 1e-8, 0.1),
        _adam_case(g, "a large step (1,000,000): both bias corrections are 1", (2, 5), 1_000_000, 0.01, std, 1e-8, 0.1),
    ]
    for shape, betas in (((4, 6), (0.9, 0.95)), ((16,), std)):
        step = int(torch.randint(2, 200, (1,), generator=g))
        lr = float(10 ** (-3 + 2 * torch.rand(1, generator=g)))
        wd = float(0.2 * torch.rand(1, generator=g))
        cases.append(_adam_case(g, f"random {tuple(shape)}: step {step}, lr {lr:.2g}, betas {betas}, wd {wd:.2g}",
                                shape, step, lr, betas, 1e-8, wd))
    return cases


register(Exercise(
    "08.adamw_step", _adamw_cases, adamw_reference, atol=1e-6, rtol=1e-5, call=_adamw_call,
    description="one AdamW step on float32 tensors, in place: param, exp_avg (m) and exp_avg_sq (v) updated with "
                "decoupled weight decay and bias correction, step = 1 for the first update.",
    hint="Follow the order of the statement: the decay first, on the weights alone; then the two moments; then the "
         "bias-corrected update. And write into the tensors you were given: a new tensor bound to the same name "
         "leaves the caller's tensor as it was.",
    recipe="Shrink param in place by the factor one minus lr times weight_decay. Update exp_avg in place to beta1 "
           "times itself plus one minus beta1 times grad, and exp_avg_sq in place to beta2 times itself plus one "
           "minus beta2 times grad squared. Divide exp_avg by one minus beta1 to the power step, and exp_avg_sq by "
           "one minus beta2 to the power step (step is already 1 on the first call). Take the square root of the "
           "corrected exp_avg_sq, add eps to it (after the root), and subtract lr times the corrected exp_avg "
           "divided by that from param, in place. Return nothing."))


# --------------------------------------------------------------------------------------------
# One BPE merge
# --------------------------------------------------------------------------------------------
def _bpe_cases(seed):
    """Cases from small to large; each of the small ones isolates one rule, so the first failing case names it."""
    g = torch.Generator().manual_seed(seed)

    def draw(n, vocab, longest):
        return [torch.randint(3, 3 + vocab, (int(torch.randint(0, longest + 1, (1,), generator=g)),),
                              generator=g).tolist() for _ in range(n)]

    cases = [
        Case("only empty sequences: nothing to merge (every sequence kept, pair None)", ([[], []], 10)),
        Case("no pair inside any sequence (a pair never spans two sequences): unchanged, pair None",
             ([[5], [9]], 10)),
        Case("[7, 7, 7]: one merge, from the left: [new, 7]", ([[7, 7, 7]], 8)),
        Case("empty sequences stay in place, as empty lists", ([[], [4, 6], [], [4, 6], []], 9)),
        Case("every occurrence in a sequence is replaced, not only the first", ([[1, 2, 3, 1, 2]], 20)),
        Case("a tie: the smallest pair wins, not the first one counted", ([[9, 8], [3, 4]], 12)),
        Case("a pair that spans two sequences does not count", ([[1], [2, 3], [1], [2, 3]], 30)),
        Case("a pair repeated inside one sequence counts each time", ([[4, 5, 4, 5], [1, 2]], 6)),
        Case("overlapping occurrences all count: [7, 7, 7] holds (7, 7) twice",
             ([[7, 7, 7], [7, 7, 7], [1, 2], [1, 2], [1, 2]], 40)),
        Case("a tie decided by the second id: (3, 4) before (3, 9)", ([[3, 9], [5, 3, 4], [3, 9, 1], [3, 4]], 11)),
    ]
    for n, vocab, longest in ((6, 3, 10), (12, 5, 16), (20, 4, 30)):
        corpus = draw(n, vocab, longest)
        cases.append(Case(f"random: {n} sequences of up to {longest} ids from {vocab}", (corpus, 3 + vocab)))
    return cases


register(Exercise(
    "08.bpe_merge", _bpe_cases, bpe_merge, exact_types=True,
    description="corpus (a list of lists of token ids), new_id -> (the new corpus, the merged pair (a, b)): the "
                "most frequent adjacent pair (the smallest on a tie) replaced by new_id, left to right; "
                "(corpus, None) when no sequence holds a pair.",
    hint="Two passes. The first only counts: pairs of neighbours inside each sequence, every position (so a run "
         "of three equal ids holds its pair twice). The second rewrites each sequence with a position that walks "
         "from left to right and jumps past both ids of a pair it merges.",
    recipe="Count every adjacent pair (a, b) of each sequence in a dictionary, one sequence at a time so that "
           "no pair joins the end of one sequence to the start of the next. If the dictionary is empty, return "
           "copies of the sequences and None. Otherwise take the largest count, and among the pairs that have it "
           "the smallest (ordered by a, then by b). Then build each new sequence: start at the first position; "
           "if the id there and the next one form the pair, append new_id and move two places on, else append "
           "the id and move one place on. Keep empty sequences as empty lists, and return the new sequences with "
           "the pair as a tuple."))


# --------------------------------------------------------------------------------------------
# The capstone: your loss, schedule and AdamW step train a tiny Gemma
# --------------------------------------------------------------------------------------------
CAPSTONE_STEPS = 20  # warm-up for 5 steps, then the cosine down to step 20


def capstone_reference(steps):
    """The package's own loss curve (computed once per process: it does not depend on the seed)."""
    return learner_train.reference_curve(steps)


register(Exercise(
    "08.capstone",
    lambda seed: [Case(f"{CAPSTONE_STEPS} steps of a tiny Gemma (2 layers, width 32): warm-up 5 steps, then the "
                       f"cosine; every step's loss within {learner_train.TOLERANCE:g}", (CAPSTONE_STEPS,))],
    capstone_reference, atol=learner_train.TOLERANCE, rtol=0.0, timeout_s=60.0, diagnose=learner_train.diagnose,
    description="Your code trains a model: YourTraining(next_token_loss=..., lr_schedule=..., adamw_step=...) "
                f"gives the package's loss curve over {CAPSTONE_STEPS} steps.",
    hint="Each function must first pass its own check (08.next_token_loss, 08.lr_schedule, 08.adamw_step). If the "
         "curve still differs, the report names the function that changes it when swapped in alone, and the first "
         "step where the loss is off: step 0 points at the loss, a later step at what the update does.",
    recipe="Run the three checks again and fix the first that fails. Then read the report: the function it names is "
           "the one to look at, in the loop's own conditions. The loss sees a batch where one row is padded on the "
           "left and one on the right; the schedule is asked for steps 0 to 19 of a 20-step run; the AdamW step is "
           "called on every parameter under no_grad, with the step counted from 1 and the moments it must update in "
           "place, and weight decay only on matrices."))
