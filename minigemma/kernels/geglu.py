"""GeGLU's activation as one Triton kernel: gelu_tanh(gate) · up, forward and backward.

The MLP computes one fused projection `gate_up = gate_up_proj(x)` (..., 2F), gate the first half
and up the second, then `down_proj(gelu_tanh(gate) · up)`. This kernel takes gate_up and returns
(..., F): it reads 2F values and writes F per row, where eager PyTorch writes gelu(gate) out and
reads it back (and, in bfloat16, an upcast copy of gate as well).

    gelu_tanh(z) = ½ z (1 + tanh(u)),   u = k (z + 0.044715 z³),   k = sqrt(2/π)
    d/dz         = ½ (1 + tanh u) + ½ z (1 − tanh² u) · k (1 + 3 · 0.044715 z²)

Backward returns d gate_up = [dy · up · gelu'(gate), dy · gelu(gate)], recomputing gelu from the
saved gate_up instead of storing it. Arithmetic in float32; one rounding to the input dtype.
Reference: `minigemma.layers.gelu_tanh` applied as the MLP applies it (`reference` below).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minigemma.layers import gelu_tanh

from .utils import check_device, num_warps, tanh

SQRT_2_OVER_PI = 0.7978845608028654  # for Python; the kernels write it as a literal (a jit function may not
# read a plain Python global, and the interpreter mishandles constexpr · tensor)


@triton.jit
def _geglu_fwd_kernel(GU, OUT, n_rows, F, s_gu, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """One program: a (BLOCK_R, BLOCK_F) tile of the output, from the matching tiles of gate and up."""
    pid = tl.program_id(0)
    n_fb = tl.cdiv(F, BLOCK_F)
    rows = (pid // n_fb) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % n_fb) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < n_rows)[:, None] & (cols < F)[None, :]
    gate_p = GU + rows.to(tl.int64)[:, None] * s_gu + cols[None, :]
    gate = tl.load(gate_p, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_p + F, mask=mask, other=0.0).to(tl.float32)  # up = the second half of the row
    k = 0.7978845608028654  # SQRT_2_OVER_PI
    t = tanh(k * (gate + 0.044715 * gate * gate * gate))
    out = 0.5 * gate * (1.0 + t) * up
    out_p = OUT + rows.to(tl.int64)[:, None] * F + cols[None, :]
    tl.store(out_p, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(DY, GU, DGU, n_rows, F, s_gu, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """d gate and d up for one tile, written into the two halves of a (rows, 2F) gradient."""
    pid = tl.program_id(0)
    n_fb = tl.cdiv(F, BLOCK_F)
    rows = (pid // n_fb) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % n_fb) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < n_rows)[:, None] & (cols < F)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    gate_p = GU + r64 * s_gu + cols[None, :]
    gate = tl.load(gate_p, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_p + F, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + r64 * F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    k = 0.7978845608028654  # SQRT_2_OVER_PI
    t = tanh(k * (gate + 0.044715 * gate * gate * gate))
    gelu = 0.5 * gate * (1.0 + t)
    dgelu = 0.5 * (1.0 + t) + 0.5 * gate * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * gate * gate)
    dgate_p = DGU + r64 * (2 * F) + cols[None, :]
    tl.store(dgate_p, (dy * up * dgelu).to(DGU.dtype.element_ty), mask=mask)
    tl.store(dgate_p + F, (dy * gelu).to(DGU.dtype.element_ty), mask=mask)


def _rows(gate_up: torch.Tensor):
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must be (..., 2F) with an even last dim, got shape {tuple(gate_up.shape)}")
    g2 = gate_up.reshape(-1, gate_up.shape[-1])  # a view when the rows allow it
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    return g2, g2.shape[0], gate_up.shape[-1] // 2


def _launch(n_rows: int, F: int):
    BLOCK_F = min(triton.next_power_of_2(F), 1024)
    BLOCK_R = max(1, min(triton.next_power_of_2(max(n_rows, 1)), 2048 // BLOCK_F))
    grid = (triton.cdiv(n_rows, BLOCK_R) * triton.cdiv(F, BLOCK_F),)
    return grid, dict(BLOCK_R=BLOCK_R, BLOCK_F=BLOCK_F, num_warps=num_warps(BLOCK_R * BLOCK_F))


def geglu_forward(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2F) -> gelu_tanh(gate) · up (..., F), in gate_up's dtype."""
    check_device(gate_up=gate_up)
    g2, n_rows, F = _rows(gate_up)
    out = torch.empty(*gate_up.shape[:-1], F, dtype=gate_up.dtype, device=gate_up.device)
    if out.numel():
        grid, kw = _launch(n_rows, F)
        _geglu_fwd_kernel[grid](g2, out, n_rows, F, g2.stride(0), **kw)
    return out


def geglu_backward(dy: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """d gate_up (..., 2F) from dy (..., F)."""
    g2, n_rows, F = _rows(gate_up)
    dgu = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    if dgu.numel():
        grid, kw = _launch(n_rows, F)
        _geglu_bwd_kernel[grid](dy.contiguous(), g2, dgu, n_rows, F, g2.stride(0), **kw)
    return dgu


class GeGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return geglu_forward(gate_up)

    @staticmethod
    def backward(ctx, dy):
        (gate_up,) = ctx.saved_tensors
        return geglu_backward(dy, gate_up)


def geglu(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) · up for gate_up = [gate, up] (..., 2F) -> (..., F)."""
    return GeGLUFunction.apply(gate_up)


def reference(gate_up: torch.Tensor) -> torch.Tensor:
    """What `minigemma.layers.GeGLU.forward` does between its two projections."""
    gate, up = gate_up.chunk(2, dim=-1)
    return gelu_tanh(gate) * up


# the launcher's choice, public for `kernels.aot`
launch_config = _launch
