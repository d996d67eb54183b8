"""Wrong kernel bodies for chapter 12's exercises, each run through its exercise's launcher.

Plain functions written against triton.language: the launcher runs them in Triton's interpreter,
as it runs the learner's @triton.jit kernels. 12.tile_for_h100 compiles its kernels for an H100, which
reads their source: those are @triton.jit kernels of their own (no helper), each paired with a tile.
"""

import triton
import triton.language as tl

from minigemma.grading.checks.ch12 import launch


# 1. vector add ---------------------------------------------------------------------------------
def add_no_mask(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs) + tl.load(y_ptr + offs))


def add_mask_one_too_far(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs <= n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=m) + tl.load(y_ptr + offs, mask=m), mask=m)


def add_block_starts_one_late(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + 1 + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=m) + tl.load(y_ptr + offs, mask=m), mask=m)


# 2. scale columns ------------------------------------------------------------------------------
def _scale(x_ptr, s_ptr, out_ptr, M, N, stride_x, BLOCK_M, BLOCK_N, x_stride="ok", row_mask=True, swap=False,
           out_stride="ok"):
    pid_r, pid_c = (tl.program_id(1), tl.program_id(0)) if swap else (tl.program_id(0), tl.program_id(1))
    rows = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = ((rows < M)[:, None] if row_mask else (rows >= 0)[:, None]) & (cols < N)[None, :]
    sx = N if x_stride == "width" else stride_x
    x = tl.load(x_ptr + rows[:, None] * sx + cols[None, :], mask=mask)
    s = tl.load(s_ptr + cols, mask=cols < N)
    so = stride_x if out_stride == "input's" else N
    tl.store(out_ptr + rows[:, None] * so + cols[None, :], x * s[None, :], mask=mask)


def scale_row_stride_is_width(x_ptr, s_ptr, out_ptr, M, N, stride_x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _scale(x_ptr, s_ptr, out_ptr, M, N, stride_x, BLOCK_M, BLOCK_N, x_stride="width")


def scale_no_row_mask(x_ptr, s_ptr, out_ptr, M, N, stride_x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _scale(x_ptr, s_ptr, out_ptr, M, N, stride_x, BLOCK_M, BLOCK_N, row_mask=False)


def scale_program_axes_swapped(x_ptr, s_ptr, out_ptr, M, N, stride_x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _scale(x_ptr, s_ptr, out_ptr, M, N, stride_x, BLOCK_M, BLOCK_N, swap=True)


def scale_output_with_input_stride(x_ptr, s_ptr, out_ptr, M, N, stride_x, BLOCK_M: tl.constexpr,
                                   BLOCK_N: tl.constexpr):
    _scale(x_ptr, s_ptr, out_ptr, M, N, stride_x, BLOCK_M, BLOCK_N, out_stride="input's")


# 3. RMSNorm rows -------------------------------------------------------------------------------
def _rms(x_ptr, w_ptr, out_ptr, N, stride_x, eps, BLOCK, divide_by="N", one_plus=True, use_eps=True, mask_on=True):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N if mask_on else cols >= 0
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    mean = tl.sum(x * x, axis=0) / (N if divide_by == "N" else BLOCK)
    rstd = 1.0 / tl.sqrt(mean + eps if use_eps else mean)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * N + cols, x * rstd * ((1.0 + w) if one_plus else w), mask=mask)


def rms_mean_over_block(x_ptr, w_ptr, out_ptr, N, stride_x, eps, BLOCK: tl.constexpr):
    _rms(x_ptr, w_ptr, out_ptr, N, stride_x, eps, BLOCK, divide_by="BLOCK")


def rms_w_not_one_plus_w(x_ptr, w_ptr, out_ptr, N, stride_x, eps, BLOCK: tl.constexpr):
    _rms(x_ptr, w_ptr, out_ptr, N, stride_x, eps, BLOCK, one_plus=False)


def rms_no_eps(x_ptr, w_ptr, out_ptr, N, stride_x, eps, BLOCK: tl.constexpr):
    _rms(x_ptr, w_ptr, out_ptr, N, stride_x, eps, BLOCK, use_eps=False)


def rms_no_mask(x_ptr, w_ptr, out_ptr, N, stride_x, eps, BLOCK: tl.constexpr):
    _rms(x_ptr, w_ptr, out_ptr, N, stride_x, eps, BLOCK, mask_on=False)


# 4. GeGLU rows ---------------------------------------------------------------------------------
def _geglu(gu_ptr, out_ptr, F, stride_gu, BLOCK, swap=False, up_at="F", act="tanh", mask_on=True):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F if mask_on else cols >= 0
    first = tl.load(gu_ptr + row * stride_gu + cols, mask=mask)
    second = tl.load(gu_ptr + row * stride_gu + (F if up_at == "F" else BLOCK) + cols, mask=mask)
    gate, up = (second, first) if swap else (first, second)
    if act == "tanh":
        u = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        y = 0.5 * gate * (2.0 * tl.sigmoid(2.0 * u)) * up
    else:  # the exact, erf GELU
        y = 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)) * up
    tl.store(out_ptr + row * F + cols, y, mask=mask)


