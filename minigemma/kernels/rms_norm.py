"""Gemma's RMSNorm with (1 + w) as one Triton kernel, forward and backward.

    y = x̂ · (1 + w),   x̂ = x · rstd,   rstd = 1 / sqrt(mean(x²) + ε)         x (..., C), w (C,)

Reference: `minigemma.layers.RMSNorm` (float32 statistics, one rounding to x's dtype at the end).
Eager PyTorch runs that as about six kernels, each reading and writing a (..., C) tensor in float32;
here one program loads a block of rows once, reduces each row in registers and writes y once.
The same kernel is Gemma 3's QK-norm: rows of head_dim in a (B, H, T, D) tensor, one w for every
head, read in place when q is a transposed view of the (B, T, H·D) projection.

Backward, with g = dy · (1 + w) (the gradient reaching x̂):
    dx = rstd · (g − x̂ · mean(g · x̂))          per row
    dw = Σ_rows dy · x̂                          each program sums its rows, torch adds the programs
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minigemma.layers import RMSNorm as TorchRMSNorm  # the reference, and the module we replace

from .utils import check_device, device_props, lead_rows, num_warps


@triton.jit
def _row_offsets(rows, N1, N2, s0, s1, s2):
    """Memory offset of row r = (i0, i1, i2) of the leading dims, each with its own stride."""
    rows = rows.to(tl.int64)
    i2 = rows % N2
    i1 = (rows // N2) % N1
    i0 = rows // (N1 * N2)
    return i0 * s0 + i1 * s1 + i2 * s2


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, n_rows, n_cols, N1, N2, s0, s1, s2, eps,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: BLOCK_R rows of x, each of n_cols <= BLOCK_C values, normalised in registers."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    cols = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    row_ok, col_ok = rows < n_rows, cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    x_off = _row_offsets(rows, N1, N2, s0, s1, s2)
    x = tl.load(X + x_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)  # (BLOCK_R,): padding adds 0 to the sum
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * (1.0 + w)[None, :]
    y_off = rows.to(tl.int64) * n_cols  # y is written contiguous
    tl.store(Y + y_off[:, None] + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, n_rows, n_cols, N1, N2, s0, s1, s2, tiles_per_program,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: tiles pid, pid + P, pid + 2P, ... of BLOCK_R rows; dx per row, a partial dw per program."""
    pid, n_programs = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    w1 = 1.0 + tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(tiles_per_program):
        rows = (pid + i * n_programs) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        x_off = _row_offsets(rows, N1, N2, s0, s1, s2)
        d_off = rows.to(tl.int64) * n_cols  # dy and dx are contiguous
        x = tl.load(X + x_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + d_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        x_hat = x * rstd[:, None]
        g = dy * w1[None, :]
        c = tl.sum(g * x_hat, axis=1) / n_cols  # (BLOCK_R,) mean(g · x̂)
        dx = (g - x_hat * c[:, None]) * rstd[:, None]
        tl.store(DX + d_off[:, None] + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * x_hat, axis=0)
    tl.store(DW_PART + pid.to(tl.int64) * n_cols + cols, dw, mask=col_ok)


MAX_C = 65536  # a row lives in registers


def _blocks(n_rows: int, n_cols: int) -> tuple[int, int]:
    if n_cols > MAX_C:
        raise ValueError(f"rms_norm keeps a row in registers: C = {n_cols} > {MAX_C}")
    BLOCK_C = triton.next_power_of_2(n_cols)
    BLOCK_R = max(1, min(triton.next_power_of_2(max(n_rows, 1)), 4096 // BLOCK_C))
    return BLOCK_R, BLOCK_C


def _programs(device: torch.device, n_tiles: int) -> int:
    """How many programs share the backward's tiles (each writes one partial dw row)."""
    props = device_props(device)
    if props is not None:
        return max(1, min(n_tiles, 4 * props.sm_count))
    return max(1, min(n_tiles, 4))  # the interpreter: few programs, numpy does the width


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """y (x's shape, contiguous, x's dtype) and rstd (rows,) float32."""
    check_device(x=x, weight=weight)
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight shape {tuple(weight.shape)} != ({x.shape[-1]},) for x of shape {tuple(x.shape)}")
    xv, (N0, N1, N2), (s0, s1, s2) = lead_rows(x)
    n_rows, n_cols = N0 * N1 * N2, x.shape[-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0 or n_cols == 0:
        return y, rstd
    BLOCK_R, BLOCK_C = _blocks(n_rows, n_cols)
    grid = (triton.cdiv(n_rows, BLOCK_R),)
    _rms_norm_fwd_kernel[grid](xv, weight.contiguous(), y, rstd, n_rows, n_cols, N1, N2, s0, s1, s2, eps,
                               BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=num_warps(BLOCK_R * BLOCK_C))
    return y, rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """dx (x's shape and dtype) and dw (weight's shape and dtype)."""
    xv, (N0, N1, N2), (s0, s1, s2) = lead_rows(x)
    n_rows, n_cols = N0 * N1 * N2, x.shape[-1]
    dy = dy.contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if n_rows == 0 or n_cols == 0:
        return dx, torch.zeros_like(weight)
    BLOCK_R, BLOCK_C = _blocks(n_rows, n_cols)
    n_tiles = triton.cdiv(n_rows, BLOCK_R)
    P = _programs(x.device, n_tiles)
    dw_part = torch.empty(P, n_cols, dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(P,)](dy, xv, weight.contiguous(), rstd, dx, dw_part, n_rows, n_cols, N1, N2, s0, s1, s2,
                               triton.cdiv(n_tiles, P), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
                               num_warps=num_warps(BLOCK_R * BLOCK_C))
    return dx, dw_part.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x, weight, rstd)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Gemma's RMSNorm of x (..., C) with weight w (C,): x / sqrt(mean(x²) + ε) · (1 + w), in x's dtype."""
    return RMSNormFunction.apply(x, weight, eps)


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`minigemma.layers.RMSNorm` called with this weight (gradients flow to x and weight)."""
    norm = TorchRMSNorm(x.shape[-1], eps).to(x.device)
    return torch.func.functional_call(norm, {"weight": weight}, (x,))


class RMSNorm(TorchRMSNorm):
    """`minigemma.layers.RMSNorm` whose forward is the Triton kernel: same parameters, same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


# the launcher's choice, public for `kernels.aot`
block_sizes = _blocks
