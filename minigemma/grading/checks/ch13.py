"""Chapter 13: attention kernels, in chapter 12's style (the learner writes a kernel body).

Three pieces of the package's attention kernels (`minigemma.kernels.attention`), each small enough to
write in a few lines, then a whole forward kernel built from the first two; each checked the same way
as chapter 12's: the exercise fixes the kernel's
signature, grid and blocks; the check runs it through a *launcher* in Triton's interpreter on CPU
with every load and store bounds-checked; outputs start as NaN so that an element no program writes
shows up.

    check_kernel("13.online_softmax", online_softmax_kernel)

- 13.online_softmax: one block's update of the running maximum, sum and output of flash attention;
- 13.key_range: which keys a block of queries can see at all (the blocks outside are skipped);
- 13.combine_splits: split-K decoding's merge of partial outputs by their log-sum-exp;
- 13.flash_forward_window: the whole forward kernel of a causal sliding window, the first two put
  together: the online softmax over the key blocks a block of queries can see, and only over those.

The references are torch specs: the online softmax's update from its definition, the key range from
`minigemma.attention.index_mask` (first and last visible key of the block), the merge as a softmax
over the splits' log-sum-exps, the windowed attention as the package's own
`minigemma.attention.scaled_dot_product_attention` under `index_mask`'s window.

13.flash_forward_window grades block skipping as well as values: its launcher watches every load from
k and v, and a program that loads a key block none of its queries can see (before the window, or
after the block's last query) fails with `BlockSkippingError`, naming the program and the keys.

13.capstone runs the learner's 13.flash_forward_window, 12.rms_norm_rows and 12.geglu_rows inside the real
Gemma 3 270M on the package's kernels (`minigemma.learner_kernels`, each launched by its exercise's launcher)
and compares a prompt's logits and greedy next tokens with the model's own, its local window cut to 4 in both;
the diagnosis swaps each kernel in alone and names the one that breaks them.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ...attention import index_mask, scaled_dot_product_attention
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
# 4. the whole forward kernel of a causal sliding window: online softmax + block skipping
# --------------------------------------------------------------------------------------------
FW_BLOCK_M, FW_BLOCK_N = 32, 16


class BlockSkippingError(Exception):
    """A program of 13.flash_forward_window loaded a key block that none of its queries can see."""


def _flash_cases(seed):
    g = torch.Generator().manual_seed(seed)
    T_r = int(torch.randint(33, 90, (1,), generator=g))
    W_r = int(torch.randint(2, 40, (1,), generator=g))
    s_r = round(float(torch.rand(1, generator=g)) * 0.8 + 0.2, 2)
    cases = []
    # (label, H, T, D, window, scale, shift of every score); scale 1 unless the case is about it
    for label, H, T, D, W, scale, shift in [
        ("T = 6, window 100 (longer than T): plain causal attention, query i sees keys 0..i", 1, 6, 16, 100, 1.0, 0),
        ("T = 7, window 3: query i sees keys i-2..i (the window counts the query itself)", 1, 7, 16, 3, 1.0, 0),
        ("T = 12, window 1: each query sees only itself", 1, 12, 16, 1, 1.0, 0),
        ("T = 9, window 5, scale 0.3: the scores are q·k times scale", 1, 9, 16, 5, 0.3, 0),
        ("T = 16, window 10, every score near +150: exp overflows unless the running max is subtracted",
         1, 16, 16, 10, 1.0, 150),
        ("T = 16, window 10, every score near -150: exp underflows to 0 unless m starts at -inf",
         1, 16, 16, 10, 1.0, -150),
        ("T = 30, window 25: queries 16..29 see two key blocks: acc and l rescaled when the max grows, "
         "divided by l once, at the end", 1, 30, 16, 25, 1.0, 0),
        ("T = 32, window 5: query 0 needs key block 0, where queries 20..31 see no key (their m is still -inf "
         "there: no NaN)", 1, 32, 16, 5, 1.0, 0),
        ("2 heads, T = 18, window 6: head h's rows start at h·T·D", 2, 18, 16, 6, 1.0, 0),
        ("T = 40, window 4: block skipping: queries 32..39 see keys 29..39 only (key block 0 is never visited), "
         "queries 0..31 never visit key block 2", 1, 40, 16, 4, 1.0, 0),
        ("D = 32, T = 21, window 7: the head dimension is D", 1, 21, 32, 7, 1.0, 0),
        ("2 heads, T = 70, window 16 = a key block", 2, 70, 16, 16, 1.0, 0),
        ("T = 100, window 40, scale 0.25: 2 to 5 key blocks per query block", 1, 100, 16, 40, 0.25, 0),
        (f"random: 2 heads, T = {T_r}, window {W_r}, scale {s_r}", 2, T_r, 16, W_r, s_r, 0),
    ]:
        q, k, v = (torch.randn(H, T, D, generator=g) for _ in range(3))
        tol = {}
        if shift:  # the last dimension adds `shift` to every score (the same for a whole row: same softmax)
            a = abs(shift) ** 0.5
            q[..., -1], k[..., -1] = a, a if shift > 0 else -a
            tol = dict(atol=1e-4, rtol=1e-3)  # scores near 150 carry float32's 1.5e-5 steps into exp
        cases.append(Case(label, (q, k, v, scale, W), **tol))
    return cases


def flash_window_spec(q, k, v, scale, window):
    """Causal sliding-window attention of every head: q, k, v (H, T, D) -> (H, T, D).

    softmax(q kᵀ · scale) v where query i sees key j iff j <= i and i - j < window
    (`index_mask(arange(T), arange(T), window)`), by the package's `scaled_dot_product_attention`."""
    idx = torch.arange(q.shape[1])
    mask = index_mask(idx, idx, window)  # (T, T)
    return scaled_dot_product_attention(q[None], k[None], v[None], mask, scale=scale)[0]


