"""Attention as Triton kernels: a flash-style forward and backward for every mask of the course's
models, and a split-K decode kernel over the KV cache (ring buffers included).

    out = softmax(mask(cap · tanh(q kᵀ · scale / cap))) v        q (B, H, T, D); k, v (B, K, S, D)

The mask is `minigemma.attention.index_mask`'s rule: query index i sees key index j iff

    j >= 0 (an empty slot is -1);  j <= i (causal);  |i - j| < window (window);
    i - j <= position_i (packed: left padding and packed documents of a causal model);
    same document id (documents: an encoder's padding, where the keys are the queries).

Forward (`flash_attention`). One program per (block of BLOCK_M queries, batch row, query head). It
loads its queries once and walks blocks of BLOCK_N keys with an online softmax: a running maximum m,
a running sum l and an unnormalised output acc per query, rescaled by exp(m_old - m_new) whenever the
maximum grows, so the T × S scores never exist. Query head h reads K/V head h // (H/K): grouped heads
share K and V without a copy. Before the loop, `_key_range` works out the keys that any query of the
block can see; blocks outside it (before the window, past the diagonal, outside the band, before the
document) are never loaded, so a local layer's cost follows W, not T. Only blocks that straddle an
edge of the mask pay for computing it (`_inside`).

Decode (`decode_attention`). One new token per row. Its G = H/K query heads share a K/V head, so one
program takes the G heads as the rows of its block (each key is read once for all of them) and one
slice of the keys: split-K ("flash-decoding"). With a long cache many programs share one row's keys,
each writes a partial output and its log-sum-exp, and `_combine_kernel` merges them. Keys may be a
ring buffer's rotated slots, given by their indices (`k_index`).

Backward (FlashAttention-2's). The forward saves lse = m + log l per query; with it P = exp(x - lse)
is recomputed tile by tile, never stored. With x the (soft-capped) scores and δ = rowsum(dO ⊙ O):

    dV = Pᵀ dO,   dP = dO Vᵀ,   dS = P ⊙ (dP − δ)  [⊙ (1 − tanh²) under a soft-cap],
    dQ = scale · dS K,   dK = scale · dSᵀ Q.

`_bwd_dkdv_kernel` runs one program per (key block, batch row, K/V head) and sums over every query
block and every query head of the group (no atomics); `_bwd_dq_kernel` one per query block.

tl.dot: float32 inputs use input_precision="ieee" (exact float32 products, as the torch reference),
not TF32, whose 10-bit mantissa costs about 1e-3 relative error; bf16/fp16 inputs go to the tensor
cores as they are. Products accumulate in float32; P is rounded to v's dtype before P·V, as the
reference rounds its weights.

Reference: `minigemma.attention.attend` over `attention_blocks`, the model's own path (`reference`).
`GroupedQueryAttention` is the model's attention layer with `attention` (and RoPE) done here; it falls
back to the torch path, saying why, for what the kernels do not cover.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from minigemma.attention import GroupedQueryAttention as TorchGroupedQueryAttention
from minigemma.attention import Keys, Positions, attend, attention_blocks, split_heads

from .interpret import INTERPRET
from .rope import rope
from .utils import DeviceProps, check_device, device_props, tanh

MAX_D = 256  # head_dim the kernels keep in registers (Gemma: 256, 128; Griffin: 128, 256)


# --------------------------------------------------------------------------------------------
# The pieces every kernel shares
# --------------------------------------------------------------------------------------------
@triton.jit
def _visible(i, j, pos_i, doc_i, doc_j, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
             PACKED: tl.constexpr, DOCS: tl.constexpr):
    """`index_mask`'s rule, element by element: may query index i see key index j? (broadcasts)"""
    ok = j >= 0
    if CAUSAL:
        ok = ok & (j <= i)
    if WINDOW:
        ok = ok & (tl.abs(i - j) < window)
    if PACKED:
        ok = ok & (i - j <= pos_i)
    if DOCS:
        ok = ok & (doc_i == doc_j)
    return ok


@triton.jit
def _key_range(i_lo, i_hi, k_first, S, window, doc_start, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
               PACKED: tl.constexpr):
    """Key slots [lo, hi) that some query with index in [i_lo, i_hi] may see (slot s holds index
    k_first + s). Every key outside is invisible to the whole block: its tiles are skipped."""
    lo = k_first  # in key indices first, slots at the end
    hi = k_first + S - 1
    if WINDOW:
        lo = tl.maximum(lo, i_lo - window + 1)
        if not CAUSAL:
            hi = tl.minimum(hi, i_hi + window - 1)  # the band reaches forward too
    if CAUSAL:
        hi = tl.minimum(hi, i_hi)
    if PACKED:
        lo = tl.maximum(lo, doc_start)  # nothing before the earliest document start of the block
    return lo - k_first, tl.maximum(hi - k_first + 1, lo - k_first)


@triton.jit
def _inside(i_lo, i_hi, k_first, S, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
            MASKED: tl.constexpr):
    """Key slots [lo, hi) that *every* query of the block sees: tiles inside need no mask."""
    lo = k_first
    hi = k_first + S - 1
    if WINDOW:
        lo = tl.maximum(lo, i_hi - window + 1)
        if not CAUSAL:
            hi = tl.minimum(hi, i_lo + window - 1)
    if CAUSAL:
        hi = tl.minimum(hi, i_lo)
    if MASKED:  # packed positions or documents: every tile needs its mask
        lo = k_first
        hi = k_first - 1
    return lo - k_first, hi - k_first + 1


