"""Chapter 13: attention kernels, in chapter 12's style (the learner writes a kernel body).

Three pieces of the package's attention kernels (`minigemma.kernels.attention`), each small enough to
write in a few lines and each checked the same way as chapter 12's: the exercise fixes the kernel's
signature, grid and blocks; the check runs it through a *launcher* in Triton's interpreter on CPU
with every load and store bounds-checked; outputs start as NaN so that an element no program writes
shows up.

    check_kernel("13.online_softmax", online_softmax_kernel)

- 13.online_softmax: one block's update of the running maximum, sum and output of flash attention;
- 13.key_range: which keys a block of queries can see at all (the blocks outside are skipped);
- 13.combine_splits: split-K decoding's merge of partial outputs by their log-sum-exp.

The references are torch specs: the online softmax's update from its definition, the key range from
`minigemma.attention.index_mask` (first and last visible key of the block), the merge as a softmax
over the splits' log-sum-exps.
"""

from __future__ import annotations

import torch

from ...attention import index_mask
from ..exercise import Case, Exercise, register


def _run(kernel, grid, *args, **meta):
    import minigemma.kernels  # noqa: F401  (TRITON_INTERPRET before Triton, when there is no GPU)
    from minigemma.kernels.interpret import launch_checked

    launch_checked(kernel, grid, *args, **meta)


def _nans(*shape) -> torch.Tensor:
    return torch.full(shape, float("nan"))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# 1. the online softmax: one block of keys folded into the running (m, l, acc)
# --------------------------------------------------------------------------------------------
OS_BLOCK_M, OS_BLOCK_N, OS_BLOCK_D = 16, 16, 16


def _online_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, M, N, D, first, masked in [
        ("first block (m = -inf, l = 0, acc = 0), 5 queries x 7 keys", 5, 7, 4, True, 0.0),
        ("a later block, 16 x 16, D = 16", 16, 16, 16, False, 0.0),
        ("a later block, scores above the running max", 9, 11, 6, False, 0.0),
        ("masked scores (-inf), a row masked entirely", 12, 10, 5, False, 0.3),
        ("first block, a query that sees nothing yet", 6, 8, 3, True, 0.3),
        ("30 queries: two programs", 30, 13, 8, False, 0.2),
    ]:
        x = 3 * torch.randn(M, N, generator=g)
        if label.startswith("a later block, scores above"):
            x += 4.0
        if masked:
            x[torch.rand(M, N, generator=g) < masked] = NEG_INF
            x[1] = NEG_INF  # a row that sees none of this block's keys
        v = torch.randn(N, D, generator=g)
        if first:
            m, l, acc = torch.full((M,), NEG_INF), torch.zeros(M), torch.zeros(M, D)
        else:
            m = 3 * torch.randn(M, generator=g) + 1.0
            l = torch.rand(M, generator=g) * 5 + 1.0
            acc = torch.randn(M, D, generator=g) * l[:, None]
        cases.append(Case(label, (m, l, acc, x, v)))
    return cases


def online_softmax_spec(m, l, acc, x, v):
    """Fold a block of scores x (M, N) with values v (N, D) into each query's running maximum m (M,),
    sum l (M,) and unnormalised output acc (M, D). Returns the new (m, l, acc).

        m' = max(m, max_j x_j);  α = exp(m − m');  p_j = exp(x_j − m');  l' = α l + Σ_j p_j;  acc' = α acc + p v

    A query that has seen no key yet (m' = -inf) keeps m' = -inf, l' = 0, acc' = 0."""
    m_new = torch.maximum(m, x.max(dim=1).values)
    m_use = torch.where(m_new == NEG_INF, 0.0, m_new)
    alpha = torch.exp(m - m_use)
    p = torch.exp(x - m_use[:, None])
    return m_new, alpha * l + p.sum(1), alpha[:, None] * acc + p @ v


def _launch_online_softmax(kernel):
    def online_softmax(m, l, acc, x, v):
        M, N = x.shape
        D = v.shape[1]
        m_out, l_out, acc_out = _nans(M), _nans(M), _nans(M, D)
        _run(kernel, (_cdiv(M, OS_BLOCK_M),), m.contiguous(), l.contiguous(), acc.contiguous(), x.contiguous(),
             v.contiguous(), m_out, l_out, acc_out, M, N, D, BLOCK_M=OS_BLOCK_M, BLOCK_N=OS_BLOCK_N,
             BLOCK_D=OS_BLOCK_D)
        return m_out, l_out, acc_out
    return online_softmax


# --------------------------------------------------------------------------------------------
# 2. the key range of a block of queries: what block skipping needs
# --------------------------------------------------------------------------------------------
KR_BLOCK_M = 16


def _range_cases(seed):
    g = torch.Generator().manual_seed(seed)
    W = int(torch.randint(3, 12, (1,), generator=g))
    cases = []
    for label, T, S, q_start, k_first, window, causal in [
        ("causal, T = 40", 40, 40, 0, 0, None, True),
        (f"causal window {W}, T = 50", 50, 50, 0, 0, W, True),
        ("causal window 16 = the block, T = 64", 64, 64, 0, 0, 16, True),
        (f"bidirectional band {W}, T = 45", 45, 45, 0, 0, W, False),
        ("bidirectional, no window, T = 20", 20, 20, 0, 0, None, False),
        ("a chunk of 30 queries at index 100 after a ring's 9 keys (first key 91), window 10", 30, 39, 100, 91,
         10, True),
        ("a chunk of 20 queries at index 12 after 12 cached keys, global", 20, 32, 12, 0, None, True),
    ]:
        cases.append(Case(label, (T, S, q_start, k_first, window, causal), atol=0, rtol=0))
    return cases