@contextlib.contextmanager
def _watch_key_blocks(k, v, T, D, window, BLOCK_M):
    """Inside: every load of an interpreted launch from k or v must touch a key that some query of the
    loading program's block can see; else BlockSkippingError. The program (pid_m, h) holds queries
    i_lo = 32·pid_m .. i_hi (the last one cut by T) of head h, which see keys max(0, i_lo - window + 1) .. i_hi.

    A load is judged by its active lanes (all of them inside head h's keys: a load that reads another
    head's is left to the values' comparison), or, when its mask is off everywhere, by the keys its
    addresses name (its lowest address in k or v, and one of them among head h's keys 0 .. T-1): a loop
    that visits a key block but masks its loads off still visits it."""
    import minigemma.kernels  # noqa: F401  (TRITON_INTERPRET before Triton, when there is no GPU)
    from triton.runtime import interpreter as ti

    builder = ti.interpreter_builder
    own = "create_masked_load" in vars(builder)
    load0 = builder.create_masked_load
    row_bytes = D * k.element_size()
    tensors = [(name, t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for name, t in (("k", k), ("v", v))]

    def judge(ptrs, mask):
        addr = np.asarray(ptrs.data).astype(np.int64).reshape(-1)
        on = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data)).reshape(-1)
        active = on.any()
        lanes = addr[on] if active else addr
        for name, lo_b, hi_b in tensors:
            inside = (lanes >= lo_b) & (lanes < hi_b)
            if not (inside.all() if active else inside[lanes.argmin()]):  # masked off: named by its first key
                continue
            pid_m, h = (int(x) for x in builder.grid_idx[:2])
            j = (lanes - lo_b) // row_bytes - h * T  # key indices within head h
            if active and ((j < 0) | (j >= T)).any():
                return  # another head's keys: the values will show it
            if not active:
                j = j[(j >= 0) & (j < T)]
                if j.size == 0:
                    return  # a block past the last key: nothing there to visit
            i_lo = pid_m * BLOCK_M
            i_hi = min(T, i_lo + BLOCK_M) - 1
            first = max(0, i_lo - window + 1)
            if ((j >= first) & (j <= i_hi)).any():
                return
            where = ("entirely before the window" if j.max() < first else
                     "entirely after the block's last query (causal: no query sees a later key)")
            how = "loaded" if active else "visited"
            why = "" if active else " (its load masked them all off, but the loop still went there)"
            raise BlockSkippingError(
                f"a key block {where} was visited: skip it. Program ({pid_m}, {h}) holds queries {i_lo}..{i_hi} "
                f"with window {window}, which see keys {first}..{i_hi} only, but it {how} keys "
                f"{int(j.min())}..{int(j.max())} of `{name}`{why}")

    def load(ptrs, mask, other, *rest):
        judge(ptrs, mask)
        return load0(ptrs, mask, other, *rest)

    builder.create_masked_load = load  # on the instance only; bounds_checked() wraps it in turn
    try:
        yield
    finally:
        if own:
            builder.create_masked_load = load0
        else:
            del builder.create_masked_load