@triton.jit
def _query_range(j_lo, j_hi, q_start, T, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Query rows [lo, hi) whose queries may see some key with index in [j_lo, j_hi] (the backward)."""
    lo = q_start
    hi = q_start + T - 1
    if CAUSAL:
        lo = tl.maximum(lo, j_lo)
    if WINDOW:
        hi = tl.minimum(hi, j_hi + window - 1)
        if not CAUSAL:
            lo = tl.maximum(lo, j_lo - window + 1)
    return lo - q_start, tl.maximum(hi - q_start + 1, lo - q_start)


@triton.jit
def _scores(q, k, scale, softcap, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """q kᵀ · scale, soft-capped if asked: (BLOCK_M, BLOCK_N) float32."""
    x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    if SOFTCAP:
        x = softcap * tanh(x / softcap)
    return x


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, POS, DOC, TILES,
                s_qb, s_qh, s_qt, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_ob, s_oh, s_ot, s_pb, s_pt, s_db, s_dt,
                H, T, S, G, q_start, k_first, scale, softcap, window,
                D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PACKED: tl.constexpr,
                DOCS: tl.constexpr, COUNT: tl.constexpr, PRECISION: tl.constexpr):
    """One program: BLOCK_M queries of one (batch row, query head) against the keys they can see."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    kv = h // G  # the K/V head of this query head's group
    t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows
    t_ok = t < T
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(Q + b * s_qb + h * s_qh + t[:, None] * s_qt + d[None, :], mask=t_ok[:, None] & d_ok[None, :],
                other=0.0)
    i = q_start + t  # query indices
    i_lo = q_start + pid_m * BLOCK_M
    i_hi = q_start + tl.minimum(T, pid_m * BLOCK_M + BLOCK_M) - 1
    pos_i = tl.zeros((BLOCK_M,), tl.int32)
    doc_i = tl.zeros((BLOCK_M,), tl.int32)
    doc_start = 0
    if PACKED:
        pos_i = tl.load(POS + b * s_pb + t * s_pt, mask=t_ok, other=0)
        doc_start = tl.min(tl.where(t_ok, i - pos_i, 2147483647), axis=0)  # the block's earliest document start
    if DOCS:
        doc_i = tl.load(DOC + b * s_db + t * s_dt, mask=t_ok, other=-1)

    lo, hi = _key_range(i_lo, i_hi, k_first, S, window, doc_start, CAUSAL, WINDOW, PACKED)
    in_lo, in_hi = _inside(i_lo, i_hi, k_first, S, window, CAUSAL, WINDOW, PACKED or DOCS)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running maximum of each query's scores
    l = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)  # running Σ exp(score - m) · v
    k_rows = K + b * s_kb + kv * s_kh
    v_rows = V + b * s_vb + kv * s_vh
    tiles = 0
    for start in range(lo, hi, BLOCK_N):
        s = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key slots
        s_ok = s < hi
        kv_mask = s_ok[:, None] & d_ok[None, :]
        k = tl.load(k_rows + s[:, None] * s_ks + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_rows + s[:, None] * s_vs + d[None, :], mask=kv_mask, other=0.0)
        x = _scores(q, k, scale, softcap, SOFTCAP, PRECISION)
        if (start < in_lo) | (start + BLOCK_N > in_hi):  # a tile on an edge of the mask
            doc_j = tl.zeros((BLOCK_N,), tl.int32)
            if DOCS:
                doc_j = tl.load(DOC + b * s_db + s * s_dt, mask=s_ok, other=-2)
            ok = _visible(i[:, None], (k_first + s)[None, :], pos_i[:, None], doc_i[:, None], doc_j[None, :],
                          window, CAUSAL, WINDOW, PACKED, DOCS)
            x = tl.where(ok & s_ok[None, :], x, float("-inf"))
        # the online softmax: rescale what was summed so far to the new maximum
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a query that has seen no key yet
        alpha = tl.exp(m - m_use)
        p = tl.exp(x - m_use[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
        tiles += 1
    l_safe = tl.where(l > 0, l, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + b * s_ob + h * s_oh + t[:, None] * s_ot + d[None, :], out.to(O.dtype.element_ty),
             mask=t_ok[:, None] & d_ok[None, :])
    # lse for the backward; +inf for a query that sees nothing, so that exp(x - lse) is 0 there
    tl.store(LSE + bh.to(tl.int64) * T + t, tl.where(l > 0, m + tl.log(l_safe), float("inf")), mask=t_ok)
    if COUNT:
        tl.store(TILES + bh.to(tl.int64) * tl.num_programs(0) + pid_m, tiles)


# --------------------------------------------------------------------------------------------
# Decode: one query per row, its group's heads together, the keys split over programs
# --------------------------------------------------------------------------------------------
# A generation calls the decode kernel with a new cache length every step: the arguments that follow it
# are not specialised (Triton would otherwise compile a variant whenever one of them becomes 1 or a
# multiple of 16, a stall of a second or more in the middle of generating).
# A step shaped for a CUDA graph (`kernels.graph`) passes none of them: its kernel reads the query's index
# from the device (INDEXED) and attends the whole static cache, so every launch of a generation is the same.
DECODE_VARYING = ["S", "keys_per_split", "q_index", "k_first"]


@triton.jit(do_not_specialize=DECODE_VARYING)
def _decode_kernel(Q, K, V, K_IDX, POS, INDEX, O_PART, LSE_PART,
                   s_qb, s_qh, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_pb,
                   KV, S, G, keys_per_split, q_index, k_first, scale, softcap, window,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PACKED: tl.constexpr,
                   RING: tl.constexpr, INDEXED: tl.constexpr, PRECISION: tl.constexpr):
    """One program: the G query heads of one (batch row, K/V head), against one split of the keys.

    INDEXED: q_index is read from INDEX (a device tensor), and a ring's slot indices are derived from it
    (token i in slot i % S) instead of read from K_IDX."""
    split, bk = tl.program_id(0), tl.program_id(1)
    if INDEXED:
        q_index = tl.load(INDEX).to(tl.int32)  # 32 bits, as the int argument it replaces (64-bit division spills)
    n_splits = tl.num_programs(0)
    b, kv = (bk // KV).to(tl.int64), bk % KV
    g = tl.arange(0, BLOCK_G)  # (BLOCK_G,) rows: the query heads of this group
    g_ok = g < G
    h = kv * G + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(Q + b * s_qb + h[:, None] * s_qh + d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    pos_i = 0
    if PACKED:
        pos_i = tl.load(POS + b * s_pb)
    lo = split * keys_per_split  # this split's slots
    hi = tl.minimum(S, lo + keys_per_split)
    if not RING:  # keys in index order: cut the split to the keys the query can see
        vis_lo, vis_hi = _key_range(q_index, q_index, k_first, S, window, q_index - pos_i, CAUSAL, WINDOW, PACKED)
        lo = tl.maximum(lo, vis_lo)
        hi = tl.minimum(hi, vis_hi)
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for start in range(lo, hi, BLOCK_N):
        s = start + tl.arange(0, BLOCK_N)
        s_ok = s < hi
        kv_mask = s_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * s_kb + kv * s_kh + s[:, None] * s_ks + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + b * s_vb + kv * s_vh + s[:, None] * s_vs + d[None, :], mask=kv_mask, other=0.0)
        x = _scores(q, k, scale, softcap, SOFTCAP, PRECISION)  # (BLOCK_G, BLOCK_N)
        if RING:  # a ring's slots are rotated: slot s holds the latest index i <= q_index with i % S == s
            if INDEXED:
                j = tl.where(s <= q_index, s + ((q_index - s) // S) * S, -1)
            else:
                j = tl.load(K_IDX + s, mask=s_ok, other=-1)  # (`RingKVCache.slot_index`)
        else:
            j = k_first + s
        ok = _visible(q_index, j, pos_i, 0, 0, window, CAUSAL, WINDOW, PACKED, False) & s_ok
        x = tl.where(ok[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_use)
        p = tl.exp(x - m_use[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    l_safe = tl.where(l > 0, l, 1.0)
    row = (b * KV * G + h) * n_splits + split  # (BLOCK_G,) this split's partial result of each head
    tl.store(O_PART + row[:, None] * D + d[None, :], acc / l_safe[:, None], mask=g_ok[:, None] & d_ok[None, :])
    tl.store(LSE_PART + row, tl.where(l > 0, m + tl.log(l_safe), float("-inf")), mask=g_ok)


@triton.jit
def merge_splits(O_PART, LSE_PART, bh, n_splits, d, d_ok, D: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
    """Row bh's partial results merged at dims d: Σ_splits e^(lse_s − max) o_s / Σ_splits e^(lse_s − max).

    The splits are read BLOCK_SPLITS at a time with a running maximum (the online softmax once more), so
    the registers hold one (BLOCK_SPLITS, len(d)) tile however many splits there are. The combine kernel
    merges a whole head; the fused decode step's o_proj (`kernels.decode_layer`) one K tile at a time."""
    m = tl.max(tl.full((BLOCK_SPLITS,), float("-inf"), tl.float32), axis=0)  # running max of the lse
    total = tl.sum(tl.zeros((BLOCK_SPLITS,), tl.float32), axis=0)  # running Σ e^(lse − m)
    acc = tl.zeros(d.shape, tl.float32)  # running Σ e^(lse − m) o
    for s0 in range(0, n_splits, BLOCK_SPLITS):
        sp = s0 + tl.arange(0, BLOCK_SPLITS)
        sp_ok = sp < n_splits
        lse = tl.load(LSE_PART + bh * n_splits + sp, mask=sp_ok, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a split that saw nothing weighs 0
        alpha = tl.exp(m - m_use)
        w = tl.exp(lse - m_use)
        o = tl.load(O_PART + (bh * n_splits + sp)[:, None] * D + d[None, :], mask=sp_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = acc * alpha + tl.sum(o * w[:, None], axis=0)
        total = total * alpha + tl.sum(w, axis=0)
        m = m_new
    return acc / tl.where(total > 0, total, 1.0)


@triton.jit(do_not_specialize=["n_splits"])
def _combine_kernel(O_PART, LSE_PART, O, s_ob, s_oh, H, n_splits, D: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_SPLITS: tl.constexpr):
    """One program per (batch row, head): its head's splits merged (`merge_splits`), stored in O's dtype."""
    bh = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    out = merge_splits(O_PART, LSE_PART, bh, n_splits, d, d_ok, D, BLOCK_SPLITS)
    tl.store(O + (bh // H) * s_ob + (bh % H) * s_oh + d, out.to(O.dtype.element_ty), mask=d_ok)


COMBINE_SPLITS = 16  # splits the combine kernel reads at once: 16 × 256 float32 is 32 registers a thread


def _combine_config(n_splits: int, D: int) -> dict:
    """The combine kernel's constexprs for n_splits partial results of head_dim D: the same for every
    n_splits (the tile is masked), so a generation whose split count grows compiles one kernel."""
    return dict(D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_SPLITS=COMBINE_SPLITS)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _probabilities(q, k, lse, i, j, pos_i, doc_i, doc_j, ok, scale, softcap, window,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PACKED: tl.constexpr,
                   DOCS: tl.constexpr, PRECISION: tl.constexpr):
    """P = exp(x − lse) recomputed for one tile (0 where masked), and 1 − tanh² of the soft-cap (or 1)."""
    x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    dcap = tl.full(x.shape, 1.0, tl.float32)
    if SOFTCAP:
        c = tanh(x / softcap)
        x = softcap * c
        dcap = 1.0 - c * c
    ok = ok & _visible(i, j, pos_i, doc_i, doc_j, window, CAUSAL, WINDOW, PACKED, DOCS)
    p = tl.where(ok, tl.exp(x - lse[:, None]), 0.0)
    return p, dcap


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, POS, DOC,
                     s_qb, s_qh, s_qt, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_pb, s_pt, s_db, s_dt,
                     KV, T, S, G, q_start, k_first, scale, softcap, window,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PACKED: tl.constexpr,
                     DOCS: tl.constexpr, PRECISION: tl.constexpr):
    """One program: dK and dV of BLOCK_N keys of one (batch row, K/V head), summed over the queries of
    every head in the group that can see them. q, dO (B, H, T, D) share strides; so do dK, dV with k."""
    pid_n, bk = tl.program_id(0), tl.program_id(1)
    b, kv = (bk // KV).to(tl.int64), bk % KV
    H = KV * G
    s = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    s_ok = s < S
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    kv_mask = s_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * s_kb + kv * s_kh + s[:, None] * s_ks + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * s_vb + kv * s_vh + s[:, None] * s_vs + d[None, :], mask=kv_mask, other=0.0)
    j = k_first + s
    doc_j = tl.zeros((BLOCK_N,), tl.int32)
    if DOCS:
        doc_j = tl.load(DOC + b * s_db + s * s_dt, mask=s_ok, other=-2)
    j_lo = k_first + pid_n * BLOCK_N
    j_hi = k_first + tl.minimum(S, pid_n * BLOCK_N + BLOCK_N) - 1
    lo, hi = _query_range(j_lo, j_hi, q_start, T, window, CAUSAL, WINDOW)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for g in range(G):
        h = kv * G + g
        for start in range(lo, hi, BLOCK_M):
            t = start + tl.arange(0, BLOCK_M)
            t_ok = t < hi
            q_mask = t_ok[:, None] & d_ok[None, :]
            offs = b * s_qb + h * s_qh + t[:, None] * s_qt + d[None, :]
            q = tl.load(Q + offs, mask=q_mask, other=0.0)
            do = tl.load(DO + offs, mask=q_mask, other=0.0)
            row = (b * H + h) * T + t
            lse = tl.load(LSE + row, mask=t_ok, other=float("inf"))
            delta = tl.load(DELTA + row, mask=t_ok, other=0.0)
            pos_i = tl.zeros((BLOCK_M,), tl.int32)
            doc_i = tl.zeros((BLOCK_M,), tl.int32)
            if PACKED:
                pos_i = tl.load(POS + b * s_pb + t * s_pt, mask=t_ok, other=0)
            if DOCS:
                doc_i = tl.load(DOC + b * s_db + t * s_dt, mask=t_ok, other=-1)
            p, dcap = _probabilities(q, k, lse, (q_start + t)[:, None], j[None, :], pos_i[:, None], doc_i[:, None],
                                     doc_j[None, :], t_ok[:, None] & s_ok[None, :], scale, softcap, window,
                                     CAUSAL, WINDOW, SOFTCAP, PACKED, DOCS, PRECISION)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None]) * dcap
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    out = b * s_kb + kv * s_kh + s[:, None] * s_ks + d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, POS, DOC,
                   s_qb, s_qh, s_qt, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_pb, s_pt, s_db, s_dt,
                   H, T, S, G, q_start, k_first, scale, softcap, window,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PACKED: tl.constexpr,
                   DOCS: tl.constexpr, PRECISION: tl.constexpr):
    """One program: dQ of BLOCK_M queries of one (batch row, query head), over the keys they see."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    kv = h // G
    t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = t < T
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q_mask = t_ok[:, None] & d_ok[None, :]
    offs = b * s_qb + h * s_qh + t[:, None] * s_qt + d[None, :]
    q = tl.load(Q + offs, mask=q_mask, other=0.0)
    do = tl.load(DO + offs, mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + t, mask=t_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * T + t, mask=t_ok, other=0.0)
    i = q_start + t
    pos_i = tl.zeros((BLOCK_M,), tl.int32)
    doc_i = tl.zeros((BLOCK_M,), tl.int32)
    doc_start = 0
    if PACKED:
        pos_i = tl.load(POS + b * s_pb + t * s_pt, mask=t_ok, other=0)
        doc_start = tl.min(tl.where(t_ok, i - pos_i, 2147483647), axis=0)
    if DOCS:
        doc_i = tl.load(DOC + b * s_db + t * s_dt, mask=t_ok, other=-1)
    i_lo = q_start + pid_m * BLOCK_M
    i_hi = q_start + tl.minimum(T, pid_m * BLOCK_M + BLOCK_M) - 1
    lo, hi = _key_range(i_lo, i_hi, k_first, S, window, doc_start, CAUSAL, WINDOW, PACKED)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(lo, hi, BLOCK_N):
        s = start + tl.arange(0, BLOCK_N)
        s_ok = s < hi
        kv_mask = s_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * s_kb + kv * s_kh + s[:, None] * s_ks + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + b * s_vb + kv * s_vh + s[:, None] * s_vs + d[None, :], mask=kv_mask, other=0.0)
        doc_j = tl.zeros((BLOCK_N,), tl.int32)
        if DOCS:
            doc_j = tl.load(DOC + b * s_db + s * s_dt, mask=s_ok, other=-2)
        p, dcap = _probabilities(q, k, lse, i[:, None], (k_first + s)[None, :], pos_i[:, None], doc_i[:, None],
                                 doc_j[None, :], t_ok[:, None] & s_ok[None, :], scale, softcap, window,
                                 CAUSAL, WINDOW, SOFTCAP, PACKED, DOCS, PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None]) * dcap
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + offs, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mask:
    """Which keys each query sees (`index_mask`'s rule), and where queries and keys sit.

    causal, window: as `GroupedQueryAttention`'s (window: keys a query sees, itself included)
    q_start:        index of the first query (queries are q_start, q_start + 1, ...)
    k_first:        index of the key in slot 0, for keys stored in index order
    k_index:        (S,) the index of each slot, for keys that are not (a ring buffer's): decode only
    positions:      (B, T) RoPE positions, for the packed rule i - j <= position_i (causal only)
    documents:      (B, T) document ids where the keys are the queries (an encoder's padding)
    """

    causal: bool = True
    window: int | None = None
    q_start: int = 0
    k_first: int = 0
    k_index: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    documents: torch.Tensor | None = None


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is Triton's default, unused by bf16/fp16 inputs


# Tile choices on a GPU, best first: (BLOCK_M, BLOCK_N, warps, stages, shared memory in bytes for bf16,
# lowest compute capability). The shared memory is what Triton 3.9 allocated at these tiles (`python -m
# minigemma.kernels.aot`, the larger of sm_90's and sm_80's, and of the two backward kernels), doubled for
# float32 operands; the first choice that fits the device's per-block limit and capability is taken, and
# the AOT check verifies it. At head_dim 128 the forward's 128 × 64 tiles spilled 4-84 bytes a thread
# on both GPUs once the packed mask (int64 positions) was live beside the (128, 128) accumulator, the
# scores and P; 128 × 32 spills nothing (254 registers) and keeps BLOCK_M = 128, which on Hopper is two
# warpgroups of 64 whole query rows: the online softmax exchanges nothing between warps (64 × 64 tiles
# fit too, but split each row's scores over two warpgroups).
# The backward's tiles are smaller than the forward's: its programs hold two (BLOCK_N, D) float32
# accumulators and recompute P and dS; 128 × 64 tiles in 3 stages need ~242 KB (more than an H100's
# 227 KB) and spill. At head_dim 128, 128 × 32 backward tiles use Hopper's wgmma without spilling, but
# spill on an A100's mma.sync, which gets 32 × 32.
_TILES = {
    ("forward", 64): [(128, 64, 4, 3, 65536, 0), (64, 32, 4, 2, 32768, 0)],
    ("forward", 128): [(128, 32, 8, 3, 81920, 0), (64, 32, 4, 2, 49152, 0)],
    ("forward", 256): [(64, 32, 8, 2, 98304, 0), (32, 32, 4, 2, 65536, 0)],
    ("backward", 64): [(128, 32, 8, 2, 49152, 9), (32, 32, 4, 2, 24576, 0)],
    ("backward", 128): [(128, 32, 8, 2, 98304, 9), (32, 32, 4, 2, 35328, 0)],
    ("backward", 256): [(32, 32, 8, 2, 68096, 0), (16, 16, 4, 2, 33536, 0)],
}
# The float32 forward ("ieee" products on the CUDA cores, not the tensor cores) has tiles of its own, the
# same on both GPUs, with the shared memory Triton allocated in float32 (not doubled). An FMA `tl.dot`
# keeps both operands in registers, and a float32 value takes a whole register where bf16 packs two: the
# bf16 tiles, doubled, spilled 16 B to 2.4 KB a thread (64 × 32 on 4 warps at head_dim 128, 64 × 32 on
# 8 at 256). 32 query rows on 8 warps take at most 150 registers and spill nothing on sm_90 or sm_80, for
# every mask. At head_dim 256 the keys go 16 a step: 32 × 32 spilled 16 B on sm_80 (8 warps) and on
# sm_90 (4 warps), 32 × 16 on 4 warps 80 B on sm_90.
_TILES_FP32_FORWARD = {
    64: [(32, 32, 8, 2, 28800, 0)],
    128: [(32, 32, 8, 2, 53248, 0)],
    256: [(32, 16, 8, 2, 67712, 0)],
}
# The decode kernel: 16-bit inputs take the forward's BLOCK_N and stages with at most 4 warps (its rows
# are the G ≤ 16 query heads of a group); float32 takes 16 keys a step on 4 warps: with the forward's 32
# it spilled 52-104 B on sm_80 and up to 10 KB on sm_90 at head_dim 256, 492 B on sm_90 at 128.
_DECODE_FP32 = (16, 4, 2)  # (BLOCK_N, warps, stages)


def _width(D: int) -> int:
    return 64 if D <= 64 else 128 if D <= 128 else 256


def _choices(D: int, backward: bool, elem: int) -> list[tuple[int, int, int, int, int, int]]:
    """The tile choices for head_dim D, with shared memory in bytes for `elem`-byte operands."""
    if elem == 4 and not backward:
        return _TILES_FP32_FORWARD[_width(D)]
    return [(bm, bn, w, st, need * elem // 2, cap)
            for bm, bn, w, st, need, cap in _TILES[("backward" if backward else "forward", _width(D))]]


def _smem_need(D: int, bm: int, bn: int, stages: int, elem: int = 2, backward: bool = False) -> int:
    """Shared memory (bytes) a program needs at these tiles: the table's figure when it lists them,
    else a conservative estimate (every pipelined stage holds a tile of K and of V, or of q and dO)."""
    for bm_, bn_, _, st_, need, _ in _choices(D, backward, elem):
        if (bm_, bn_, st_) == (bm, bn, stages):
            return need
    rows = max(bm, bn)
    return (stages + 1) * 2 * rows * _width(D) * elem + 2 * bm * bn * 4


def _gpu_blocks(D: int, props: DeviceProps, backward: bool = False, elem: int = 2):
    """(BLOCK_M, BLOCK_N, warps, stages) on a GPU with these props: the first of `_TILES` (float32
    forward: `_TILES_FP32_FORWARD`) whose shared memory fits one program's limit and whose capability
    the device has (a 256-wide row of q and of acc must fit in registers too)."""
    choices = _choices(D, backward, elem)
    for bm, bn, warps, stages, need, cap in choices:
        if need <= props.smem_per_block and props.capability[0] >= cap:
            return bm, bn, warps, stages
    return choices[-1][:4]


def _blocks(D: int, device: torch.device | None, block_m: int | None, block_n: int | None, *,
            props: DeviceProps | None = None, backward: bool = False, elem: int = 2):
    """(BLOCK_M, BLOCK_N, warps, stages). On a GPU, `_gpu_blocks` for its props (given, or read from the
    device) and the operands' element size; in the interpreter, 16 × 16: small tiles, many programs."""
    if props is None and device is not None:
        props = device_props(device)
    if props is not None:
        bm, bn, warps, stages = _gpu_blocks(D, props, backward, elem)
    else:
        bm, bn, warps, stages = 16, 16, 1, 1
    return block_m or bm, block_n or bn, warps, stages


def _decode_blocks(D: int, device: torch.device | None, block_n: int | None, *, props: DeviceProps | None = None,
                   elem: int = 2):
    """(BLOCK_N, warps, stages) of the decode kernel: on a GPU, the forward's BLOCK_N and stages with at
    most 4 warps for 16-bit inputs, `_DECODE_FP32` for float32; in the interpreter 16 keys, 1 warp."""
    if props is None and device is not None:
        props = device_props(device)
    if props is None:
        bn, warps, stages = 16, 1, 1
    elif elem == 4:
        bn, warps, stages = _DECODE_FP32
    else:
        _, bn, warps, stages = _gpu_blocks(D, props, False, elem)
        warps = min(warps, 4)
    return block_n or bn, warps, stages


def _check(q, k, v, mask: Mask):
    check_device(q=q, k=k, v=v, positions=mask.positions, documents=mask.documents, k_index=mask.k_index)
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q (B, H, T, D) and k, v (B, K, S, D) of one shape; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, T, D = q.shape
    Bk, K, S, Dk = k.shape
    if (Bk, Dk) != (B, D) or H % K:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: batch and head_dim must match and the "
                         f"{H} query heads must be a multiple of the {K} key/value heads")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q, k, v must share one dtype among float32, bfloat16, float16; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if INTERPRET and q.device.type == "cpu" and q.dtype != torch.float32:
        raise ValueError(f"Triton's interpreter computes {q.dtype} wrongly (numpy has no bfloat16): on CPU the "
                         "attention kernels take float32; bfloat16 and float16 run on a GPU")
    if D > MAX_D:
        raise ValueError(f"head_dim {D} > {MAX_D}: the kernels keep a row of q in registers")
    if mask.window is not None and mask.window < 1:
        raise ValueError(f"window must be >= 1 (the query itself), got {mask.window}")
    for name, t in (("positions", mask.positions), ("documents", mask.documents)):
        if t is not None and (t.shape != (B, T) or t.is_floating_point()):
            raise ValueError(f"{name} must be a ({B}, {T}) integer tensor, got {t.dtype} {tuple(t.shape)}")
    if mask.documents is not None and (S != T or mask.q_start != mask.k_first):
        raise ValueError("documents are for keys that are the queries themselves (an encoder: S = T, no cache)")
    if mask.k_index is not None and mask.k_index.shape != (S,):
        raise ValueError(f"k_index must be ({S},), got {tuple(mask.k_index.shape)}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


PLACEHOLDERS: dict[torch.device, torch.Tensor] = {}


def placeholder(device: torch.device) -> torch.Tensor:
    """A one-element int32 tensor on `device`, made once: the pointer passed for an absent mask tensor
    (a kernel whose switch is off never reads it). Not a fresh torch.zeros(1) per call: a launch saved."""
    if device not in PLACEHOLDERS:
        PLACEHOLDERS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return PLACEHOLDERS[device]


def _flags(mask: Mask, softcap, q):
    """Kernel arguments every launch shares: the mask's tensors and strides, its switches."""
    dummy = placeholder(q.device)
    pos = mask.positions if mask.positions is not None and mask.causal else None
    doc = mask.documents
    args = (pos if pos is not None else dummy, doc if doc is not None else dummy)
    strides = ((pos.stride(0), pos.stride(1)) if pos is not None else (0, 0)) + \
              ((doc.stride(0), doc.stride(1)) if doc is not None else (0, 0))
    switches = dict(CAUSAL=mask.causal, WINDOW=mask.window is not None, SOFTCAP=bool(softcap),
                    PACKED=pos is not None, DOCS=doc is not None, PRECISION=_precision(q.dtype))
    return args, strides, switches


def flash_attention_forward(q, k, v, mask: Mask, scale: float, softcap: float | None = None,
                            block_m: int | None = None, block_n: int | None = None, tiles: torch.Tensor | None = None):
    """The forward kernel: (out (B, H, T, D), lse (B, H, T) float32). Keys in index order.

    `tiles`, if given ((B·H, number of query blocks) int32), receives the key tiles each program visited."""
    _check(q, k, v, mask)
    if mask.k_index is not None:
        raise ValueError("flash_attention needs keys in index order; a ring buffer's rotated slots are for decoding")
    q, k, v = _rows(q), _rows(k), _rows(v)
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    # out is written as (B, T, H, D) seen as (B, H, T, D): merge_heads is then a view, not a copy
    out = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    BLOCK_M, BLOCK_N, warps, stages = _blocks(D, q.device, block_m, block_n, elem=q.element_size())
    grid = (triton.cdiv(T, BLOCK_M), B * H)
    if tiles is not None and tiles.shape != (B * H, grid[0]):
        raise ValueError(f"tiles must be ({B * H}, {grid[0]}), got {tuple(tiles.shape)}")
    (pos, doc), pd_strides, switches = _flags(mask, softcap, q)
    _fwd_kernel[grid](q, k, v, out, lse, pos, doc, tiles if tiles is not None else lse,
                      *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *pd_strides,
                      H, T, S, H // K, mask.q_start, mask.k_first, scale, float(softcap or 1.0), mask.window or 0,
                      D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                      COUNT=tiles is not None, num_warps=warps, num_stages=stages, **switches)
    return out, lse


def flash_attention_backward(do, q, k, v, out, lse, mask: Mask, scale: float, softcap: float | None = None,
                             block_m: int | None = None, block_n: int | None = None):
    """dq, dk, dv from dout, with P recomputed from the forward's lse."""
    q, k, v = _rows(q), _rows(k), _rows(v)
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    do = do.contiguous()
    q = q.contiguous()  # q and dO are read with one set of strides
    delta = (do.float() * out.float()).sum(-1)  # (B, H, T): δ = rowsum(dO ⊙ O)
    k, v = k.contiguous(), v.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    BLOCK_M, BLOCK_N, warps, stages = _blocks(D, q.device, block_m, block_n, backward=True,
                                              elem=q.element_size())
    (pos, doc), pd_strides, switches = _flags(mask, softcap, q)
    common = dict(D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                  num_warps=warps, num_stages=stages, **switches)
    tail = (mask.q_start, mask.k_first, scale, float(softcap or 1.0), mask.window or 0)
    _bwd_dkdv_kernel[(triton.cdiv(S, BLOCK_N), B * K)](
        q, k, v, do, lse, delta, dk, dv, pos, doc, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *pd_strides,
        K, T, S, H // K, *tail, **common)
    _bwd_dq_kernel[(triton.cdiv(T, BLOCK_M), B * H)](
        q, k, v, do, lse, delta, dq, pos, doc, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *pd_strides,
        H, T, S, H // K, *tail, **common)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale, softcap, block_m, block_n):
        out, lse = flash_attention_forward(q, k, v, mask, scale, softcap, block_m, block_n)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (mask, scale, softcap, block_m, block_n)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(dout, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                    softcap: float | None = None, causal: bool = True, window: int | None = None,
                    q_start: int = 0, k_first: int = 0, positions: torch.Tensor | None = None,
                    documents: torch.Tensor | None = None, block_m: int | None = None,
                    block_n: int | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale [soft-capped] [masked]) v, differentiable: q (B, H, T, D), k and v (B, K, S, D)
    -> (B, H, T, D). Queries have indices q_start, q_start + 1, ...; keys k_first, k_first + 1, ...
    (see `Mask` for the rest). scale defaults to D^-0.5."""
    mask = Mask(causal, window, q_start, k_first, None, positions, documents)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return FlashAttentionFunction.apply(q, k, v, mask, scale, softcap, block_m, block_n)


def target_programs(device: torch.device | None, props: DeviceProps | None = None) -> int:
    """Programs a decode step should launch: two per streaming multiprocessor on a GPU (props given, or
    read from the device); 4 in the interpreter (enough to exercise the merge)."""
    if props is None and device is not None:
        props = device_props(device)
    return 2 * props.sm_count if props is not None else 4


def decode_splits(batch: int, kv_heads: int, S: int, block_n: int, programs: int) -> int:
    """How many programs share one row's keys: enough that batch · K · splits reaches `programs`, and
    never more than one per tile of keys."""
    tiles = triton.cdiv(S, block_n)
    return max(1, min(tiles, triton.cdiv(programs, batch * kv_heads)))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_index: int | torch.Tensor,
                     scale: float | None = None, softcap: float | None = None, causal: bool = True,
                     window: int | None = None, k_first: int = 0, k_index: torch.Tensor | None = None,
                     ring: bool = False, positions: torch.Tensor | None = None, splits: int | None = None,
                     block_n: int | None = None) -> torch.Tensor:
    """One new query per row against the cache: q (B, H, 1, D), k and v (B, K, S, D) -> (B, H, 1, D).

    q_index: the query's index; keys k_first, k_first + 1, ... or, for a ring buffer's rotated slots,
    `k_index` (S,). positions (B, 1): the packed rule. splits: programs per row and K/V head
    (default `decode_splits`); q_index as a (1,) tensor and `ring`: see `decode_partials`. Forward only
    (no autograd). Two launches: `decode_partials`, then the combine of its splits."""
    o_part, lse_part = decode_partials(q, k, v, q_index=q_index, scale=scale, softcap=softcap, causal=causal,
                                       window=window, k_first=k_first, k_index=k_index, ring=ring,
                                       positions=positions, splits=splits, block_n=block_n)
    B, H, T, D = q.shape
    out = torch.empty(B, 1, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    if o_part is None:
        return out.zero_()
    n_splits = o_part.shape[2]
    _combine_kernel[(B * H,)](o_part, lse_part, out, out.stride(0), out.stride(1), H, n_splits,
                              **_combine_config(n_splits, D))
    return out


def decode_partials(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_index: int | torch.Tensor,
                    scale: float | None = None, softcap: float | None = None, causal: bool = True,
                    window: int | None = None, k_first: int = 0, k_index: torch.Tensor | None = None,
                    ring: bool = False, positions: torch.Tensor | None = None, splits: int | None = None,
                    block_n: int | None = None):
    """The split-K half of `decode_attention` (one launch): each split's softmax-normalised partial output
    o_part (B, H, n_splits, D) float32 and its log-sum-exp lse_part (B, H, n_splits); (None, None) when
    there is nothing to attend. The combine, Σ_s e^(lse_s − max) o_s / Σ_s e^(lse_s − max), is
    `_combine_kernel`, or the prologue of the output projection (`kernels.decode_layer`).

    q_index may be a (1,) integer tensor on q's device: the kernel reads it, and k, v are then the whole
    static cache (B, K, S, D), keys in index order from 0 (the causal rule hides the slots not yet
    written) or, with `ring`, a ring buffer whose slot s holds the latest index i <= q_index with
    i % S == s. Nothing in such a launch changes from step to step: a CUDA graph can replay it
    (`kernels.graph`)."""
    indexed = isinstance(q_index, torch.Tensor)
    if indexed and (q_index.shape != (1,) or q_index.is_floating_point() or k_first != 0 or k_index is not None
                    or not causal):
        raise ValueError("a q_index tensor must be (1,) integers, with causal keys from index 0 in order or "
                         f"in a ring (`ring`), not k_first or k_index; got {q_index.dtype} {tuple(q_index.shape)}")
    if ring and not indexed:
        raise ValueError("ring=True derives a ring's slot indices from a q_index tensor; with an int q_index, "
                         "pass the slots' indices as k_index")
    mask = Mask(causal, window, 0 if indexed else q_index, k_first, k_index, positions, None)
    check_device(q=q, q_index=q_index if indexed else None)
    _check(q, k, v, mask)
    B, H, T, D = q.shape
    if T != 1:
        raise ValueError(f"decode_attention takes one query per row, got T = {T}")
    q, k, v = _rows(q), _rows(k), _rows(v)
    K, S = k.shape[1], k.shape[2]
    if q.numel() == 0 or S == 0:
        return None, None
    scale = D ** -0.5 if scale is None else scale
    BLOCK_N, warps, stages = _decode_blocks(D, q.device, block_n, elem=q.element_size())
    n_splits = splits or decode_splits(B, K, S, BLOCK_N, target_programs(q.device))
    keys_per_split = triton.cdiv(triton.cdiv(S, n_splits), BLOCK_N) * BLOCK_N  # whole tiles per split
    n_splits = triton.cdiv(S, keys_per_split)
    # the partial results in one buffer sized for the most splits this batch could get, whatever S is:
    # every step of a generation allocates the same bytes (a CUDA graph's memory pool can serve them)
    most = max(n_splits, triton.cdiv(target_programs(q.device), B * K))
    part = torch.empty(B * H * most * (D + 1), dtype=torch.float32, device=q.device)
    o_part = part[:B * H * n_splits * D].view(B, H, n_splits, D)
    lse_part = part[B * H * most * D:B * H * (most * D + n_splits)].view(B, H, n_splits)
    pos = positions if positions is not None and causal else None
    dummy = placeholder(q.device)
    G = H // K
    BLOCK_D = max(16, triton.next_power_of_2(D))
    _decode_kernel[(n_splits, B * K)](
        q, k, v, k_index if k_index is not None else dummy, pos if pos is not None else dummy,
        q_index if indexed else dummy, o_part, lse_part,
        q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3], pos.stride(0) if pos is not None else 0,
        K, S, G, keys_per_split, 0 if indexed else q_index, k_first, scale, float(softcap or 1.0), window or 0,
        D=D, BLOCK_D=BLOCK_D, BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_N=BLOCK_N,
        CAUSAL=causal, WINDOW=window is not None, SOFTCAP=bool(softcap), PACKED=pos is not None,
        RING=k_index is not None or ring, INDEXED=indexed, PRECISION=_precision(q.dtype), num_warps=warps,
        num_stages=stages)
    return o_part, lse_part


def reference(q, k, v, *, scale=None, softcap=None, causal=True, window=None, q_start=0, k_first=0,
              positions=None, documents=None, k_index=None):
    """The model's own attention for the same call: `minigemma.attention.attend` over the blocks that
    `attention_blocks` plans from a `Positions` and a `Keys` describing these queries and keys."""
    B, H, T, D = q.shape
    S = k.shape[2]
    index = torch.arange(q_start, q_start + T, device=q.device)
    pos = Positions(q_start, index, positions if positions is not None else index.expand(B, T),
                    packed=positions is not None, documents=documents)
    keys = Keys(k_first, S, in_order=k_index is None, index=lambda: k_index, layout=("reference",))
    scale = D ** -0.5 if scale is None else scale
    return attend(q, k, v, attention_blocks(pos, keys, window, causal), scale, softcap)


# --------------------------------------------------------------------------------------------
# The model's attention layer, with the kernels swapped in
# --------------------------------------------------------------------------------------------
_WARNED: set[str] = set()


def _fall_back(why: str) -> None:
    if why not in _WARNED:
        _WARNED.add(why)
        warnings.warn(f"minigemma.kernels.attention: {why}; these calls run the torch attention", stacklevel=3)


class GroupedQueryAttention(TorchGroupedQueryAttention):
    """`minigemma.attention.GroupedQueryAttention` with RoPE and attention done by Triton kernels.

    Same parameters, same state dict, same cache: `project` applies RoPE with `kernels.rope` (angles
    from the positions), `attention` runs `decode_attention` for one new token per row (split-K over
    the cache, a ring's rotated slots included) and `flash_attention` otherwise (differentiable).
    What the kernels do not cover runs the torch path after a warning that says why.
    """

    @staticmethod
    def unsupported(module: TorchGroupedQueryAttention) -> str | None:
        """Why this layer cannot use the kernels at all (None: it can)."""
        if module.head_dim > MAX_D:
            return f"head_dim {module.head_dim} > {MAX_D}"
        return None

    def project(self, x: torch.Tensor, pos: Positions):
        """x (B, T, C) -> q (B, H, T, D), k and v (B, K, T, D): the torch layer's projection, RoPE by the kernel."""
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([H * D, K * D, K * D], dim=-1)
        q, k, v = split_heads(q, H), split_heads(k, K), split_heads(v, K)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = self.rotary.frequencies(x.device)  # built on the device once, not copied every step
        return rope(q, pos.positions, inv_freq=inv_freq), rope(k, pos.positions, inv_freq=inv_freq), v

    @staticmethod
    def key_index(keys: Keys, pos: Positions) -> torch.Tensor | None:
        """A ring's slot indices (S,) for the decode kernel, or None for a cache in index order. A ring passes
        them before it is full too (slots 0..S-1 then hold indices 0..S-1): a local layer's decode kernel
        then runs one way from the first step to the last, and a generation never compiles a second one."""
        if keys.index is None:
            return None
        return pos.key_index(keys)[:keys.count]

    def attention(self, q, k, v, pos: Positions, keys: Keys) -> torch.Tensor:
        T = q.shape[2]
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        why = None
        if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            why = f"no attention kernel for {q.dtype}"
        elif INTERPRET and q.device.type == "cpu" and q.dtype != torch.float32:
            why = f"Triton's interpreter (CPU) computes {q.dtype} wrongly, so it runs float32 only"
        elif not keys.in_order and (T > 1 or grad):
            why = "keys out of index order (a ring buffer) are supported for one-token decoding without gradients"
        if why:
            _fall_back(why)
            return super().attention(q, k, v, pos, keys)
        positions = pos.positions if pos.packed and self.causal else None
        if T == 1 and pos.documents is None and not grad:
            return decode_attention(q, k, v, q_index=pos.start, scale=self.scale, softcap=self.softcap,
                                    causal=self.causal, window=self.window, k_first=keys.first,
                                    k_index=self.key_index(keys, pos), positions=positions)
        return flash_attention(q, k, v, scale=self.scale, softcap=self.softcap, causal=self.causal,
                               window=self.window, q_start=pos.start, k_first=keys.first, positions=positions,
                               documents=pos.documents)


__all__ = ["Mask", "flash_attention", "decode_attention", "decode_partials", "flash_attention_forward", "flash_attention_backward",
           "decode_splits", "target_programs", "reference", "GroupedQueryAttention", "MAX_D", "INTERPRET"]


# the launchers' choices, public for `kernels.aot` (which compiles them for a GPU it does not have)
blocks, decode_blocks, combine_config = _blocks, _decode_blocks, _combine_config