def geglu_gate_and_up_swapped(gu_ptr, out_ptr, F, stride_gu, BLOCK: tl.constexpr):
    _geglu(gu_ptr, out_ptr, F, stride_gu, BLOCK, swap=True)


def geglu_up_at_block_not_f(gu_ptr, out_ptr, F, stride_gu, BLOCK: tl.constexpr):
    _geglu(gu_ptr, out_ptr, F, stride_gu, BLOCK, up_at="BLOCK")


def geglu_erf_gelu(gu_ptr, out_ptr, F, stride_gu, BLOCK: tl.constexpr):
    _geglu(gu_ptr, out_ptr, F, stride_gu, BLOCK, act="erf")


def geglu_no_mask(gu_ptr, out_ptr, F, stride_gu, BLOCK: tl.constexpr):
    _geglu(gu_ptr, out_ptr, F, stride_gu, BLOCK, mask_on=False)


# 5. online log-sum-exp ------------------------------------------------------------------------
def _lse(z_ptr, out_ptr, V, stride_z, BLOCK, rescale=True, pad="-inf", tail=True, use_max=True, m0=float("-inf"),
         row_stride="stride_z", mask_on=True):
    row = tl.program_id(0)
    m, l = m0, 0.0
    stop = V if tail else V // BLOCK * BLOCK
    for start in range(0, stop, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(z_ptr + row * (stride_z if row_stride == "stride_z" else V) + cols,
                    mask=cols < V if mask_on else cols >= 0, other=float("-inf") if pad == "-inf" else 0.0)
        if use_max:
            m_new = tl.maximum(m, tl.max(z, axis=0))
            l = (l * tl.exp(m - m_new) if rescale else l) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        else:
            l = l + tl.sum(tl.exp(z), axis=0)
    tl.store(out_ptr + row, m + tl.log(l) if use_max else tl.log(l))


def lse_sum_not_rescaled(z_ptr, out_ptr, V, stride_z, BLOCK: tl.constexpr):
    _lse(z_ptr, out_ptr, V, stride_z, BLOCK, rescale=False)


def lse_tail_padded_with_zeros(z_ptr, out_ptr, V, stride_z, BLOCK: tl.constexpr):
    _lse(z_ptr, out_ptr, V, stride_z, BLOCK, pad="0")


def lse_last_partial_block_skipped(z_ptr, out_ptr, V, stride_z, BLOCK: tl.constexpr):
    _lse(z_ptr, out_ptr, V, stride_z, BLOCK, tail=False)


def lse_without_the_max(z_ptr, out_ptr, V, stride_z, BLOCK: tl.constexpr):
    _lse(z_ptr, out_ptr, V, stride_z, BLOCK, use_max=False)


def lse_max_starts_at_zero(z_ptr, out_ptr, V, stride_z, BLOCK: tl.constexpr):
    _lse(z_ptr, out_ptr, V, stride_z, BLOCK, m0=0.0)


def lse_no_mask(z_ptr, out_ptr, V, stride_z, BLOCK: tl.constexpr):
    _lse(z_ptr, out_ptr, V, stride_z, BLOCK, mask_on=False)


def lse_row_stride_is_v(z_ptr, out_ptr, V, stride_z, BLOCK: tl.constexpr):
    _lse(z_ptr, out_ptr, V, stride_z, BLOCK, row_stride="V")


# 6. linear scan --------------------------------------------------------------------------------
def _scan(a_ptr, b_ptr, h0_ptr, h_ptr, T, D, BLOCK_D, carry=True, time_stride="D", use_h0=True, store="after"):
    seq = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = d < D
    h0 = tl.load(h0_ptr + seq * D + d, mask=mask, other=0.0)
    h = h0 if use_h0 else h0 * 0.0
    for t in range(T):
        off = (seq * T + t) * D + d if time_stride == "D" else seq * T * D + t + d
        prev = h if carry else h0
        new = tl.load(a_ptr + off, mask=mask) * prev + tl.load(b_ptr + off, mask=mask)
        tl.store(h_ptr + off, new if store == "after" else h, mask=mask)
        h = new


def scan_state_not_carried(a_ptr, b_ptr, h0_ptr, h_ptr, T, D, BLOCK_D: tl.constexpr):
    _scan(a_ptr, b_ptr, h0_ptr, h_ptr, T, D, BLOCK_D, carry=False)


def scan_time_stride_one(a_ptr, b_ptr, h0_ptr, h_ptr, T, D, BLOCK_D: tl.constexpr):
    _scan(a_ptr, b_ptr, h0_ptr, h_ptr, T, D, BLOCK_D, time_stride="1")


def scan_h0_ignored(a_ptr, b_ptr, h0_ptr, h_ptr, T, D, BLOCK_D: tl.constexpr):
    _scan(a_ptr, b_ptr, h0_ptr, h_ptr, T, D, BLOCK_D, use_h0=False)


def scan_stores_the_previous_state(a_ptr, b_ptr, h0_ptr, h_ptr, T, D, BLOCK_D: tl.constexpr):
    _scan(a_ptr, b_ptr, h0_ptr, h_ptr, T, D, BLOCK_D, store="before")


# 7. tiled matmul -------------------------------------------------------------------------------
def _mm(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn, BLOCK_M, BLOCK_N, BLOCK_K, k_mask=True,
        store_mask=True, strides="given", advance=True, n_block="BLOCK_N", k_mask_at="k0 + rk", accumulate=True,
        acc_in="float32"):
    if strides == "contiguous":
        s_am, s_ak, s_bk, s_bn, s_cm, s_cn = K, 1, N, 1, N, 1
    elif strides == "unit columns":
        s_ak, s_bn, s_cn = 1, 1, 1
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * (BLOCK_N if n_block == "BLOCK_N" else BLOCK_M) + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk if advance else rk
        in_k = (k if k_mask_at == "k0 + rk" else rk) < K
        if not k_mask:
            in_k = k >= 0
        a = tl.load(a_ptr + rm[:, None] * s_am + k[None, :] * s_ak, mask=(rm[:, None] < M) & in_k[None, :], other=0.0)
        b = tl.load(b_ptr + k[:, None] * s_bk + rn[None, :] * s_bn, mask=in_k[:, None] & (rn[None, :] < N), other=0.0)
        if not accumulate:
            acc = tl.dot(a, b)
        elif acc_in == "float32":
            acc += tl.dot(a, b)
        else:  # rounded to the inputs' dtype at every step, as a bf16 accumulator is
            acc = (acc + tl.dot(a, b)).to(a_ptr.dtype.element_ty)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn, acc, mask=mask if store_mask else rm[:, None] >= 0)