def _launch_flash_window(kernel):
    def flash_window(q, k, v, scale, window):
        H, T, D = q.shape
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o = _nans(H, T, D)
        with _watch_key_blocks(k, v, T, D, window, FW_BLOCK_M):
            _run(kernel, (_cdiv(T, FW_BLOCK_M), H), q, k, v, o, T, scale, window, D=D, BLOCK_M=FW_BLOCK_M,
                 BLOCK_N=FW_BLOCK_N)
        return o
    return flash_window


# --------------------------------------------------------------------------------------------
LAUNCHERS = {
    "13.online_softmax": _launch_online_softmax,
    "13.key_range": _launch_key_range,
    "13.combine_splits": _launch_combine,
    "13.flash_forward_window": _launch_flash_window,
}


def launch(name: str, kernel):
    """The torch function that exercise `name` checks: it runs `kernel` with the exercise's grid and blocks."""
    if name not in LAUNCHERS:
        raise KeyError(f"no kernel exercise {name!r}; known: {', '.join(LAUNCHERS)}")
    return LAUNCHERS[name](kernel)


register(Exercise("13.online_softmax", _online_cases, online_softmax_spec,
                  description="Fold one block of scores into the running (m, l, acc) of flash attention; "
                              "16 queries per program.",
                  hint="When the block raises a row's maximum, what must happen to what that row has summed so "
                       "far, l and acc alike? And what does a row that has still seen no key compute, with "
                       "−inf − (−inf) in an exponent?",
                  recipe="1. The program id picks 16 query rows; mask rows < M. Load m, l and the acc rows "
                         "(columns masked by d < D), the block of scores x (rows × keys, masked by row < M and "
                         "key < N, with −inf in the masked lanes so they weigh exp(−inf) = 0) and v (keys × D, "
                         "masked, 0.0 outside). 2. The new maximum m′ of each row is max(m, the row's maximum of "
                         "x). 3. Guard: where m′ is −inf (a row that has seen no key yet, or a fully masked row on "
                         "the first block), subtract 0 instead of m′ below, else exp(−inf − (−inf)) gives nan. "
                         "4. With that value u: α = exp(m − u) rescales what was summed so far, and "
                         "p = exp(x − u) for the block, in float32. 5. l′ = α·l + the row sum of p; acc′ = α·acc + "
                         "the matrix product of p (rows × keys) and v (keys × D). 6. Store m′, l′ and acc′ into "
                         "m_out, l_out and acc_out with the row (and column) masks. A row that has seen nothing "
                         "keeps m′ = −inf, l′ = 0, acc′ = 0.",
                       launch=LAUNCHERS["13.online_softmax"]))
