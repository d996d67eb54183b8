"""A Gemma layer's one-token decode step in five launches, and a trunk that chains them.

Run module by module (`kernels.swap`'s classes), one decode step of a Gemma 3 layer launches 17 times:
three norms and two QK-norms, two RoPEs, four matrix products, the GeGLU activation, the two halves of
the split-K attention, two residual adds and the two KV-cache writes. Each launch costs a few µs on
a GPU whatever it does, and a step moves only ~0.7 MB per layer of the 270M, so launches, not bytes,
would set the speed. Here the element-wise work rides inside the matrix products, which must read
every weight anyway (a GEMV: one activation row per batch row against a whole weight matrix):

    1. _qkv_kernel       prologue  x = input_norm(r + post_norm(d))    (the pending residual, below)
                         product   [q | k | v] = x W_qkvᵀ, one program per head
                         epilogue  QK-norm, RoPE; q to a buffer, k and v straight into the cache
    2. _decode_kernel    split-K attention of q over the cache (`kernels.attention.decode_partials`)
    3. _o_proj_kernel    prologue  the splits combined: a = Σ_s e^(lse_s − max) o_s / Σ_s e^(lse_s − max)
                         product   d = a W_oᵀ
    4. _gate_up_kernel   prologue  h = x + post_attention_norm(d), written once; u = pre_ffw_norm(h)
                         product   gate = u W_gateᵀ, up = u W_upᵀ
                         epilogue  gelu_tanh(gate) · up
    5. _down_kernel      product   d = act W_downᵀ

The residual after the MLP, h + post_ffw_norm(d), is left pending (`Residual`): the next layer's
kernel 1 adds it in its prologue, and after the last layer `_residual_kernel` adds it and applies the
final norm. Gemma 3 270M: 18 × 5 + 1 launches of Triton for the trunk, where the modules make 17 × 18.

A prologue needs a whole row's statistics (an RMSNorm's mean of squares) before its first product, so
each program reads the row (C values) once for the statistics and again as it multiplies: a few KB
from L2, next to the weight tile it reads once. Each program computes every output it owns from the
whole row: no split over K, so no partial sums and no extra launch to add them, at the price of
fewer programs than a GPU has SMs for the small matrices (the 270M's QKV: 6 programs, one per head).

Rounding follows the torch layer step by step: each value the torch layer stores in the activation
dtype (a norm's output, a residual sum, a projection, QK-norm, RoPE, the combined attention) is
rounded to it here too, so in bfloat16 the two differ only by float32 summation order. Reference:
the torch model's own forward (`tests/test_kernels_decode_layer.py`), float32 in the interpreter, bf16
emulated (`interpret.emulated_bf16`) at the GPU's launch configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import nn

from minigemma import gemma
from minigemma.layers import activation_dtype
from minigemma.attention import KVCache, Positions, RingKVCache, positions_after

from . import attention as attention_kernels
from .attention import COMBINE_SPLITS, GroupedQueryAttention, merge_splits
from .interpret import INTERPRET
from .rope import reduce_angle
from .utils import tanh


# --------------------------------------------------------------------------------------------
# Pieces every kernel shares
# --------------------------------------------------------------------------------------------
@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """x rounded to the activation dtype and widened back: what the torch layer would have stored."""
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def _rstd(X, n, eps, BLOCK: tl.constexpr):
    """1 / sqrt(mean(x²) + ε) of one row of n values, read BLOCK at a time."""
    ss = tl.zeros((BLOCK,), tl.float32)
    for k0 in range(0, n, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        x = tl.load(X + k, mask=k < n, other=0.0).to(tl.float32)
        ss += x * x
    return tl.rsqrt(tl.sum(ss, axis=0) / n + eps)


@triton.jit
def _residual(R, DELTA, W_POST, k, k_ok, rstd_d, DTYPE: tl.constexpr, HAS_DELTA: tl.constexpr,
              POST_NORM: tl.constexpr):
    """One tile of the pending residual r + post_norm(δ) (r alone without δ; r + δ without a post-norm)."""
    r = tl.load(R + k, mask=k_ok, other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = tl.load(DELTA + k, mask=k_ok, other=0.0).to(tl.float32)
        if POST_NORM:
            w = tl.load(W_POST + k, mask=k_ok, other=0.0).to(tl.float32)
            d = _round(d * rstd_d * (1.0 + w), DTYPE)
        r = _round(r + d, DTYPE)
    return r


@triton.jit
def _residual_stats(R, DELTA, W_POST, R_OUT, write, C, eps_post, eps, DTYPE: tl.constexpr,
                    HAS_DELTA: tl.constexpr, POST_NORM: tl.constexpr, BLOCK_K: tl.constexpr):
    """The statistics a prologue needs before its first product: rstd of δ (for the post-norm) and rstd of
    h = r + post_norm(δ) (for the next norm). h is written to R_OUT when `write` (one program per row)."""
    rstd_d = 1.0
    if HAS_DELTA:
        if POST_NORM:
            rstd_d = _rstd(DELTA, C, eps_post, BLOCK_K)
    ss = tl.zeros((BLOCK_K,), tl.float32)
    written = tl.where(write, C, 0)  # how many values of h this program writes: all, or none
    for k0 in range(0, C, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < C
        h = _residual(R, DELTA, W_POST, k, k_ok, rstd_d, DTYPE, HAS_DELTA, POST_NORM)
        ss += h * h
        tl.store(R_OUT + k, h.to(DTYPE), mask=k < written)
    return rstd_d, tl.rsqrt(tl.sum(ss, axis=0) / C + eps)


@triton.jit
def _normed_input(R, DELTA, W_POST, W_PRE, k, k_ok, rstd_d, rstd_h, DTYPE: tl.constexpr,
                  HAS_DELTA: tl.constexpr, POST_NORM: tl.constexpr):
    """One tile of the product's input, norm(r + post_norm(δ)) · (1 + w), rounded as the torch norm rounds."""
    h = _residual(R, DELTA, W_POST, k, k_ok, rstd_d, DTYPE, HAS_DELTA, POST_NORM)
    w = tl.load(W_PRE + k, mask=k_ok, other=0.0).to(tl.float32)
    return _round(h * rstd_h * (1.0 + w), DTYPE)