def mm_no_k_mask(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _mm(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn, BLOCK_M, BLOCK_N, BLOCK_K, k_mask=False)


def mm_store_not_masked(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _mm(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn, BLOCK_M, BLOCK_N, BLOCK_K, store_mask=False)


def mm_assumes_contiguous(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _mm(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn, BLOCK_M, BLOCK_N, BLOCK_K,
        strides="contiguous")


def mm_column_strides_taken_as_1(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _mm(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn, BLOCK_M, BLOCK_N, BLOCK_K,
        strides="unit columns")


def mm_k_offset_never_advances(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _mm(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn, BLOCK_M, BLOCK_N, BLOCK_K, advance=False)


def mm_column_offsets_use_block_m(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _mm(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn, BLOCK_M, BLOCK_N, BLOCK_K,
        n_block="BLOCK_M")


def mm_k_mask_without_the_tile_offset(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
                                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _mm(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn, BLOCK_M, BLOCK_N, BLOCK_K, k_mask_at="rk")


def mm_keeps_only_the_last_k_tile(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _mm(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn, BLOCK_M, BLOCK_N, BLOCK_K,
        accumulate=False)


def mm_accumulates_in_the_input_dtype(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
                                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _mm(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn, BLOCK_M, BLOCK_N, BLOCK_K, acc_in="input")


# 8. a tile for an H100: @triton.jit kernels of their own (the compiler reads their source) -----
@triton.jit
def matmul_right(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rm[:, None] * stride_am + (k0 + rk)[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K), other=0.0)
        b = tl.load(b_ptr + (k0 + rk)[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=((k0 + rk)[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def matmul_float32_ieee_products(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
                                 stride_cn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Right in the interpreter (12.tiled_matmul passes it), slow on an H100: float32 "ieee" products are FMAs
    on the CUDA cores, not tensor-core instructions."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rm[:, None] * stride_am + (k0 + rk)[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K), other=0.0)
        b = tl.load(b_ptr + (k0 + rk)[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=((k0 + rk)[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def matmul_bf16_accumulator(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
                            stride_cn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The accumulator in the inputs' dtype: the interpreter promotes `acc + dot` to float32 and goes on (it passes
    12.tiled_matmul); the compiler refuses a loop variable whose type changes."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=a_ptr.dtype.element_ty)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rm[:, None] * stride_am + (k0 + rk)[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K), other=0.0)
        b = tl.load(b_ptr + (k0 + rk)[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=((k0 + rk)[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def matmul_with_moving_pointers(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
                                stride_cn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Triton's tutorial way: pointer blocks built once and moved along K, the K mask against what is left."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        left = K - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < left), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < left) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c = acc.to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, c, mask=(rm[:, None] < M) & (rn[None, :] < N))


def _tile(m, n, k, warps, stages):
    return dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=warps, num_stages=stages)


TILE_MUTANTS = [  # (label, kernel, tile): each breaks the rule its label names first
    ("256 x 256 x 64 on 4 warps spills", matmul_right, _tile(256, 256, 64, 4, 3)),
    ("128 x 256 x 128 in 3 stages exceeds shared memory", matmul_right, _tile(128, 256, 128, 8, 3)),
    ("128 x 256 x 64 on 8 warps leaves 1 program per SM", matmul_right, _tile(128, 256, 64, 8, 3)),
    ("32 x 32 x 32 is too small for wgmma", matmul_right, _tile(32, 32, 32, 4, 3)),
    ("float32 ieee products do not use the tensor cores", matmul_float32_ieee_products, _tile(128, 128, 64, 8, 3)),
    ("a bf16 accumulator does not compile", matmul_bf16_accumulator, _tile(128, 128, 64, 8, 3)),
    ("BLOCK_N = 96 is not a power of two", matmul_right, _tile(128, 96, 64, 8, 3)),
    ("a tile without num_stages", matmul_right, {k: v for k, v in _tile(128, 128, 64, 8, 3).items()
                                                 if k != "num_stages"}),
]


# 9. int4 GEMV on the packed layout -------------------------------------------------------------
def _int4(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg, HALF, GROUP, BLOCK_N, BLOCK_K, nibble="ok",
          block_pairs="j, j + HALF", tail_pairs="2j, 2j + 1", tail_formula="tail", minus_8=True, use_zero=True,
          group_width="GROUP", sz_at="g, n", scale_at=0, mask_on=True):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N if mask_on else n >= 0
    in_block = n < n_full if tail_formula == "tail" else n >= 0
    j = n % (2 * HALF)
    t = n - n_full
    R = N - n_full
    if block_pairs == "j, j + HALF":
        b_base, b_shift = (n // (2 * HALF)) * (HALF * K) + j % HALF, (j // HALF) * 4
    else:  # "2j, 2j + 1": a block read as if it were a tail
        b_base, b_shift = (n // (2 * HALF)) * (HALF * K) + j // 2, (j % 2) * 4
    if tail_pairs == "2j, 2j + 1":
        t_base, t_shift = n_full * (K // 2) + t // 2, (t % 2) * 4
    else:  # "t, t + R/2": a tail read as if it were a block of R rows
        half_r = tl.maximum(R // 2, 1)  # (no tail: 1, not 0, so that no lane divides by 0)
        t_base, t_shift = n_full * (K // 2) + t % half_r, (t // half_r) * 4
    base = tl.where(in_block, b_base, t_base)
    step = tl.where(in_block, HALF, R // 2)
    shift = tl.where(in_block, b_shift, t_shift)
    if nibble == "low":
        shift = shift * 0
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + k)
        byte = tl.load(pk_ptr + base[:, None] + k[None, :] * step[:, None], mask=n_ok[:, None], other=0)
        c = ((byte.to(tl.int32) >> shift[:, None]) & 15).to(tl.float32)
        if minus_8:
            c = c - 8.0
        grp = k0 // GROUP if group_width == "GROUP" else k0 // (2 * GROUP)
        if sz_at == "g, n":
            sz = sz_ptr + grp * stride_szg + 2 * n
        elif sz_at == "n, g":  # scale_zero taken as (N, K/g, 2), like the codes' (N, K/2)
            sz = sz_ptr + n * (2 * (K // GROUP)) + 2 * grp
        else:  # "pairs not 2 apart": row n at n, not 2n
            sz = sz_ptr + grp * stride_szg + n
        scale = tl.load(sz + scale_at, mask=n_ok, other=0.0).to(tl.float32)
        zero = tl.load(sz + 1 - scale_at, mask=n_ok, other=0.0).to(tl.float32)
        acc += scale * tl.sum(c * x[None, :], axis=1)
        if use_zero:
            acc += zero * tl.sum(x, axis=0)
    tl.store(y_ptr + n, acc, mask=n_ok)


def int4_always_the_low_nibble(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg, HALF: tl.constexpr,
                               GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _int4(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg, HALF, GROUP, BLOCK_N, BLOCK_K, nibble="low")


def int4_block_rows_paired_like_tail_rows(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg, HALF: tl.constexpr,
                                          GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _int4(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg, HALF, GROUP, BLOCK_N, BLOCK_K,
          block_pairs="2j, 2j + 1")


def int4_tail_rows_paired_like_block_rows(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg, HALF: tl.constexpr,
                                          GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _int4(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg, HALF, GROUP, BLOCK_N, BLOCK_K,
          tail_pairs="t, t + R/2")


def int4_tail_rows_read_with_the_block_formula(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg,
                                               HALF: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                                               BLOCK_K: tl.constexpr):
    _int4(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg, HALF, GROUP, BLOCK_N, BLOCK_K,
          tail_formula="block")


def int4_codes_without_the_minus_8(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg, HALF: tl.constexpr,
                                   GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _int4(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg, HALF, GROUP, BLOCK_N, BLOCK_K, minus_8=False)


def int4_zero_ignored(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg, HALF: tl.constexpr,
                      GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _int4(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg, HALF, GROUP, BLOCK_N, BLOCK_K, use_zero=False)


def int4_group_index_from_a_k_tile_of_64(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg, HALF: tl.constexpr,
                                         GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _int4(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg, HALF, GROUP, BLOCK_N, BLOCK_K,
          group_width="2 GROUP")


def int4_scale_zero_indexed_transposed(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg, HALF: tl.constexpr,
                                       GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _int4(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg, HALF, GROUP, BLOCK_N, BLOCK_K, sz_at="n, g")


def int4_scale_of_row_n_at_n_not_2n(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg, HALF: tl.constexpr,
                                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _int4(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg, HALF, GROUP, BLOCK_N, BLOCK_K,
          sz_at="pairs not 2 apart")


def int4_scale_and_zero_swapped(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg, HALF: tl.constexpr,
                                GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _int4(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg, HALF, GROUP, BLOCK_N, BLOCK_K, scale_at=1)


def int4_no_mask_on_the_n_tail(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg, HALF: tl.constexpr,
                               GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _int4(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg, HALF, GROUP, BLOCK_N, BLOCK_K, mask_on=False)


# each int4 mutant, and the case its check must show first (its label starts so)
INT4_FIRST_FAILURE = {
    int4_always_the_low_nibble: "N = {B} = one whole block",
    int4_block_rows_paired_like_tail_rows: "N = {B} = one whole block",
    int4_tail_rows_paired_like_block_rows: "N = {tail} = one block of {B} + 16 tail rows",
    int4_tail_rows_read_with_the_block_formula: "N = {tail} = one block of {B} + 16 tail rows",
    int4_codes_without_the_minus_8: "N = {B}, K = 32, x > 0 (Σ x ≠ 0), zeros 0",
    int4_zero_ignored: "N = {B}, K = 32, x > 0, zeros ≠ 0",
    int4_group_index_from_a_k_tile_of_64: "N = {B}, K = 128, four groups",
    int4_scale_zero_indexed_transposed: "N = {B}, K = 128, four groups",
    int4_scale_of_row_n_at_n_not_2n: "N = {B}, K = 32, every row the same codes",
    int4_scale_and_zero_swapped: "N = {B}, K = 32, every row the same codes",
    int4_no_mask_on_the_n_tail: "N = {tail} = one block of {B} + 16 tail rows",
}


# right answers written differently ------------------------------------------------------------
def add_with_other_and_where(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    start = tl.program_id(0) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    y = tl.load(y_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, tl.where(offs < n, x + y, 0.0), mask=offs < n)


def scale_with_pointer_blocks_built_separately(x_ptr, s_ptr, out_ptr, M, N, stride_x, BLOCK_M: tl.constexpr,
                                               BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]  # (BLOCK_M, 1)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]  # (1, BLOCK_N)
    inside = (rows < M) & (cols < N)
    x = tl.load(x_ptr + rows * stride_x + cols, mask=inside, other=0.0)
    s = tl.load(s_ptr + cols, mask=cols < N, other=0.0)
    tl.store(out_ptr + rows * N + cols, s * x, mask=inside)


def rms_with_rsqrt_and_mean_of_squares(x_ptr, w_ptr, out_ptr, N, stride_x, eps, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + tl.program_id(0) * stride_x + cols, mask=cols < N, other=0.0).to(tl.float32)
    ms = tl.sum(x * x) / N
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0)
    tl.store(out_ptr + tl.program_id(0) * N + cols, (x * tl.rsqrt(ms + eps)) * w + x * tl.rsqrt(ms + eps),
             mask=cols < N)


def geglu_tanh_from_exp(gu_ptr, out_ptr, F, stride_gu, BLOCK: tl.constexpr):
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row = gu_ptr + tl.program_id(0) * stride_gu
    gate = tl.load(row + cols, mask=cols < F, other=0.0)
    up = tl.load(row + F + cols, mask=cols < F, other=0.0)
    u = 0.7978845608028654 * gate * (1.0 + 0.044715 * gate * gate)
    e = tl.exp(-2.0 * tl.abs(u))
    tanh = tl.where(u >= 0, (1.0 - e) / (1.0 + e), (e - 1.0) / (1.0 + e))
    tl.store(out_ptr + tl.program_id(0) * F + cols, up * (0.5 * gate + 0.5 * gate * tanh), mask=cols < F)


def lse_max_first_then_the_sum(z_ptr, out_ptr, V, stride_z, BLOCK: tl.constexpr):
    row_ptr = z_ptr + tl.program_id(0) * stride_z
    m = float("-inf")
    for start in range(0, V, BLOCK):  # pass 1: the row's max
        cols = start + tl.arange(0, BLOCK)
        m = tl.maximum(m, tl.max(tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")), axis=0))
    total = 0.0
    for start in range(0, V, BLOCK):  # pass 2: Σ exp(z - max)
        cols = start + tl.arange(0, BLOCK)
        total += tl.sum(tl.exp(tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")) - m), axis=0)
    tl.store(out_ptr + tl.program_id(0), m + tl.log(total))


def scan_with_moving_pointers(a_ptr, b_ptr, h0_ptr, h_ptr, T, D, BLOCK_D: tl.constexpr):
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = d < D
    base = tl.program_id(0) * T * D + d
    a_p, b_p, h_p = a_ptr + base, b_ptr + base, h_ptr + base
    h = tl.load(h0_ptr + tl.program_id(0) * D + d, mask=m, other=0.0)
    for _ in range(T):
        h = tl.load(b_p, mask=m, other=0.0) + tl.load(a_p, mask=m, other=0.0) * h
        tl.store(h_p, h, mask=m)
        a_p += D
        b_p += D
        h_p += D


def int4_dequantised_then_summed(x_ptr, pk_ptr, sz_ptr, y_ptr, N, K, n_full, stride_szg, HALF: tl.constexpr,
                                 GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Each weight dequantised, w = (c − 8) · scale + zero, before the sum; the nibble picked with tl.where."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = n < N
    tail = n >= n_full
    block_byte = (n // (2 * HALF)) * (HALF * K) + n % HALF
    tail_byte = n_full * (K // 2) + (n - n_full) // 2
    high = tl.where(tail, (n - n_full) % 2 == 1, n % (2 * HALF) >= HALF)
    y = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        offs = tl.where(tail[:, None], tail_byte[:, None] + k[None, :] * ((N - n_full) // 2),
                        block_byte[:, None] + k[None, :] * HALF)
        byte = tl.load(pk_ptr + offs, mask=inside[:, None], other=0).to(tl.int32)
        code = tl.where(high[:, None], byte // 16, byte % 16)
        pair = sz_ptr + (k0 // GROUP) * stride_szg + n * 2
        s = tl.load(pair, mask=inside, other=0.0).to(tl.float32)
        z = tl.load(pair + 1, mask=inside, other=0.0).to(tl.float32)
        w = (code.to(tl.float32) - 8.0) * s[:, None] + z[:, None]
        y += tl.sum(w * tl.load(x_ptr + k)[None, :], axis=1)
    tl.store(y_ptr + n, y, mask=inside)


def int4_by_the_package_module(x, packed, scale_zero):
    """Not a kernel: the package's own module, Int4Linear, on the same buffers, its weight in float32."""
    from minigemma.quant import Int4Linear

    return Int4Linear(packed, scale_zero, 32).dequantized() @ x


def _m(name, *kernels):
    return [(k.__name__.replace("_", " "), launch(name, k)) for k in kernels]


def _tiles(entries):
    return [(label, launch("12.tile_for_h100", (kernel, tile))) for label, kernel, tile in entries]


MUTANTS = {
    "12.vector_add": _m("12.vector_add", add_no_mask, add_mask_one_too_far, add_block_starts_one_late),
    "12.scale_columns": _m("12.scale_columns", scale_row_stride_is_width, scale_no_row_mask,
                           scale_program_axes_swapped, scale_output_with_input_stride),
    "12.rms_norm_rows": _m("12.rms_norm_rows", rms_mean_over_block, rms_w_not_one_plus_w, rms_no_eps, rms_no_mask),
    "12.geglu_rows": _m("12.geglu_rows", geglu_gate_and_up_swapped, geglu_up_at_block_not_f, geglu_erf_gelu,
                        geglu_no_mask),
    "12.online_logsumexp": _m("12.online_logsumexp", lse_sum_not_rescaled, lse_tail_padded_with_zeros,
                              lse_last_partial_block_skipped, lse_without_the_max, lse_max_starts_at_zero,
                              lse_row_stride_is_v, lse_no_mask),
    "12.linear_scan": _m("12.linear_scan", scan_state_not_carried, scan_time_stride_one, scan_h0_ignored,
                         scan_stores_the_previous_state),
    "12.tiled_matmul": _m("12.tiled_matmul", mm_no_k_mask, mm_store_not_masked, mm_assumes_contiguous,
                          mm_column_strides_taken_as_1, mm_k_offset_never_advances, mm_column_offsets_use_block_m,
                          mm_k_mask_without_the_tile_offset, mm_keeps_only_the_last_k_tile,
                          mm_accumulates_in_the_input_dtype),
    "12.tile_for_h100": _tiles(TILE_MUTANTS),
    "12.int4_gemv": _m("12.int4_gemv", *INT4_FIRST_FAILURE),
}

CORRECT = {
    "12.vector_add": _m("12.vector_add", add_with_other_and_where),
    "12.scale_columns": _m("12.scale_columns", scale_with_pointer_blocks_built_separately),
    "12.rms_norm_rows": _m("12.rms_norm_rows", rms_with_rsqrt_and_mean_of_squares),
    "12.geglu_rows": _m("12.geglu_rows", geglu_tanh_from_exp),
    "12.online_logsumexp": _m("12.online_logsumexp", lse_max_first_then_the_sum),
    "12.linear_scan": _m("12.linear_scan", scan_with_moving_pointers),
    "12.tiled_matmul": [("matmul with moving pointers", launch("12.tiled_matmul", matmul_with_moving_pointers)),
                        ("matmul with float32 ieee products (right, if slow)",
                         launch("12.tiled_matmul", matmul_float32_ieee_products))],
    "12.tile_for_h100": _tiles([("moving pointers, 128 x 128 x 64 on 4 warps", matmul_with_moving_pointers,
                                 _tile(128, 128, 64, 4, 3))]),
    "12.int4_gemv": _m("12.int4_gemv", int4_dequantised_then_summed) + [
        ("the package's Int4Linear, dequantised in float32", int4_by_the_package_module)],
}