register(Exercise("13.key_range", _range_cases, key_range_spec,
                  description="For each block of 16 queries, the slots [lo, hi) of the keys any of them can see.",
                  hint="Work in token indices, not slots: which is the block's first query, which its last real "
                       "one (T may cut the block), and how far back and forward can each of them see?",
                  recipe="1. The program id b picks the block: its first query has index i_lo = q_start + 16b, "
                         "and its last real one i_hi = q_start + min(16b + 16, T) − 1 (T may cut the last block). "
                         "2. The keys hold indices k_first … k_first + S − 1, slot s holding index k_first + s. "
                         "3. Start from the widest range, all the keys. If causal, nothing after i_hi. With a "
                         "window W (the WINDOW flag set), nothing before i_lo − W + 1; and for a bidirectional band "
                         "(not causal), nothing after i_hi + W − 1 either. Without a window and not causal, every "
                         "key is seen. 4. Clip the range to the keys' own indices, then subtract k_first to turn "
                         "indices into slots. 5. Store lo, the first slot, and hi, one past the last, as the two "
                         "int32 entries of row b of out (at 2b and 2b + 1).",
                  launch=LAUNCHERS["13.key_range"]))
register(Exercise("13.combine_splits", _combine_cases, combine_splits_spec,
                  description="Merge the partial outputs of split-K decoding, weighted by exp(lse), "
                              "one program per (row, block of 16 columns).",
                  hint="Each split's weight is exp of its log-sum-exp, and those are near 1000 in one case. What do "
                       "you subtract first, what should the lanes past the last split weigh, and what do you "
                       "divide by?",
                  recipe="1. Program id 0 is the row r, program id 1 the block of 16 columns d; mask d < D. "
                         "2. Take a block of split offsets 0 … BLOCK_S − 1 with the mask s < n. Load lse of row r at "
                         "r · n + s, filling the missing splits with −inf so they weigh 0. 3. The weights are "
                         "w_s = exp(lse_s − max over s of lse_s): subtracting the maximum keeps exp from "
                         "overflowing (a split that saw no key has lse = −inf and weighs 0). 4. Load the outputs, "
                         "element (r, s, d) at (r · n + s) · D + d, masked on both s and d with 0.0 outside. "
                         "5. The merged output is Σ_s w_s · o_s divided by Σ_s w_s, for each column. 6. Store it at "
                         "r · D + d with the column mask. With one split it is that split's output.",
                  launch=LAUNCHERS["13.combine_splits"]))
register(Exercise("13.flash_forward_window", _flash_cases, flash_window_spec,
                  description="The forward kernel of causal sliding-window attention: one program per (block of "
                              "32 queries, head), the online softmax over blocks of 16 keys, only the key blocks "
                              "the window reaches.",
                  hint="13.key_range gives the loop's bounds: the first key the block's first query sees and the "
                       "block's last real query (T cuts the last block); a loop over blocks of keys can start at "
                       "the block holding that first key. Inside, the score mask is per element (each query has "
                       "its own window), and the update is 13.online_softmax's, guard included. Normalise once, "
                       "after the loop.",
                  recipe="1. Program id 0 picks the block of 32 queries, i_lo = 32 · id plus 0 … 31, masked by "
                         "i < T; program id 1 is the head h. Head h's row i is at (h · T + i) · D, for q, k, v and o "
                         "alike. Load the q block (rows × D). 2. Bounds, as in 13.key_range: the block's last real "
                         "query i_hi = min(i_lo + 32, T) − 1, and the first key its first query sees, "
                         "max(0, i_lo − window + 1). Start the loop at the key block of 16 that holds that key "
                         "(round it down to a multiple of 16), and stop after the block holding i_hi; never visit a "
                         "key block that no query of the block can see. 3. Running state per query: m = −inf, "
                         "l = 0, acc = 0 (rows × D), all float32. 4. For each key block: load k and v at the key "
                         "offsets, masked by key < T; scores are q times k transposed, times scale. Mask them per "
                         "element, query i sees key j when j ≤ i and i − j < window (and j < T), with −inf "
                         "elsewhere. 5. Fold the block in with 13.online_softmax's update, the guard for a row whose "
                         "maximum is still −inf included (in an early key block, late queries see nothing). "
                         "6. After the loop divide acc by l, once, and store it into o with the row mask.",
                  launch=LAUNCHERS["13.flash_forward_window"]))