@triton.jit
def _times(W, rows, rows_ok, stride_w, x, k, k_ok):
    """Σ over this K tile of W[rows, k] · x[k]: (BLOCK_N,) float32 (a GEMV: one input row, no tl.dot)."""
    w = tl.load(W + rows.to(tl.int64)[:, None] * stride_w + k[None, :], mask=rows_ok[:, None] & k_ok[None, :],
                other=0.0)
    return tl.sum(w.to(tl.float32) * x[None, :], axis=1)


# --------------------------------------------------------------------------------------------
# The kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _qkv_kernel(R, DELTA, W_POST, W_IN, X_OUT, W, QN, KN, POS, INV_FREQ, INDEX, Q, K_CACHE, V_CACHE,
                C, H, KV, S, stride_w, pos_step, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, eps_post, eps, eps_qk,
                DTYPE: tl.constexpr, HAS_DELTA: tl.constexpr, POST_NORM: tl.constexpr, QK_NORM: tl.constexpr,
                HALF: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program: head p of one row m, p < H a query head, then K key heads, then K value heads.

    Its 2·HALF = D outputs are computed as two halves, rows p·D + i and p·D + HALF + i (i < HALF), so that
    RoPE's pairs (i, i + D/2) sit in the same lane of the two accumulators. The new token's index is read
    from INDEX, on the device: its key and value go to slot index % S of a cache of S slots (a static
    cache: the index itself; a ring: index mod its size), and no argument changes from step to step."""
    p, m = tl.program_id(0), tl.program_id(1).to(tl.int64)
    R, DELTA, X_OUT = R + m * C, DELTA + m * C, X_OUT + m * C
    rstd_d, rstd_h = _residual_stats(R, DELTA, W_POST, X_OUT, p == 0, C, eps_post, eps, DTYPE, HAS_DELTA,
                                     POST_NORM, BLOCK_K)
    i = tl.arange(0, HALF)
    rows = p * (2 * HALF) + i
    ok = i < HALF  # every lane: (HALF is a power of two)
    lo = tl.zeros((HALF,), tl.float32)
    hi = tl.zeros((HALF,), tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < C
        x = _normed_input(R, DELTA, W_POST, W_IN, k, k_ok, rstd_d, rstd_h, DTYPE, HAS_DELTA, POST_NORM)
        lo += _times(W, rows, ok, stride_w, x, k, k_ok)
        hi += _times(W, rows + HALF, ok, stride_w, x, k, k_ok)
    lo, hi = _round(lo, DTYPE), _round(hi, DTYPE)  # the projection's output, as qkv_proj stores it
    is_q, is_v = p < H, p >= H + KV
    if QK_NORM:  # q and k heads: RMSNorm over the head's D values, one weight for all heads of a kind
        rstd = tl.rsqrt((tl.sum(lo * lo, axis=0) + tl.sum(hi * hi, axis=0)) / (2 * HALF) + eps_qk)
        w_lo = tl.where(is_q, tl.load(QN + i), tl.load(KN + i)).to(tl.float32)
        w_hi = tl.where(is_q, tl.load(QN + HALF + i), tl.load(KN + HALF + i)).to(tl.float32)
        lo = tl.where(is_v, lo, _round(lo * rstd * (1.0 + w_lo), DTYPE))
        hi = tl.where(is_v, hi, _round(hi * rstd * (1.0 + w_hi), DTYPE))
    # RoPE: the pair (i, i + D/2) turned by the angle pos · θ_i (kernels.rope's reduction keeps it exact)
    angle = reduce_angle(tl.load(POS + m * pos_step).to(tl.float32) * tl.load(INV_FREQ + i))
    cos, sin = tl.cos(angle), tl.sin(angle)
    lo_r, hi_r = lo * cos - hi * sin, hi * cos + lo * sin
    lo = tl.where(is_v, lo, lo_r)
    hi = tl.where(is_v, hi, hi_r)
    # q to its buffer (B, H, 1, D); k and v into their slot of the cache (B, K, S, D). Each program stores
    # through one of the three: the others' masks are empty (a lane limit of 0)
    slot = tl.load(INDEX) % S
    is_k = (p >= H) & (p < H + KV)
    q_at = Q + (m * H + p) * (2 * HALF) + i
    tl.store(q_at, lo.to(DTYPE), mask=i < tl.where(is_q, HALF, 0))
    tl.store(q_at + HALF, hi.to(DTYPE), mask=i < tl.where(is_q, HALF, 0))
    kv = tl.where(is_v, p - H - KV, p - H).to(tl.int64)
    k_at = K_CACHE + m * s_kb + kv * s_kh + slot * s_ks + i
    tl.store(k_at, lo.to(DTYPE), mask=i < tl.where(is_k, HALF, 0))
    tl.store(k_at + HALF, hi.to(DTYPE), mask=i < tl.where(is_k, HALF, 0))
    v_at = V_CACHE + m * s_vb + kv * s_vh + slot * s_vs + i
    tl.store(v_at, lo.to(DTYPE), mask=i < tl.where(is_v, HALF, 0))
    tl.store(v_at + HALF, hi.to(DTYPE), mask=i < tl.where(is_v, HALF, 0))


O_PROJ_VARYING = ["n_splits"]


@triton.jit(do_not_specialize=O_PROJ_VARYING)
def _o_proj_kernel(O_PART, LSE_PART, W, Y, H, N, n_splits, stride_w,
                   DTYPE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_SPLITS: tl.constexpr):
    """One program: BLOCK_N outputs of row m. Its input, the attention output of H heads × D, is the
    combine of the decode kernel's splits, done tile by tile (BLOCK_K divides D: a tile is in one head)."""
    pid, m = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_ok = rows < N
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, H * D, BLOCK_K):
        bh = m * H + k0 // D  # (row, head) of this tile
        d = k0 % D + tl.arange(0, BLOCK_K)
        a = _round(merge_splits(O_PART, LSE_PART, bh, n_splits, d, d < D, D, BLOCK_SPLITS), DTYPE)  # as combined
        k = k0 + tl.arange(0, BLOCK_K)
        acc += _times(W, rows, rows_ok, stride_w, a, k, k < H * D)
    tl.store(Y + m * N + rows, acc.to(DTYPE), mask=rows_ok)


