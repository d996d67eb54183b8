"""Chapter 08: pre-training — the next-token loss, the learning-rate schedule, gradient accumulation."""

import torch
import torch.nn.functional as F

from ...losses import next_token_loss
from ...train import accumulate_gradients, lr_at
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
    "08.next_token_loss", _loss_cases, next_token_loss, atol=1e-5, rtol=1e-5,
    description="mean over scored positions of -log softmax(logits[b, t])[ids[b, t+1]]; scored iff mask[b, t] "
                "and mask[b, t+1].",
    hint="Position t predicts the token at t + 1: pair logits[:, :-1] with ids[:, 1:]. A pair counts only if "
         "both tokens are real: mask[:, :-1] & mask[:, 1:]. Take log_softmax over the last dimension, gather the "
         "target's entry, and average over the pairs that count (divide by their number, not by B·(T-1))."))
register(Exercise(
    "08.lr_schedule", _lr_cases, lr_at, atol=1e-12, rtol=1e-7,
    description="lr of step `step` (0-based): linear warmup to peak, then cosine to peak·min_ratio, then flat.",
    hint="Three regimes. step < warmup: peak · (step + 1) / warmup (step 0 already gets a little). From warmup "
         "to total: progress p = (step - warmup) / (total - warmup) goes from 0 to 1, and "
         "lr = min + (peak - min) · (1 + cos(pi p)) / 2 with min = peak · min_ratio. At and after total: min."))
register(Exercise(
    "08.accumulate", _accum_cases, accumulation_reference, atol=1e-6, rtol=1e-5,
    description="(mean loss over all N rows, dL/dw) from n_micro backward passes, one per micro-batch.",
    hint="Make w a leaf that requires grad: w = w.detach().clone().requires_grad_(). Split the row indices with "
         "torch.tensor_split(torch.arange(N), n_micro). For each part, the SUM of its cross-entropies "
         "(reduction='sum') divided by N, the total number of rows, then .backward(): the gradients add up in "
         "w.grad. Dividing each part's mean by n_micro is only right when the parts have equal sizes."))