# --------------------------------------------------------------------------------------------
# 5. the capstone: your kernels inside the real Gemma 3 270M (minigemma/learner_kernels.py)
# --------------------------------------------------------------------------------------------
# The 270M's local layers see 512 keys, more than a prompt the interpreter can afford (each program of a kernel costs
# it a few ms, and one prompt of T tokens runs some 200 T of them): the capstone cuts the window to 4, in the model
# it compares with as in yours, so that it cuts keys (queries 4..7 of the 8). 8 tokens: one block of 32 queries
# and one of 16 keys, both cut by T (their tails masked); too short for a key block to be skipped, which the
# exercise grades on its own.
CAPSTONE_PROMPT = "Once upon a time there was a"
CAPSTONE_TOKENS = 8  # with the BOS token (tests/test_learner_kernels.py checks it)
CAPSTONE_WINDOW = 4
# float32 everywhere, but your kernels add in other orders than torch (a row's Σx² in one sum, the attention's
# online softmax): last-bit differences that 18 layers carry to the logits, about 5e-5 for the exercises' answers
# (at most 1e-4 for the other right answers of tests/mutants/ch13.py); the smallest wrong kernel there, the exact
# GELU for the tanh one, moves them by more than 1e-2. The top two logits are 0.15 apart or more at every position:
# no greedy token flips within the tolerance.
CAPSTONE_ATOL, CAPSTONE_RTOL = 1e-3, 1e-4


def _capstone_cases(seed):
    return [Case(f"a {CAPSTONE_TOKENS}-token prompt, local window {CAPSTONE_WINDOW}: the greedy next token after each "
                 "prefix and the logits at every position", (CAPSTONE_PROMPT, CAPSTONE_WINDOW),
                 atol=CAPSTONE_ATOL, rtol=CAPSTONE_RTOL)]


def capstone_reference(prompt, window):
    """What Gemma 3 270M (float32) itself gives, the package's torch code everywhere and its local layers'
    window set to `window`: the greedy next token after each prefix of the prompt (T,) and the logits at
    every position (T, V) (computed once per process: they do not depend on the seed)."""
    from ... import learner_kernels

    return learner_kernels.reference_outputs(prompt, window)


def _capstone_diagnose(fn, case, expected):
    from ... import learner_kernels

    return learner_kernels.diagnose(fn, case, expected)


register(Exercise(
    "13.capstone", _capstone_cases, capstone_reference, timeout_s=600.0, diagnose=_capstone_diagnose,
    outputs=("the greedy next token after each prefix", "the logits at every position"),
    description="Your kernels, real weights: YourKernels(rms_norm_rows=..., geglu_rows=..., flash_forward_window=...) "
                f"gives the greedy next tokens and logits (within {CAPSTONE_ATOL:g}) of Gemma 3 270M at every "
                f"position of a {CAPSTONE_TOKENS}-token prompt, its local window cut to {CAPSTONE_WINDOW}.",
    hint="Each kernel must first pass its own exercise (12.rms_norm_rows, 12.geglu_rows, 13.flash_forward_window). "
         "If the logits still differ, what does the model hand your kernels that the exercises' cases did not: "
         "how wide is a row, how wide is a head, how long is the prompt?",
    recipe="1. Run the three checks (12.rms_norm_rows, 12.geglu_rows, 13.flash_forward_window) on the kernels you "
           "give here, and fix the first that fails. 2. Build YourKernels with each kernel given under its own "
           "name, and check it. 3. If the outputs differ, read which kernel the report names: swapped in alone, "
           "that one changes the logits, or raises the error shown beside it. 4. Think about that kernel on the "
           "model's shapes: rows of 640 values in a block of 1024 and rows of 256 for the QK-norm, so the column "
           "mask and the division by the row's own length matter; a head dimension of 256, not 16 or 32, and GeGLU "
           "blocks of 512 columns (four per row of 2048), not 32, so nothing may assume a width; a prompt of 8 tokens, so the one block of 32 queries and the one block of "
           "16 keys are both cut by T, and their loads and stores need their masks; a window of 4 on the local "
           "layers, the whole prompt on the global ones."))