def key_range_spec(T, S, q_start, k_first, window, causal):
    """(cdiv(T, 16), 2) int32: for each block of 16 queries (indices q_start + 16·b ...), the slots
    [lo, hi) of the first and one past the last key (slot s holds index k_first + s) that some query of
    the block sees under `index_mask(q, k, window, causal=causal)`."""
    q_idx = torch.arange(q_start, q_start + T)
    k_idx = torch.arange(k_first, k_first + S)
    seen = index_mask(q_idx, k_idx, window, causal=causal).expand(T, S)  # (T, S)
    out = []
    for b in range(0, T, KR_BLOCK_M):
        cols = seen[b:b + KR_BLOCK_M].any(dim=0).nonzero()[:, 0]
        out.append([int(cols.min()), int(cols.max()) + 1])
    return torch.tensor(out, dtype=torch.int32)


def _launch_key_range(kernel):
    def key_range(T, S, q_start, k_first, window, causal):
        n = _cdiv(T, KR_BLOCK_M)
        out = torch.full((n, 2), -12345, dtype=torch.int32)
        _run(kernel, (n,), out, T, S, q_start, k_first, window or 0, CAUSAL=causal, WINDOW=window is not None,
             BLOCK_M=KR_BLOCK_M)
        return out
    return key_range


# --------------------------------------------------------------------------------------------
# 3. split-K decoding: merge the splits' partial outputs
# --------------------------------------------------------------------------------------------
CB_BLOCK_S, CB_BLOCK_D = 16, 16


def _combine_cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for label, R, n, D, kind in [("4 rows, 3 splits, D = 8", 4, 3, 8, "plain"),
                                 ("one split: nothing to merge", 2, 1, 5, "plain"),
                                 ("log-sum-exps near 1000: subtract the maximum", 3, 5, 16, "large"),
                                 ("a split that saw no key (lse = -inf, its output 0)", 3, 4, 6, "empty"),
                                 ("12 splits, D = 20 (two blocks of columns)", 2, 12, 20, "plain")]:
        lse = 2 * torch.randn(R, n, generator=g)
        if kind == "large":
            lse += 1000.0
        o = torch.randn(R, n, D, generator=g)
        if kind == "empty":
            lse[:, 1] = NEG_INF
            o[:, 1] = 0.0
        cases.append(Case(label, (o, lse)))
    return cases


def combine_splits_spec(o, lse):
    """o (R, n, D): each split's normalised partial output; lse (R, n): its log-sum-exp of scores.
    The whole softmax's output is Σ_s w_s o_s with w = softmax(lse) over the splits. Returns (R, D)."""
    w = torch.softmax(lse, dim=1)  # a split with lse = -inf weighs 0
    return (w[:, :, None] * o).sum(1)


def _launch_combine(kernel):
    def combine(o, lse):
        R, n, D = o.shape
        out = _nans(R, D)
        _run(kernel, (R, _cdiv(D, CB_BLOCK_D)), o.contiguous(), lse.contiguous(), out, n, D,
             BLOCK_S=CB_BLOCK_S, BLOCK_D=CB_BLOCK_D)
        return out
    return combine


# --------------------------------------------------------------------------------------------
LAUNCHERS = {
    "13.online_softmax": _launch_online_softmax,
    "13.key_range": _launch_key_range,
    "13.combine_splits": _launch_combine,
}


def launch(name: str, kernel):
    """The torch function that exercise `name` checks: it runs `kernel` with the exercise's grid and blocks."""
    if name not in LAUNCHERS:
        raise KeyError(f"no kernel exercise {name!r}; known: {', '.join(LAUNCHERS)}")
    return LAUNCHERS[name](kernel)


register(Exercise("13.online_softmax", _online_cases, online_softmax_spec,
                  description="Fold one block of scores into the running (m, l, acc) of flash attention; "
                              "16 queries per program.",
                  hint="m_new = tl.maximum(m, tl.max(x, axis=1)). Rescale what was summed so far by "
                       "alpha = exp(m - m_new), both l and acc. A row whose m_new is -inf would compute "
                       "exp(-inf - (-inf)) = nan: subtract tl.where(m_new == -inf, 0.0, m_new) instead.",
                       launch=LAUNCHERS["13.online_softmax"]))
register(Exercise("13.key_range", _range_cases, key_range_spec,
                  description="For each block of 16 queries, the slots [lo, hi) of the keys any of them can see.",
                  hint="Work in indices: the block's queries are i_lo .. i_hi (the last one is the last real "
                       "query, T may cut the block). Causal: nothing after i_hi. A window W: nothing before "
                       "i_lo - W + 1, and for a band nothing after i_hi + W - 1. Clip to the keys' own indices "
                       "k_first .. k_first + S - 1, then subtract k_first.", launch=LAUNCHERS["13.key_range"]))
register(Exercise("13.combine_splits", _combine_cases, combine_splits_spec,
                  description="Merge the partial outputs of split-K decoding, weighted by exp(lse), "
                              "one program per (row, block of 16 columns).",
                  hint="w_s = exp(lse_s - max_s lse_s): subtracting the maximum keeps exp from overflowing. "
                       "Load the missing splits with other=-inf so they weigh 0, and divide by Σ w_s.",
                  launch=LAUNCHERS["13.combine_splits"]))