@triton.jit
def _gate_up_kernel(R, DELTA, W_POST, W_PRE, H_OUT, W, Y, C, F, stride_w, eps_post, eps,
                    DTYPE: tl.constexpr, POST_NORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program: BLOCK_N columns of gelu_tanh(gate) · up for row m, from rows n (gate) and F + n (up)."""
    pid, m = tl.program_id(0), tl.program_id(1).to(tl.int64)
    R, DELTA, H_OUT = R + m * C, DELTA + m * C, H_OUT + m * C
    rstd_d, rstd_h = _residual_stats(R, DELTA, W_POST, H_OUT, pid == 0, C, eps_post, eps, DTYPE, True, POST_NORM,
                                     BLOCK_K)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < F
    gate = tl.zeros((BLOCK_N,), tl.float32)
    up = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < C
        x = _normed_input(R, DELTA, W_POST, W_PRE, k, k_ok, rstd_d, rstd_h, DTYPE, True, POST_NORM)
        gate += _times(W, n, n_ok, stride_w, x, k, k_ok)
        up += _times(W, F + n, n_ok, stride_w, x, k, k_ok)
    gate, up = _round(gate, DTYPE), _round(up, DTYPE)  # the projection's output, as gate_up_proj stores it
    t = tanh(0.7978845608028654 * (gate + 0.044715 * gate * gate * gate))  # √(2/π) as a literal
    tl.store(Y + m * F + n, (0.5 * gate * (1.0 + t) * up).to(DTYPE), mask=n_ok)


@triton.jit
def _down_kernel(X, W, Y, K, N, stride_w, DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program: BLOCK_N outputs of row m of y = x Wᵀ, a plain GEMV."""
    pid, m = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_ok = rows < N
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(X + m * K + k, mask=k_ok, other=0.0).to(tl.float32)
        acc += _times(W, rows, rows_ok, stride_w, x, k, k_ok)
    tl.store(Y + m * N + rows, acc.to(DTYPE), mask=rows_ok)


@triton.jit
def _residual_kernel(R, DELTA, W_POST, W_NORM, Y, C, eps_post, eps, DTYPE: tl.constexpr, POST_NORM: tl.constexpr,
                     NORM: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per row: y = r + post_norm(δ), then (NORM) the final norm of it."""
    m = tl.program_id(0).to(tl.int64)
    R, DELTA, Y = R + m * C, DELTA + m * C, Y + m * C
    rstd_d = 1.0
    if POST_NORM:
        rstd_d = _rstd(DELTA, C, eps_post, BLOCK_K)
    if NORM:
        ss = tl.zeros((BLOCK_K,), tl.float32)
        for k0 in range(0, C, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            h = _residual(R, DELTA, W_POST, k, k < C, rstd_d, DTYPE, True, POST_NORM)
            ss += h * h
        rstd_h = tl.rsqrt(tl.sum(ss, axis=0) / C + eps)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < C
        y = _residual(R, DELTA, W_POST, k, k_ok, rstd_d, DTYPE, True, POST_NORM)
        if NORM:
            w = tl.load(W_NORM + k, mask=k_ok, other=0.0).to(tl.float32)
            y = y * rstd_h * (1.0 + w)
        tl.store(Y + k, y.to(DTYPE), mask=k_ok)


# --------------------------------------------------------------------------------------------
# Launch configurations (functions of the shapes only: the same on every GPU; `kernels.aot` compiles them)
# --------------------------------------------------------------------------------------------
def blocks(kernel: str, D: int = 0, interpret: bool = INTERPRET) -> dict:
    """Constexpr tiles and warps of each kernel. A weight tile is BLOCK_N × BLOCK_K ≤ 4096 values (32 a
    thread at 4 warps, widened to float32): the QKV kernel holds two (its halves), as does gate_up."""
    if interpret:  # numpy: a Python loop over programs and tiles, each op costing ~the same at any size: big
        # tiles, few trips (the GPU's tiles and their loops run in tests/test_kernels_decode_layer.py's bf16 case)
        return {"qkv": dict(BLOCK_K=1024, num_warps=1),
                "o_proj": dict(BLOCK_N=1024, BLOCK_K=min(256, D & -D), num_warps=1),
                "gate_up": dict(BLOCK_N=1024, BLOCK_K=1024, num_warps=1),
                "down": dict(BLOCK_N=1024, BLOCK_K=1024, num_warps=1),
                "residual": dict(BLOCK_K=1024, num_warps=1)}[kernel]
    half = D // 2
    return {"qkv": dict(BLOCK_K=max(16, min(64, 2048 // max(half, 1))), num_warps=4),
            "o_proj": dict(BLOCK_N=64, BLOCK_K=min(64, D & -D), num_warps=4),
            "gate_up": dict(BLOCK_N=32, BLOCK_K=64, num_warps=4),
            "down": dict(BLOCK_N=64, BLOCK_K=64, num_warps=4),
            "residual": dict(BLOCK_K=512, num_warps=4)}[kernel]


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


# --------------------------------------------------------------------------------------------
# The pending residual, and the launchers
# --------------------------------------------------------------------------------------------
@dataclass
class Residual:
    """The residual stream after a sub-layer, not yet added: base + post_norm(delta), each (M, C) in the
    activation dtype; `post` is the post-norm (None: none, the delta is added as it is); delta None: base
    itself. Whoever reads it next (a layer's first kernel, the trunk's last) does the add."""

    base: torch.Tensor
    delta: torch.Tensor | None = None
    post: nn.Module | None = None

    def args(self):
        """(R, DELTA, W_POST, eps_post, HAS_DELTA, POST_NORM) for a kernel (absent tensors: base, unread)."""
        w = self.post.weight if self.post is not None else self.base
        eps = self.post.eps if self.post is not None else 0.0
        delta = self.delta if self.delta is not None else self.base
        return self.base, delta, w, eps, self.delta is not None, self.post is not None


def _post(norm: nn.Module) -> nn.Module | None:
    """A sandwich post-norm, or None where the layer has none (nn.Identity: an ablation)."""
    return None if isinstance(norm, nn.Identity) else norm


def finish(r: Residual, norm: nn.Module | None = None) -> torch.Tensor:
    """base + post_norm(delta) (M, C), then norm(·) if given: one launch (`_residual_kernel`)."""
    if r.delta is None and norm is None:
        return r.base
    M, C = r.base.shape
    y = torch.empty_like(r.base)
    R, DELTA, W_POST, eps_post, has_delta, post_norm = r.args()
    if not has_delta:  # only the final norm: the same kernel with δ = 0 and no post-norm
        DELTA, post_norm = torch.zeros_like(r.base), False  # (a standalone call; the trunk always has a δ)
    cfg = blocks("residual", interpret=INTERPRET)
    _residual_kernel[(M,)](R, DELTA, W_POST, norm.weight if norm is not None else R, y, C, eps_post,
                           norm.eps if norm is not None else 0.0, DTYPE=_tl_dtype(y.dtype), POST_NORM=post_norm,
                           NORM=norm is not None, BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
    return y


class DecoderLayer(gemma.DecoderLayer):
    """`minigemma.gemma.DecoderLayer` whose one-token decode step is the five fused kernels above.

    Same parameters, same state dict, same cache. `decode(r, pos, cache)` is the step on a pending
    residual; `forward` runs it for a single layer (plus one launch to add its residual) when it can
    (`fusable`), and the layer's own forward otherwise: a prompt, training, an encoder, a quantised
    projection, a cache without slots, all run module by module (with the modules' kernels)."""

    def fusable(self, pos: Positions | None, cache, dtype: torch.dtype, T: int = 1) -> bool:
        """Whether a call of T tokens in `dtype` is a step the fused kernels cover (host-side checks only:
        no sync): one token per row with a cache that has slots, the kernels' attention, plain bias-free
        projections in the activation dtype, a full-width RoPE of a power-of-two head, no gradient."""
        attn = self.self_attn
        linears = (attn.qkv_proj, attn.o_proj, self.mlp.gate_up_proj, self.mlp.down_proj)
        D = attn.head_dim
        return (T == 1 and pos is not None and pos.documents is None
                and (isinstance(cache, RingKVCache) or (isinstance(cache, KVCache) and cache.max_len is not None))
                and isinstance(attn, GroupedQueryAttention) and attn.causal
                and attn.rotary.rotary_dim == D and D >= 4 and D & (D - 1) == 0
                and all(isinstance(lin, nn.Linear) and lin.bias is None and lin.weight.dtype == dtype
                        for lin in linears)
                and dtype in (torch.float32, torch.bfloat16, torch.float16)
                and not (INTERPRET and dtype != torch.float32)
                and not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())))

    def forward(self, x: torch.Tensor, pos: Positions | None = None, cache=None) -> torch.Tensor:
        pos = pos or positions_after(cache, x.shape[0], x.shape[1], x.device)
        if x.dim() != 3 or not self.fusable(pos, cache, x.dtype, x.shape[1]):
            return super().forward(x, pos, cache)
        B, T, C = x.shape
        return finish(self.decode(Residual(x.reshape(B, C).contiguous()), pos, cache)).view(B, T, C)  # rows of C

    def decode(self, r: Residual, pos: Positions, cache: KVCache | RingKVCache) -> Residual:
        """One token per row: the pending residual r of this layer's input (M = B rows, C) -> the pending
        residual of its output. Five launches."""
        attn, mlp = self.self_attn, self.mlp
        M, C = r.base.shape
        H, KV, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
        dtype, device = r.base.dtype, r.base.device
        DT = _tl_dtype(dtype)
        if cache.length != pos.start:
            raise ValueError(f"this layer's cache holds {cache.length} tokens but the new ones start at index "
                             f"{pos.start}: the model's Cache and its layers' caches disagree")
        cache.claim_one()  # the host's count, and the check that the token fits; the kernels find the slot
        # Every launch below reads the token's index from the device (pos.index, (1,)) and sees the whole
        # static cache: the step's arguments are the same at every step, so a CUDA graph can replay it
        ring = isinstance(cache, RingKVCache)
        # 1. norm(residual) -> q, k, v with QK-norm and RoPE; k and v into the cache
        x = torch.empty(M, C, dtype=dtype, device=device)  # this layer's input, materialised
        q = torch.empty(M, H, 1, D, dtype=dtype, device=device)
        R, DELTA, W_POST, eps_post, has_delta, post_norm = r.args()
        qn = attn.q_norm.weight if attn.qk_norm else W_POST
        kn = attn.k_norm.weight if attn.qk_norm else W_POST
        eps_qk = attn.q_norm.eps if attn.qk_norm else 0.0
        w = attn.qkv_proj.weight
        positions = pos.positions  # (B, 1)
        cfg = blocks("qkv", D, INTERPRET)
        _qkv_kernel[(H + 2 * KV, M)](
            R, DELTA, W_POST, self.input_layernorm.weight, x, w, qn, kn, positions, attn.rotary.frequencies(device),
            pos.index, q, cache.k, cache.v, C, H, KV, cache.k.shape[2], w.stride(0), positions.stride(0),
            *cache.k.stride()[:3],
            *cache.v.stride()[:3], eps_post, self.input_layernorm.eps, eps_qk,
            DTYPE=DT, HAS_DELTA=has_delta, POST_NORM=post_norm, QK_NORM=attn.qk_norm, HALF=D // 2, **cfg)
        # 2. split-K attention over the cache
        o_part, lse_part = attention_kernels.decode_partials(
            q, cache.k, cache.v, q_index=pos.index, scale=attn.scale, softcap=attn.softcap, causal=True,
            window=attn.window, ring=ring, positions=pos.positions if pos.packed else None)
        # 3. combine the splits -> o_proj
        d_attn = torch.empty(M, C, dtype=dtype, device=device)
        w = attn.o_proj.weight
        cfg = blocks("o_proj", D, INTERPRET)
        _o_proj_kernel[(triton.cdiv(C, cfg["BLOCK_N"]), M)](
            o_part, lse_part, w, d_attn, H, C, o_part.shape[2], w.stride(0), DTYPE=DT, D=D,
            BLOCK_SPLITS=COMBINE_SPLITS, **cfg)
        # 4. h = x + post_attention_norm(d); gelu(gate) · up of pre_feedforward_norm(h)
        post = _post(self.post_attention_layernorm)
        h = torch.empty(M, C, dtype=dtype, device=device)
        F = mlp.intermediate
        act = torch.empty(M, F, dtype=dtype, device=device)
        w = mlp.gate_up_proj.weight
        cfg = blocks("gate_up", D, INTERPRET)
        _gate_up_kernel[(triton.cdiv(F, cfg["BLOCK_N"]), M)](
            x, d_attn, post.weight if post is not None else x, self.pre_feedforward_layernorm.weight, h, w, act,
            C, F, w.stride(0), post.eps if post is not None else 0.0, self.pre_feedforward_layernorm.eps,
            DTYPE=DT, POST_NORM=post is not None, **cfg)
        # 5. down_proj; its residual add waits for the next kernel
        d_mlp = torch.empty(M, C, dtype=dtype, device=device)
        w = mlp.down_proj.weight
        cfg = blocks("down", D, INTERPRET)
        _down_kernel[(triton.cdiv(C, cfg["BLOCK_N"]), M)](act, w, d_mlp, F, C, w.stride(0), DTYPE=DT, **cfg)
        return Residual(h, d_mlp, _post(self.post_feedforward_layernorm))


class Gemma(gemma.Gemma):
    """`minigemma.gemma.Gemma` whose decode step chains its layers' fused steps (`DecoderLayer.decode`),
    each layer's last residual add done by the next layer's first kernel and the final one with the
    final norm (`finish`). Any other call, or a model whose layers cannot all fuse this step, runs the
    trunk as the torch model does."""

    def trunk(self, input_ids: torch.Tensor, pos: Positions, cache=None) -> torch.Tensor:
        B, T = input_ids.shape
        dtype = activation_dtype(self)
        if cache is None or not all(isinstance(layer, DecoderLayer) and layer.fusable(pos, c, dtype, T)
                                    for layer, c in zip(self.layers, cache)):
            return super().trunk(input_ids, pos, cache)
        r = Residual(self.embed(input_ids).reshape(B, -1))  # (B, C): one token per row
        for layer, c in zip(self.layers, cache):
            r = layer.decode(r, pos, c)
        return finish(r, self.norm).view(B, 1, -1)


__all__ = ["DecoderLayer", "Gemma", "Residual", "finish", "blocks"]
