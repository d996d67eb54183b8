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


def _m(name, *kernels):
    return [(k.__name__.replace("_", " "), launch(name, k)) for k in kernels]


MUTANTS = {
    "13.online_softmax": _m("13.online_softmax", online_acc_not_rescaled, online_sum_not_rescaled,
                            online_no_guard_for_rows_that_saw_nothing, online_p_against_the_old_maximum),
    "13.key_range": _m("13.key_range", range_window_one_key_too_far, range_window_from_the_last_query,
                       range_band_reaches_every_later_key, range_indices_not_slots),
    "13.combine_splits": _m("13.combine_splits", combine_plain_mean, combine_without_subtracting_the_max,
                            combine_weighted_by_lse_itself, combine_divided_by_the_number_of_splits),
}

CORRECT = {
    "13.online_softmax": _m("13.online_softmax", online_with_exp2_and_a_broadcast_sum),
    "13.key_range": _m("13.key_range", range_from_clamps_in_slots),
    "13.combine_splits": _m("13.combine_splits", combine_by_the_total_log_sum_exp),
}
