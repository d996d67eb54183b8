"""Split-half RoPE as one Triton kernel, angles computed in place, forward and backward.

Dimension i of the first `rotary_dim` is paired with i + rotary_dim/2 (`rotate_half`), and each
pair is rotated by the angle p · θ_i, θ_i = base^(−2i/rotary_dim) / scaling:

    out_i        = x_i · cos − x_{i+d/2} · sin
    out_{i+d/2}  = x_{i+d/2} · cos + x_i · sin            i < d/2 = rotary_dim / 2
    out_j        = x_j                                     j >= rotary_dim (Griffin rotates half)

The kernel reads the positions (T,) or (B, T) and the d/2 frequencies and computes cos and sin
itself, so no (T, d) tables are read; per row it reads x once and writes the output once, where
eager PyTorch makes rotate_half's copy, two products and a sum in float32. A rotation's inverse is
its transpose, so the backward is the same kernel turning the other way (sin → −sin).
Reference: `minigemma.layers.apply_rope(x, *rope_cos_sin(positions, rope_frequencies(d, base, scaling)))`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minigemma.layers import apply_rope, rope_cos_sin, rope_frequencies

from .utils import check_device, num_warps


# 2π as C1 + C2 + C3 (Cody and Waite): C1 has 8 significant bits, so k·C1 is exact for k < 2^16.
# (for Python: `reduce_angle` writes them as literals, since a jit function may not read a plain Python global)
TWO_PI_1, TWO_PI_2, TWO_PI_3 = 6.28125, 0.0019353071693331003, 1.0253131677018246e-11
INV_TWO_PI = 0.15915494309189535


@triton.jit
def reduce_angle(angle):
    """angle − k·2π in [−π, π], as exact as float32 allows, so cos and sin only see small arguments
    (a GPU's fast sin/cos lose accuracy far from 0; positions reach 10^5 radians)."""
    k = tl.floor(angle * 0.15915494309189535 + 0.5)  # INV_TWO_PI
    r = tl.fma(-k, 6.28125, angle)  # TWO_PI_1
    r = tl.fma(-k, 0.0019353071693331003, r)  # TWO_PI_2
    return tl.fma(-k, 1.0253131677018246e-11, r)  # TWO_PI_3


@triton.jit
def _rope_kernel(X, POS, INV_FREQ, OUT, H, T, D, sxb, sxh, sxt, spb, spt, SIGN: tl.constexpr,
                 HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program: BLOCK_T rows (tokens) of one (batch, head); HALF = rotary_dim / 2 pairs per row."""
    pid = tl.program_id(0)
    n_tb = tl.cdiv(T, BLOCK_T)
    bh, tb = pid // n_tb, pid % n_tb
    b, h = bh // H, bh % H
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    t_ok = t < T
    i = tl.arange(0, BLOCK_H)  # (BLOCK_H,) pair index
    i_ok = i < HALF
    mask = t_ok[:, None] & i_ok[None, :]
    pos = tl.load(POS + b.to(tl.int64) * spb + t * spt, mask=t_ok, other=0).to(tl.float32)
    inv_freq = tl.load(INV_FREQ + i, mask=i_ok, other=0.0)
    angle = reduce_angle(pos[:, None] * inv_freq[None, :])  # (BLOCK_T, BLOCK_H); the product in float32 as in rope_cos_sin
    cos, sin = tl.cos(angle), SIGN * tl.sin(angle)
    row_x = X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + t.to(tl.int64)[:, None] * sxt
    row_o = OUT + (bh.to(tl.int64) * T + t.to(tl.int64))[:, None] * D  # out is contiguous (B, H, T, D)
    x1 = tl.load(row_x + i[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row_x + HALF + i[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(row_o + i[None, :], (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
    tl.store(row_o + HALF + i[None, :], (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=mask)
    if BLOCK_P > 0:  # dims past rotary_dim pass through
        j = 2 * HALF + tl.arange(0, BLOCK_P)
        pmask = t_ok[:, None] & (j < D)[None, :]
        tl.store(row_o + j[None, :], tl.load(row_x + j[None, :], mask=pmask, other=0.0), mask=pmask)


def _rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, sign: int) -> torch.Tensor:
    check_device(x=x, positions=positions, inv_freq=inv_freq)
    if x.dim() != 4:
        raise ValueError(f"x must be (B, H, T, D), got shape {tuple(x.shape)}")
    B, H, T, D = x.shape
    if positions.dim() not in (1, 2) or positions.shape[-1] != T or (positions.dim() == 2 and positions.shape[0] != B):
        raise ValueError(f"positions must be ({T},) or ({B}, {T}) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(positions.shape)}")
    if positions.is_floating_point() or positions.is_complex():
        raise ValueError(f"positions must be integers, got {positions.dtype}")
    half = inv_freq.numel()
    if inv_freq.dim() != 1 or not 0 < 2 * half <= D:
        raise ValueError(f"inv_freq must be (rotary_dim/2,) with rotary_dim <= D = {D}, got {tuple(inv_freq.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(B, H, T, D, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    spb, spt = (positions.stride(0), positions.stride(1)) if positions.dim() == 2 else (0, positions.stride(0))
    BLOCK_H = triton.next_power_of_2(half)
    BLOCK_P = triton.next_power_of_2(D - 2 * half) if D > 2 * half else 0
    BLOCK_T = max(1, min(triton.next_power_of_2(T), 2048 // BLOCK_H))
    grid = (B * H * triton.cdiv(T, BLOCK_T),)
    if inv_freq.dtype != torch.float32 or not inv_freq.is_contiguous():  # a model's own are already (no op)
        inv_freq = inv_freq.to(torch.float32).contiguous()
    _rope_kernel[grid](x, positions, inv_freq, out, H, T, D,
                       x.stride(0), x.stride(1), x.stride(2), spb, spt, SIGN=sign, HALF=half, BLOCK_T=BLOCK_T,
                       BLOCK_H=BLOCK_H, BLOCK_P=BLOCK_P, num_warps=num_warps(BLOCK_T * BLOCK_H))
    return out


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, positions, inv_freq):
        ctx.save_for_backward(positions, inv_freq)
        return _rope(x, positions, inv_freq, 1)

    @staticmethod
    def backward(ctx, dy):
        positions, inv_freq = ctx.saved_tensors
        return _rope(dy, positions, inv_freq, -1), None, None


def rope(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int | None = None, base: float = 10_000.0,
         scaling: float = 1.0, inv_freq: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE on x (B, H, T, D) at integer positions (T,) or (B, T); returns a new (B, H, T, D) tensor.

    rotary_dim (default D) dims are rotated with frequencies `rope_frequencies(rotary_dim, base,
    scaling)`, or with the given `inv_freq` (rotary_dim/2,) instead (a model's cached buffer).
    """
    if inv_freq is None:
        inv_freq = rope_frequencies(x.shape[-1] if rotary_dim is None else rotary_dim, base, scaling).to(x.device)
    elif rotary_dim is not None and 2 * inv_freq.numel() != rotary_dim:
        raise ValueError(f"inv_freq has {inv_freq.numel()} frequencies; rotary_dim {rotary_dim} needs "
                         f"{rotary_dim // 2}")
    return RoPEFunction.apply(x, positions, inv_freq)


def reference(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int | None = None, base: float = 10_000.0,
              scaling: float = 1.0) -> torch.Tensor:
    """minigemma.layers' RoPE: cos/sin tables from the positions, then apply_rope."""
    inv_freq = rope_frequencies(x.shape[-1] if rotary_dim is None else rotary_dim, base, scaling).to(x.device)
    cos, sin = rope_cos_sin(positions, inv_freq)  # (T, d) or (B, T, d)
    if cos.dim() == 3:  # one set of angles for every head
        cos, sin = cos[:, None], sin[:, None]
    return apply_rope(x, cos, sin)
