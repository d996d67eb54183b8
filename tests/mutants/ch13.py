"""Wrong kernel bodies for chapter 13's exercises, each run through its exercise's launcher.

Plain functions written against triton.language: the launcher runs them in Triton's interpreter,
as it runs the learner's @triton.jit kernels.
"""

import triton.language as tl

from minigemma.grading.checks.ch13 import launch


# 1. online softmax ----------------------------------------------------------------------------
def _online(m_ptr, l_ptr, acc_ptr, x_ptr, v_ptr, m_out, l_out, acc_out, M, N, D, BLOCK_M, BLOCK_N, BLOCK_D,
            rescale_acc=True, rescale_l=True, guard=True, p_from="new"):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    r_ok, c_ok, d_ok = rows < M, cols < N, d < D
    m = tl.load(m_ptr + rows, mask=r_ok, other=float("-inf"))
    l = tl.load(l_ptr + rows, mask=r_ok, other=0.0)
    acc = tl.load(acc_ptr + rows[:, None] * D + d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    x = tl.load(x_ptr + rows[:, None] * N + cols[None, :], mask=r_ok[:, None] & c_ok[None, :], other=float("-inf"))
    v = tl.load(v_ptr + cols[:, None] * D + d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new) if guard else m_new
    alpha = tl.exp(m - m_use)
    p = tl.exp(x - m_use[:, None]) if p_from == "new" else tl.exp(x - tl.where(m == float("-inf"), 0.0, m)[:, None])
    l_new = (l * alpha if rescale_l else l) + tl.sum(p, axis=1)
    acc_new = (acc * alpha[:, None] if rescale_acc else acc) + tl.dot(p, v)
    tl.store(m_out + rows, m_new, mask=r_ok)
    tl.store(l_out + rows, l_new, mask=r_ok)
    tl.store(acc_out + rows[:, None] * D + d[None, :], acc_new, mask=r_ok[:, None] & d_ok[None, :])


def online_acc_not_rescaled(m_ptr, l_ptr, acc_ptr, x_ptr, v_ptr, m_out, l_out, acc_out, M, N, D,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    _online(m_ptr, l_ptr, acc_ptr, x_ptr, v_ptr, m_out, l_out, acc_out, M, N, D, BLOCK_M, BLOCK_N, BLOCK_D,
            rescale_acc=False)


def online_sum_not_rescaled(m_ptr, l_ptr, acc_ptr, x_ptr, v_ptr, m_out, l_out, acc_out, M, N, D,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    _online(m_ptr, l_ptr, acc_ptr, x_ptr, v_ptr, m_out, l_out, acc_out, M, N, D, BLOCK_M, BLOCK_N, BLOCK_D,
            rescale_l=False)


def online_no_guard_for_rows_that_saw_nothing(m_ptr, l_ptr, acc_ptr, x_ptr, v_ptr, m_out, l_out, acc_out, M, N, D,
                                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                              BLOCK_D: tl.constexpr):
    _online(m_ptr, l_ptr, acc_ptr, x_ptr, v_ptr, m_out, l_out, acc_out, M, N, D, BLOCK_M, BLOCK_N, BLOCK_D,
            guard=False)


def online_p_against_the_old_maximum(m_ptr, l_ptr, acc_ptr, x_ptr, v_ptr, m_out, l_out, acc_out, M, N, D,
                                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    _online(m_ptr, l_ptr, acc_ptr, x_ptr, v_ptr, m_out, l_out, acc_out, M, N, D, BLOCK_M, BLOCK_N, BLOCK_D,
            p_from="old")


# 2. key range ---------------------------------------------------------------------------------
def _range(out_ptr, T, S, q_start, k_first, window, CAUSAL, WINDOW, BLOCK_M, edge=1, window_from="lo",
           band_forward=True, slots=True):
    pid = tl.program_id(0)
    i_lo = q_start + pid * BLOCK_M
    i_hi = q_start + tl.minimum(T, pid * BLOCK_M + BLOCK_M) - 1
    lo = k_first
    hi = k_first + S - 1
    if WINDOW:
        lo = tl.maximum(lo, (i_lo if window_from == "lo" else i_hi) - window + edge)
        if not CAUSAL and band_forward:
            hi = tl.minimum(hi, i_hi + window - 1)
    if CAUSAL:
        hi = tl.minimum(hi, i_hi)
    shift = k_first if slots else 0
    tl.store(out_ptr + 2 * pid, lo - shift)
    tl.store(out_ptr + 2 * pid + 1, hi - shift + 1)


def range_window_one_key_too_far(out_ptr, T, S, q_start, k_first, window, CAUSAL: tl.constexpr,
                                 WINDOW: tl.constexpr, BLOCK_M: tl.constexpr):
    _range(out_ptr, T, S, q_start, k_first, window, CAUSAL, WINDOW, BLOCK_M, edge=0)


def range_window_from_the_last_query(out_ptr, T, S, q_start, k_first, window, CAUSAL: tl.constexpr,
                                     WINDOW: tl.constexpr, BLOCK_M: tl.constexpr):
    _range(out_ptr, T, S, q_start, k_first, window, CAUSAL, WINDOW, BLOCK_M, window_from="hi")


def range_band_reaches_every_later_key(out_ptr, T, S, q_start, k_first, window, CAUSAL: tl.constexpr,
                                       WINDOW: tl.constexpr, BLOCK_M: tl.constexpr):
    _range(out_ptr, T, S, q_start, k_first, window, CAUSAL, WINDOW, BLOCK_M, band_forward=False)


def range_indices_not_slots(out_ptr, T, S, q_start, k_first, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                            BLOCK_M: tl.constexpr):
    _range(out_ptr, T, S, q_start, k_first, window, CAUSAL, WINDOW, BLOCK_M, slots=False)


# 3. combine splits ----------------------------------------------------------------------------
def _combine(o_ptr, lse_ptr, out_ptr, n, D, BLOCK_S, BLOCK_D, weights="exp", subtract_max=True, divide="sum"):
    r = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    sp = tl.arange(0, BLOCK_S)
    lse = tl.load(lse_ptr + r * n + sp, mask=sp < n, other=float("-inf"))
    if weights == "exp":
        w = tl.exp(lse - tl.max(lse, axis=0)) if subtract_max else tl.exp(lse)
    elif weights == "ones":
        w = tl.where(sp < n, 1.0, 0.0)
    else:
        w = tl.where(sp < n, lse, 0.0)
    o = tl.load(o_ptr + (r * n + sp)[:, None] * D + d[None, :], mask=(sp < n)[:, None] & (d < D)[None, :], other=0.0)
    total = tl.sum(w, axis=0) if divide == "sum" else n
    tl.store(out_ptr + r * D + d, tl.sum(o * w[:, None], axis=0) / total, mask=d < D)


def combine_plain_mean(o_ptr, lse_ptr, out_ptr, n, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    _combine(o_ptr, lse_ptr, out_ptr, n, D, BLOCK_S, BLOCK_D, weights="ones")


def combine_without_subtracting_the_max(o_ptr, lse_ptr, out_ptr, n, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    _combine(o_ptr, lse_ptr, out_ptr, n, D, BLOCK_S, BLOCK_D, subtract_max=False)


def combine_weighted_by_lse_itself(o_ptr, lse_ptr, out_ptr, n, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    _combine(o_ptr, lse_ptr, out_ptr, n, D, BLOCK_S, BLOCK_D, weights="lse")


def combine_divided_by_the_number_of_splits(o_ptr, lse_ptr, out_ptr, n, D, BLOCK_S: tl.constexpr,
                                            BLOCK_D: tl.constexpr):
    _combine(o_ptr, lse_ptr, out_ptr, n, D, BLOCK_S, BLOCK_D, divide="n")


# 4. the forward kernel of a causal sliding window --------------------------------------------
def _flash(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D, BLOCK_M, BLOCK_N, rescale_acc=True, rescale_l=True,
           window_cmp="lt", causal=True, first="window", last="query", guard=True, per_block_softmax=False,
           running_max=True, m_start=float("-inf"), use_scale=True, head_offset=True, width=None, store_mask=True,
           loads_masked_to_the_window=False):
    pid, h = tl.program_id(0), tl.program_id(1)
    head = h * T * D if head_offset else 0
    i = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D if width is None else width)
    q = tl.load(q_ptr + head + i[:, None] * D + d[None, :], mask=(i < T)[:, None], other=0.0)
    i_lo = pid * BLOCK_M
    i_hi = tl.minimum(T, i_lo + BLOCK_M) - 1
    lo = {"window": tl.maximum(0, i_lo - window + 1), "zero": 0, "query_block": i_lo,
          "last_query": tl.maximum(0, i_hi - window + 1),
          "one_block_early": tl.maximum(0, i_lo - window + 1 - BLOCK_N)}[first]
    hi = i_hi if last == "query" else T - 1
    m = tl.full((BLOCK_M,), m_start, tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D if width is None else width), tl.float32)
    for n in range(lo // BLOCK_N, hi // BLOCK_N + 1):
        j = n * BLOCK_N + tl.arange(0, BLOCK_N)
        load_ok = (j < T) & (j >= tl.maximum(0, i_lo - window + 1)) & (j <= i_hi) if loads_masked_to_the_window \
            else j < T
        k = tl.load(k_ptr + head + j[:, None] * D + d[None, :], mask=load_ok[:, None], other=0.0)
        v = tl.load(v_ptr + head + j[:, None] * D + d[None, :], mask=load_ok[:, None], other=0.0)
        x = tl.dot(q, tl.trans(k))
        if use_scale:
            x = x * scale
        back = i[:, None] - j[None, :]
        ok = ((back < window) if window_cmp == "lt" else (back <= window)) & (j < T)[None, :]
        if causal:
            ok = ok & (j[None, :] <= i[:, None])
        x = tl.where(ok, x, float("-inf"))
        if running_max:
            m_new = tl.maximum(m, tl.max(x, axis=1))
        else:
            m_new = tl.zeros((BLOCK_M,), tl.float32)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new) if guard else m_new
        alpha = tl.exp(m - m_use)
        p = tl.exp(x - m_use[:, None])
        if per_block_softmax:
            p = p / tl.sum(p, axis=1)[:, None]
        l = (l * alpha if rescale_l else l) + tl.sum(p, axis=1)
        acc = (acc * alpha[:, None] if rescale_acc else acc) + tl.dot(p, v)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    if store_mask:
        tl.store(o_ptr + head + i[:, None] * D + d[None, :], out, mask=(i < T)[:, None])
    else:
        tl.store(o_ptr + head + i[:, None] * D + d[None, :], out)


def flash_acc_not_rescaled(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    _flash(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D, BLOCK_M, BLOCK_N, rescale_acc=False)


def flash_sum_not_rescaled(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    _flash(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D, BLOCK_M, BLOCK_N, rescale_l=False)


def flash_each_key_block_normalised_on_its_own(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D: tl.constexpr,
                                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _flash(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D, BLOCK_M, BLOCK_N, per_block_softmax=True)


def flash_window_one_key_too_many(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _flash(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D, BLOCK_M, BLOCK_N, window_cmp="le")


def flash_no_causal_mask(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    _flash(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D, BLOCK_M, BLOCK_N, causal=False)


def flash_visits_every_key_block(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _flash(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D, BLOCK_M, BLOCK_N, first="zero", last="T")


def flash_visits_every_key_block_with_its_loads_masked_off(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window,
                                                           D: tl.constexpr, BLOCK_M: tl.constexpr,
                                                           BLOCK_N: tl.constexpr):
    _flash(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D, BLOCK_M, BLOCK_N, first="zero", last="T",
           loads_masked_to_the_window=True)


def flash_skips_only_the_blocks_past_the_diagonal(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D: tl.constexpr,
                                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _flash(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D, BLOCK_M, BLOCK_N, first="zero")


def flash_skips_only_the_blocks_before_the_window(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D: tl.constexpr,
                                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _flash(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D, BLOCK_M, BLOCK_N, last="T")


def flash_first_key_block_is_the_query_block(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D: tl.constexpr,
                                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _flash(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D, BLOCK_M, BLOCK_N, first="query_block")


def flash_first_key_from_the_last_query(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D: tl.constexpr,
                                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _flash(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D, BLOCK_M, BLOCK_N, first="last_query")


def flash_first_key_block_one_too_early(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D: tl.constexpr,
                                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _flash(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D, BLOCK_M, BLOCK_N, first="one_block_early")


def flash_no_guard_for_queries_that_saw_nothing(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D: tl.constexpr,
                                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _flash(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D, BLOCK_M, BLOCK_N, guard=False)


def flash_exp_without_the_running_max(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D: tl.constexpr,
                                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _flash(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D, BLOCK_M, BLOCK_N, running_max=False, m_start=0.0)


def flash_running_max_starts_at_zero(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D: tl.constexpr,
                                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _flash(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D, BLOCK_M, BLOCK_N, m_start=0.0)


def flash_scale_ignored(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    _flash(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D, BLOCK_M, BLOCK_N, use_scale=False)


def flash_every_head_reads_head_0(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _flash(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D, BLOCK_M, BLOCK_N, head_offset=False)


def flash_head_dim_fixed_at_16(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr):
    _flash(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D, BLOCK_M, BLOCK_N, width=16)


def flash_rows_past_T_stored(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr):
    _flash(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D, BLOCK_M, BLOCK_N, store_mask=False)


# right answers written differently ------------------------------------------------------------
def online_with_exp2_and_a_broadcast_sum(m_ptr, l_ptr, acc_ptr, x_ptr, v_ptr, m_out, l_out, acc_out, M, N, D,
                                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    LOG2E = 1.4426950408889634
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols, d = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    rm = rows < M
    x = tl.load(x_ptr + rows[:, None] * N + cols[None, :], mask=rm[:, None] & (cols < N)[None, :],
                other=float("-inf"))
    m = tl.load(m_ptr + rows, mask=rm, other=float("-inf"))
    m_new = tl.maximum(tl.max(x, axis=1), m)
    ref = tl.where(m_new > float("-inf"), m_new, 0.0)
    p = tl.exp2((x - ref[:, None]) * LOG2E)
    scale = tl.exp2((m - ref) * LOG2E)
    v = tl.load(v_ptr + cols[:, None] * D + d[None, :], mask=(cols < N)[:, None] & (d < D)[None, :], other=0.0)
    pv = tl.sum(p[:, :, None] * v[None, :, :], axis=1)
    acc_p = acc_ptr + rows[:, None] * D + d[None, :]
    inside = rm[:, None] & (d < D)[None, :]
    tl.store(acc_out + rows[:, None] * D + d[None, :], tl.load(acc_p, mask=inside, other=0.0) * scale[:, None] + pv,
             mask=inside)
    tl.store(l_out + rows, tl.load(l_ptr + rows, mask=rm, other=0.0) * scale + tl.sum(p, axis=1), mask=rm)
    tl.store(m_out + rows, m_new, mask=rm)


def range_from_clamps_in_slots(out_ptr, T, S, q_start, k_first, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                               BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    first_q = q_start - k_first + pid * BLOCK_M  # the block's first and last query, as slots of the keys
    last_q = q_start - k_first + tl.minimum(T, (pid + 1) * BLOCK_M) - 1
    lo = 0
    hi = S
    if WINDOW:
        lo = tl.maximum(0, first_q - (window - 1))
        if not CAUSAL:
            hi = tl.minimum(S, last_q + window)
    if CAUSAL:
        hi = tl.minimum(hi, last_q + 1)
    tl.store(out_ptr + 2 * pid + tl.arange(0, 2), tl.where(tl.arange(0, 2) == 0, lo, hi))


def combine_by_the_total_log_sum_exp(o_ptr, lse_ptr, out_ptr, n, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    sp = tl.arange(0, BLOCK_S)
    lse = tl.load(lse_ptr + r * n + sp, mask=sp < n, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    total = mx + tl.log(tl.sum(tl.exp(lse - mx), axis=0))  # the whole row's log-sum-exp
    o = tl.load(o_ptr + (r * n + sp)[:, None] * D + d[None, :], mask=(sp < n)[:, None] & (d < D)[None, :], other=0.0)
    tl.store(out_ptr + r * D + d, tl.sum(tl.exp(lse - total)[:, None] * o, axis=0), mask=d < D)


def flash_from_the_first_visible_key_as_the_package(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D: tl.constexpr,
                                                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """kernels.attention._fwd_kernel's loop: blocks of keys from the first visible one, not aligned to
    BLOCK_N; the scores masked only on the tiles that straddle an edge of the mask."""
    pid, h = tl.program_id(0), tl.program_id(1)
    t = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (h * T + t)[:, None] * D + d[None, :], mask=(t < T)[:, None], other=0.0)
    i_lo = pid * BLOCK_M
    i_hi = tl.minimum(T, i_lo + BLOCK_M) - 1
    lo = tl.maximum(0, i_lo - window + 1)
    hi = i_hi + 1
    in_lo = i_hi - window + 1  # keys every query of the block sees: [in_lo, i_lo]
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for start in range(lo, hi, BLOCK_N):
        s = start + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + (h * T + s)[:, None] * D + d[None, :], mask=(s < hi)[:, None], other=0.0)
        v = tl.load(v_ptr + (h * T + s)[:, None] * D + d[None, :], mask=(s < hi)[:, None], other=0.0)
        x = tl.dot(q, tl.trans(k)) * scale
        if (start < in_lo) | (start + BLOCK_N > i_lo + 1):
            ok = (s[None, :] <= t[:, None]) & (t[:, None] - s[None, :] < window) & (s < hi)[None, :]
            x = tl.where(ok, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_use)
        p = tl.exp(x - m_use[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(o_ptr + (h * T + t)[:, None] * D + d[None, :], out, mask=(t < T)[:, None])


def flash_with_exp2_a_finite_floor_and_a_normalised_output(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window,
                                                           D: tl.constexpr, BLOCK_M: tl.constexpr,
                                                           BLOCK_N: tl.constexpr):
    """Scores in base 2 (scale·log2 e folded in), -1e30 for masked scores and the starting max (no -inf,
    no guard: a query's own key wipes what masked scores added), the output kept normalised."""
    LOG2E = 1.4426950408889634
    pid, h = tl.program_id(0), tl.program_id(1)
    i = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    base = h * T * D
    q = tl.load(q_ptr + base + i[:, None] * D + d[None, :], mask=(i < T)[:, None] & (d < D)[None, :], other=0.0)
    q = q * (scale * LOG2E)
    first_block = tl.maximum(pid * BLOCK_M - window + 1, 0) // BLOCK_N
    end_block = (tl.minimum(T, (pid + 1) * BLOCK_M) + BLOCK_N - 1) // BLOCK_N
    m = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    o = tl.zeros((BLOCK_M, D), tl.float32)
    for n in range(first_block, end_block):
        j = n * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_ok = (j < T)[:, None]
        k = tl.load(k_ptr + base + j[:, None] * D + d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_ptr + base + j[:, None] * D + d[None, :], mask=kv_ok, other=0.0)
        x = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        seen = (j[None, :] <= i[:, None]) & (j[None, :] > i[:, None] - window) & (j[None, :] < T)
        x = tl.where(seen, x, -1.0e30)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        p = tl.exp2(x - m_new[:, None])
        l_new = l * tl.exp2(m - m_new) + tl.sum(p, axis=1)
        o = (o * (l * tl.exp2(m - m_new))[:, None] + tl.dot(p, v)) / l_new[:, None]
        l, m = l_new, m_new
    tl.store(o_ptr + base + i[:, None] * D + d[None, :], o, mask=(i < T)[:, None])


def _m(name, *kernels):
    return [(k.__name__.replace("_", " "), launch(name, k)) for k in kernels]


MUTANTS = {
    "13.online_softmax": _m("13.online_softmax", online_acc_not_rescaled, online_sum_not_rescaled,
                            online_no_guard_for_rows_that_saw_nothing, online_p_against_the_old_maximum),
    "13.key_range": _m("13.key_range", range_window_one_key_too_far, range_window_from_the_last_query,
                       range_band_reaches_every_later_key, range_indices_not_slots),
    "13.combine_splits": _m("13.combine_splits", combine_plain_mean, combine_without_subtracting_the_max,
                            combine_weighted_by_lse_itself, combine_divided_by_the_number_of_splits),
    "13.flash_forward_window": _m("13.flash_forward_window", flash_acc_not_rescaled, flash_sum_not_rescaled,
                                  flash_each_key_block_normalised_on_its_own, flash_window_one_key_too_many,
                                  flash_no_causal_mask, flash_visits_every_key_block,
                                  flash_visits_every_key_block_with_its_loads_masked_off,
                                  flash_skips_only_the_blocks_past_the_diagonal,
                                  flash_skips_only_the_blocks_before_the_window,
                                  flash_first_key_block_is_the_query_block, flash_first_key_from_the_last_query,
                                  flash_first_key_block_one_too_early, flash_no_guard_for_queries_that_saw_nothing,
                                  flash_exp_without_the_running_max, flash_running_max_starts_at_zero,
                                  flash_scale_ignored, flash_every_head_reads_head_0, flash_head_dim_fixed_at_16,
                                  flash_rows_past_T_stored),
}

CORRECT = {
    "13.online_softmax": _m("13.online_softmax", online_with_exp2_and_a_broadcast_sum),
    "13.key_range": _m("13.key_range", range_from_clamps_in_slots),
    "13.combine_splits": _m("13.combine_splits", combine_by_the_total_log_sum_exp),
    "13.flash_forward_window": _m("13.flash_forward_window", flash_from_the_first_visible_key_as_the_package,
                                  flash_with_exp2_a_finite_floor_and_a_normalised_output),
}


# 5. the capstone: the exercises' answers (written as a learner would), and each of them broken once ----------
from minigemma.learner_kernels import YourKernels  # noqa: E402
from tests.mutants.ch12 import (  # noqa: E402
    geglu_erf_gelu,
    geglu_tanh_from_exp,
    rms_mean_over_block,
    rms_w_not_one_plus_w,
    rms_with_rsqrt_and_mean_of_squares,
)


def your_rms_norm_kernel(x_ptr, w_ptr, out_ptr, N, stride_x, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * N + cols, x * rstd * (1.0 + w), mask=mask)


def your_geglu_kernel(gu_ptr, out_ptr, F, stride_gu, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask)
    up = tl.load(gu_ptr + row * stride_gu + F + cols, mask=mask)
    u = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
    tanh = 2.0 * tl.sigmoid(2.0 * u) - 1.0
    tl.store(out_ptr + row * F + cols, 0.5 * gate * (1.0 + tanh) * up, mask=mask)


def your_flash_window_kernel(q_ptr, k_ptr, v_ptr, o_ptr, T, scale, window, D: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr):
    pid, h = tl.program_id(0), tl.program_id(1)
    head = h * T * D
    i = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + head + i[:, None] * D + d[None, :], mask=(i < T)[:, None], other=0.0)
    i_lo = pid * BLOCK_M
    i_hi = tl.minimum(T, i_lo + BLOCK_M) - 1
    first = tl.maximum(0, i_lo - window + 1) // BLOCK_N
    last = i_hi // BLOCK_N
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for n in range(first, last + 1):
        j = n * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + head + j[:, None] * D + d[None, :], mask=(j < T)[:, None], other=0.0)
        v = tl.load(v_ptr + head + j[:, None] * D + d[None, :], mask=(j < T)[:, None], other=0.0)
        x = tl.dot(q, tl.trans(k)) * scale
        seen = (j[None, :] <= i[:, None]) & (i[:, None] - j[None, :] < window) & (j < T)[None, :]
        x = tl.where(seen, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_use)
        p = tl.exp(x - m_use[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(o_ptr + head + i[:, None] * D + d[None, :], out, mask=(i < T)[:, None])


YOUR_ANSWERS = dict(rms_norm_rows=your_rms_norm_kernel, geglu_rows=your_geglu_kernel,
                    flash_forward_window=your_flash_window_kernel)
CAPSTONE_BROKEN = {  # label -> (the kernel it breaks, the wrong kernel), for tests/test_learner_kernels.py
    "RMSNorm scaled by w, not 1 + w": ("rms_norm_rows", rms_w_not_one_plus_w),
    "RMSNorm's mean of x² over the block of 1024, not the row's 640": ("rms_norm_rows", rms_mean_over_block),
    "GeGLU with the exact (erf) GELU, not the tanh one the model uses": ("geglu_rows", geglu_erf_gelu),
    "flash attention's window one key too long (i − j ≤ window)": ("flash_forward_window",
                                                                    flash_window_one_key_too_many),
    "flash attention storing the rows past T too (the 8 queries' block of 32 unmasked)": ("flash_forward_window",
                                                                                        flash_rows_past_T_stored),
}
MUTANTS["13.capstone"] = [(label, YourKernels(**{**YOUR_ANSWERS, name: kernel}))
                          for label, (name, kernel) in CAPSTONE_BROKEN.items()]
CORRECT["13.capstone"] = [
    ("the exercises' answers, written out", YourKernels(**YOUR_ANSWERS)),
    ("right answers written differently (rsqrt, tanh from exp, base-2 exponentials and a finite floor)",
     YourKernels(rms_norm_rows=rms_with_rsqrt_and_mean_of_squares, geglu_rows=geglu_tanh_from_exp,
                 flash_forward_window=flash_with_exp2_a_finite_floor_and_a_normalised_output)),
]
